"""Teacher-student trainers: mean-taught deep supervision, dual-branch distillation, deep mutual distillation.

All three extend :class:`nnunet_mixsup.trainer.MixSupTrainer_WeakOnly` (mixed-supervision loader,
MLDS, certain negatives, box tightness, entropy) and add one teacher-student scheme. The
self-training line (``SelfTrain`` -> ``MaskFirst`` -> ``MaskFirst_StockDS``) grew out of the
cpu-mini measurements, and the default users run, :class:`MixSupTrainer`, is its last step. The
reasons for each step are in the class docstrings and in docs/BENCHMARKS.md. Follow a
batch: ``train_step`` -> :meth:`forward_and_loss` (student forward through ``self.network``, the
extra forward passes, pseudo labels) -> named loss terms (plain modules of
:mod:`nnunet_mixsup.losses`) -> one optimizer step -> :meth:`after_optimizer_step`.

What is exported: ``self.network`` is always one stock nnU-Net network (student / first network),
so ``checkpoint['network_weights']`` loads into ``build_network_architecture(...,
enable_deep_supervision=False)`` and stock ``nnUNetv2_predict`` costs what stock nnU-Net costs.
Teacher, second decoder or second network live in ``self.extra_modules``; ``MixSupTrainerBase``
saves them in the checkpoint (``mixsup_state``) and restores them on ``--c``; trainable ones share
nnU-Net's optimizer (a second parameter group) and grad scaler.

DDP (``-num_gpus N``): the student is wrapped by nnU-Net; trainable extra modules get their own
DDP wrapper in ``MixSupTrainerBase.initialize`` (gradients all-reduced, initial weights broadcast from
rank 0); the EMA teacher is not trained and is updated from the synchronised student weights, so
it is identical on every rank without communication. Feature taps (forward hooks) read the
encoder / last decoder stage of the plain module inside the wrappers; torch.compile is disabled
for the hook-based variants because hooks on compiled submodules are not reliably called.
nnU-Net's batch Dice all-gathers across ranks, so every loss term is computed on every rank even
when its batch has no sample of that kind (targets masked, never sliced);
``tests/test_ddp_cpu.py`` checks this with gloo on CPU (a rank without mask samples, DDP-wrapped
network and extra module, identical gradients). The trainers themselves need CUDA under DDP.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from nnunet_mixsup.losses import (
    EntropyLoss,
    KLDistillationLoss,
    SoftDiceAgreementLoss,
    constrain_pseudo_labels,
    ema_update,
    pseudo_label_map,
)
from nnunet_mixsup.manifest import TYPE_CODES
from nnunet_mixsup.mixing import cutmix_pairs, mix, perturb_intensity
from nnunet_mixsup.trainer import (
    MixSupTrainer_WeakOnly,
    as_list,
    load_pretrained_like_nnunet,
    nnUNetTrainer_MixSupDemo,
    set_budget,
    unwrap,
)


class FeatureTap:
    """Keeps the latest output of a submodule (a forward hook), e.g. the encoder's skip list."""

    def __init__(self, module: nn.Module) -> None:
        self.value = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        self.value = output

    def pop(self):
        """The captured output (and forget it, so a stale value is never reused)."""
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("feature tap: the hooked module did not run in this forward pass")
        return v


def batch_subset_pays(n_rows: int, n_total: int, device: torch.device) -> bool:
    """Whether a forward pass over ``n_rows`` of a batch of ``n_total`` is cheaper than over the whole batch.

    True whenever rows are saved, except for a single row on the CPU: torch's CPU convolution sends
    one-sample inputs of small patches to its native kernel instead of oneDNN (``use_mkldnn`` in
    ATen's Convolution.cpp), measured 4-5x slower per 3D convolution at 20x32x40 with 32 channels
    than the two-sample batch - so there one row costs more than two (docs/BENCHMARKS.md).
    """
    return n_rows < n_total and (device.type != "cpu" or n_rows > 1)


def linear_rampup(epoch: int, length: int) -> float:
    """0 -> 1 linearly over ``length`` epochs (1 from the start if ``length`` <= 0)."""
    return 1.0 if length <= 0 else min(1.0, (epoch + 1) / length)


