"""Mixed-supervision trainers: thin subclasses of nnU-Net's ``nnUNetTrainer``.

Follow one batch: :class:`nnunet_mixsup.data.MixSupDataLoader` yields ``target`` scales of shape
(B, 1 + K, *s) plus ``sup_type`` and ``tags``; :meth:`MixSupTrainerBase.train_step` splits channel 0
(nnU-Net's label map with the ignore label) from the K *allowed* channels and hands both to
:meth:`MixSupTrainerBase.compute_loss`, which returns named loss terms (plain torch modules from
:mod:`nnunet_mixsup.losses`); their weighted sum is optimised exactly like nnU-Net's own loss.

``MixSupTrainerBase`` holds the plumbing (supervision manifest, mask-only validation splits, the
mixed-supervision loader, per-group supervised loss, extra modules and their checkpointing, per-term
logging, non-finite-step handling) and the simplest scheme: nnU-Net's Dice + CE on the mask
samples exactly as stock, cross-entropy on the known voxels of the weak samples, certain negatives
per class. ``MixSupTrainer_Negatives`` is that scheme as a variant.

``MixSupTrainer_WeakOnly`` adds MLDS (coarse outputs), a box term (tightness, or presence for 2D
slices of 3D volumes) and ramped entropy; it was the default until session 13. The default users
run, ``MixSupTrainer``, is defined in :mod:`nnunet_mixsup.trainer_distill`: it builds on these
terms with a mask-only warm-up and weak-label-constrained self-training, the one scheme measured
not below the mask-only baseline on the cpu-mini benchmark (equal on average; docs/BENCHMARKS.md).

Validation (online pseudo-Dice and final validation) only ever sees mask cases. The network is
nnU-Net's own, so checkpoints load in stock ``nnUNetv2_predict`` and friends.

Hyperparameters are attributes (nnU-Net records ``__init__`` arguments by signature, so trainers
take no extra arguments); variants are subclasses named ``MixSupTrainer_<Variant>``.
"""
from __future__ import annotations

import os
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

