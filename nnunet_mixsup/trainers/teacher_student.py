"""Teacher-student trainers: mean-taught deep supervision, dual-branch distillation, deep mutual distillation.

Siblings on one small base, :class:`TeacherStudentTrainer`, that supplies the weak-label terms
they all compose (:meth:`TeacherStudentTrainer.weak_label_terms`: per-group supervised loss,
MLDS, certain negatives, box tightness / presence, entropy). Each adds its own teacher and terms
in ``forward_and_loss``; none is an ancestor of the default :class:`~nnunet_mixsup.trainers.MixSupTrainer`.

What is exported: ``self.network`` is always one stock nnU-Net network (student / first network),
so ``checkpoint['network_weights']`` loads into ``build_network_architecture(...,
enable_deep_supervision=False)`` and stock ``nnUNetv2_predict`` costs what stock nnU-Net costs.
Teacher, second decoder or second network live in ``self.extra_modules``; the base saves them in
the checkpoint (``mixsup_state``) and restores them on ``--c``; trainable ones share nnU-Net's
optimizer (a second parameter group) and grad scaler.

DDP (``-num_gpus N``): the student is wrapped by nnU-Net; trainable extra modules get their own
DDP wrapper (gradients all-reduced, initial weights broadcast from rank 0); the EMA teacher is
updated from the synchronised student weights, so it is identical on every rank. Feature taps
(forward hooks) read the encoder / last decoder stage of the plain module inside the wrappers;
those trainers do not compile the network (``compiles_network = False``), because hooks on
compiled submodules are not reliably called. Every loss term runs on every rank whatever its
batch holds, so nnU-Net's batch Dice all-gathers in step (``tests/test_ddp_cpu.py``).
"""
from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from nnunet_mixsup.losses import (
    EntropyLoss,
    KLDistillationLoss,
    SoftDiceAgreementLoss,
    constrain_pseudo_labels,
    ema_update,
)
from nnunet_mixsup.manifest import TYPE_CODES
from nnunet_mixsup.trainers.mixsup import (
    MixSupTrainerBase,
    as_list,
    batch_subset_pays,
    ema_teacher,
    linear_rampup,
    load_pretrained_like_nnunet,
    teacher_pseudo_labels,
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


class TeacherStudentTrainer(MixSupTrainerBase):
    """Weak-label terms shared by the teacher-student trainers (no teacher of its own).

    :meth:`weak_label_terms` on a network output, every term weighted:

    - ``supervised``: nnU-Net's Dice + CE on the mask samples (full resolution, times nnU-Net's
      full-resolution scale weight) + CE on the weak samples' known voxels;
    - ``mlds``: multi-label deep supervision on every sample at the coarse outputs (real labels,
      or pseudo labels where given, with box / tag negatives pooled in);
    - ``negatives``: certain negatives at full resolution;
    - ``box``: box tightness or presence on box samples (:meth:`~MixSupTrainerBase.box_term_loss`);
    - ``entropy``: entropy on unlabelled samples, ramped in over ``entropy_rampup_epochs``.

    Attributes:
        box_weight, entropy_weight, entropy_rampup_epochs: term weights and the entropy ramp.
        distill_rampup: fraction of the epochs over which the distillation terms ramp up linearly.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.box_weight = 0.5
        self.entropy_weight = 0.1
        self.entropy_rampup_epochs = 50
        self.distill_rampup = 0.25
        self.loss_term_names = ("supervised", "mlds", "negatives", "box", "entropy")

    def _build_loss(self):
        loss = super()._build_loss()
        self.entropy_loss = EntropyLoss()
        return loss

    def distill_ramp(self) -> float:
        """Weight factor of the distillation terms: linear 0 -> 1 over ``distill_rampup`` of the epochs."""
        return linear_rampup(self.current_epoch, round(self.distill_rampup * self.num_epochs))

    def fresh_network(self) -> nn.Module:
        """A newly initialised network from the plans, like nnU-Net's own (second decoder / network)."""
        return self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                               self.num_input_channels, self.label_manager.num_segmentation_heads,
                                               self.enable_deep_supervision).to(self.device)

    def weak_label_terms(self, output: list[torch.Tensor], seg: list[torch.Tensor], allowed: list[torch.Tensor],
                         batch: dict, mlds_labels: torch.Tensor | None = None,
                         entropy: bool = True) -> dict[str, torch.Tensor]:
        """The terms listed in the class docstring for one network ``output`` (list over scales).

        ``mlds_labels``: full-resolution labels for the MLDS targets instead of ``seg[0]`` (pseudo
        labels); ``entropy=False`` leaves the entropy term to the caller.
        """
        w0 = self.deep_supervision_weights(len(output))[0]
        terms = {"supervised": w0 * self.supervised_loss(self.fullres_loss, output[0], seg[0], batch)}
        terms["mlds"] = self.mlds_term(output, seg[0] if mlds_labels is None else mlds_labels, allowed[0])
        terms["negatives"] = self.negatives_term(output[0], allowed[0])
        sup_type = batch["sup_type"].to(output[0].device)
        if self.box_weight > 0:
            terms["box"] = self.box_weight * self.box_term_loss(output[0], allowed[0], batch)
        unlabelled = sup_type == TYPE_CODES["none"]
        if entropy and self.entropy_weight > 0:
            ramp = linear_rampup(self.current_epoch, self.entropy_rampup_epochs)
            terms["entropy"] = self.entropy_weight * ramp * self.entropy_loss(output[0], sample_mask=unlabelled)
        return terms