class _TeacherStudentBase(MixSupTrainer_WeakOnly):
    """Shared plumbing: sample groups of a batch and the ramp-up."""

    distill_rampup = 0.25

    def _do_i_compile(self) -> bool:
        return False

    def distill_ramp(self) -> float:
        """Weight factor of the distillation terms: linear 0 -> 1 over ``distill_rampup`` of the epochs."""
        return linear_rampup(self.current_epoch, round(self.distill_rampup * self.num_epochs))

    def fresh_network(self) -> nn.Module:
        """A newly initialised network from the plans, like nnU-Net's own (second decoder / network)."""
        return self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                               self.num_input_channels, self.label_manager.num_segmentation_heads,
                                               self.enable_deep_supervision).to(self.device)

    def sample_groups(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_mask, is_weak) (B,) bool tensors from the loader's ``sup_type``."""
        is_mask = batch["sup_type"].to(device) == TYPE_CODES["mask"]
        return is_mask, ~is_mask



class MixSupTrainer_MeanTeacher(_TeacherStudentBase):
    """Mean-taught deep supervision (Reiss et al., CVPR 2021) on top of the weak-label losses.

    An EMA teacher (``theta_t = ema_decay * theta_t + (1 - ema_decay) * theta_s`` after every
    step) sees the batch with Gaussian input noise (``teacher_noise_std``; the student sees the
    clean augmented batch: perturbation consistency). Its softmax is constrained by the weak
    labels (class c zeroed outside the boxes of c and for classes absent from the tags) and, on
    weak / unlabelled samples, fills the unknown voxels with pseudo labels where its confidence is
    at least ``pseudo_threshold``. These pseudo labels

    - feed the MLDS pooled targets of the coarse outputs (so coarse scales learn from them), and
    - train a separate full-resolution pseudo-label head (a 1x1 conv on the last decoder stage);
      the clean head - the one exported and used for the teacher's pseudo labels - sees real
      labels only, unless ``pseudo_on_clean_head`` is set.

    Attributes:
        ema_decay, teacher_noise_std, pseudo_threshold, pseudo_weight,
        distill_rampup: fraction of the epochs over which the pseudo-label terms ramp up linearly,
        pseudo_types: the supervision kinds whose samples get pseudo labels (default: every weak kind),
        pseudo_on_clean_head: train the exported head on pseudo labels too (no separate head).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ema_decay = 0.99
        self.teacher_noise_std = 0.1
        self.pseudo_threshold = 0.7
        self.pseudo_weight = 1.0
        self.pseudo_on_clean_head = False
        self.pseudo_types: tuple[str, ...] = ("box", "tags", "none")
        self.loss_term_names = ("supervised", "mlds", "negatives", "box", "entropy", "pseudo")

    def build_extra_modules(self) -> dict[str, nn.Module]:
        net = unwrap(self.network)
        teacher = copy.deepcopy(net)
        teacher.requires_grad_(False)
        teacher.eval()
        modules: dict[str, nn.Module] = {"teacher": teacher}
        if not self.pseudo_on_clean_head:
            head = copy.deepcopy(net.decoder.seg_layers[-1])
            head.reset_parameters()
            modules["pseudo_head"] = head
            self.decoder_tap = FeatureTap(net.decoder.stages[-1])
        return modules

    @torch.no_grad()
    def start_extra_modules(self) -> None:
        """The EMA teacher starts as a copy of the student as it is when training starts.

        Built in ``initialize()``, the teacher copied the freshly initialised student; with
        ``-pretrained_weights`` nnU-Net loads the student's weights only afterwards.
        """
        self.extra_modules["teacher"].load_state_dict(unwrap(self.network).state_dict())

    @torch.no_grad()
    def teacher_probs(self, data: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) float32 softmax of the EMA teacher on ``data`` + Gaussian noise (``teacher_noise_std``)."""
        teacher = self.extra_modules["teacher"]
        noisy = data + self.teacher_noise_std * torch.randn_like(data) if self.teacher_noise_std > 0 else data
        return torch.softmax(as_list(teacher(noisy))[0].float(), dim=1)

    def adjust_teacher_probs(self, probs: torch.Tensor, seg0: torch.Tensor, weak: torch.Tensor,
                             rows: torch.Tensor) -> torch.Tensor:
        """Hook between the teacher's softmax on the batch ``rows`` and the weak-label constraint (identity here)."""
        return probs

    @torch.no_grad()
    def teacher_pseudo_labels(self, data: torch.Tensor, seg0: torch.Tensor, allowed0: torch.Tensor,
                              weak: torch.Tensor) -> torch.Tensor:
        """Real labels where known; on the ``weak`` samples, confident constrained teacher labels elsewhere.

        The teacher runs on the ``weak`` rows only where that is cheaper (:func:`batch_subset_pays`):
        every other row keeps its real labels, so its output there would be thrown away. The teacher
        is in eval mode and nnU-Net's networks normalise per sample (instance norm), so a row's
        output does not depend on the rest of the batch - the same pseudo labels as a full-batch
        pass (tested) at the weak rows' share of the cost. No collective operation is involved, so
        DDP ranks may differ in their number of weak rows.
        """
        pseudo = seg0.clone()
        rows = weak.nonzero().flatten()
        if rows.numel() == 0:
            return pseudo
        if not batch_subset_pays(rows.numel(), weak.numel(), data.device):
            rows = torch.arange(weak.numel(), device=weak.device)
        probs = self.teacher_probs(data[rows])
        probs = constrain_pseudo_labels(self.adjust_teacher_probs(probs, seg0, weak, rows), allowed0[rows].float())
        pseudo[rows] = pseudo_label_map(probs, seg0[rows], self.label_manager.ignore_label, self.pseudo_threshold,
                                        weak[rows])
        return pseudo

    def pseudo_samples(self, batch: dict, device: torch.device) -> torch.Tensor:
        """(B,) bool: the samples whose unknown voxels get pseudo labels (kinds in ``pseudo_types``)."""
        codes = torch.tensor([TYPE_CODES[t] for t in self.pseudo_types], device=device)
        return torch.isin(batch["sup_type"].to(device), codes)

    def add_pseudo_terms(self, terms: dict, output: list[torch.Tensor], logits: torch.Tensor, data: torch.Tensor,
                         seg: list[torch.Tensor], allowed: list[torch.Tensor], batch: dict) -> None:
        """Teacher pseudo labels into the MLDS targets (``terms["mlds"]``) and ``terms["pseudo"]`` on ``logits``."""
        selected = self.pseudo_samples(batch, data.device)
        pseudo = self.teacher_pseudo_labels(data, seg[0], allowed[0], selected)
        self.pseudo_label_terms(terms, output, logits, pseudo, allowed[0], selected, batch)

    def pseudo_label_terms(self, terms: dict, output: list[torch.Tensor], logits: torch.Tensor, pseudo: torch.Tensor,
                           allowed0: torch.Tensor, selected: torch.Tensor, batch: dict) -> None:
        """``terms["mlds"]`` with the pseudo labels in its pooled targets and ``terms["pseudo"]`` on ``logits``."""
        terms["mlds"] = self.mlds_weight * self.mlds_term(output, pseudo, allowed0, batch)
        # the pseudo-label term covers the selected samples only (mask samples are in "supervised"),
        # exactly as nnU-Net's loss on them as a sub-batch (rows_loss: DDP-safe for batch Dice too)
        terms["pseudo"] = self.distill_ramp() * self.pseudo_weight * self.rows_loss(
            self.fullres_loss, logits, pseudo, selected)

    def forward_and_loss(self, data, seg, allowed, batch):
        output = as_list(self.network(data))
        terms = self.compute_loss(output, seg, allowed, batch)
        logits = output[0] if self.pseudo_on_clean_head else \
            self.extra_modules["pseudo_head"](self.decoder_tap.pop())
        if self.label_manager.ignore_label is None:  # nothing is unknown anywhere: no pseudo labels needed
            terms["pseudo"] = self.distill_ramp() * self.pseudo_weight * self.fullres_loss(logits, seg[0])
            return terms
        self.add_pseudo_terms(terms, output, logits, data, seg, allowed, batch)
        return terms

    def after_optimizer_step(self) -> None:
        ema_update(self.extra_modules["teacher"], unwrap(self.network), self.ema_decay)


