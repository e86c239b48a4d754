"""``nnUNetTrainer_MixSupBudget``: stock nnU-Net with the benchmark's budget, the baselines' trainer."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_mixsup.trainers.mixsup import apply_env_budget


class nnUNetTrainer_MixSupBudget(nnUNetTrainer):
    """Stock ``nnUNetTrainer`` whose schedule follows ``nnUNet_mixsup_epochs`` / ``_iterations``.

    The baseline of ``nnunet-mixsup benchmark``: identical to ``nnUNetTrainer`` except that it
    honours the same budget variables as the MixSup trainers, so every run of a comparison trains
    for the same number of epochs and iterations.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_env_budget(self)
