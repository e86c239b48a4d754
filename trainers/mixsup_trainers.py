"""Re-exports of the nnunet-mixsup trainer classes for nnU-Net's ``nnUNet_extTrainer`` lookup."""
from nnunet_mixsup.trainer import (  # noqa: F401
    MixSupTrainer_MLDS,
    MixSupTrainer_MLDS_Demo,
    MixSupTrainer_MLDS_Uniform,
    MixSupTrainer_Negatives,
    MixSupTrainer_NoEntropy,
    MixSupTrainer_Strong75,
    MixSupTrainer_WeakOnly,
    MixSupTrainer_WeakOnly_Demo,
    nnUNetTrainer_MixSupBudget,
    nnUNetTrainer_MixSupDemo,
)
from nnunet_mixsup.trainer_distill import (  # noqa: F401
    MixSupTrainer,
    MixSupTrainer_CutMix,
    MixSupTrainer_Demo,
    MixSupTrainer_DistAlign,
    MixSupTrainer_DistAlignCutMix,
    MixSupTrainer_DMD,
    MixSupTrainer_DualBranch,
    MixSupTrainer_MaskFirst,
    MixSupTrainer_MaskFirst_StockDS,
    MixSupTrainer_MeanTeacher,
    MixSupTrainer_SelfTrain,
    MixSupTrainer_SelfTrainBox,
    MixSupTrainer_Smoke,
    MixSupTrainer_Thr50,
)