class MixSupTrainer_SelfTrain(MixSupTrainer_MeanTeacher):
    """Delayed self-training: weak-label-constrained EMA-teacher pseudo labels on the exported head.

    The mean teacher with three changes that follow from the cpu-mini measurements
    (docs/BENCHMARKS.md):

    - **Delayed start.** For the first ``pseudo_start`` of the epochs the trainer is exactly
      :class:`~nnunet_mixsup.trainer.MixSupTrainer` (no teacher forward pass, no pseudo labels):
      an early teacher is confident only about background, and its pseudo labels suppressed the
      small class (the mean teacher missed the ventricles on seed 0). Afterwards the pseudo-label
      term ramps up linearly over ``distill_rampup`` of the epochs.
    - **Pseudo labels on the clean head** (``pseudo_on_clean_head``): nnU-Net's Dice + CE on the
      weak samples of the kinds in ``pseudo_types``, against real labels where known and the
      teacher's confident (``pseudo_threshold``), constrained labels elsewhere - so inside a box the
      exported head gets negatives too, not only the box term's one positive voxel.
    - **The box presence / tightness term fades out** as the pseudo-label term ramps in
      (``fade_box_term``): its max-voxel positives found more of the small class but taught it
      on look-alike tissue (ventricle false positives on CSF).

    Attributes (beyond the mean teacher's): pseudo_start, fade_box_term.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_on_clean_head = True
        self.pseudo_start = 0.4
        self.distill_rampup = 0.2
        self.pseudo_threshold = 0.8
        self.fade_box_term = True

    def distill_ramp(self) -> float:
        """0 before ``pseudo_start`` of the epochs, then linear 0 -> 1 over ``distill_rampup`` of them."""
        start = round(self.pseudo_start * self.num_epochs)
        if self.current_epoch < start:
            return 0.0
        return linear_rampup(self.current_epoch - start, round(self.distill_rampup * self.num_epochs))

    def forward_and_loss(self, data, seg, allowed, batch):
        output = as_list(self.network(data))
        terms = self.compute_loss(output, seg, allowed, batch)
        ramp = self.distill_ramp()
        if self.fade_box_term:
            terms["box"] = (1.0 - ramp) * terms["box"]
        if ramp == 0 or self.label_manager.ignore_label is None:
            # the ramp depends on the epoch only, so every DDP rank takes the same branch
            terms["pseudo"] = output[0].sum() * 0
            return terms
        self.add_pseudo_terms(terms, output, output[0], data, seg, allowed, batch)
        return terms


class MixSupTrainer_SelfTrainBox(MixSupTrainer_SelfTrain):
    """``MixSupTrainer_SelfTrain`` with pseudo labels on box samples only (ablation).

    On tag and unlabelled samples nothing constrains the teacher (in the demo data every class is
    present in every image), so its false positives come back as training targets; on box samples
    the boxes remove them outside the box of each class.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_types = ("box",)


