"""Re-exports of the experiment-only trainers for ``nnUNet_extTrainer`` (added by ``nnunet-mixsup benchmark``)."""
from nnunet_mixsup.lab.experiment_trainers import (  # noqa: F401
    MixSupTrainer_BoxFill,
    MixSupTrainer_BoxPositives,
    MixSupTrainer_BoxTerm,
    MixSupTrainer_MaskFirst,
    MixSupTrainer_MaskOnly2x,
    MixSupTrainer_OpenEmptyBoxes,
    MixSupTrainer_PseudoCE,
    MixSupTrainer_StrongView,
    MixSupTrainer_StrongViewAddWeak,
    MixSupTrainer_WarmupFirst,
    MixSupTrainer_WeakFromStart,
    MixSupTrainer_WeakPerClass,
)
