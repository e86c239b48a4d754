"""Trainers that only experiments use: variants and controls the benchmark compares with the default.

They are not on the public ``nnUNet_extTrainer`` path; ``nnunet-mixsup benchmark`` adds their own
folder (:func:`experiments_trainers_path`). Each is a small subclass of a public trainer. The
variants measured before the default held a class's weak labels back until the teacher labels it
derive from :class:`MixSupTrainer_WeakFromStart`, so they compute what they computed then.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from nnunet_mixsup.mixing import cutmix_pairs, mix, perturb_intensity
from nnunet_mixsup.trainers import MixSupTrainer


def experiments_trainers_path() -> str:
    """The folder of thin modules that re-export these classes (add it to ``nnUNet_extTrainer``)."""
    return str(Path(__file__).resolve().parent / "ext_trainers")


class MixSupTrainer_WeakFromStart(MixSupTrainer):
    """``MixSupTrainer`` whose weak samples speak for every class from the first epoch (the former default).

    ``weak_labels_with_teacher = False``: known background, certain negatives and multi-label
    targets of the box and tag cases act from epoch 0, also for a class the mask cases have not
    taught yet, for which they say only "not here". On the INIA19 boxes scenario that lost the
    thinnest structures in every run (``docs/inia19.md``); kept to reproduce those numbers.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weak_labels_with_teacher = False