class MixSupTrainer_MaskFirst(MixSupTrainer_SelfTrain):
    """Stock nnU-Net on the mask cases until it segments every class, then self-training on the weak cases.

    ``MixSupTrainer_SelfTrain`` with changes that follow from its measured failure modes
    (docs/BENCHMARKS.md, sessions 11-13: weak positives teach the small class on look-alike
    tissue and grow the inner classes into their neighbours; a teacher that has not yet found a
    class turns it into confident background pseudo labels and it is never learned):

    - **Mask-only warm-up.** Every batch holds mask cases only (:meth:`mask_only_batches_left`)
      until self-training starts, so this phase is ``MixSupTrainer_MLDS`` on the mask cases (with
      ``mlds_on_mask_samples = False``, as in ``MixSupTrainer_MaskFirst_StockDS``, exactly
      ``nnUNetTrainer``) and the EMA teacher that labels the weak cases afterwards is the
      mask-only model.
    - **Start when the teacher is ready** (:meth:`self_training_start`): at the first epoch
      after ``pseudo_start`` of the epochs at which nnU-Net's own validation pseudo Dice of the
      previous epoch reached ``start_min_dice`` for every class. Small classes are learned
      abruptly (every run first predicts none of them), at an epoch that varies from run to run,
      so a fixed start epoch sometimes came too early. If a class is never found, self-training
      never starts and the run stays stock nnU-Net on the mask cases.
    - **No box presence / tightness term** (``box_weight = 0``): boxes act only through what is
      certain - negatives outside the box of each class, in the loss and in the pseudo labels
      (class c is zeroed outside its boxes and for classes absent from the tags before the
      confidence threshold).

    Afterwards batches are mixed (``strong_fraction``; the loaders are rebuilt once, at the start
    epoch) and the constrained pseudo-label term ramps in over ``distill_rampup`` of the epochs.
    The start epoch is derived from the logged validation Dice, which nnU-Net saves in every
    checkpoint, so ``--c`` resumes the same schedule; under DDP every rank logs the same
    (all-gathered) Dice and so takes the same decision.

    With ``weak_batch_extra`` > 0 the mask samples keep the whole batch after the start as well
    and ``round(weak_batch_extra * B)`` weak samples come on top (labelled and unlabelled batches
    side by side, as semi-supervised methods train): the supervised part of every step stays that
    of stock nnU-Net, at the price of a larger batch in the self-training phase.

    Attributes (beyond ``SelfTrain``'s): start_min_dice, weak_batch_extra.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.box_weight = 0.0
        self.start_min_dice = 0.5
        self.weak_batch_extra = 0.0
        self._loaders_in_warmup = False

    def extra_weak_samples(self) -> int:
        """Weak samples added on top of the plans' batch: 0 without ``weak_batch_extra`` or before the start."""
        if self.weak_batch_extra <= 0 or self.mask_only_batches_left() > 0:
            return 0
        return max(1, round(self.weak_batch_extra * self.batch_size))

    def train_batch_size(self) -> int:
        """The plans' batch size plus :meth:`extra_weak_samples`."""
        return self.batch_size + self.extra_weak_samples()

    def loader_strong_fraction(self) -> float:
        """``strong_fraction``, or the plans' batch size over the enlarged batch when weak samples come on top."""
        extra = self.extra_weak_samples()
        return self.strong_fraction if extra == 0 else self.batch_size / (self.batch_size + extra)

    def teacher_ready(self, dice_per_class: Sequence[float]) -> bool:
        """Every class's validation pseudo Dice >= ``start_min_dice`` (NaN - class absent from validation - counts as ready)."""
        return all(np.isnan(d) or d >= self.start_min_dice for d in dice_per_class)

    def self_training_start(self) -> int | None:
        """The epoch at which self-training starts, or None if it has not started by ``current_epoch``."""
        history = self.logger.local_logger.my_fantastic_logging.get("dice_per_class_or_region", [])
        for epoch in range(max(1, round(self.pseudo_start * self.num_epochs)), self.current_epoch + 1):
            if epoch - 1 < len(history) and self.teacher_ready(history[epoch - 1]):
                return epoch
        return None

    def distill_ramp(self) -> float:
        """0 before :meth:`self_training_start`, then linear 0 -> 1 over ``distill_rampup`` of the epochs."""
        start = self.self_training_start()
        if start is None:
            return 0.0
        return linear_rampup(self.current_epoch - start, round(self.distill_rampup * self.num_epochs))

    def mask_only_batches_left(self) -> int:
        """Unbounded until self-training has started, 0 afterwards (also after ``--c``)."""
        return 0 if self.self_training_start() is not None else 2 ** 62

    def get_dataloaders(self):
        loaders = super().get_dataloaders()
        self._loaders_in_warmup = self.mask_only_batches_left() > 0
        return loaders

    def on_epoch_start(self):
        if self._loaders_in_warmup and self.self_training_start() is not None:
            self.print_to_log_file(f"epoch {self.current_epoch}: every class reached validation pseudo Dice "
                                   f">= {self.start_min_dice}; self-training on the weak cases starts")
            for loader in (self.dataloader_train, self.dataloader_val):
                if hasattr(loader, "_finish"):
                    loader._finish()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        super().on_epoch_start()


