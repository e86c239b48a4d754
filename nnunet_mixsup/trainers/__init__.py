"""The trainers users choose from (``nnUNetv2_train ... -tr <name>``); see docs/trainers.md.

- :class:`MixSupTrainer` - the default (:mod:`.mixsup`, with the plumbing they all share).
- :class:`MixSupTrainer_MLDS` - multi-label deep supervision on the mask cases (:mod:`.mlds`).
- :class:`MixSupTrainer_MeanTeacher`, :class:`MixSupTrainer_DualBranch`, :class:`MixSupTrainer_DMD` -
  teacher-student schemes (:mod:`.teacher_student`).
- :class:`nnUNetTrainer_MixSupBudget` - stock nnU-Net with the benchmark budget (:mod:`.baseline`).
"""
from nnunet_mixsup.trainers.baseline import nnUNetTrainer_MixSupBudget
from nnunet_mixsup.trainers.mixsup import MixSupTrainer, MixSupTrainerBase, SelfTrainingSchedule
from nnunet_mixsup.trainers.mlds import MixSupTrainer_MLDS
from nnunet_mixsup.trainers.teacher_student import (
    MixSupTrainer_DMD,
    MixSupTrainer_DualBranch,
    MixSupTrainer_MeanTeacher,
    TeacherStudentTrainer,
)

PUBLIC_TRAINERS = ("MixSupTrainer", "MixSupTrainer_MLDS", "MixSupTrainer_MeanTeacher", "MixSupTrainer_DualBranch",
                   "MixSupTrainer_DMD", "nnUNetTrainer_MixSupBudget")

__all__ = ["PUBLIC_TRAINERS", "MixSupTrainer", "MixSupTrainerBase", "MixSupTrainer_DMD", "MixSupTrainer_DualBranch",
           "MixSupTrainer_MLDS", "MixSupTrainer_MeanTeacher", "SelfTrainingSchedule", "TeacherStudentTrainer",
           "nnUNetTrainer_MixSupBudget"]