class MixSupTrainer_MaskFirst(MixSupTrainer_WeakFromStart):
    """Ablation: ``MixSupTrainer`` before boxes and tags joined from the first epoch.

    A mask-only warm-up (stock nnU-Net on the mask cases) until *every* class reaches validation
    pseudo Dice ``schedule.min_dice`` (not before ``schedule.earliest``); then the weak cases take
    half of the plans' batch, the teacher labels every class it has been validated on, and boxes
    act through their certain negatives only (no box term). Measures what the weak-label phase
    and the per-class trust of the default add.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.schedule.per_class = False
        self.weak_kinds_from_start = ()
        self.weak_batch_extra = 0.0
        self.box_weight = 0.0


class MixSupTrainer_StrongView(MixSupTrainer_MaskFirst):
    """``MixSupTrainer_MaskFirst`` whose student sees CutMixed, intensity-perturbed weak samples (FixMatch / UniMatch).

    The teacher labels the clean, unmixed batch. Then, on the pseudo-labelled rows, a grid-aligned
    rectangle of another such row (share of the patch in ``cutmix_area``, each row with probability
    ``cutmix_prob``) replaces part of the student's input - image, real labels, allowed maps and
    pseudo labels alike (:mod:`nnunet_mixsup.mixing`; exact at every deep-supervision scale) - and
    brightness, contrast, gamma, blur and noise change (each with probability ``strong_view_prob``;
    no voxel moves, so every target stays valid). Mask samples and the warm-up are untouched; no
    extra forward pass. Under DDP each rank draws its own pairs and perturbations.

    Attributes (beyond ``MixSupTrainer``'s): cutmix_prob, cutmix_area, strong_view_prob.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.cutmix_prob = 0.5
        self.cutmix_area = (0.25, 0.5)
        self.strong_view_prob = 0.8

    def student_view(self, data, seg, allowed, pseudo, selected):
        cell = [a // b for a, b in zip(data.shape[2:], seg[-1].shape[2:])]
        partner, cut = cutmix_pairs(selected, data.shape[2:], cell, self.cutmix_area, self.cutmix_prob)
        data, pseudo = mix(data, partner, cut), mix(pseudo, partner, cut)
        seg, allowed = [mix(t, partner, cut) for t in seg], [mix(t, partner, cut) for t in allowed]
        if self.strong_view_prob > 0:
            data = perturb_intensity(data, selected, prob=self.strong_view_prob)
        return data, seg, allowed, pseudo


class MixSupTrainer_StrongViewAddWeak(MixSupTrainer_StrongView):
    """``MixSupTrainer_StrongView`` whose self-training batches keep all B mask samples and add B weak ones.

    ``weak_batch_extra = 1``: the supervised part of every step stays that of stock nnU-Net, at
    about twice the step time in the self-training phase. Its control with the same batches and
    no weak case is :class:`MixSupTrainer_MaskOnly2x`.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weak_batch_extra = 1.0


class MixSupTrainer_MaskOnly2x(MixSupTrainer_MaskFirst):
    """Control for ``weak_batch_extra``: the mask cases only, the batch doubled from the self-training start on.

    Stock nnU-Net on the mask cases (``strong_fraction = 1``: weak cases are not loaded) until the
    epoch at which ``MixSupTrainer_MaskFirst`` would start self-training, then 2B mask samples per step.
    """

    trains_on_weak_cases: ClassVar[bool] = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 1.0
        self.weak_batch_extra = 1.0


class MixSupTrainer_WarmupFirst(MixSupTrainer_WeakFromStart):
    """``MixSupTrainer`` with a mask-only warm-up: every weak case joins at ``schedule.earliest`` of the epochs.

    Until then stock nnU-Net on the mask cases (the small classes are found abruptly, late in a
    short run); from then on the default's terms - weak samples on top of the mask batch, boxes and
    tags with their own labels, teacher pseudo labels for the classes validated at
    ``schedule.min_dice``. Measures whether the weak-label terms help more from the first epoch or
    after the mask-only model has found the classes.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weak_kinds_from_start = ()


class MixSupTrainer_BoxTerm(MixSupTrainer_WeakFromStart):
    """Ablation: ``MixSupTrainer`` with the box term (``box_weight = 0.5``) for the classes the teacher does not label.

    Tightness in 3D, presence (multiple-instance: some voxel of the box cross-section is the class)
    on 2D slices of volumes, from the first epoch for every class, later for the classes below
    ``schedule.min_dice``.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.box_weight = 0.5


class MixSupTrainer_BoxFill(MixSupTrainer_WeakFromStart):
    """``MixSupTrainer`` with a positive box signal for the classes the teacher does not label.

    Two additions, both only for classes below ``schedule.min_dice`` (every class before the
    pseudo labels start): the box fill constraint (``box_fill_weight = 1``: the class fills 8-60 %
    of its boxes, pooled over the batch - Kervadec et al. 2020's size constraint) and the
    teacher's confident labels of such a class inside its boxes (``unsure_box_positives``). Measures
    whether the classes the default loses (weak samples teach only "not here" for them) are kept.
    On the INIA19 boxes scenario (2d) the network met the fill bound with a flat probability of
    about 0.08 inside every box and never learned even the mask cases (``docs/inia19.md``): a soft
    size constraint alone has this degenerate solution.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.box_fill_weight = 1.0
        self.unsure_box_positives = True


class MixSupTrainer_BoxPositives(MixSupTrainer_WeakFromStart):
    """``MixSupTrainer`` keeping the teacher's confident labels of untrusted classes inside their boxes.

    ``unsure_box_positives``: a class below ``schedule.min_dice`` gets pseudo labels where the
    teacher, constrained by the boxes, is confident it is there; the rest of its boxes stays
    unknown. The only difference to the default; no fill term.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsure_box_positives = True


class MixSupTrainer_WeakPerClass(MixSupTrainer_WeakFromStart):
    """``MixSupTrainer`` whose weak samples speak for a class only once the mask cases have taught it.

    ``weak_labels_min_dice = 0.2``: until class c's validation pseudo Dice first reaches 0.2 the
    weak samples' terms (known background, certain negatives, multi-label deep supervision, pseudo
    labels) leave class c out of the softmax, so it learns from the mask cases as in stock nnU-Net.
    Measures whether that keeps the thin INIA19 structures the former default (``_WeakFromStart``)
    loses (``docs/inia19.md``).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weak_labels_min_dice = 0.2


class MixSupTrainer_PseudoCE(MixSupTrainer):
    """``MixSupTrainer`` whose pseudo-label term is cross-entropy only (``pseudo_dice = False``).

    The teacher labels only its confident voxels; on a batch where those hold a few dozen voxels
    of a class, the batch Dice of the pseudo term had gradient norms 10-30x those of nnU-Net's
    loss on the mask samples (INIA19, ``docs/inia19.md``). Measures whether those steps hold back
    the classes the mask cases are still learning.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_dice = False


class MixSupTrainer_OpenEmptyBoxes(MixSupTrainer):
    """``MixSupTrainer`` that keeps a box unknown where the teacher finds none of its class (``open_empty_boxes``).

    On INIA19 seed 2 (mask cases that are strips, no whole 2d slice) the teacher found nothing on
    the box cases' whole slices and labelled them background, inside their boxes too; every run
    then segmented nothing on whole-brain test slices (``docs/inia19.md``). A box says its class is
    there, so such background labels contradict it; this variant drops them.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.open_empty_boxes = True