class MixSupTrainer_MaskFirst_StockDS(MixSupTrainer_MaskFirst):
    """``MixSupTrainer_MaskFirst`` with nnU-Net's own deep supervision on the mask samples (MLDS on weak ones only).

    MLDS replaces the coarse outputs' Dice + CE by per-class BCE, whose gradient for a small class
    is dominated by its negatives: in the mask-only warm-up the ventricles were found later than
    by stock nnU-Net (not by epoch 39 on a seed where ``nnUNetTrainer`` found them at epoch 22).
    With ``mlds_on_mask_samples = False`` the warm-up is exactly ``nnUNetTrainer`` on the mask
    cases; pooled multi-label targets still carry the weak samples' certain negatives and pseudo
    labels to the coarse outputs.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mlds_on_mask_samples = False


class MixSupTrainer(MixSupTrainer_MaskFirst_StockDS):
    """The default mixed-supervision trainer (``nnUNetv2_train ... -tr MixSupTrainer``).

    Identical to :class:`MixSupTrainer_MaskFirst_StockDS`: stock nnU-Net on the mask cases until it
    segments every class, then mixed batches with the EMA teacher's weak-label-constrained pseudo
    labels on the exported head, certain negatives from boxes and tags, MLDS on the weak samples
    and a ramped entropy term on unlabelled ones. It is the best of the schemes measured with 3
    seeds in sessions 11-13 (+4.7 Dice points over the previous default ``MixSupTrainer_WeakOnly``)
    but not above the mask-only baseline on the cpu-mini benchmark: +0.0 +- 2.1 points in session
    13, -1.5 +- 1.1 when retrained side by side in session 14, -1.0 +- 2.7 over 5 seeds in
    session 15 (docs/BENCHMARKS.md). ``MixSupTrainer_CutMix`` (+0.7) was above it in session 14,
    too little over 3 seeds to switch. ``MixSupTrainer_StrongView`` was above it on 4 of 5 seeds in session 17 (+1.7 points,
    +0.7 +- 2.8 vs the baseline), not enough to switch. Change the default only with numbers.
    """


class MixSupTrainer_Thr50(MixSupTrainer):
    """``MixSupTrainer`` with pseudo labels wherever the teacher's probability is >= 0.5 (not 0.8).

    A high threshold keeps the interior of compact classes and drops most voxels of thin ones (at
    4 mm grey matter is nearly all boundary), so the pseudo labels over-represent the compact class
    and the student's boundary moves into the thin one (measured: white matter grows into grey
    matter). At 0.5 almost every voxel the teacher decides is kept, in its own class proportions.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pseudo_threshold = 0.5


