"""Re-exports of the nnunet-mixsup trainer classes for nnU-Net's ``nnUNet_extTrainer`` lookup."""
from nnunet_mixsup.trainer import MixSupTrainer, MixSupTrainer_Smoke  # noqa: F401