from nnunet_mixsup.data import MixSupDataLoader, record_spatial_axes
from nnunet_mixsup.losses import (
    BoxPresenceLoss,
    BoxProjectionLoss,
    CertainNegativeLoss,
    EntropyLoss,
    KnownVoxelCrossEntropyLoss,
    MultiLabelDeepSupervisionLoss,
    labels_to_pos_known,
    multilabel_pooled_targets,
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


def set_budget(trainer: nnUNetTrainer, epochs: int, iterations: int, val_iterations: int = 5,
               save_every: int = 10) -> None:
    """Give a trainer a short schedule (nnU-Net's own attributes); used by the demo/smoke variants."""
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.save_every = save_every
    apply_env_budget(trainer)


BUDGET_ENV = ("nnUNet_mixsup_epochs", "nnUNet_mixsup_iterations", "nnUNet_mixsup_val_iterations")


def apply_env_budget(trainer: nnUNetTrainer) -> None:
    """Let ``nnUNet_mixsup_epochs`` / ``_iterations`` / ``_val_iterations`` override the schedule, if set.

    Benchmarks must train every run - the stock baseline included - with the same budget; the
    environment (nnU-Net's own way of passing settings to ``nnUNetv2_train``) does that without a
    trainer class per budget. ``_val_iterations`` sets the online-validation batches per epoch
    (nnU-Net: 50), which dominate the cost of short CPU runs. Unset, nothing changes.
    """
    e, i, v = (os.environ.get(k) for k in BUDGET_ENV)
    if e:
        trainer.num_epochs = int(e)
    if i:
        trainer.num_iterations_per_epoch = int(i)
    if v:
        trainer.num_val_iterations_per_epoch = int(v)


class MixSupTrainerBase(nnUNetTrainer):
    """nnU-Net trainer that learns from mask, box, image-tag and unlabelled cases together (base class).

    Attributes (hyperparameters):
        strong_fraction: share of every training batch drawn from mask cases.
        separate_group_losses: nnU-Net's loss on the mask samples, known-voxel CE on the weak ones
            (see :meth:`supervised_loss`); weak_supervised_weight: factor of the weak samples' part.
        negative_weight: weight of the certain-negative term (``CertainNegativeLoss``).
        max_consecutive_bad_steps: non-finite losses are skipped; this many in a row stop training.

    Class attribute ``trains_on_weak_cases``: False for trainers that use the mask cases only
    (``strong_fraction`` 1); the benchmark then charges them the masks' annotation cost only.
    """

    trains_on_weak_cases: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 0.5
        self.negative_weight = 1.0
        self.max_consecutive_bad_steps = 10
        self.separate_group_losses = True
        self.weak_supervised_weight = 1.0
        self.consecutive_bad_steps = 0
        self.supervision: dict[str, CaseSupervision] | None = None
        self.loss_term_names: tuple[str, ...] = ("supervised", "negatives")
        # modules beyond self.network (EMA teacher, second decoder / network, extra heads); they are
        # built in initialize(), optimised with self.network if trainable, and saved in checkpoints
        self.extra_modules: dict[str, nn.Module] = {}
        apply_env_budget(self)

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

    def start_extra_modules(self) -> None:
        """Align the extra modules with the network at the start of a new run (nothing here).

        Called by :meth:`on_train_start` unless a checkpoint restored the extra modules (``--c``),
        i.e. after ``-pretrained_weights`` were loaded into ``self.network``.
        """

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
    def train_batch_size(self) -> int:
        """Samples per training batch (per DDP rank): the plans' batch size here."""
        return self.batch_size

    def loader_strong_fraction(self) -> float:
        """Share of each training batch drawn from mask cases: ``strong_fraction`` here."""
        return self.strong_fraction

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
                                 n_workers=max(1, get_allowed_n_proc_DA()),
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
        """Training batches still to come in a mask-only warm-up (none here; see ``MixSupTrainer_MaskFirst``).

        Counted from ``current_epoch`` when the loaders are built, so a run resumed with ``--c``
        continues the schedule instead of starting the warm-up again.
        """
        return 0

    # -------------------------------------------------------------------------------- losses
    def _build_loss(self):
        self.negative_loss = CertainNegativeLoss()
        self.weak_ce = KnownVoxelCrossEntropyLoss(self.label_manager.ignore_label)
        return super()._build_loss()

    def deep_supervision_weights(self, n_outputs: int) -> list[float]:
        """nnU-Net's scale weights (1/2^i, lowest scale 0, normalised) – shared by all our terms."""
        if n_outputs == 1:
            return [1.0]
        w = np.array([1 / (2 ** i) for i in range(n_outputs)])
        w[-1] = 1e-6 if self.is_ddp else 0
        return list(w / w.sum())

    def only(self, samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target`` (B, 1, *s) with the unselected samples set to the ignore label (needs one)."""
        keep = samples.view(-1, *([1] * (target.ndim - 1)))
        return torch.where(keep, target, torch.full_like(target, self.label_manager.ignore_label))

    def rows_loss(self, loss_fn, output, target, rows: torch.Tensor) -> torch.Tensor:
        """``loss_fn`` on the batch ``rows`` only, equal in value and gradient to ``loss_fn`` on that sub-batch.

        See :func:`loss_on_rows`; the trainer supplies its ignore label.
        """
        return loss_on_rows(loss_fn, output, target, rows, self.label_manager.ignore_label)

    def supervised_loss(self, loss_fn, output, target, batch: dict) -> torch.Tensor:
        """nnU-Net's loss (``loss_fn``) on the mask samples + known-voxel CE on the weak samples.

        nnU-Net's CE is a mean over every annotated voxel of the batch and its batch Dice sums over
        the batch, so in one call the many certain-background voxels of weak samples (outside their
        boxes) would dilute the mask samples' gradient. Split by group, the first term is exactly
        nnU-Net's loss on the batch's mask samples as a sub-batch (:meth:`rows_loss`, for batch
        and per-sample Dice alike). The weak samples get cross-entropy on their known voxels only
        (:class:`KnownVoxelCrossEntropyLoss`, times ``weak_supervised_weight``; deep-supervision
        outputs weighted like nnU-Net's): their known voxels are certain background, where a Dice
        term is degenerate. ``output`` / ``target``: a tensor or a list over deep-supervision
        scales (as ``loss_fn`` takes them).
        """
        if self.label_manager.ignore_label is None or not self.separate_group_losses:
            return loss_fn(output, target)
        many = isinstance(target, (list, tuple))
        dev = (target[0] if many else target).device
        is_mask = batch["sup_type"].to(dev) == TYPE_CODES["mask"]
        mask_part = self.rows_loss(loss_fn, output, target, is_mask)
        if many:
            weights = self.deep_supervision_weights(len(output))
            weak_part = sum(w * self.weak_ce(o, self.only(~is_mask, t))
                            for w, o, t in zip(weights, output, target) if w > 0)
        else:
            weak_part = self.weak_ce(output, self.only(~is_mask, target))
        return mask_part + self.weak_supervised_weight * weak_part

    def compute_loss(self, output: list[torch.Tensor], seg: list[torch.Tensor], allowed: list[torch.Tensor],
                     batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms, each already weighted. ``output``/``seg``/``allowed`` are lists over scales."""
        if self.enable_deep_supervision:
            terms = {"supervised": self.supervised_loss(self.loss, output, seg, batch)}
        else:
            terms = {"supervised": self.supervised_loss(self.loss, output[0], seg[0], batch)}
        weights = self.deep_supervision_weights(len(output))
        neg = sum(w * self.negative_loss(o, a) for w, o, a in zip(weights, output, allowed) if w > 0)
        terms["negatives"] = self.negative_weight * neg
        return terms

    def forward_and_loss(self, data: torch.Tensor, seg: list[torch.Tensor], allowed: list[torch.Tensor],
                         batch: dict) -> dict[str, torch.Tensor]:
        """Network forward pass(es) and the named loss terms; teacher-student variants override this."""
        return self.compute_loss(as_list(self.network(data)), seg, allowed, batch)

    def after_optimizer_step(self) -> None:
        """Called after every successful optimizer step (the mean teacher's EMA update goes here)."""

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
        out.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
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
        return {"loss": np.array(np.nan), **{f"loss_{k}": np.nan for k in terms}}

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
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(join(self.output_folder, "progress_mixsup.png"))
        plt.close(fig)



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


class MixSupTrainer_Negatives(MixSupTrainerBase):
    """The simplest scheme: per-group supervised loss + certain negatives (no MLDS, box or entropy term)."""


class MixSupTrainer_MLDS(MixSupTrainerBase):
    """Multi-label deep supervision (Reiss et al., CVPR 2021) on mask cases only.

    Full resolution: nnU-Net's Dice + CE. Every coarser output: sigmoid + BCE per class against the
    max-pooled one-hot target (kernel = stride = that output's cumulative pooling, anisotropic
    where the plans are), masked where the pooled target is unknown. A fair drop-in comparison
    with ``nnUNetTrainer``: same data (``strong_fraction = 1``), only the deep-supervision targets
    differ.

    Attributes:
        mlds_weight: factor on the summed coarse-scale terms (scale weights as nnU-Net's).
        mlds_soft_dice: add a masked soft Dice to the BCE at coarse scales.
        mlds_scale_weighting: ``"nnunet"`` (1/2^i, default) or ``"uniform"``; see :meth:`mlds_scale_weights`.
        mlds_on_mask_samples: MLDS on the mask samples too (default). If False, the mask samples get
            nnU-Net's own deep supervision (Dice + CE at every scale against the downsampled labels)
            and MLDS and the certain-negative term serve the weak samples only.
    """

    trains_on_weak_cases: ClassVar[bool] = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 1.0
        self.mlds_weight = 1.0
        self.mlds_soft_dice = False
        self.mlds_scale_weighting = "nnunet"
        self.mlds_on_mask_samples = True
        self.loss_term_names = ("supervised", "mlds", "negatives")

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.strong_fraction >= 1.0:  # mask cases only
            sup = self.load_supervision()
            keys = [k for k in dataset_tr.identifiers if sup[k].type == "mask"]
            if not keys:
                raise RuntimeError(f"fold {self.fold}: {type(self).__name__} trains on mask cases only, but the "
                                   f"fold's training split has no mask case. Add mask cases to its 'train' list "
                                   f"in splits_final.json or use a trainer that learns from weak cases.")
            dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, keys,
                                            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return dataset_tr, dataset_val

    def _build_loss(self):
        loss = super()._build_loss()
        self.fullres_loss = loss.loss if hasattr(loss, "loss") else loss
        self.mlds_loss = MultiLabelDeepSupervisionLoss(use_soft_dice=self.mlds_soft_dice)
        return loss

    def cumulative_pooling(self) -> list[list[int]]:
        """Per network output (full resolution first): its downsampling relative to the input."""
        strides = np.array(self.configuration_manager.pool_op_kernel_sizes)
        return [list(map(int, v)) for v in np.cumprod(strides, axis=0)]

    def mlds_scale_weights(self, n_outputs: int) -> list[float]:
        """Weights of the coarse outputs 1..n-1 (their sum is nnU-Net's coarse share of the loss).

        ``mlds_scale_weighting``: ``"nnunet"`` - nnU-Net's 1/2^i, lowest scale 0; ``"uniform"`` -
        the same total spread equally over every coarse output, lowest included (the MLDS
        reference sums its scales unweighted).
        """
        coarse = self.deep_supervision_weights(n_outputs)[1:]
        if self.mlds_scale_weighting == "uniform":
            coarse = [sum(coarse) / len(coarse)] * len(coarse)
        elif self.mlds_scale_weighting != "nnunet":
            raise ValueError(f"mlds_scale_weighting must be 'nnunet' or 'uniform', got {self.mlds_scale_weighting!r}")
        return [float(w) for w in coarse]

    def mlds_term(self, output: list[torch.Tensor], seg0: torch.Tensor, allowed0: torch.Tensor,
                  batch: dict) -> torch.Tensor:
        """Pooled multi-label targets from the full-resolution labels, BCE at every coarse output.

        Without ``mlds_on_mask_samples`` the mask samples are left out (their coarse outputs get
        nnU-Net's own deep supervision in :meth:`compute_loss`).
        """
        weights = self.mlds_scale_weights(len(output)) if len(output) > 1 else []
        if sum(weights) == 0:
            return output[0].sum() * 0
        if not self.mlds_on_mask_samples:
            if self.label_manager.ignore_label is None:  # every case is a mask case: nothing left for MLDS
                return output[0].sum() * 0
            seg0, allowed0 = self.weak_samples_only(seg0, allowed0, batch)
        pos, known = labels_to_pos_known(seg0, allowed0, output[0].shape[1], self.label_manager.ignore_label)
        pools = self.cumulative_pooling()
        targets = [multilabel_pooled_targets(pos, known, pools[i]) for i in range(1, len(output))]
        self.mlds_loss.weights = weights
        return sum(weights) * self.mlds_loss(list(output[1:]), targets)

    def weak_samples_only(self, seg0: torch.Tensor, allowed0: torch.Tensor,
                          batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Label map and allowed maps with the mask samples made all-unknown (ignore label, all allowed).

        A mask sample's allowed maps are 0 outside nnU-Net's non-zero crop (background there by
        nnU-Net's convention), which would otherwise give it certain negatives.
        """
        is_mask = batch["sup_type"].to(seg0.device) == TYPE_CODES["mask"]
        keep = (~is_mask).view(-1, *([1] * (allowed0.ndim - 1)))
        return self.only(~is_mask, seg0), torch.where(keep, allowed0, torch.ones_like(allowed0))

    def compute_loss(self, output, seg, allowed, batch):
        if self.mlds_on_mask_samples or not self.enable_deep_supervision:
            weights = self.deep_supervision_weights(len(output))
            supervised = float(weights[0]) * self.supervised_loss(self.fullres_loss, output[0], seg[0], batch)
        else:  # nnU-Net's deep supervision (all scales) on the mask samples, known-voxel CE on the weak ones
            supervised = self.supervised_loss(self.loss, output, seg, batch)
        terms = {"supervised": supervised}
        terms["mlds"] = self.mlds_weight * self.mlds_term(output, seg[0], allowed[0], batch)
        neg_allowed = allowed[0]
        if not self.mlds_on_mask_samples and self.label_manager.ignore_label is not None:
            neg_allowed = self.weak_samples_only(seg[0], allowed[0], batch)[1]  # mask samples: nnU-Net's loss only
        terms["negatives"] = self.negative_weight * self.negative_loss(output[0], neg_allowed)
        return terms


class MixSupTrainer_MLDS_Uniform(MixSupTrainer_MLDS):
    """``MixSupTrainer_MLDS`` with equal weights on every coarse output (scale-weight ablation)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mlds_scale_weighting = "uniform"


class MixSupTrainer_WeakOnly(MixSupTrainer_MLDS):
    """All weak-label losses, no teacher: MLDS on every case (box and tag negatives included in
    the pooled targets), certain negatives, box tightness (max-projection Dice) on boxes fully
    inside the patch, and an entropy (confidence) term on unlabelled samples ramped up linearly.

    Attributes:
        box_weight, entropy_weight: term weights; entropy_rampup_epochs: linear ramp length.
        box_term: ``"tightness"`` (:class:`BoxProjectionLoss`), ``"presence"``
            (:class:`BoxPresenceLoss`) or ``"auto"`` (default): presence when a 2D configuration
            trains on slices of 3D volumes - there a patch holds a cross-section of each 3D box, for
            which the tightness prior is false (the object's cross-section is smaller than the box
            rectangle near its ends) but "the object occurs in the rectangle" holds - else tightness.
            Tightness applies only to samples whose augmentation kept the image axes
            (``batch["axes_kept"]``, see :class:`nnunet_mixsup.data.AxesRecordingSpatialTransform`):
            after a rotation the box still bounds the object but is no longer its tight box.
    """

    trains_on_weak_cases: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 0.5
        self.box_weight = 0.5
        self.entropy_weight = 0.1
        self.entropy_rampup_epochs = 50
        self.box_term = "auto"
        self.loss_term_names = ("supervised", "mlds", "negatives", "box", "entropy")

    def _build_loss(self):
        loss = super()._build_loss()
        self.box_tightness_loss, self.box_presence_loss = BoxProjectionLoss(), BoxPresenceLoss()
        self._box_term_resolved: str | None = None
        self.entropy_loss = EntropyLoss()
        return loss

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

    def rampup(self) -> float:
        return min(1.0, (self.current_epoch + 1) / max(1, self.entropy_rampup_epochs))

    def compute_loss(self, output, seg, allowed, batch):
        terms = super().compute_loss(output, seg, allowed, batch)
        sup_type = batch["sup_type"].to(output[0].device)
        is_box = sup_type == TYPE_CODES["box"]
        valid = boxes_inside_patch(allowed[0]) & is_box[:, None]
        if self.resolved_box_term() == "presence":
            box_loss = self.box_presence_loss  # "the object is somewhere in its box" holds for rotated boxes too
        else:  # a rotated box is not the tight box of the rotated object: tightness only where axes were kept
            box_loss = self.box_tightness_loss
            valid = valid & batch["axes_kept"].to(valid.device)[:, None]
        terms["box"] = self.box_weight * box_loss(output[0], allowed[0], valid)
        unlabelled = sup_type == TYPE_CODES["none"]
        terms["entropy"] = self.entropy_weight * self.rampup() * self.entropy_loss(output[0], sample_mask=unlabelled)
        return terms


class MixSupTrainer_Strong75(MixSupTrainer_WeakOnly):
    """``MixSupTrainer_WeakOnly`` (the default until session 13), 3/4 of every batch from mask cases.

    ``strong_fraction`` 0.75 instead of 0.5.

    Ablation of the batch composition: the mask samples carry the signal the mask-only baseline
    learns from, and at ``strong_fraction`` 0.5 they are seen half as often per iteration.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strong_fraction = 0.75


class MixSupTrainer_NoEntropy(MixSupTrainer_WeakOnly):
    """``MixSupTrainer_WeakOnly`` (the default until session 13) without the entropy term (ablation).

    The entropy (confidence) term acts on unlabelled samples only.

    Entropy minimisation sharpens every uncertain voxel towards the currently favoured class; on
    thin structures (grey matter at 4 mm is one or two voxels wide) most voxels are boundary
    voxels, so this ablation measures whether the term costs boundary accuracy.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.entropy_weight = 0.0


class nnUNetTrainer_MixSupBudget(nnUNetTrainer):
    """Stock ``nnUNetTrainer`` whose schedule follows ``nnUNet_mixsup_epochs`` / ``_iterations``.

    The baseline of ``nnunet-mixsup benchmark``: identical to ``nnUNetTrainer`` except that it
    honours the same budget variables as the MixSup trainers.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_env_budget(self)


class nnUNetTrainer_MixSupDemo(nnUNetTrainer):
    """Stock ``nnUNetTrainer`` with the demo's short budget (baselines in ``nnunet-mixsup demo``).

    Only the schedule differs from stock; it exists so that baselines and MixSup trainers run with
    exactly the same number of epochs and iterations.
    """

    demo_epochs = 80
    demo_iterations = 25

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, self.demo_epochs, self.demo_iterations)


class MixSupTrainer_WeakOnly_Demo(MixSupTrainer_WeakOnly):
    """``MixSupTrainer_WeakOnly`` with the demo's short budget (entropy ramp shortened to match)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, nnUNetTrainer_MixSupDemo.demo_epochs, nnUNetTrainer_MixSupDemo.demo_iterations)
        self.entropy_rampup_epochs = self.num_epochs // 4


class MixSupTrainer_MLDS_Demo(MixSupTrainer_MLDS):
    """``MixSupTrainer_MLDS`` (mask cases only) with the demo's short budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, nnUNetTrainer_MixSupDemo.demo_epochs, nnUNetTrainer_MixSupDemo.demo_iterations)