class MixSupTrainer_CutMix(MixSupTrainer):
    """``MixSupTrainer`` whose student sees CutMixed weak samples once self-training has started.

    In ``MixSupTrainer`` teacher and student see the same augmented patch, so the pseudo-label
    term mostly asks the student to repeat its own EMA. Here the teacher labels the unmixed batch
    and then, on the weak samples, a grid-aligned rectangle of another weak sample (share of the
    patch in ``cutmix_area``, each weak sample mixed with probability ``cutmix_prob``) replaces
    part of the student's input; image, real labels, allowed maps and pseudo labels are mixed
    alike (:mod:`nnunet_mixsup.mixing`; exact at every deep-supervision scale), so every loss term
    keeps its meaning. Mask samples are never mixed, and the warm-up is unchanged. The cost per
    step is ``MixSupTrainer``'s (no extra forward pass). Under DDP each rank draws its own pairs
    and rectangles within its own batch; no collective operation depends on them.

    Attributes (beyond ``MixSupTrainer``'s): cutmix_prob, cutmix_area.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.cutmix_prob = 0.5
        self.cutmix_area = (0.25, 0.5)

    def forward_and_loss(self, data, seg, allowed, batch):
        ramp = self.distill_ramp()
        if ramp == 0 or self.label_manager.ignore_label is None:  # epoch-dependent: the same on every DDP rank
            return super().forward_and_loss(data, seg, allowed, batch)
        selected = self.pseudo_samples(batch, data.device)
        pseudo = self.teacher_pseudo_labels(data, seg[0], allowed[0], selected)  # the teacher sees the unmixed batch
        cell = [a // b for a, b in zip(data.shape[2:], seg[-1].shape[2:])]
        partner, cut = cutmix_pairs(selected, data.shape[2:], cell, self.cutmix_area, self.cutmix_prob)
        data, pseudo = mix(data, partner, cut), mix(pseudo, partner, cut)
        seg, allowed = [mix(t, partner, cut) for t in seg], [mix(t, partner, cut) for t in allowed]
        output = as_list(self.network(self.student_view(data, selected)))
        terms = self.compute_loss(output, seg, allowed, batch)
        if self.fade_box_term:
            terms["box"] = (1.0 - ramp) * terms["box"]
        self.pseudo_label_terms(terms, output, output[0], pseudo, allowed[0], selected, batch)
        return terms

    def student_view(self, data: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Hook: the (already CutMixed) input the student sees; ``selected`` rows carry pseudo labels. Identity here."""
        return data


class MixSupTrainer_StrongView(MixSupTrainer_CutMix):
    """``MixSupTrainer_CutMix`` whose student also sees random intensity changes on the weak samples.

    FixMatch / UniMatch: the teacher labels a weak view, the student must reproduce the labels on
    a strong one. nnU-Net's own augmentation happens in the loader, before the batch is split
    into the two views, so in ``MixSupTrainer_CutMix`` the only difference between them is the
    pasted rectangle (and the teacher's input noise). Here the student's weak samples also get
    brightness, contrast, gamma, blur and noise (:func:`~nnunet_mixsup.mixing.perturb_intensity`,
    each with probability ``strong_view_prob``); no voxel moves, so every target stays valid.
    Mask samples and the warm-up are untouched; no extra forward pass. Under DDP each rank draws
    its own perturbations (no collective operation depends on them).

    Attributes (beyond ``MixSupTrainer_CutMix``'s): strong_view_prob.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_view_prob = 0.8

    def student_view(self, data: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """``data`` with :func:`~nnunet_mixsup.mixing.perturb_intensity` on the ``selected`` rows."""
        return perturb_intensity(data, selected, prob=self.strong_view_prob)


class MixSupTrainer_StrongViewAddWeak(MixSupTrainer_StrongView):
    """``MixSupTrainer_StrongView`` whose self-training batches keep all B mask samples and add B weak ones.

    In ``MixSupTrainer`` the weak samples take half of each batch once self-training starts, so
    the mask cases get half the gradient stock nnU-Net gives them for the rest of the run
    (``weak_batch_extra = 1``; see :class:`MixSupTrainer_MaskFirst`). The self-training phase
    costs about twice the step time. Its control with the same batches but no weak samples is
    :class:`MixSupTrainer_MaskOnly2x`.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weak_batch_extra = 1.0


