"""The mixed-supervision trainers' plumbing and the default trainer, ``MixSupTrainer``.

Read top to bottom: helpers that know nnU-Net's conventions; :class:`MixSupTrainerBase` (manifest,
mask-only validation splits, the mixed-supervision loader, the per-group supervised loss, extra
modules and their checkpointing, the training step, per-term logging); :class:`SelfTrainingSchedule`
(when the weak cases join); :class:`MixSupTrainer`, whose :meth:`MixSupTrainer.forward_and_loss`
holds every loss term of the default. Follow one batch:

1. :meth:`nnunet_mixsup.data.MixSupDataLoader.generate_train_batch` yields ``target`` scales of
   shape (B, 1 + K, *s) (label map with the ignore label + K *allowed* maps), ``sup_type``,
   ``tags`` and ``axes_kept``;
2. :meth:`MixSupTrainerBase.train_step` splits label map and allowed maps and calls
   ``forward_and_loss``, which returns named, weighted loss terms (plain torch modules of
   :mod:`nnunet_mixsup.losses`);
3. their sum is optimised exactly like nnU-Net's own loss (AMP, gradient clipping at 12), then
   :meth:`MixSupTrainerBase.after_optimizer_step` (the EMA teacher's update).

Validation (online pseudo-Dice and final validation) only ever sees mask cases. The exported
network is nnU-Net's own, so checkpoints load in stock ``nnUNetv2_predict`` and friends.
Hyperparameters are attributes (nnU-Net records ``__init__`` arguments by signature, so trainers
take no extra arguments); variants are subclasses named ``MixSupTrainer_<Variant>``.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from os.path import isfile, join
from typing import ClassVar

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_mixsup.data import LABELLED_WEAK_KINDS, MixSupDataLoader, record_spatial_axes
from nnunet_mixsup.losses import (
    BoxFillLoss,
    BoxPresenceLoss,
    BoxProjectionLoss,
    CertainNegativeLoss,
    EntropyLoss,
    KnownVoxelCrossEntropyLoss,
    MultiLabelDeepSupervisionLoss,
    constrain_pseudo_labels,
    ema_update,
    labels_to_pos_known,
    multilabel_pooled_targets,
    pseudo_label_map,
)
from nnunet_mixsup.manifest import (
    MANIFEST_NAME,
    TYPE_CODES,
    CaseSupervision,
    Manifest,
    ManifestError,
    parse_manifest,
)
from nnunet_mixsup.prepare import supervision_summary
from nnunet_mixsup.splits import mixsup_splits

BUDGET_ENV = ("nnUNet_mixsup_epochs", "nnUNet_mixsup_iterations", "nnUNet_mixsup_val_iterations")
THREADS_ENV = "nnUNet_mixsup_torch_threads"


def apply_env_budget(trainer: nnUNetTrainer) -> None:
    """Let ``nnUNet_mixsup_epochs`` / ``_iterations`` / ``_val_iterations`` override the schedule, if set.

    Benchmarks must train every run - the stock baseline included - with the same budget; the
    environment (nnU-Net's own way of passing settings to ``nnUNetv2_train``) does that without a
    trainer class per budget. ``_val_iterations`` sets the online-validation batches per epoch
    (nnU-Net: 50), which dominate the cost of short CPU runs. Unset, nothing changes.

    ``nnUNet_mixsup_torch_threads`` (CPU training only): torch's intra-op threads. ``nnUNetv2_train
    -device cpu`` sets them to every core of the machine, which oversubscribes the cores when
    several trainings share them (``nnunet-mixsup benchmark --parallel``).
    """
    threads = os.environ.get(THREADS_ENV)
    if threads and trainer.device.type == "cpu":
        torch.set_num_threads(int(threads))
    e, i, v = (os.environ.get(k) for k in BUDGET_ENV)
    if e:
        trainer.num_epochs = int(e)
    if i:
        trainer.num_iterations_per_epoch = int(i)
    if v:
        trainer.num_val_iterations_per_epoch = int(v)


def uses_batch_dice(loss_fn: nn.Module) -> bool:
    """Whether ``loss_fn`` (or a module inside it, e.g. nnU-Net's soft Dice) sums its Dice over the batch."""
    return any(bool(getattr(m, "batch_dice", False)) for m in loss_fn.modules())


def loss_on_rows(loss_fn: nn.Module, output, target, rows: torch.Tensor, ignore_label: int | None) -> torch.Tensor:
    """``loss_fn(output, target)`` restricted to the batch ``rows``: the value and gradient of the sub-batch.

    ``loss_fn`` is nnU-Net's Dice + CE (optionally inside its ``DeepSupervisionWrapper``);
    ``output`` / ``target`` are (B, C, *s) / (B, 1, *s) tensors or lists of them over
    deep-supervision scales; ``rows`` is a (B,) bool tensor. Two routes give exactly the loss of
    ``loss_fn`` on the sub-batch ``output[rows]``, ``target[rows]``:

    - **Batch Dice** (``batch_dice=True``): the other rows' targets become the ignore label. Ignored
      voxels add nothing to the Dice sums over the batch nor to CE's mean over annotated voxels, so
      the value is the sub-batch's. This route is taken because under DDP nnU-Net's batch Dice
      all-gathers its sums: every rank must call it, whatever its batch holds.
    - **Per-sample Dice** (``batch_dice=False``, nnU-Net's 3d_fullres when no 3d_lowres is
      planned): an all-ignore sample scores Dice 1 and enters the mean over samples, which would
      scale the selected rows' Dice gradient by ``n_rows / B``. The rows are sliced out instead;
      with none selected the result is a zero connected to the graph. Per-sample Dice runs no
      collective operation, so DDP ranks may differ in their row counts.

    Without an ignore label the rows are always sliced.
    """
    many = isinstance(target, (list, tuple))
    if ignore_label is not None and uses_batch_dice(loss_fn):
        def fill(t: torch.Tensor) -> torch.Tensor:
            return torch.where(rows.view(-1, *([1] * (t.ndim - 1))), t, torch.full_like(t, ignore_label))
        return loss_fn(output, [fill(t) for t in target] if many else fill(target))
    outs = list(output) if many else [output]
    if not bool(rows.any()):
        return sum(o.sum() for o in outs) * 0
    if many:
        return loss_fn([o[rows] for o in output], [t[rows] for t in target])
    return loss_fn(output[rows], target[rows])


def weights_fingerprint(module: nn.Module) -> torch.Tensor:
    """(n_tensors,) float64 sums of a module's parameters and buffers: cheap change detection."""
    return torch.stack([v.detach().double().sum().cpu() for v in module.state_dict().values()])


def load_pretrained_like_nnunet(target: nn.Module, source: nn.Module) -> int:
    """Copy ``source``'s weights into ``target`` where names and shapes match, except output layers.

    Mirrors what ``nnUNetv2_train -pretrained_weights`` does to the network (nnU-Net skips the
    ``.seg_layers.`` of the segmentation heads), for modules built beside it (a second network or
    decoder). Returns the number of tensors copied.
    """
    src = source.state_dict()
    dst = target.state_dict()
    n = 0
    for k, v in dst.items():
        if ".seg_layers." in f".{k}" or k not in src or src[k].shape != v.shape:
            continue
        v.copy_(src[k])
        n += 1
    return n


def as_list(output) -> list[torch.Tensor]:
    """A network output as a list over deep-supervision scales (full resolution first)."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


def class_channels(off: torch.Tensor, ndim: int, device: torch.device, background: bool = False) -> torch.Tensor:
    """(1, C, 1, ...) bool over the C channels: the foreground classes ``off`` (K,) bool, and background if asked."""
    chans = torch.cat([torch.tensor([background], device=off.device), off.bool()]).to(device)
    return chans.view(1, -1, *([1] * (ndim - 2)))


def without_classes(logits: torch.Tensor, off: torch.Tensor | None) -> torch.Tensor:
    """``logits`` (B, C, *s) with the foreground classes ``off`` (K,) bool pushed out of the softmax.

    Their channels are set to -1e4 (finite in float16 too), so a softmax-based loss on the result
    neither scores nor moves them: their probability is 0 and their gradient is exactly 0.
    """
    if off is None or not bool(off.any()):
        return logits
    return logits.masked_fill(class_channels(off, logits.ndim, logits.device), -1e4)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    if isinstance(module, DDP):
        module = module.module
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def boxes_inside_patch(box_masks: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the class has box voxels in the patch and none on the patch border.

    A box cut by the patch border (after augmentation) only constrains what the patch contains,
    so its projection would be wrong; those (sample, class) pairs are excluded.
    """
    nd = box_masks.ndim - 2
    present = box_masks.flatten(2).amax(2) > 0
    on_border = torch.zeros_like(present)
    for d in range(nd):
        ax = 2 + d
        first = box_masks.narrow(ax, 0, 1)
        last = box_masks.narrow(ax, box_masks.shape[ax] - 1, 1)
        on_border |= (first.flatten(2).amax(2) > 0) | (last.flatten(2).amax(2) > 0)
    return present & ~on_border


def batch_subset_pays(n_rows: int, n_total: int, device: torch.device) -> bool:
    """Whether a forward pass over ``n_rows`` of a batch of ``n_total`` is cheaper than over the whole batch.

    True whenever rows are saved, except for a single row on the CPU: torch's CPU convolution sends
    one-sample inputs of small patches to its native kernel instead of oneDNN (``use_mkldnn`` in
    ATen's Convolution.cpp), measured 4-5x slower per 3D convolution at 20x32x40 with 32 channels
    than the two-sample batch - so there one row costs more than two.
    """
    return n_rows < n_total and (device.type != "cpu" or n_rows > 1)


def linear_rampup(epoch: int, length: int) -> float:
    """0 -> 1 linearly over ``length`` epochs (1 from the start if ``length`` <= 0)."""
    return 1.0 if length <= 0 else min(1.0, (epoch + 1) / length)


def first_epochs_reaching(dice_history: Sequence[Sequence[float]], threshold: float,
                          n_classes: int) -> list[int | None]:
    """Per class: one plus the first epoch whose logged validation Dice reached ``threshold`` (None: never).

    The Dice of epoch e is logged at its end, so e + 1 is the first epoch that can act on it. NaN
    (class absent from every validation case) never counts.
    """
    starts: list[int | None] = [None] * n_classes
    for e, h in enumerate(dice_history):
        for c in range(min(n_classes, len(h))):
            if starts[c] is None and bool(h[c] >= threshold):
                starts[c] = e + 1
    return starts


def classes_lost(dice_history: Sequence[Sequence[float]], learned: float, window: int = 5,
                 keep: float = 0.2) -> list[tuple[int, float, int, float]]:
    """Classes the run learned and then lost: ``(class index, best Dice, its epoch, recent mean Dice)``.

    A class counts as learned once its logged validation Dice reached ``learned``; it is lost when
    the mean of its last ``window`` logged values (NaN skipped) is below ``keep`` x its best. A
    self-training run can collapse this way (every class predicted nowhere, on the mask cases
    too) while its training loss keeps falling, so the end-of-training report names it.
    """
    lost = []
    n = max((len(h) for h in dice_history), default=0)
    for c in range(n):
        vals = [(e, float(h[c])) for e, h in enumerate(dice_history) if c < len(h) and not np.isnan(h[c])]
        if not vals:
            continue
        best_epoch, best = max(vals, key=lambda ev: ev[1])
        recent = float(np.mean([v for _, v in vals[-window:]]))
        if best >= learned and recent < keep * best:
            lost.append((c, best, best_epoch, recent))
    return lost


@torch.no_grad()
def teacher_pseudo_labels(teacher: nn.Module, data: torch.Tensor, seg0: torch.Tensor, allowed0: torch.Tensor,
                          rows: torch.Tensor, ignore_label: int, threshold: float, noise_std: float = 0.0,
                          unsure: torch.Tensor | None = None, keep_unsure_positives: bool = False) -> torch.Tensor:
    """(B, 1, *s) labels: real labels where known; on the ``rows`` samples, the teacher's confident labels elsewhere.

    The teacher sees ``data`` + Gaussian noise (``noise_std``); its softmax is constrained by the
    allowed maps ``allowed0`` (B, K, *s) (class c zeroed outside the boxes of c and for classes
    absent from the tags, :func:`constrain_pseudo_labels`), and its arg-max fills the unknown
    voxels where the constrained probability is at least ``threshold``
    (:func:`pseudo_label_map`); other unknown voxels keep the ignore label. ``unsure`` (K,) bool
    marks classes the teacher cannot be trusted with yet: an unknown voxel where such a class may be
    present (its allowed map is 1: inside its boxes, or anywhere if the tags allow it) stays unknown,
    so the teacher never teaches "not this class" where the weak labels leave it open. With
    ``keep_unsure_positives`` such a voxel keeps a confident label *of* an unsure class (the
    constraint already confines it to that class's boxes or tag-allowed images): box-constrained
    positives, the only pseudo labels that speak for a class the teacher segments poorly.

    The teacher runs on the ``rows`` only where that is cheaper (:func:`batch_subset_pays`). It
    is in eval mode and nnU-Net's networks normalise per sample (instance norm), so a row's
    output does not depend on the rest of the batch: the same labels as a full-batch pass at the
    rows' share of the cost. No collective operation is involved (DDP ranks may differ in rows).
    """
    pseudo = seg0.clone()
    idx = rows.nonzero().flatten()
    if idx.numel() == 0:
        return pseudo
    if not batch_subset_pays(idx.numel(), rows.numel(), data.device):
        idx = torch.arange(rows.numel(), device=rows.device)
    x = data[idx]
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    probs = torch.softmax(as_list(teacher(x))[0].float(), dim=1)
    probs = constrain_pseudo_labels(probs, allowed0[idx].float())
    labels = pseudo_label_map(probs, seg0[idx], ignore_label, threshold, rows[idx])
    if unsure is not None and bool(unsure.any()):
        unsure = unsure.to(allowed0.device)
        hold = (allowed0[idx][:, unsure] > 0).any(1, keepdim=True) & (seg0[idx] == ignore_label)
        if keep_unsure_positives:
            for k in unsure.nonzero().flatten().tolist():
                hold = hold & (labels != k + 1)
        labels = torch.where(hold, torch.full_like(labels, ignore_label), labels)
    pseudo[idx] = labels
    return pseudo


def open_empty_boxes(labels: torch.Tensor, seg0: torch.Tensor, allowed0: torch.Tensor, present: torch.Tensor,
                     ignore_label: int) -> torch.Tensor:
    """Pseudo labels with the teacher's background inside a box taken back where it found none of the box's class.

    A tight box around a connected object is crossed by the object in every slice through it, so a
    box (or its 2D cross-section) lying wholly inside the patch certainly holds some voxels of its
    class k. Where the teacher labels none of them k, its confident background there contradicts
    the box - a teacher that misses a structure on a kind of image would otherwise teach the
    student that the structure is absent exactly where the box says it is. Those background
    voxels become unknown (``ignore_label``); labels of other classes and real (known) labels
    stay.

    Args:
        labels: (B, 1, *s) pseudo labels (:func:`teacher_pseudo_labels`).
        seg0: (B, 1, *s) real labels (``ignore_label`` where unknown).
        allowed0: (B, K, *s) allowed maps: class k's boxes for box samples.
        present: (B, K) bool: class k's box lies wholly inside sample b's patch and k is to be
            checked (e.g. :meth:`MixSupTrainerBase.box_pairs_in_patch` for the classes the
            teacher labels).
        ignore_label: the label value meaning "unknown".

    Returns:
        (B, 1, *s) labels, a new tensor.
    """
    out = labels.clone()
    for b, k in present.nonzero().tolist():
        inside = allowed0[b, k] > 0
        if bool((labels[b, 0][inside] == k + 1).any()):
            continue
        release = inside & (labels[b, 0] == 0) & (seg0[b, 0] == ignore_label)
        out[b, 0][release] = ignore_label
    return out


def ema_teacher(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network`` in eval mode (the mean teacher, updated by :func:`ema_update`)."""
    teacher = copy.deepcopy(unwrap(network))
    teacher.requires_grad_(False)
    return teacher.eval()


class MixSupTrainerBase(nnUNetTrainer):
    """nnU-Net trainer that learns from mask, box, image-tag and unlabelled cases (plumbing shared by all).

    Subclasses set their hyperparameters in ``__init__`` and implement :meth:`forward_and_loss`;
    the base supplies the term helpers they compose (:meth:`supervised_loss`, :meth:`mlds_term`,
    :meth:`negatives_term`).

    Attributes (hyperparameters):
        strong_fraction: share of every training batch drawn from mask cases.
        weak_supervised_weight: factor of the weak samples' known-voxel CE in :meth:`supervised_loss`.
        negative_weight: weight of the certain-negative term (``CertainNegativeLoss``).
        mlds_weight: factor of the multi-label deep-supervision term (:meth:`mlds_term`).
        box_term: ``"tightness"``, ``"presence"`` or ``"auto"`` (default) for :meth:`box_term_loss`:
            presence when a 2D configuration trains on slices of 3D volumes - there a patch holds a
            cross-section of each 3D box, for which the tightness prior is false (the object's
            cross-section is smaller than the box rectangle near its ends) but "the object occurs
            in the rectangle" holds - else tightness.
        box_fill_bounds: (lower, upper) share of its boxes a class fills, for :meth:`box_fill_term`.
        max_consecutive_bad_steps: non-finite losses are skipped; this many in a row stop training.

    Class attributes:
        trains_on_weak_cases: False for trainers that use the mask cases only; the benchmark then
            charges them the masks' annotation cost only.
        compiles_network: False where a forward hook reads a submodule's output (torch.compile does
            not reliably call hooks on compiled submodules); otherwise nnU-Net's own rule applies.
    """

    trains_on_weak_cases: ClassVar[bool] = True
    compiles_network: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 0.5
        self.weak_supervised_weight = 1.0
        self.negative_weight = 1.0
        self.mlds_weight = 1.0
        self.box_term = "auto"
        self.box_fill_bounds = (0.08, 0.6)
        self.max_consecutive_bad_steps = 10
        self.consecutive_bad_steps = 0
        self.supervision: dict[str, CaseSupervision] | None = None
        self.loss_term_names: tuple[str, ...] = ("supervised",)
        # modules beyond self.network (EMA teacher, second decoder / network, extra heads); they are
        # built in initialize(), optimised with self.network if trainable, and saved in checkpoints
        self.extra_modules: dict[str, nn.Module] = {}
        apply_env_budget(self)

    def _do_i_compile(self) -> bool:
        """nnU-Net's rule (CUDA, not Windows, ``nnUNet_compile``), unless ``compiles_network`` is False."""
        return self.compiles_network and super()._do_i_compile()

    # -------------------------------------------------------------------------------- extra modules
    def build_extra_modules(self) -> dict[str, nn.Module]:
        """Modules a variant needs besides ``self.network`` (none here). Called once by initialize()."""
        return {}

    def initialize(self):
        """nnU-Net's initialize, then the variant's extra modules.

        Trainable extra modules join nnU-Net's SGD optimizer as a second parameter group (same
        lr schedule, momentum and weight decay), so optimizer and grad-scaler state cover them.
        Under DDP each trainable extra module gets its own DistributedDataParallel wrapper
        (gradients all-reduced like the network's; initial weights broadcast from rank 0).
        Non-trainable ones (an EMA teacher) need no wrapper: they are a deterministic function
        of the synchronised student weights, so every rank computes the same teacher.
        """
        first = not self.was_initialized
        super().initialize()
        if not first:
            return
        self.extra_modules = self.build_extra_modules()
        self._network_fingerprint = weights_fingerprint(unwrap(self.network))
        trainable = [p for m in self.extra_modules.values() for p in m.parameters() if p.requires_grad]
        if trainable:
            self.optimizer.add_param_group({"params": trainable})
        if self.is_ddp:
            for k, m in self.extra_modules.items():
                if any(p.requires_grad for p in m.parameters()):
                    self.extra_modules[k] = DDP(m, device_ids=[self.local_rank])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer updates (for gradient clipping)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``mixsup_state`` (the extra modules' weights), written atomically.

        ``network_weights`` stays the exported network alone, so stock ``nnUNetv2_predict`` and
        ensembling load it unchanged. nnU-Net writes into a temporary file that replaces
        ``filename`` only when complete, so a run killed while saving leaves the previous
        checkpoint intact and ``--c`` can resume from it.
        """
        tmp = filename + ".mixsup_tmp"
        super().save_checkpoint(tmp)
        if self.local_rank != 0 or self.disable_checkpointing or not isfile(tmp):
            return
        if self.extra_modules:
            ckpt = torch.load(tmp, map_location="cpu", weights_only=False)
            ckpt["mixsup_state"] = {k: unwrap(m).state_dict() for k, m in self.extra_modules.items()}
            torch.save(ckpt, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's load (network, optimizer incl. the extra group, scaler, logs, epoch) + extra modules."""
        super().load_checkpoint(filename_or_checkpoint)
        if not self.extra_modules:
            return
        ckpt = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = ckpt.get("mixsup_state")
        missing = [k for k in self.extra_modules if state is None or k not in state]
        if missing:
            raise RuntimeError(f"checkpoint has no state for {missing} (teacher / second network), so "
                               f"{type(self).__name__} cannot resume exactly; it was written by "
                               f"{ckpt.get('trainer_name')!r}. Start without --c or use the matching trainer.")
        for k, m in self.extra_modules.items():
            unwrap(m).load_state_dict(state[k])
        self._extra_state_loaded = True

    def network_was_replaced(self) -> bool:
        """True if ``self.network``'s weights changed since :meth:`initialize` built the extra modules.

        That happens when ``nnUNetv2_train -pretrained_weights`` loads weights after
        ``initialize()``; extra modules copied from the network at build time are then stale.
        """
        return not torch.equal(weights_fingerprint(unwrap(self.network)), self._network_fingerprint)

    @torch.no_grad()
    def start_extra_modules(self) -> None:
        """Align the extra modules with the network at the start of a new run: an EMA ``teacher`` starts as the student.

        Called by :meth:`on_train_start` unless a checkpoint restored the extra modules (``--c``),
        i.e. after ``-pretrained_weights`` were loaded into ``self.network`` (the teacher built in
        ``initialize()`` copied the freshly initialised student).
        """
        if "teacher" in self.extra_modules:
            self.extra_modules["teacher"].load_state_dict(unwrap(self.network).state_dict())

    def samples_of(self, batch: dict, kinds: Sequence[str], device: torch.device) -> torch.Tensor:
        """(B,) bool: the samples whose supervision kind (``"mask"``, ``"box"``, ``"tags"``, ``"none"``) is in ``kinds``."""
        codes = torch.tensor([TYPE_CODES[k] for k in kinds], device=device)
        return torch.isin(batch["sup_type"].to(device), codes)

    # -------------------------------------------------------------------------------- supervision
    def load_supervision(self) -> dict[str, CaseSupervision]:
        """Read the manifest copied next to the preprocessed data; fail clearly if it is missing."""
        if self.supervision is not None:
            return self.supervision
        path = join(self.preprocessed_dataset_folder_base, MANIFEST_NAME)
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        ids = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        if not isfile(path):
            if self.label_manager.has_ignore_label:
                raise RuntimeError(f"{path} is missing but the dataset uses an ignore label. Run "
                                   "`nnunet-mixsup plan_and_preprocess -d ...` (or `nnunet-mixsup prepare`) first.")
            self.print_to_log_file(f"No {MANIFEST_NAME} in {self.preprocessed_dataset_folder_base}: "
                                   "treating every case as a mask case.")
            self.supervision = {k: CaseSupervision(k, "mask") for k in ids}
            return self.supervision
        problems: list[str] = []
        man = parse_manifest(load_json(path), problems)
        missing = [k for k in ids if k not in man.cases]
        problems += [f"case {k!r}: preprocessed but not in the manifest (rerun prepare)" for k in missing[:20]]
        if self.label_manager.has_regions:
            problems.append("region-based training is not supported by nnunet-mixsup")
        if problems:
            raise ManifestError(problems, path)
        self.supervision = {k: man.cases[k] for k in ids}
        return self.supervision

    def do_split(self):
        """nnU-Net's split, made mixed-supervision aware.

        If no ``splits_final.json`` exists, one is written whose validation folds are made of mask
        cases only (every fold gets mask cases; weak cases are always in training). With a user's
        split, weak cases listed for validation are moved to training (they cannot be scored), and a
        fold whose validation set has no mask case is an error before any training starts.
        """
        sup = self.load_supervision()
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and not isfile(splits_file):
            mask_ids = sorted(k for k, s in sup.items() if s.type == "mask")
            weak_ids = sorted(k for k, s in sup.items() if s.type != "mask")
            save_json(mixsup_splits(mask_ids, weak_ids), splits_file)
        if self.fold != "all" and isfile(splits_file):
            n = len(load_json(splits_file))
            if self.fold >= n:
                raise RuntimeError(f"fold {self.fold} requested but {splits_file} has only {n} fold(s) "
                                   f"(nnunet-mixsup makes at most one fold per mask case)")
        tr_keys, val_keys = super().do_split()
        weak_val = [k for k in val_keys if sup[k].type != "mask"]
        val_keys = [k for k in val_keys if sup[k].type == "mask"]
        if weak_val:
            self.print_to_log_file(f"{len(weak_val)} weak case(s) in the validation split moved to training.")
            tr_keys = list(tr_keys) + [k for k in weak_val if k not in tr_keys]
        if not val_keys:
            raise RuntimeError(f"fold {self.fold}: the validation split contains no mask case, so nothing can be "
                               f"validated. Add mask cases to the fold's 'val' list in {splits_file}.")
        return tr_keys, val_keys

    # -------------------------------------------------------------------------------- data
    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets; with ``strong_fraction`` >= 1 the training set holds the mask cases only."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.strong_fraction >= 1.0:
            sup = self.load_supervision()
            keys = [k for k in dataset_tr.identifiers if sup[k].type == "mask"]
            if not keys:
                raise RuntimeError(f"fold {self.fold}: {type(self).__name__} trains on mask cases only, but the "
                                   f"fold's training split has no mask case. Add mask cases to its 'train' list "
                                   f"in splits_final.json or use a trainer that learns from weak cases.")
            dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, keys,
                                            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return dataset_tr, dataset_val

    def train_batch_size(self) -> int:
        """Samples per training batch (per DDP rank): the plans' batch size here."""
        return self.batch_size

    def loader_strong_fraction(self) -> float:
        """Share of each training batch drawn from mask cases: ``strong_fraction`` here."""
        return self.strong_fraction

    def loader_weak_kinds(self) -> tuple[str, ...] | None:
        """Supervision kinds the training loader draws weak samples from (None: every non-mask kind)."""
        return None

    def get_dataloaders(self):
        """nnU-Net's pipeline with :class:`MixSupDataLoader` for training (validation stays stock)."""
        if self.label_manager.has_regions:
            raise RuntimeError("region-based training is not supported by nnunet-mixsup")
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        tr_transforms = record_spatial_axes(self.get_training_transforms(  # batch["axes_kept"]: boxes still tight?
            patch_size, rotation_for_DA, ds_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label))
        val_transforms = self.get_validation_transforms(
            ds_scales, is_cascaded=self.is_cascaded, foreground_labels=self.label_manager.foreground_labels,
            regions=None, ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = MixSupDataLoader(dataset_tr, self.train_batch_size(), initial_patch_size, patch_size,
                                 self.label_manager, supervision=self.load_supervision(),
                                 transpose_forward=self.plans_manager.transpose_forward,
                                 strong_fraction=self.loader_strong_fraction(),
                                 mask_only_batches=self.mask_only_batches_left(),
                                 weak_kinds=self.loader_weak_kinds(), n_workers=max(1, get_allowed_n_proc_DA()),
                                 oversample_foreground_percent=self.oversample_foreground_percent,
                                 sampling_probabilities=None, pad_sides=None, transforms=tr_transforms,
                                 probabilistic_oversampling=self.probabilistic_oversampling)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_train, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
            mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                  pin, 0.002)
        _ = next(mt_train)
        _ = next(mt_val)
        return mt_train, mt_val

    def mask_only_batches_left(self) -> int:
        """Training batches still to come in a mask-only warm-up (none here; see :class:`MixSupTrainer`).

        Counted from ``current_epoch`` when the loaders are built, so a run resumed with ``--c``
        continues the schedule instead of starting the warm-up again.
        """
        return 0

    # -------------------------------------------------------------------------------- loss terms
    def _build_loss(self):
        """nnU-Net's Dice + CE (with its deep supervision) plus the plain modules the terms use."""
        self.weak_ce = KnownVoxelCrossEntropyLoss(self.label_manager.ignore_label)
        self.negative_loss = CertainNegativeLoss()
        self.mlds_loss = MultiLabelDeepSupervisionLoss()
        self.box_tightness_loss, self.box_presence_loss = BoxProjectionLoss(), BoxPresenceLoss()
        self.box_fill_loss = BoxFillLoss(*self.box_fill_bounds)
        self._box_term_resolved: str | None = None
        loss = super()._build_loss()
        self.fullres_loss = loss.loss if hasattr(loss, "loss") else loss  # Dice + CE of one output
        return loss

    def deep_supervision_weights(self, n_outputs: int) -> list[float]:
        """nnU-Net's scale weights (1/2^i, lowest scale 0 - 1e-6 under DDP without compile, normalised)."""
        if n_outputs == 1:
            return [1.0]
        w = np.array([1 / (2 ** i) for i in range(n_outputs)])
        w[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0
        return list(w / w.sum())

    def cumulative_pooling(self) -> list[list[int]]:
        """Per network output (full resolution first): its downsampling relative to the input."""
        strides = np.array(self.configuration_manager.pool_op_kernel_sizes)
        return [list(map(int, v)) for v in np.cumprod(strides, axis=0)]

    def only(self, samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target`` (B, 1, *s) with the unselected samples set to the ignore label (needs one)."""
        keep = samples.view(-1, *([1] * (target.ndim - 1)))
        return torch.where(keep, target, torch.full_like(target, self.label_manager.ignore_label))

    def rows_loss(self, loss_fn, output, target, rows: torch.Tensor) -> torch.Tensor:
        """``loss_fn`` on the batch ``rows`` only, equal in value and gradient to ``loss_fn`` on that sub-batch.

        See :func:`loss_on_rows`; the trainer supplies its ignore label.
        """
        return loss_on_rows(loss_fn, output, target, rows, self.label_manager.ignore_label)

    def supervised_loss(self, loss_fn, output, target, batch: dict, weak_output=None) -> torch.Tensor:
        """nnU-Net's loss (``loss_fn``) on the mask samples + known-voxel CE on the weak samples.

        nnU-Net's CE is a mean over every annotated voxel of the batch and its batch Dice sums over
        the batch, so in one call the many certain-background voxels of weak samples (outside their
        boxes) would dilute the mask samples' gradient. Split by group, the first term is exactly
        nnU-Net's loss on the batch's mask samples as a sub-batch (:meth:`rows_loss`, for batch
        and per-sample Dice alike). The weak samples get cross-entropy on their known voxels only
        (:class:`KnownVoxelCrossEntropyLoss`, times ``weak_supervised_weight``; deep-supervision
        outputs weighted like nnU-Net's): their known voxels are certain background, where a Dice
        term is degenerate. ``output`` / ``target``: a tensor or a list over deep-supervision
        scales (as ``loss_fn`` takes them). ``weak_output``: what the weak samples' term sees
        instead of ``output`` (e.g. :func:`without_classes`), same structure.
        """
        weak_output = output if weak_output is None else weak_output
        if self.label_manager.ignore_label is None:  # every case is a mask case
            return loss_fn(output, target)
        many = isinstance(target, (list, tuple))
        dev = (target[0] if many else target).device
        is_mask = batch["sup_type"].to(dev) == TYPE_CODES["mask"]
        mask_part = self.rows_loss(loss_fn, output, target, is_mask)
        if many:
            weights = self.deep_supervision_weights(len(output))
            weak_part = sum(w * self.weak_ce(o, self.only(~is_mask, t))
                            for w, o, t in zip(weights, weak_output, target) if w > 0)
        else:
            weak_part = self.weak_ce(weak_output, self.only(~is_mask, target))
        return mask_part + self.weak_supervised_weight * weak_part

    def mlds_term(self, output: list[torch.Tensor], seg0: torch.Tensor, allowed0: torch.Tensor,
                  rows: torch.Tensor | None = None, off: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-label deep supervision (Reiss et al., CVPR 2021) at the coarse outputs, times ``mlds_weight``.

        Every coarse output voxel gets the *set* of classes in its block of the full-resolution
        labels ``seg0`` (B, 1, *s) (real or pseudo labels; unknown where the ignore label is,
        certain negatives from the allowed maps ``allowed0`` (B, K, *s)), by max pooling with
        kernel = stride = that output's cumulative pooling (anisotropic where the plans are);
        sigmoid + BCE per class, masked where unknown, with nnU-Net's coarse scale weights.
        ``rows`` (B,) bool restricts it to those samples (the others become all-unknown); 0 when
        there is no coarse output or no selected sample. ``off`` (K,) bool: foreground classes
        that get no target at all (unknown everywhere), and then background neither.
        """
        weights = self.deep_supervision_weights(len(output))[1:]
        if not weights or sum(weights) == 0 or (rows is not None and not bool(rows.any())):
            return output[0].sum() * 0
        if rows is not None:
            keep = rows.view(-1, *([1] * (allowed0.ndim - 1)))
            seg0 = self.only(rows, seg0)
            allowed0 = torch.where(keep, allowed0, torch.ones_like(allowed0))
        pos, known = labels_to_pos_known(seg0, allowed0, output[0].shape[1], self.label_manager.ignore_label)
        if off is not None and bool(off.any()):
            keep = (~class_channels(off, known.ndim, known.device, background=True)).float()
            pos, known = pos * keep, known * keep  # a pooled positive counts as known: clear both
        pools = self.cumulative_pooling()
        targets = [multilabel_pooled_targets(pos, known, pools[i]) for i in range(1, len(output))]
        self.mlds_loss.weights = weights
        return self.mlds_weight * sum(weights) * self.mlds_loss(list(output[1:]), targets)

    def negatives_term(self, logits: torch.Tensor, allowed0: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """``negative_weight`` x mean ``-log(1 - p_c)`` where class c is certainly absent (full resolution).

        ``rows`` (B,) bool restricts it to those samples: a mask sample's allowed maps are 0 outside
        nnU-Net's non-zero crop (background there by nnU-Net's convention), which its own loss
        already covers.
        """
        if rows is not None:
            keep = rows.view(-1, *([1] * (allowed0.ndim - 1)))
            allowed0 = torch.where(keep, allowed0, torch.ones_like(allowed0))
        return self.negative_weight * self.negative_loss(logits, allowed0)

    def box_term_loss(self, logits: torch.Tensor, allowed0: torch.Tensor, batch: dict,
                      classes: torch.Tensor | None = None) -> torch.Tensor:
        """Box tightness or presence (unweighted) on the box samples whose box lies fully inside the patch.

        Tightness (:class:`BoxProjectionLoss`: every slice through the box extent crosses the
        object) only on samples whose augmentation kept the image axes (``batch["axes_kept"]``):
        after a rotation the box still bounds the object but is not its tight box. Presence
        (:class:`BoxPresenceLoss`: the object occurs in the box) holds for rotated boxes too.
        ``classes``: optional (K,) bool restricting the term to those classes. ``logits`` (B, C, *s),
        ``allowed0`` (B, K, *s) (for box samples: the union of the boxes of each class).
        """
        valid = self.box_pairs_in_patch(allowed0, batch, classes)
        if self.resolved_box_term() == "presence":
            return self.box_presence_loss(logits, allowed0, valid)
        valid = valid & batch["axes_kept"].to(valid.device)[:, None]
        return self.box_tightness_loss(logits, allowed0, valid)

    def box_fill_term(self, logits: torch.Tensor, allowed0: torch.Tensor, batch: dict,
                      classes: torch.Tensor | None = None) -> torch.Tensor:
        """The box fill constraint (unweighted, :class:`BoxFillLoss`) on box samples whose box lies inside the patch.

        Holds after rotations too (a rotated box keeps its area and the object in it), so every
        augmented box sample counts. ``classes``: optional (K,) bool restricting it to those classes.
        """
        return self.box_fill_loss(logits, allowed0, self.box_pairs_in_patch(allowed0, batch, classes))

    def box_pairs_in_patch(self, allowed0: torch.Tensor, batch: dict, classes: torch.Tensor | None) -> torch.Tensor:
        """(B, K) bool: box samples' classes whose box lies inside the patch, restricted to ``classes`` (K,) if given."""
        is_box = batch["sup_type"].to(allowed0.device) == TYPE_CODES["box"]
        valid = boxes_inside_patch(allowed0) & is_box[:, None]
        return valid if classes is None else valid & classes.to(valid.device)[None, :]

    def resolved_box_term(self) -> str:
        """``box_term`` with ``"auto"`` resolved: presence for 2D patches cut from 3D volumes (cached)."""
        if self._box_term_resolved is None:
            self._box_term_resolved = self._resolve_box_term()
            self.print_to_log_file(f"box term: {self._box_term_resolved} (box_term={self.box_term!r})")
        return self._box_term_resolved

    def _resolve_box_term(self) -> str:
        if self.box_term not in ("auto", "tightness", "presence"):
            raise ValueError(f"box_term must be 'auto', 'tightness' or 'presence', got {self.box_term!r}")
        if self.box_term != "auto":
            return self.box_term
        if len(self.configuration_manager.patch_size) == 3:
            return "tightness"
        return "presence" if self.training_data_is_volumetric() else "tightness"

    def training_data_is_volumetric(self) -> bool:
        """True when the preprocessed cases have more than one slice (2D configs then train on slices)."""
        keys = sorted(self.load_supervision())  # also sets self.dataset_class
        data = self.dataset_class(self.preprocessed_dataset_folder, keys[:1]).load_case(keys[0])[0]
        return data.shape[1] > 1

    def forward_and_loss(self, data: torch.Tensor, seg: list[torch.Tensor], allowed: list[torch.Tensor],
                         batch: dict) -> dict[str, torch.Tensor]:
        """Network forward pass(es) and the named, weighted loss terms (``seg`` / ``allowed``: lists over scales)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every successful optimizer step (the EMA teacher's update goes here)."""

    # -------------------------------------------------------------------------------- one step
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        target = [t.to(self.device, non_blocking=True) for t in target]
        seg = [t[:, :1] for t in target]
        allowed = [t[:, 1:] for t in target]
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            terms = self.forward_and_loss(data, seg, allowed, batch)
            loss = sum(terms.values())
        if not torch.isfinite(loss.detach()):
            return self.skip_non_finite_step(terms)
        self.consecutive_bad_steps = 0
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), 12)
            self.optimizer.step()
        self.after_optimizer_step()
        out = {"loss": loss.detach().cpu().numpy()}
        out.update({f"loss_{k}": float(terms[k].detach()) if k in terms else 0.0 for k in self.loss_term_names})
        return out

    def skip_non_finite_step(self, terms: dict[str, torch.Tensor]) -> dict:
        """Skip an optimiser step whose loss is NaN/inf; stop after ``max_consecutive_bad_steps``.

        The message names the loss term(s) that went bad, so a user knows where to look.
        """
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach())]
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_bad_steps = getattr(self, "consecutive_bad_steps", 0) + 1
        self.print_to_log_file(f"non-finite loss in term(s) {bad}: step skipped "
                               f"({self.consecutive_bad_steps} in a row)")
        if self.consecutive_bad_steps >= self.max_consecutive_bad_steps:
            raise RuntimeError(f"{self.consecutive_bad_steps} consecutive non-finite losses (term(s) {bad}); "
                               "stopping. Check the input data and the loss weights.")
        return {"loss": np.array(np.nan), **{f"loss_{k}": np.nan for k in self.loss_term_names}}

    # -------------------------------------------------------------------------------- logging
    def on_train_start(self):
        super().on_train_start()
        if self.extra_modules and not getattr(self, "_extra_state_loaded", False):
            self.start_extra_modules()
        if self.local_rank == 0:
            names = {v: k for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}
            sup = self.load_supervision()
            self.print_to_log_file("nnunet-mixsup " + supervision_summary(
                Manifest(dict(sup)), list(self.label_manager.foreground_labels), names))
        for k in self.loss_term_names:
            self.logger.local_logger.my_fantastic_logging.setdefault(f"train_loss_{k}", [])

    def on_train_epoch_end(self, train_outputs: list[dict]):
        finite = [o for o in train_outputs if np.isfinite(o["loss"])]
        train_outputs = finite or train_outputs  # skipped (non-finite) steps do not enter the epoch mean
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        log = self.logger.local_logger.my_fantastic_logging
        parts = []
        for k in self.loss_term_names:
            key = f"train_loss_{k}"
            if f"loss_{k}" not in outputs:
                continue
            v = float(np.mean(outputs[f"loss_{k}"]))
            if self.is_ddp:
                import torch.distributed as dist
                vals = [None] * dist.get_world_size()
                dist.all_gather_object(vals, v)
                v = float(np.mean(vals))
            log.setdefault(key, [])
            self.logger.log(key, v, self.current_epoch)
            parts.append(f"{k} {v:.4f}")
        if parts:
            self.print_to_log_file("loss terms: " + ", ".join(parts))

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0 and os.environ.get("nnUNet_mixsup_no_plot") is None:
            try:
                self.plot_loss_terms()
            except Exception as e:  # noqa: BLE001 - plotting must never stop training
                self.print_to_log_file(f"could not plot loss terms: {e}")

    def plot_loss_terms(self) -> None:
        """``progress_mixsup.png`` beside nnU-Net's progress.png: one curve per loss term."""
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        log = self.logger.local_logger.my_fantastic_logging
        fig, ax = plt.subplots(figsize=(8, 4))
        for k in self.loss_term_names:
            v = log.get(f"train_loss_{k}", [])
            if v:
                ax.plot(range(len(v)), v, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss term (weighted)")
        self.annotate_plot(ax)
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(join(self.output_folder, "progress_mixsup.png"))
        plt.close(fig)

    def annotate_plot(self, ax) -> None:
        """Hook: add to the loss-term plot (the default marks its self-training start)."""


@dataclass
class SelfTrainingSchedule:
    """When the weak cases join training, and how fast the pseudo-label term ramps in.

    Self-training starts at the first epoch ``e >= round(earliest * num_epochs)`` (and >= 1) at
    which nnU-Net's validation pseudo Dice of epoch ``e - 1`` is at least ``min_dice`` for every
    class (NaN - class absent from the validation patches - counts as reached). Small classes are
    learned abruptly, at an epoch that varies from run to run; a teacher that has not found a class
    turns it into confident background pseudo labels and it is never learned, so the start waits
    for it. Afterwards the pseudo-label weight ramps linearly from 0 to 1 over
    ``round(rampup * num_epochs)`` epochs.

    Everything is derived from the logged Dice (``dice_history``: per epoch, per class), which
    nnU-Net saves in every checkpoint, so ``--c`` resumes the same schedule and DDP ranks (which
    log the same all-gathered Dice) agree. The loader (mask-only batches before the start), the
    losses (the ramp), ``bench-speed`` and the end-of-training report all read this object.
    """

    earliest: float = 0.4
    min_dice: float = 0.5
    rampup: float = 0.2
    per_class: bool = False

    def ready(self, dice_per_class: Sequence[float]) -> bool:
        """Every class's validation Dice >= ``min_dice`` (NaN counts as ready)."""
        return all(np.isnan(d) or d >= self.min_dice for d in dice_per_class)

    def start_epoch(self, dice_history: Sequence[Sequence[float]], current_epoch: int, num_epochs: int) -> int | None:
        """The epoch at which self-training starts, or None if it has not started by ``current_epoch``.

        With ``per_class`` the weak cases join at ``earliest`` whatever the Dice says; each class
        is then trusted to the teacher from its own ready epoch on (:meth:`ready_classes`).
        """
        first = max(1, round(self.earliest * num_epochs))
        if self.per_class:
            return first if current_epoch >= first else None
        for epoch in range(first, current_epoch + 1):
            if epoch - 1 < len(dice_history) and self.ready(dice_history[epoch - 1]):
                return epoch
        return None

    def ready_classes(self, dice_history: Sequence[Sequence[float]], current_epoch: int, num_epochs: int,
                      n_classes: int) -> list[bool]:
        """Per class: whether the teacher's pseudo labels may speak for it at ``current_epoch``.

        Without ``per_class``: once self-training has started, every class that nnU-Net's validation
        has scored at least once (a class absent from every mask case only ever logs NaN: the teacher
        never learned it, so it must not label it - in particular not as absent inside its boxes).
        With ``per_class``: class c from the first epoch ``e >= start`` whose previous epoch logged a
        validation Dice >= ``min_dice`` for c, and from then on (NaN never counts).
        """
        return [e is not None for e in self.ready_epochs(dice_history, current_epoch, num_epochs, n_classes)]

    def ready_epochs(self, dice_history: Sequence[Sequence[float]], current_epoch: int, num_epochs: int,
                     n_classes: int) -> list[int | None]:
        """Per class: the epoch from which the teacher labels it, as known at ``current_epoch`` (None: not yet).

        The epochs at which :meth:`ready_classes` turns true: never before the start; a class's Dice
        counts from the epoch after it was logged (:func:`first_epochs_reaching`).
        """
        start = self.start_epoch(dice_history, current_epoch, num_epochs)
        if start is None:
            return [None] * n_classes
        if not self.per_class:  # scored at least once (any Dice that is not NaN)
            scored = first_epochs_reaching(dice_history[:current_epoch], -np.inf, n_classes)
            return [None if e is None else max(start, e) for e in scored]
        since_start = first_epochs_reaching(dice_history[start - 1:current_epoch], self.min_dice, n_classes)
        return [None if e is None else start - 1 + e for e in since_start]

    def ramp(self, dice_history: Sequence[Sequence[float]], current_epoch: int, num_epochs: int) -> float:
        """Weight factor of the pseudo-label term: 0 before the start, then linear 0 -> 1."""
        start = self.start_epoch(dice_history, current_epoch, num_epochs)
        if start is None:
            return 0.0
        return linear_rampup(current_epoch - start, round(self.rampup * num_epochs))

    def report(self, dice_history: Sequence[Sequence[float]], current_epoch: int, num_epochs: int,
               class_names: Sequence[str], weak_kinds_from_start: Sequence[str] = (),
               untrusted_weak_labels: bool = True) -> str:
        """One sentence for the end of training: when the weak cases were used, and for what, or why never.

        ``weak_kinds_from_start``: the supervision kinds that were in the batches from the first
        epoch for their own labels (empty: a mask-only warm-up preceded the start).
        ``untrusted_weak_labels``: whether the weak cases' own labels spoke for a class the teacher
        never labelled (False: such a class learned from the mask cases only).
        """
        start = self.start_epoch(dice_history, current_epoch, num_epochs)
        last = current_epoch + 1
        early = ""
        if weak_kinds_from_start:
            early = f"{' and '.join(weak_kinds_from_start)} cases used for their own labels from epoch 0; "
        if start is not None:
            share = 100.0 * (last - start) / max(1, last)
            if early:
                msg = early + f"teacher pseudo labels from epoch {start} on, {share:.0f} % of the {last} epochs"
            else:
                part = "" if start <= 1 else f" (the first {start} epochs used the mask cases only)"
                msg = f"weak cases used from epoch {start} on, {share:.0f} % of the {last} epochs{part}"
            if self.per_class:
                ready = self.ready_classes(dice_history, current_epoch, num_epochs, len(class_names))
                never = [n for n, r in zip(class_names, ready) if not r]
                if never:
                    msg += (f"; the teacher never labelled {', '.join(never)} (validation Dice below "
                            f"{self.min_dice}): " + ("on the weak cases only their weak labels spoke for them"
                                                     if untrusted_weak_labels else
                                                     "they learned from the mask cases only"))
            return msg
        if self.per_class:
            return (early + f"no teacher pseudo labels: training ended before epoch "
                    f"{max(1, round(self.earliest * num_epochs))}" + ("" if early else
                                                                     "; the run is nnU-Net trained on the mask cases only"))
        best = np.nanmax(np.asarray(dice_history, dtype=float), axis=0) if len(dice_history) else None
        if best is None:
            return early + "no teacher pseudo labels: no validation Dice was logged"
        missing = [f"{n} (best {b:.2f})" for n, b in zip(class_names, best) if not b >= self.min_dice]
        why = f"validation Dice stayed below {self.min_dice} for {', '.join(missing)}" if missing else \
            f"every class reached {self.min_dice} only before epoch {round(self.earliest * num_epochs)}" \
            " or in the last epoch"
        if early:
            return (early + f"no teacher pseudo labels (they need validation pseudo Dice >= {self.min_dice} for "
                    f"every class; {why}); unlabelled cases never used")
        return (f"weak cases never used: self-training needs validation pseudo Dice >= {self.min_dice} for "
                f"every class; {why}. The run is nnU-Net trained on the mask cases only.")


class MixSupTrainer(MixSupTrainerBase):
    """The default mixed-supervision trainer (``nnUNetv2_train ... -tr MixSupTrainer``).

    **Batches.** Every batch holds the plans' batch of mask cases - nnU-Net's own loss on them
    as a sub-batch, so the mask part of every step is that of stock nnU-Net - plus
    ``weak_batch_extra`` x batch weak samples on top.

    **Weak-label terms.** By default (``weak_labels_with_teacher``) the weak samples join the
    batches when the pseudo labels start (before, the batches hold the mask cases only), and their
    labels speak for class c from the epoch the teacher labels c (:meth:`weak_label_classes`):
    until then the terms below leave c out of the weak samples' softmax (:func:`without_classes`),
    so c learns from the mask cases as in stock nnU-Net. A box or tag alone says only where c is
    *not*; for a class the masks have not taught yet that pulled it towards "nowhere" (the thin
    INIA19 structures were lost in every run, ``docs/inia19.md``), so "not here" comes together
    with the teacher's box-constrained "here". Without ``weak_labels_with_teacher`` the cases of
    ``weak_kinds_from_start`` (boxes and image tags) are in the batches from the first epoch. For
    each class they speak for:

    - ``supervised``: nnU-Net's deep-supervised Dice + CE on the mask samples + cross-entropy on the
      weak samples' known voxels (outside every box: background) (:meth:`supervised_loss`);
    - ``negatives``: class c is absent outside its boxes and everywhere when the tags exclude it,
      full resolution (:meth:`negatives_term`);
    - ``mlds``: multi-label deep supervision of the weak samples at the coarse outputs, from their
      known labels and certain negatives (:meth:`mlds_term`);
    - ``box`` (only with ``box_weight`` > 0; off by default): the object lies in its box -
      tightness (every slice through the box extent crosses it) in 3D, presence (some voxel of the
      box cross-section is c) for 2D slices of volumes (:meth:`~MixSupTrainerBase.box_term_loss`).
      On the INIA19 benchmark (2d, slices of volumes) the presence term at weight 0.5 kept the
      network from learning the masks' classes (``docs/inia19.md``), so boxes act through their
      certain negatives, the known background outside them and, later, the box-constrained
      pseudo labels.

    Without cases of those kinds (e.g. masks + unlabelled only) the steps before the pseudo labels
    start are nnU-Net on the mask cases (a mask-only warm-up).

    **Self-training (from** ``schedule.earliest`` **of the epochs).** Unlabelled cases join, and the
    EMA teacher labels the weak samples' unknown voxels with its weak-label-constrained, confident
    predictions - for the classes it has shown it segments (validation pseudo Dice >=
    ``schedule.min_dice``, :meth:`SelfTrainingSchedule.ready_classes`); where another class may be
    present the voxels stay unknown (and the box term, if on, keeps teaching that class). Added terms:

    - ``pseudo``: nnU-Net's Dice + CE of the exported head against the pseudo labels on the weak
      samples, times the schedule's ramp and ``pseudo_weight``; the ``mlds`` targets now include
      the pseudo labels;
    - ``entropy``: entropy of the prediction on unlabelled samples, ramped in over
      ``entropy_rampup_epochs`` from the start of the run.

    After each optimizer step the teacher moves towards the student (``ema_decay``). At the end of
    training the log and ``progress_mixsup.png`` say which weak cases were used from when, and which
    classes the teacher never labelled.

    Attributes (hyperparameters, beyond the base's):
        schedule: :class:`SelfTrainingSchedule` (start of the pseudo labels, per-class trust, ramp).
        weak_kinds_from_start: supervision kinds in the batches from the first epoch (``()``: a
            mask-only warm-up until the pseudo labels start).
        weak_batch_extra: weak samples on top of the plans' batch, as a share of it (0: they take
            ``1 - strong_fraction`` of the plans' batch instead).
        ema_decay: teacher update ``t = ema_decay * t + (1 - ema_decay) * s`` after every step.
        teacher_noise_std: Gaussian noise on the teacher's input (perturbation consistency).
        pseudo_threshold: minimum constrained teacher probability for a pseudo label.
        pseudo_weight: weight of the pseudo-label term at full ramp.
        pseudo_dice: the pseudo-label term is nnU-Net's Dice + CE (True) or cross-entropy only
            (:meth:`pseudo_term`).
        pseudo_types: the supervision kinds whose samples get pseudo labels.
        entropy_weight, entropy_rampup_epochs: the entropy term and its linear ramp.
        box_weight: weight of the box term for the classes the teacher is not trusted with (all of
            them before the pseudo labels start); 0 (default): no box term.
        box_fill_weight: weight of the box fill constraint (:meth:`~MixSupTrainerBase.box_fill_term`,
            bounds ``box_fill_bounds``) for the classes the teacher is not trusted with; 0: off.
        unsure_box_positives: the teacher's confident labels of classes it is not trusted with are
            kept inside their boxes (``keep_unsure_positives`` of :func:`teacher_pseudo_labels`).
        open_empty_boxes: inside a box (wholly in the patch) of a class the teacher labels, its
            background labels become unknown where it labels none of the box that class
            (:func:`open_empty_boxes`); off by default (not yet measured).
        weak_labels_min_dice: used without ``weak_labels_with_teacher``. None: the weak samples'
            labels speak for every class from the start. A number: for class c only from the epoch
            after its validation pseudo Dice first reached it (:meth:`weak_label_classes`); before,
            the weak samples' terms neither score nor move class c (:func:`without_classes`), so a
            class the mask cases have not taught yet learns as in stock nnU-Net instead of meeting
            "not here" only.
        weak_labels_with_teacher: True (default): the weak samples' labels speak for class c from
            the epoch the teacher is trusted with c (:meth:`ready_classes`), together with its
            pseudo labels; overrides ``weak_labels_min_dice``. False: see ``weak_labels_min_dice``.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.schedule = SelfTrainingSchedule(earliest=0.4, min_dice=0.5, rampup=0.2, per_class=True)
        self.strong_fraction = 0.5
        self.weak_kinds_from_start: tuple[str, ...] = LABELLED_WEAK_KINDS
        self.weak_batch_extra = 0.5
        self.ema_decay = 0.99
        self.teacher_noise_std = 0.1
        self.pseudo_threshold = 0.8
        self.pseudo_weight = 1.0
        self.pseudo_dice = True
        self.pseudo_types: tuple[str, ...] = ("box", "tags", "none")
        self.entropy_weight = 0.1
        self.entropy_rampup_epochs = 50
        self.box_weight = 0.0
        self.box_fill_weight = 0.0
        self.unsure_box_positives = False
        self.open_empty_boxes = False
        self.weak_labels_min_dice: float | None = None
        self.weak_labels_with_teacher = True
        self.loss_term_names = ("supervised", "negatives", "mlds", "pseudo", "entropy", "box", "fill")
        self._loaders_self_training: bool | None = None  # phase the current loaders were built for
        self._kinds_in_dataset: frozenset[str] | None = None

    def build_extra_modules(self) -> dict[str, nn.Module]:
        self.entropy_loss = EntropyLoss()
        return {"teacher": ema_teacher(self.network)}

    # -------------------------------------------------------------------------------- schedule
    def self_training_start(self) -> int | None:
        """The epoch self-training started at (None: not yet), from the logged validation Dice."""
        return self.schedule.start_epoch(self._dice_history(), self.current_epoch, self.num_epochs)

    def ready_classes(self) -> list[bool]:
        """Per foreground class: whether the teacher's pseudo labels speak for it now (the schedule's rule)."""
        return self.schedule.ready_classes(self._dice_history(), self.current_epoch, self.num_epochs,
                                           len(self.label_manager.foreground_labels))

    def pseudo_ramp(self) -> float:
        """The schedule's ramp of the pseudo-label term at ``current_epoch``."""
        return self.schedule.ramp(self._dice_history(), self.current_epoch, self.num_epochs)

    def weak_label_classes(self) -> list[bool]:
        """Per foreground class: whether the weak samples' labels speak for it at ``current_epoch``.

        Every class without ``weak_labels_min_dice`` or ``weak_labels_with_teacher``; else class c
        from its :meth:`weak_label_start_epochs` on. From the log, so ``--c`` resumes it.
        """
        starts = self.weak_label_start_epochs()
        return [s is not None and s <= self.current_epoch for s in starts]

    def weak_label_start_epochs(self) -> list[int | None]:
        """Per foreground class: the epoch from which the weak samples' labels speak for it (None: not yet).

        0 for every class by default; with ``weak_labels_with_teacher`` the epoch the teacher is
        trusted with it (:meth:`SelfTrainingSchedule.ready_epochs`); with ``weak_labels_min_dice``
        the epoch after the first logged validation pseudo Dice >= it (:func:`first_epochs_reaching`).
        """
        k = len(self.label_manager.foreground_labels)
        if self.weak_labels_with_teacher:
            return self.schedule.ready_epochs(self._dice_history(), self.current_epoch, self.num_epochs, k)
        if self.weak_labels_min_dice is None:
            return [0] * k
        return first_epochs_reaching(self._dice_history(), self.weak_labels_min_dice, k)

    def weak_labels_gated(self) -> bool:
        """Whether the weak samples' labels join per class (``weak_labels_with_teacher`` or ``_min_dice``)."""
        return self.weak_labels_with_teacher or self.weak_labels_min_dice is not None

    def weak_label_rule(self) -> str:
        """The rule by which a class's weak labels join, in words for the log ('' when not gated)."""
        if self.weak_labels_with_teacher:
            return f"with its pseudo labels: self-training started and validation pseudo Dice >= {self.schedule.min_dice}"
        if self.weak_labels_min_dice is not None:
            return f"once validation pseudo Dice reached {self.weak_labels_min_dice}"
        return ""

    def _dice_history(self) -> list:
        return self.logger.local_logger.my_fantastic_logging.get("dice_per_class_or_region", [])

    def weak_kinds_in_dataset(self) -> frozenset[str]:
        """The supervision kinds the dataset has cases of (read once: this is asked every step)."""
        if self._kinds_in_dataset is None:
            self._kinds_in_dataset = frozenset(s.type for s in self.load_supervision().values())
        return self._kinds_in_dataset

    def weak_kinds_present_from_start(self) -> tuple[str, ...]:
        """The kinds of ``weak_kinds_from_start`` that the dataset has cases of (they join at epoch 0).

        None with ``weak_labels_with_teacher``: no class's weak labels can speak before the teacher
        starts, so until then the batches hold the mask cases only (a mask-only warm-up, at stock
        nnU-Net's step cost) instead of weak samples that would teach nothing.
        """
        if self.weak_labels_with_teacher:
            return ()
        return tuple(k for k in self.weak_kinds_from_start if k in self.weak_kinds_in_dataset())

    def weak_cases_from_start(self) -> bool:
        """Whether the dataset has cases of a kind in ``weak_kinds_from_start``."""
        return bool(self.weak_kinds_present_from_start())

    def in_weak_label_phase(self) -> bool:
        """Before the pseudo labels start, with weak cases in the batches for their own labels."""
        return self.self_training_start() is None and self.weak_cases_from_start()

    def mask_only_batches_left(self) -> int:
        """Unbounded in a mask-only warm-up (no weak case of ``weak_kinds_from_start``), else 0 (also after ``--c``)."""
        if self.self_training_start() is not None or self.weak_cases_from_start():
            return 0
        return 2 ** 62

    def loader_weak_kinds(self) -> tuple[str, ...] | None:
        """``weak_kinds_from_start`` before the pseudo labels start, every weak kind afterwards."""
        return tuple(self.weak_kinds_from_start) if self.in_weak_label_phase() else None

    def extra_weak_samples(self) -> int:
        """Weak samples on top of the plans' batch: 0 without ``weak_batch_extra`` or in a mask-only warm-up."""
        if self.weak_batch_extra <= 0 or self.mask_only_batches_left() > 0:
            return 0
        return max(1, round(self.weak_batch_extra * self.batch_size))

    def train_batch_size(self) -> int:
        return self.batch_size + self.extra_weak_samples()

    def loader_strong_fraction(self) -> float:
        extra = self.extra_weak_samples()
        return self.strong_fraction if extra == 0 else self.batch_size / (self.batch_size + extra)

    def get_dataloaders(self):
        loaders = super().get_dataloaders()
        self._loaders_self_training = self.self_training_start() is not None
        return loaders

    def on_epoch_start(self):
        """Log what changes this epoch (one line), and rebuild the loaders when self-training starts."""
        starting = self._loaders_self_training is False and self.self_training_start() is not None
        joining = ""
        if self.weak_labels_gated() and self.label_manager.ignore_label is not None:
            now = [n for n, s in zip(self.class_names(), self.weak_label_start_epochs()) if s == self.current_epoch]
            if now and self.current_epoch > 0:
                joining = f"the weak labels now speak for {', '.join(now)} ({self.weak_label_rule()})"
        if starting:
            ready = [n for n, r in zip(self.class_names(), self.ready_classes()) if r]
            self.print_to_log_file(f"epoch {self.current_epoch}: self-training starts; the teacher labels "
                                   f"{', '.join(ready) if ready else 'no class yet'} on the weak cases"
                                   + (f"; {joining}" if joining else ""))
            for loader in (self.dataloader_train, self.dataloader_val):
                if hasattr(loader, "_finish"):
                    loader._finish()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        elif joining:
            self.print_to_log_file(f"epoch {self.current_epoch}: {joining}")
        super().on_epoch_start()

    def class_names(self) -> list[str]:
        """The foreground classes' names from dataset.json, in ``foreground_labels`` order."""
        names = {v: k for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}
        return [names.get(c, str(c)) for c in self.label_manager.foreground_labels]

    # -------------------------------------------------------------------------------- one step
    def forward_and_loss(self, data, seg, allowed, batch):
        ramp = self.pseudo_ramp()
        if self.label_manager.ignore_label is None or (ramp == 0 and not self.weak_cases_from_start()):
            # mask-only warm-up (epoch-level, so every DDP rank takes this branch together): stock nnU-Net
            return {"supervised": self.deep_supervised_loss(as_list(self.network(data)), seg, batch)}
        sup_type = batch["sup_type"].to(data.device)
        weak = sup_type != TYPE_CODES["mask"]
        unsure = ~torch.tensor(self.ready_classes(), device=data.device)
        if ramp > 0:
            selected = self.samples_of(batch, self.pseudo_types, data.device)
            pseudo = teacher_pseudo_labels(self.extra_modules["teacher"], data, seg[0], allowed[0], selected,
                                           self.label_manager.ignore_label, self.pseudo_threshold,
                                           self.teacher_noise_std, unsure=unsure,
                                           keep_unsure_positives=self.unsure_box_positives)
            if self.open_empty_boxes:
                check = self.box_pairs_in_patch(allowed[0], batch, classes=~unsure) & selected[:, None]
                pseudo = open_empty_boxes(pseudo, seg[0], allowed[0], check, self.label_manager.ignore_label)
            data, seg, allowed, pseudo = self.student_view(data, seg, allowed, pseudo, selected)
        else:  # weak-label phase: the weak samples' own labels only
            pseudo = seg[0]
        output = as_list(self.network(data))
        off = ~torch.tensor(self.weak_label_classes(), device=data.device)
        weak_out = [without_classes(o, off) for o in output]  # the weak samples' terms skip unlearned classes
        terms = {"supervised": self.deep_supervised_loss(output, seg, batch, weak_output=weak_out)}
        terms["negatives"] = self.negatives_term(weak_out[0], allowed[0], rows=weak)
        terms["mlds"] = self.mlds_term(output, pseudo, allowed[0], rows=weak, off=off)
        if ramp > 0:
            terms["pseudo"] = ramp * self.pseudo_weight * self.pseudo_term(weak_out[0], pseudo, selected)
        unlabelled = sup_type == TYPE_CODES["none"]
        entropy_ramp = linear_rampup(self.current_epoch, self.entropy_rampup_epochs)
        if ramp > 0 and self.entropy_weight > 0 and bool(unlabelled.any()):
            terms["entropy"] = self.entropy_weight * entropy_ramp * self.entropy_loss(output[0], sample_mask=unlabelled)
        if self.box_weight > 0 and bool(unsure.any()):
            terms["box"] = self.box_weight * self.box_term_loss(output[0], allowed[0], batch, classes=unsure)
        if self.box_fill_weight > 0 and bool(unsure.any()):
            terms["fill"] = self.box_fill_weight * self.box_fill_term(output[0], allowed[0], batch, classes=unsure)
        return terms

    def pseudo_term(self, logits: torch.Tensor, pseudo: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The unweighted pseudo-label loss of the ``selected`` samples at full resolution.

        ``pseudo_dice`` (default): nnU-Net's Dice + CE on those samples as a sub-batch
        (:meth:`rows_loss`). Without it: cross-entropy over their labelled voxels only
        (:class:`KnownVoxelCrossEntropyLoss`). The pseudo labels are partial - confident voxels
        only - and a batch Dice over a few confidently labelled voxels of a class has large,
        noisy gradients (its counts are small), while the cross-entropy's are bounded.
        """
        if self.pseudo_dice:
            return self.rows_loss(self.fullres_loss, logits, pseudo, selected)
        return self.weak_ce(logits, self.only(selected, pseudo))

    def deep_supervised_loss(self, output: list[torch.Tensor], seg: list[torch.Tensor], batch: dict,
                             weak_output: list[torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`supervised_loss` with nnU-Net's own loss: every deep-supervision output if enabled, else the one."""
        weak_output = output if weak_output is None else weak_output
        if self.enable_deep_supervision:
            return self.supervised_loss(self.loss, output, seg, batch, weak_output=weak_output)
        return self.supervised_loss(self.loss, output[0], seg[0], batch, weak_output=weak_output[0])

    def student_view(self, data: torch.Tensor, seg: list[torch.Tensor], allowed: list[torch.Tensor],
                     pseudo: torch.Tensor, selected: torch.Tensor):
        """What the student sees once the teacher has labelled the batch (unchanged here; a hook for variants).

        Returns ``(data, seg, allowed, pseudo)``; a variant may mix or perturb the ``selected``
        rows as long as every target stays aligned with the image.
        """
        return data, seg, allowed, pseudo

    def after_optimizer_step(self) -> None:
        ema_update(self.extra_modules["teacher"], unwrap(self.network), self.ema_decay)

    # -------------------------------------------------------------------------------- report
    def schedule_report(self) -> str:
        """:meth:`SelfTrainingSchedule.report` for this run (log and plot at the end of training)."""
        msg = self.schedule.report(self._dice_history(), min(self.current_epoch, self.num_epochs - 1),
                                   self.num_epochs, self.class_names(),
                                   weak_kinds_from_start=self.weak_kinds_present_from_start(),
                                   untrusted_weak_labels=not self.weak_labels_with_teacher)
        return msg + self.weak_label_report() + self.lost_classes_report()

    def lost_classes_report(self) -> str:
        """Names the classes whose validation Dice collapsed after they were learned (:func:`classes_lost`; '' if none)."""
        lost = classes_lost(self._dice_history(), self.schedule.min_dice)
        if not lost:
            return ""
        names = self.class_names()
        parts = [f"{names[c] if c < len(names) else c} (best {best:.2f} at epoch {e}, last {last:.2f})"
                 for c, best, e, last in lost]
        return ("; WARNING: validation Dice collapsed after these classes were learned: " + ", ".join(parts)
                + " - checkpoint_best.pth holds the best epoch's weights")

    def weak_label_report(self) -> str:
        """When gated (:meth:`weak_labels_gated`): from which epoch the weak labels spoke for each class ('' else)."""
        if not self.weak_labels_gated() or not (set(LABELLED_WEAK_KINDS) & self.weak_kinds_in_dataset()):
            return ""
        history = self._dice_history()
        parts = []
        for c, (name, start) in enumerate(zip(self.class_names(), self.weak_label_start_epochs())):
            if start is not None and start <= self.num_epochs - 1:
                parts.append(f"{name} from epoch {start}")
                continue
            logged = [float(h[c]) for h in history if c < len(h) and not np.isnan(h[c])]
            parts.append(f"{name} never ({f'best {max(logged):.2f}' if logged else 'no Dice logged'})")
        return (f"; weak labels per class ({self.weak_label_rule()}): "
                + ", ".join(parts))

    def on_train_end(self):
        if self.local_rank == 0 and self.label_manager.ignore_label is not None:
            self.print_to_log_file("nnunet-mixsup: " + self.schedule_report())
        super().on_train_end()

    def annotate_plot(self, ax) -> None:
        start = self.self_training_start()
        if start is not None:
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
        ax.set_title(self.schedule_report(), fontsize=7, wrap=True)
