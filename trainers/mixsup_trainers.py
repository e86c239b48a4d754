"""Re-exports of the public nnunet-mixsup trainer classes for nnU-Net's ``nnUNet_extTrainer`` lookup."""
from nnunet_mixsup.trainers import (  # noqa: F401
    MixSupTrainer,
    MixSupTrainer_DMD,
    MixSupTrainer_DualBranch,
    MixSupTrainer_MeanTeacher,
    MixSupTrainer_MLDS,
    nnUNetTrainer_MixSupBudget,
)