class MixSupTrainer_MaskOnly2x(MixSupTrainer):
    """Control for ``weak_batch_extra``: the mask cases only, the batch doubled from the same epoch on.

    Stock nnU-Net on the mask cases (``strong_fraction = 1``: weak cases are not loaded, no
    pseudo labels) until the epoch at which ``MixSupTrainer`` would start self-training, then
    2B mask samples per step. Whatever :class:`MixSupTrainer_StrongViewAddWeak` gains over this
    comes from the weak cases, not from the larger batch.
    """

    trains_on_weak_cases: ClassVar[bool] = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 1.0
        self.weak_batch_extra = 1.0


class MixSupTrainer_Smoke(MixSupTrainer):
    """A few iterations only: for smoke tests and CI (2 epochs x 4 iterations, 2 validation steps)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, 2, 4, 2)


class MixSupTrainer_Demo(MixSupTrainer):
    """``MixSupTrainer`` with the demo's short budget (same as :class:`nnUNetTrainer_MixSupDemo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, nnUNetTrainer_MixSupDemo.demo_epochs, nnUNetTrainer_MixSupDemo.demo_iterations)


class MixSupTrainer_DualBranch(_TeacherStudentBase):
    """Dual-branch confidence-maximising distillation (Liu et al., MedIA 2023).

    One shared encoder, two decoders built from the plans. The teacher decoder is trained on the
    mask samples only (nnU-Net's Dice + CE with deep supervision); the student decoder - the one in
    ``self.network`` and therefore the one exported - is trained on everything with the weak-label
    losses (nnU-Net's loss on known voxels, MLDS, negatives, box tightness), plus on the
    less-supervised (non-mask) samples an entropy term (confidence maximisation) and
    ``KL(teacher || student)`` against the detached, weak-label-constrained teacher softmax.

    Attributes:
        teacher_weight, kl_weight, kl_temperature, entropy_weight (inherited),
        distill_rampup: fraction of the epochs over which KL and entropy ramp up linearly,
        teacher_on_mask_slice: backward pass of the teacher decoder on the mask samples only
            (:meth:`teacher_sliced`; same gradients, single process only, where it pays:
            :meth:`slice_teacher`).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_weight = 1.0
        self.kl_weight = 1.0
        self.kl_temperature = 1.0
        self.teacher_on_mask_slice = True
        self.loss_term_names = ("supervised", "mlds", "negatives", "box", "entropy", "teacher", "kl")

    def build_extra_modules(self) -> dict[str, nn.Module]:
        net = unwrap(self.network)
        decoder = self.fresh_network().decoder
        decoder.encoder = None  # the teacher decoder reads the student's encoder skips, not its own encoder
        self.encoder_tap = FeatureTap(net.encoder)
        self.kl_loss = KLDistillationLoss(self.kl_temperature)
        self.entropy_loss = EntropyLoss()
        return {"teacher_decoder": decoder}

    @torch.no_grad()
    def start_extra_modules(self) -> None:
        """With ``-pretrained_weights``, the teacher decoder starts from the pretrained decoder (output layers fresh)."""
        if self.network_was_replaced():
            load_pretrained_like_nnunet(unwrap(self.extra_modules["teacher_decoder"]), unwrap(self.network).decoder)

    def forward_and_loss(self, data, seg, allowed, batch):
        output = as_list(self.network(data))
        skips = self.encoder_tap.pop()
        is_mask, weak = self.sample_groups(batch, data.device)
        terms = self.compute_loss(output, seg, allowed, batch)
        if self.slice_teacher(is_mask):
            terms["teacher"], t_logits = self.teacher_sliced(skips, seg, is_mask)
        else:
            terms["teacher"], t_logits = self.teacher_full_batch(skips, seg, is_mask)
        ramp = self.distill_ramp()
        t_probs = constrain_pseudo_labels(torch.softmax(t_logits.float(), dim=1), allowed[0].float())
        terms["kl"] = ramp * self.kl_weight * self.kl_loss(output[0], torch.log(t_probs), sample_mask=weak)
        terms["entropy"] = ramp * self.entropy_weight * self.entropy_loss(output[0], sample_mask=weak)
        return terms

    def slice_teacher(self, is_mask: torch.Tensor) -> bool:
        """Whether :meth:`teacher_sliced` runs: ``teacher_on_mask_slice``, single process, an ignore label,
        and both parts of the batch worth a pass of their own (:func:`batch_subset_pays`: on the CPU
        two one-sample passes cost more than one two-sample pass)."""
        if not self.teacher_on_mask_slice or self.is_ddp or self.label_manager.ignore_label is None:
            return False
        n, b = int(is_mask.sum()), is_mask.numel()
        return batch_subset_pays(n, b, is_mask.device) and batch_subset_pays(b - n, b, is_mask.device)

    def teacher_loss(self, t_out: list[torch.Tensor], seg_t: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """nnU-Net's loss (with its deep supervision if enabled) of the teacher decoder on the batch ``rows``.

        Equal to nnU-Net's loss on those rows as a sub-batch (:meth:`rows_loss`); without an
        ignore label every sample is a mask sample and the whole batch is used.
        """
        if self.enable_deep_supervision:
            loss_fn, out, tgt = self.loss, t_out, seg_t
        else:
            loss_fn, out, tgt = self.fullres_loss, t_out[0], seg_t[0]
        if self.label_manager.ignore_label is None or bool(rows.all()):
            return self.teacher_weight * loss_fn(out, tgt)
        return self.teacher_weight * self.rows_loss(loss_fn, out, tgt, rows)

    def teacher_full_batch(self, skips, seg, is_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher term, detached full-resolution teacher logits), decoding the whole batch.

        The teacher learns from the mask samples only (:meth:`teacher_loss` on their rows).
        """
        t_out = as_list(self.extra_modules["teacher_decoder"](skips))
        return self.teacher_loss(t_out, seg, is_mask), t_out[0].detach()

    def teacher_sliced(self, skips, seg, is_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The same term and logits as :meth:`teacher_full_batch`, with the backward pass on mask samples only.

        The teacher decoder decodes the mask samples with gradients and the other samples under
        ``no_grad`` (they only provide KL targets), which saves its backward pass on them. The term
        is nnU-Net's loss on the mask samples as a sub-batch, as in :meth:`teacher_full_batch`
        (``tests/test_distill.py`` checks values and gradients). Single-process only: with batch
        Dice, DDP ranks with different mask counts would disagree on the collectives, so under DDP
        :meth:`teacher_full_batch` runs.
        """
        decoder = self.extra_modules["teacher_decoder"]
        b = is_mask.numel()  # 0 < n_mask < b: :meth:`slice_teacher` chose this path
        t_out = as_list(decoder([s[is_mask] for s in skips]))
        sub = [x[is_mask] for x in seg]
        term = self.teacher_loss(t_out, sub, torch.ones(len(sub[0]), dtype=torch.bool, device=is_mask.device))
        logits = t_out[0].new_empty((b, *t_out[0].shape[1:]))
        logits[is_mask] = t_out[0].detach()
        with torch.no_grad():
            logits[~is_mask] = as_list(decoder([s[~is_mask].detach() for s in skips]))[0]
        return term, logits


class MixSupTrainer_DMD(_TeacherStudentBase):
    """Deep mutual distillation (Xie et al., MICCAI 2023), multi-class, inside nnU-Net.

    Two networks from the same plans with different random initialisations, one optimizer. Each
    gets the weak-label losses (nnU-Net's Dice + CE on known voxels, MLDS, negatives, box
    tightness); on every sample they are pulled together by ``dmd_weight * (1 - soft Dice)``
    between their temperature-softened softmax outputs (``dmd_temperature``), symmetric and not
    detached. Only the first network (``self.network``) is exported.

    Attributes:
        dmd_weight (lambda, public code: 4), dmd_temperature (T, public code: 2),
        distill_rampup: fraction of the epochs over which the agreement term ramps up linearly.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dmd_weight = 4.0
        self.dmd_temperature = 2.0
        self.loss_term_names = ("supervised", "mlds", "negatives", "box", "entropy", "net2", "agreement")

    def _do_i_compile(self) -> bool:  # no hooks here: stock compile behaviour
        return super(_TeacherStudentBase, self)._do_i_compile()

    def build_extra_modules(self) -> dict[str, nn.Module]:
        self.agreement_loss = SoftDiceAgreementLoss(self.dmd_temperature)
        return {"net2": self.fresh_network()}

    @torch.no_grad()
    def start_extra_modules(self) -> None:
        """With ``-pretrained_weights``, the second network gets them too (as nnU-Net loads them: fresh output layers)."""
        if self.network_was_replaced():
            load_pretrained_like_nnunet(unwrap(self.extra_modules["net2"]), unwrap(self.network))

    def forward_and_loss(self, data, seg, allowed, batch):
        out1 = as_list(self.network(data))
        out2 = as_list(self.extra_modules["net2"](data))
        terms = self.compute_loss(out1, seg, allowed, batch)
        terms["net2"] = sum(self.compute_loss(out2, seg, allowed, batch).values())
        terms["agreement"] = self.distill_ramp() * self.dmd_weight * self.agreement_loss(out1[0], out2[0])
        return terms
