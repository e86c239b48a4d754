"""``MixSupTrainer_MLDS``: multi-label deep supervision as a drop-in comparison with ``nnUNetTrainer``."""
from __future__ import annotations

from typing import ClassVar

import torch

from nnunet_mixsup.trainers.mixsup import MixSupTrainerBase, as_list


class MixSupTrainer_MLDS(MixSupTrainerBase):
    """Multi-label deep supervision (Reiss et al., CVPR 2021) on the mask cases only.

    Full resolution: nnU-Net's Dice + CE (times nnU-Net's full-resolution scale weight). Every
    coarser output: sigmoid + BCE per class against the max-pooled one-hot target (kernel =
    stride = that output's cumulative pooling, anisotropic where the plans are), masked where the
    pooled target is unknown (:meth:`~MixSupTrainerBase.mlds_term`), plus certain negatives. Same
    data as ``nnUNetTrainer`` (``strong_fraction = 1``: weak cases are not loaded); only the
    deep-supervision targets differ.
    """

    trains_on_weak_cases: ClassVar[bool] = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 1.0
        self.loss_term_names = ("supervised", "mlds", "negatives")

    def forward_and_loss(self, data, seg, allowed, batch):
        output = as_list(self.network(data))
        w0 = self.deep_supervision_weights(len(output))[0]
        return {"supervised": w0 * self.supervised_loss(self.fullres_loss, output[0], seg[0], batch),
                "mlds": self.mlds_term(output, seg[0], allowed[0]),
                "negatives": self.negatives_term(output[0], allowed[0])}