class MixSupTrainer_MeanTeacher(TeacherStudentTrainer):
    """Mean-taught deep supervision (Reiss et al., CVPR 2021) on top of the weak-label terms.

    An EMA teacher (``theta_t = ema_decay * theta_t + (1 - ema_decay) * theta_s`` after every
    step) sees the batch with Gaussian input noise (``teacher_noise_std``; the student sees the
    clean augmented batch: perturbation consistency). Its softmax is constrained by the weak
    labels and, on samples of the kinds in ``pseudo_types``, fills the unknown voxels with pseudo
    labels where its confidence is at least ``pseudo_threshold``
    (:func:`~nnunet_mixsup.trainers.mixsup.teacher_pseudo_labels`). These pseudo labels

    - feed the MLDS pooled targets of the coarse outputs (so coarse scales learn from them), and
    - train a separate full-resolution pseudo-label head (a 1x1 conv on the last decoder stage,
      ``pseudo`` term, ramped over ``distill_rampup`` of the epochs); the clean head - the one
      exported and the one the teacher labels with - sees real labels only.

    Attributes (beyond the base's): ema_decay, teacher_noise_std, pseudo_threshold, pseudo_weight,
    pseudo_types.
    """

    compiles_network: ClassVar[bool] = False  # the pseudo-label head reads the last decoder stage through a hook

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ema_decay = 0.99
        self.teacher_noise_std = 0.1
        self.pseudo_threshold = 0.7
        self.pseudo_weight = 1.0
        self.pseudo_types: tuple[str, ...] = ("box", "tags", "none")
        self.loss_term_names = ("supervised", "mlds", "negatives", "box", "entropy", "pseudo")

    def build_extra_modules(self) -> dict[str, nn.Module]:
        net = unwrap(self.network)
        head = copy.deepcopy(net.decoder.seg_layers[-1])  # a fresh 1x1 conv like the exported head
        head.reset_parameters()
        self.decoder_tap = FeatureTap(net.decoder.stages[-1])
        return {"teacher": ema_teacher(self.network), "pseudo_head": head}

    def forward_and_loss(self, data, seg, allowed, batch):
        output = as_list(self.network(data))
        logits = self.extra_modules["pseudo_head"](self.decoder_tap.pop())
        ramp = self.distill_ramp()
        if self.label_manager.ignore_label is None:  # nothing is unknown anywhere: no pseudo labels needed
            terms = self.weak_label_terms(output, seg, allowed, batch)
            terms["pseudo"] = ramp * self.pseudo_weight * self.fullres_loss(logits, seg[0])
            return terms
        selected = self.samples_of(batch, self.pseudo_types, data.device)
        pseudo = teacher_pseudo_labels(self.extra_modules["teacher"], data, seg[0], allowed[0], selected,
                                       self.label_manager.ignore_label, self.pseudo_threshold, self.teacher_noise_std)
        terms = self.weak_label_terms(output, seg, allowed, batch, mlds_labels=pseudo)
        terms["pseudo"] = ramp * self.pseudo_weight * self.rows_loss(self.fullres_loss, logits, pseudo, selected)
        return terms

    def after_optimizer_step(self) -> None:
        ema_update(self.extra_modules["teacher"], unwrap(self.network), self.ema_decay)


class MixSupTrainer_DualBranch(TeacherStudentTrainer):
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

    compiles_network: ClassVar[bool] = False  # the teacher decoder reads the encoder's skips through a hook

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
        is_mask = batch["sup_type"].to(data.device) == TYPE_CODES["mask"]
        weak = ~is_mask
        terms = self.weak_label_terms(output, seg, allowed, batch, entropy=False)
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


class MixSupTrainer_DMD(TeacherStudentTrainer):
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
        terms = self.weak_label_terms(out1, seg, allowed, batch)
        terms["net2"] = sum(self.weak_label_terms(out2, seg, allowed, batch).values())
        terms["agreement"] = self.distill_ramp() * self.dmd_weight * self.agreement_loss(out1[0], out2[0])
        return terms
