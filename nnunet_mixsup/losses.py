"""Loss terms for mixed supervision (mask / box / image tags / unlabelled).

Every loss here is a plain :class:`torch.nn.Module` (or function) that knows nothing about nnU-Net.

Conventions (shared with the rest of :mod:`nnunet_mixsup`):

- ``logits``: ``(B, C, *spatial)`` raw network output, ``C`` = number of classes *including*
  background (class 0). ``spatial`` is ``(X, Y)`` (2D) or ``(X, Y, Z)`` (3D).
- ``target``: ``(B, 1, *spatial)`` integer-valued label map (a float dtype holding integers is
  fine); the value ``ignore_index`` means "unknown".
- ``allowed``: ``(B, K, *spatial)`` with ``K = C - 1`` foreground classes (channel ``k`` <-> class
  ``k + 1``): 1 where class ``k + 1`` *may* be present at that voxel, 0 where it is *certainly
  absent* (outside every box of that class, or class absent from the image tags).
- ``sample_mask``: optional ``(B,)`` bool/float tensor selecting the samples a term applies to.
- ``voxel_mask``: optional ``(B, 1, *spatial)`` bool/float tensor selecting voxels.

Numerics: all logs, entropies and divergences are computed in float32 (inputs are cast with
``.float()`` and autocast is disabled inside the losses), with ``log_softmax`` / ``logsumexp`` /
``binary_cross_entropy_with_logits`` formulations, so logits of +-1e4 give finite values and
gradients. A term with nothing to average over (empty mask, no valid sample) returns an exact 0
that is still connected to the graph and has zero gradient - never NaN. Masked means divide by
the number of selected entries, so masked-out entries contribute neither value nor gradient.

Callers should pass the optional masks by keyword (the order is always: required tensors, then
``sample_mask``, then ``voxel_mask``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BoxFillLoss",
    "BoxPresenceLoss",
    "BoxProjectionLoss",
    "CertainNegativeLoss",
    "EntropyLoss",
    "KLDistillationLoss",
    "KnownVoxelCrossEntropyLoss",
    "MultiLabelDeepSupervisionLoss",
    "SoftDiceAgreementLoss",
    "constrain_pseudo_labels",
    "ema_update",
    "labels_to_pos_known",
    "multilabel_pooled_targets",
    "pseudo_label_map",
]


# ----------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _fp32(t: Tensor) -> Iterator[None]:
    """Disable autocast for the device type of ``t`` (no-op where autocast is unavailable)."""
    dev = t.device.type
    if torch.amp.is_autocast_available(dev):
        with torch.autocast(device_type=dev, enabled=False):
            yield
    else:
        yield


def _check_logits(logits: Tensor, name: str = "logits", min_classes: int = 2) -> None:
    if logits.ndim not in (4, 5):
        raise ValueError(f"{name} must be (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(logits.shape)}")
    if logits.shape[1] < min_classes:
        raise ValueError(f"{name} needs at least {min_classes} channels, got {logits.shape[1]}")


def _check_same(a: Tensor, b: Tensor, name_a: str, name_b: str, channels: int | None = None) -> None:
    """``b`` must be (B, channels, *spatial of a)."""
    exp = (a.shape[0], a.shape[1] if channels is None else channels, *a.shape[2:])
    if tuple(b.shape) != exp:
        raise ValueError(f"{name_b} must have shape {exp} to match {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def _sample_weights(sample_mask: Tensor | None, ref: Tensor) -> Tensor:
    """(B, 1, 1, ...) float32 weights broadcastable to ``ref`` (B, ., *spatial)."""
    shape = (ref.shape[0],) + (1,) * (ref.ndim - 1)
    if sample_mask is None:
        return torch.ones(shape, device=ref.device, dtype=torch.float32)
    if sample_mask.numel() != ref.shape[0]:
        raise ValueError(f"sample_mask must have B={ref.shape[0]} entries, got shape {tuple(sample_mask.shape)}")
    return sample_mask.to(device=ref.device, dtype=torch.float32).reshape(shape)


def _voxel_weights(sample_mask: Tensor | None, voxel_mask: Tensor | None, ref: Tensor) -> Tensor:
    """(B, 1, *spatial) float32 weights: sample_mask x voxel_mask (either optional)."""
    w = _sample_weights(sample_mask, ref)
    if voxel_mask is not None:
        _check_same(ref, voxel_mask, "logits", "voxel_mask", channels=1)
        w = w * voxel_mask.to(device=ref.device, dtype=torch.float32)
    return w.expand(ref.shape[0], 1, *ref.shape[2:])


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(w * v) / sum(w); exactly 0 (zero gradient, no NaN) when sum(w) == 0.

    Entries with w == 0 are removed with ``torch.where`` so even a non-finite value there can not
    leak into the result.
    """
    weights = weights.expand_as(values)
    v = torch.where(weights > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    num = (v * weights).sum()
    den = weights.sum()
    return num / den.clamp_min(1e-12)


def _to_kernel(kernel: int | Sequence[int], nd: int) -> tuple[int, ...]:
    k = (int(kernel),) * nd if isinstance(kernel, int) else tuple(int(v) for v in kernel)
    if len(k) != nd or any(v < 1 for v in k):
        raise ValueError(f"kernel must be {nd} positive ints (one per spatial axis), got {kernel!r}")
    return k


# ------------------------------------------------------------------------------ certain negatives
def _log_one_minus_softmax(z: Tensor) -> Tensor:
    """``log(1 - softmax(z)_c)`` for every class c, stable for any finite logits. z: (B, C, *s) fp32.

    Mathematically ``log(1 - p_c) = logsumexp_{j != c} z_j - logsumexp_j z_j``. Computing the
    "all but c" logsumexp for every c would need a (B, C, C, *s) tensor, so two exact branches are
    used instead (memory O(B*C*V)):

    - c is not the arg-max: then p_c <= 1/2 and ``log1p(-p_c)`` is accurate;
    - c is the arg-max (p_c may round to 1): ``logsumexp`` over z with the arg-max entry set to
      -inf, minus ``logsumexp`` of all. E.g. z = (0, 1e4, 0): log(1 - p_1) = log 2 - 1e4.
    """
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.exp(z - lse)
    # the arg-max as a (B, C, *s) bool map; max(dim).indices + a broadcast compare is ~30x faster on
    # the CPU than argmax + one_hot + movedim (same first-maximum tie rule)
    classes = torch.arange(z.shape[1], device=z.device).view(1, -1, *([1] * (z.ndim - 2)))
    is_top = z.max(dim=1, keepdim=True).indices == classes
    # top branch: logsumexp over the other classes (>= 1 finite entry as C >= 2)
    lse_others = torch.logsumexp(z.masked_fill(is_top, float("-inf")), dim=1, keepdim=True)
    log_q_top = lse_others - lse
    # non-top branch; the top entry is replaced by 0 so that log1p(-1) = -inf never appears
    # (a -inf in the unused branch of torch.where would still give NaN gradients)
    log_q_rest = torch.log1p(-torch.where(is_top, torch.zeros_like(p), p))
    return torch.where(is_top, log_q_top.expand_as(z), log_q_rest)


class KnownVoxelCrossEntropyLoss(nn.Module):
    """Softmax cross-entropy averaged over the voxels whose label is known.

    ``CE = -log softmax(logits)[target]`` per voxel, in float32; voxels with ``target ==
    ignore_index`` contribute neither value nor gradient; the mean is over the known voxels of
    the whole batch (the same normalisation as nnU-Net's CE). Unlike ``torch``'s CE with
    ``ignore_index``, a batch without any known voxel gives an exact 0 (not NaN).

    Why not Dice here: for weak samples the known voxels are (almost) all certain background,
    and a soft Dice of a class with no positive voxel is maximised only by predicting exactly
    nothing anywhere - a strong, degenerate push against every foreground class.

    Args:
        ignore_index: label value meaning "unknown" (None: every voxel is known).

    Forward:
        logits: (B, C, *spatial) raw scores.
        target: (B, 1, *spatial) integer label map.

    Returns:
        float32 scalar >= 0.
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits)
        if target.shape != (logits.shape[0], 1, *logits.shape[2:]):
            raise ValueError(f"target must have shape {(logits.shape[0], 1, *logits.shape[2:])}, "
                             f"got {tuple(target.shape)}")
        t = target[:, 0].long()
        with _fp32(logits):
            if self.ignore_index is None:
                known = torch.ones_like(t, dtype=torch.bool)
            else:
                known = t != self.ignore_index
            ce = F.cross_entropy(logits.float(), torch.where(known, t, torch.zeros_like(t)), reduction="none")
            ce = torch.where(known, ce, torch.zeros((), device=ce.device))
            return ce.sum() / known.sum().clamp_min(1)


class CertainNegativeLoss(nn.Module):
    """Penalise probability mass on classes that are certainly absent at a voxel.

    For every voxel and foreground class ``c`` with ``allowed[:, c-1] == 0`` the penalty is
    ``-log(1 - p_c)``, ``p = softmax(logits, dim=1)``, computed stably (see
    :func:`_log_one_minus_softmax`): for logits (0, 1e4, 0) and class 1 forbidden it is
    ``1e4 - log 2``, finite, instead of ``inf``.

    Args:
        reduction: ``"mean"`` (default): mean over all negative entries (voxel x class) of the
            selected samples, 0 if there are none; ``"sum"``: their sum; ``"none"``: the
            (B, K, *spatial) penalty map, 0 where an entry is not a selected negative.

    Forward:
        logits: (B, C, *spatial) raw scores, any float dtype.
        allowed: (B, C-1, *spatial), 1 = class may be present, 0 = certainly absent. Values are
            thresholded at 0.5.
        sample_mask: optional (B,) bool/float; samples with 0 contribute nothing.

    Returns:
        float32 scalar (or map for ``reduction="none"``).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: Tensor, allowed: Tensor, sample_mask: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        _check_same(logits, allowed, "logits", "allowed", channels=logits.shape[1] - 1)
        with _fp32(logits):
            z = logits.float()
            penalty = -_log_one_minus_softmax(z)[:, 1:]
            w = (allowed < 0.5).float() * _sample_weights(sample_mask, z)
            if self.reduction == "mean":
                return _masked_mean(penalty, w)
            masked = torch.where(w > 0, penalty, torch.zeros((), device=z.device)) * w
            return masked.sum() if self.reduction == "sum" else masked


# ---------------------------------------------------------------- multi-label deep supervision
def labels_to_pos_known(target: Tensor, allowed: Tensor | None, num_classes: int,
                        ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Full-resolution per-class positive / known indicators for multi-label deep supervision.

    Args:
        target: (B, 1, *spatial) integer-valued label map (float dtype allowed).
        allowed: (B, num_classes-1, *spatial) or None (= no certain negatives); thresholded at 0.5.
        num_classes: C, including background.
        ignore_index: label value meaning "unknown", or None.

    Returns:
        ``(pos, known)``, both float32 (B, C, *spatial) in {0, 1}:

        - labelled voxel (``target != ignore_index``): ``pos`` = one-hot of the label, ``known`` =
          1 for every class (a label in [0, C) is assumed; other values give an all-zero one-hot);
        - ignored voxel: ``pos`` = 0; ``known`` = 1 only for foreground classes with
          ``allowed == 0`` there (certain negatives), 0 otherwise (background is never known).
    """
    if target.ndim not in (4, 5) or target.shape[1] != 1:
        raise ValueError(f"target must be (B, 1, *spatial), got shape {tuple(target.shape)}")
    lab = torch.round(target.float()) if target.is_floating_point() else target
    labelled = (lab != ignore_index) if ignore_index is not None else torch.ones_like(lab, dtype=torch.bool)
    classes = torch.arange(num_classes, device=target.device).view(1, num_classes, *([1] * (target.ndim - 2)))
    pos = ((lab == classes) & labelled).float()
    known = labelled.float().expand_as(pos)
    if allowed is not None:
        exp = (target.shape[0], num_classes - 1, *target.shape[2:])
        if tuple(allowed.shape) != exp:
            raise ValueError(f"allowed must have shape {exp}, got {tuple(allowed.shape)}")
        neg = torch.cat([torch.zeros_like(allowed[:, :1], dtype=torch.bool), allowed < 0.5], dim=1)
        known = torch.maximum(known, neg.float())
    return pos, known.contiguous()


def multilabel_pooled_targets(onehot_known: Tensor, known: Tensor,
                              kernel: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pool multi-label targets to a coarser deep-supervision scale (Reiss et al., CVPR 2021).

    Args:
        onehot_known: ``pos``, (B, C, *spatial) in {0, 1}: 1 where the voxel is known to be class c
            (e.g. from :func:`labels_to_pos_known`).
        known: (B, C, *spatial) in {0, 1}: 1 where membership of the voxel in class c is known.
        kernel: pooling kernel = stride per spatial axis, e.g. ``(1, 2, 2)`` (anisotropic) or an
            int; relative to the resolution of the inputs. Spatial sizes that are not divisible
            are handled with ``ceil_mode=True`` (partial border blocks), which matches the
            ``ceil(n / stride)`` output size of a strided conv with padding.

    Returns:
        ``(target, known)`` float32 at the coarse scale (B, C, *ceil(spatial / kernel)):

        - target = max-pool of pos: the block is positive for c if any voxel in it is c;
        - known = 1 where target is 1, or where *every* voxel of the block is known (min-pool);
          so a block is a known negative only if all its voxels are known and none is c, and
          unknown otherwise.

    Pooling in several steps gives the same result as pooling once with the product kernel.
    """
    if onehot_known.ndim not in (4, 5):
        raise ValueError(f"onehot_known must be (B, C, X, Y) or (B, C, X, Y, Z), got {tuple(onehot_known.shape)}")
    _check_same(onehot_known, known, "onehot_known", "known")
    nd = onehot_known.ndim - 2
    k = _to_kernel(kernel, nd)
    pos = onehot_known.float()
    kn = known.float()
    if all(v == 1 for v in k):
        return pos.clone(), torch.maximum(kn, pos)
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    with _fp32(pos):
        tgt = pool(pos, kernel_size=k, stride=k, ceil_mode=True)
        all_known = -pool(-kn, kernel_size=k, stride=k, ceil_mode=True)
    return tgt, torch.maximum(tgt, all_known)


class MultiLabelDeepSupervisionLoss(nn.Module):
    """Masked multi-label BCE over deep-supervision scales (Reiss et al., CVPR 2021).

    At every scale each class is an independent sigmoid output trained with
    ``binary_cross_entropy_with_logits`` against the pooled target from
    :func:`multilabel_pooled_targets`; only entries with ``known == 1`` count, and the mean is
    over known entries (B x C x spatial) of that scale (0 if none). Optionally a masked soft Dice
    on the sigmoid is added per scale.

    Args:
        weights: one weight per scale (highest resolution first); default equal. Normalised to
            sum 1; scales with weight 0 are not evaluated at all.
        use_soft_dice: add ``1 - mean_c Dice_c`` where, per class c, the Dice is computed over
            the known entries of the whole batch (batch Dice)
            ``(2 sum p t + smooth) / (sum p + sum t + smooth)`` with ``p = sigmoid``; only classes
            with at least one known positive entry are averaged (absent classes are handled by
            the BCE term; averaging them would reward nothing but a vanishing prediction).
        smooth: Dice smoothing constant.

    Forward:
        logits_per_scale: list of (B, C, *spatial_s) raw scores (or a single tensor).
        pooled_targets: list of ``(target, known)`` tuples with the same shapes, in {0, 1}.

    Returns:
        float32 scalar: ``sum_s w_s * loss_s``.
    """

    def __init__(self, weights: Sequence[float] | None = None, use_soft_dice: bool = False,
                 smooth: float = 1e-5) -> None:
        super().__init__()
        if weights is not None:
            weights = [float(w) for w in weights]
            if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        self.weights = weights
        self.use_soft_dice = use_soft_dice
        self.smooth = smooth

    def _scale_loss(self, z: Tensor, tgt: Tensor, known: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(z, tgt, reduction="none")
        loss = _masked_mean(bce, known)
        if self.use_soft_dice:
            p = torch.sigmoid(z) * known
            t = tgt * known
            dims = [0] + list(range(2, z.ndim))
            inter = (p * t).sum(dims)
            denom = p.sum(dims) + t.sum(dims)
            dice = (2 * inter + self.smooth) / (denom + self.smooth)
            loss = loss + _masked_mean(1 - dice, (t.sum(dims) > 0).float())
        return loss

    def forward(self, logits_per_scale: Sequence[Tensor] | Tensor,
                pooled_targets: Sequence[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]) -> Tensor:
        if isinstance(logits_per_scale, Tensor):
            logits_per_scale = [logits_per_scale]
            pooled_targets = [pooled_targets]  # type: ignore[list-item]
        n = len(logits_per_scale)
        if len(pooled_targets) != n:
            raise ValueError(f"{n} logit scales but {len(pooled_targets)} target scales")
        w = [1.0] * n if self.weights is None else self.weights
        if len(w) < n:
            raise ValueError(f"{len(w)} weights for {n} scales")
        w = w[:n]
        tot = sum(w)
        if tot <= 0:
            raise ValueError("all weights of the given scales are 0")
        out = None
        for ws, z, (tgt, kn) in zip(w, logits_per_scale, pooled_targets):
            if ws == 0:
                continue
            _check_logits(z, "logits", min_classes=1)
            _check_same(z, tgt, "logits", "pooled target")
            _check_same(z, kn, "logits", "pooled known")
            with _fp32(z):
                term = (ws / tot) * self._scale_loss(z.float(), tgt.float(), kn.float())
            out = term if out is None else out + term
        return out


# ------------------------------------------------------------------------------ box projection
def _check_box_args(logits: Tensor, box_masks: Tensor) -> None:
    """``logits`` (B, C, *s) with C >= 2 and ``box_masks`` (B, C-1, *s), else ValueError."""
    _check_logits(logits)
    _check_same(logits, box_masks, "logits", "box_masks", channels=logits.shape[1] - 1)


def _box_pairs(inside: Tensor, valid: Tensor | None) -> Tensor:
    """(B, K) bool: (sample, class) pairs whose box mask ``inside`` (B, K, *s) is non-empty, and ``valid``."""
    pair_ok = inside.flatten(2).any(dim=2)
    if valid is not None:
        if tuple(valid.shape) != tuple(pair_ok.shape):
            raise ValueError(f"valid must be (B, K)={tuple(pair_ok.shape)}, got {tuple(valid.shape)}")
        pair_ok = pair_ok & valid.to(device=inside.device).bool()
    return pair_ok


class BoxProjectionLoss(nn.Module):
    """Box tightness prior via max-projections (BoxInst, Tian et al. CVPR 2021), for 2D and 3D.

    ``p_c`` is the softmax probability of foreground class c (channel c of
    ``softmax(logits)``). For every spatial axis ``d`` the 1D profile of ``p_c`` on that axis
    (max over all *other* spatial axes) is compared with the same profile of the box mask by a
    Dice loss ``1 - (2 sum a b + smooth) / (sum a^2 + sum b^2 + smooth)`` (the BoxInst form).
    In 2D this is exactly BoxInst (max along y -> profile over x and vice versa). In 3D the 1D
    profile is the tightness prior of a tight box: every slice perpendicular to ``d`` inside the
    box extent contains the object, and none outside does. (``projection="shadow"`` instead
    reduces only along ``d``, comparing 2D shadows with the box's rectangles; that also demands
    that every axis-parallel line through the box hits the object - false e.g. for a ball in its
    bounding cube - so it is not the default.)

    The loss is averaged over axes and then over the valid (sample, class) pairs: pairs whose box
    mask is non-empty in the patch, further restricted by ``valid``. 0 if no pair is valid.

    Args:
        smooth: Dice smoothing constant (>= 0).
        projection: ``"profile"`` (default, 1D per axis) or ``"shadow"`` (2D/1D per axis).

    Forward:
        logits: (B, C, *spatial) raw scores.
        box_masks: (B, C-1, *spatial) in {0, 1}: union of the boxes of class k+1 rasterised in
            patch space.
        valid: optional (B, C-1) bool, e.g. only boxes fully inside the patch.

    Returns:
        float32 scalar.
    """

    def __init__(self, smooth: float = 1e-5, projection: str = "profile") -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError("smooth must be >= 0")
        if projection not in ("profile", "shadow"):
            raise ValueError(f"projection must be 'profile' or 'shadow', got {projection!r}")
        self.smooth = smooth
        self.projection = projection

    def forward(self, logits: Tensor, box_masks: Tensor, valid: Tensor | None = None) -> Tensor:
        _check_box_args(logits, box_masks)
        spatial = list(range(2, logits.ndim))
        with _fp32(logits):
            p = torch.softmax(logits.float(), dim=1)[:, 1:]
            m = box_masks.float()
            pair_ok = _box_pairs(m > 0, valid)
            losses = []
            for d in spatial:
                red = [a for a in spatial if a != d] if self.projection == "profile" else [d]
                pa, pb = p.amax(dim=red), m.amax(dim=red)
                dims = list(range(2, pa.ndim))
                inter = (pa * pb).sum(dims)
                union = (pa * pa).sum(dims) + (pb * pb).sum(dims)
                losses.append(1 - (2 * inter + self.smooth) / (union + self.smooth))
            per_pair = torch.stack(losses, dim=0).mean(dim=0)  # (B, K)
            return _masked_mean(per_pair, pair_ok.float())


class BoxPresenceLoss(nn.Module):
    """Multiple-instance term for box cross-sections: class c occurs somewhere inside its boxes.

    For a 2D network trained on slices of 3D volumes, the 2D patch holds a *cross-section* of a 3D
    box of class c. The tightness prior of :class:`BoxProjectionLoss` does not hold there (near the
    ends of an object its cross-section is much smaller than the box's rectangle), but a slice that
    cuts a tight 3D box still cuts the object, so at least one voxel inside the box rectangle is c.
    Per (sample, class) pair this is the multiple-instance bag loss
    ``-max_{x in box} log p_c(x)``, i.e. ``-log`` of the largest probability of c in the box
    (computed as the max of ``log_softmax`` in float32: finite for logits of any size; the gradient
    reaches the arg-max voxel only). Only valid for tight boxes (no margin or jitter that moves a
    face beyond the object along the slice axis).

    Forward:
        logits: (B, C, *spatial) raw scores.
        box_masks: (B, C-1, *spatial) in {0, 1}: union of the boxes of class k+1 in patch space.
        valid: optional (B, C-1) bool, e.g. only boxes not cut by the patch border.

    Returns:
        float32 scalar: mean over the valid pairs whose box mask is non-empty (0 if none).
    """

    def forward(self, logits: Tensor, box_masks: Tensor, valid: Tensor | None = None) -> Tensor:
        _check_box_args(logits, box_masks)
        with _fp32(logits):
            logp = torch.log_softmax(logits.float(), dim=1)[:, 1:]
            inside = box_masks > 0
            pair_ok = _box_pairs(inside, valid)
            best = logp.masked_fill(~inside, float("-inf")).flatten(2).amax(dim=2)  # (B, K)
            best = torch.where(pair_ok, best, torch.zeros_like(best))
            return _masked_mean(-best, pair_ok.float())


class BoxFillLoss(nn.Module):
    """Global size constraint inside boxes (Kervadec et al., MIDL 2020): class c fills a share of its boxes.

    A tight box of a compact object is filled by it to a known degree (0.1-0.3 for the INIA19
    structures), so the soft size of c inside its boxes is bounded from both sides. The size is
    pooled over the batch per class: ``fill_c = sum p_c(x) / sum 1`` over the voxels ``x`` inside
    the boxes of c of every valid (sample, class) pair, ``p_c`` the softmax probability of class c.
    Pooling matters for 2D slices of 3D boxes: a single cross-section near the end of the object is
    almost empty, but slices drawn uniformly through the box extent fill it, summed, like the 3D
    object fills the 3D box. Per class with at least one valid pair the penalty is the normalised
    quadratic of Kervadec's constraint penalty,
    ``(relu(lower - fill_c) / lower)^2 + (relu(fill_c - upper) / (1 - upper))^2``: 0 inside the
    bounds, so unlike the presence term it never pushes a class that is already there. Mean over
    those classes; 0 if none.

    Args:
        lower: lower bound of the fill, in (0, 1).
        upper: upper bound of the fill, in (lower, 1]; 1 disables the upper side.

    Forward:
        logits: (B, C, *spatial) raw scores.
        box_masks: (B, C-1, *spatial) in {0, 1}: union of the boxes of class k+1 in patch space.
        valid: optional (B, C-1) bool, e.g. only boxes not cut by the patch border.

    Returns:
        float32 scalar.
    """

    def __init__(self, lower: float = 0.08, upper: float = 0.6) -> None:
        super().__init__()
        if not 0 < lower < 1 or not lower < upper <= 1:
            raise ValueError(f"need 0 < lower < upper <= 1 and lower < 1, got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)

    def forward(self, logits: Tensor, box_masks: Tensor, valid: Tensor | None = None) -> Tensor:
        _check_box_args(logits, box_masks)
        with _fp32(logits):
            p = torch.softmax(logits.float(), dim=1)[:, 1:]
            inside = box_masks > 0
            pair_ok = _box_pairs(inside, valid)  # (B, K)
            w = (inside & pair_ok.view(*pair_ok.shape, *([1] * (inside.ndim - 2)))).float()
            mass = (p * w).flatten(2).sum(dim=2).sum(dim=0)  # (K,)
            size = w.flatten(2).sum(dim=2).sum(dim=0)
            fill = mass / size.clamp_min(1.0)
            low = (torch.relu(self.lower - fill) / self.lower) ** 2
            high = torch.relu(fill - self.upper) / (1 - self.upper) if self.upper < 1 else torch.zeros_like(fill)
            return _masked_mean(low + high ** 2, (size > 0).float())


# ------------------------------------------------------------------------ unlabelled / consistency
class EntropyLoss(nn.Module):
    """Normalised Shannon entropy of the softmax, ``H(p) / log(C)`` in [0, 1], mean over voxels.

    ``H = -sum_c p_c log p_c`` computed from ``log_softmax`` in float32 (0 log 0 = 0). 1 for a
    uniform prediction, 0 for a one-hot one.

    Forward:
        logits: (B, C, *spatial) raw scores, C >= 2.
        sample_mask: optional (B,) bool/float selecting samples.
        voxel_mask: optional (B, 1, *spatial) bool/float selecting voxels.

    Returns:
        float32 scalar: mean over selected voxels (0 if none).
    """

    def forward(self, logits: Tensor, sample_mask: Tensor | None = None,
                voxel_mask: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        with _fp32(logits):
            logp = torch.log_softmax(logits.float(), dim=1)
            h = -(logp.exp() * logp).sum(dim=1, keepdim=True) / math.log(logits.shape[1])
            return _masked_mean(h, _voxel_weights(sample_mask, voxel_mask, logits))


class KLDistillationLoss(nn.Module):
    """Temperature-softened ``KL(teacher || student)`` per voxel, mean over voxels, times ``T^2``.

    ``KL = sum_c p_t (log p_t - log p_s)`` with ``p_t = softmax(teacher / T)`` and
    ``log p_s = log_softmax(student / T)``. The teacher is detached inside the module. Teacher
    logits may contain ``-inf`` (e.g. ``log`` of :func:`constrain_pseudo_labels` output): those
    classes get p_t = 0 and contribute 0 (``xlogy``).

    The ``T^2`` factor (Hinton et al., 2015): the gradient w.r.t. the student logits is
    ``(p_s - p_t) / T``, and for large T ``p_s - p_t`` itself shrinks like ``1 / T``, so the
    gradient magnitude scales as ``1 / T^2``; multiplying by ``T^2`` keeps the term's weight
    comparable across temperatures and with the hard-label losses.

    Args:
        temperature: T > 0.

    Forward:
        student_logits: (B, C, *spatial), receives gradients.
        teacher_logits: same shape, detached.
        sample_mask: optional (B,) bool/float.
        voxel_mask: optional (B, 1, *spatial) bool/float (e.g. teacher-confidence mask).

    Returns:
        float32 scalar >= 0 (up to rounding): mean over selected voxels times T^2 (0 if none).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, sample_mask: Tensor | None = None,
                voxel_mask: Tensor | None = None) -> Tensor:
        _check_logits(student_logits, "student_logits")
        _check_same(student_logits, teacher_logits, "student_logits", "teacher_logits")
        t = self.temperature
        with _fp32(student_logits):
            log_s = torch.log_softmax(student_logits.float() / t, dim=1)
            p_t = torch.softmax(teacher_logits.detach().float() / t, dim=1)
            kl = (torch.xlogy(p_t, p_t) - p_t * log_s).sum(dim=1, keepdim=True)
            return _masked_mean(kl, _voxel_weights(sample_mask, voxel_mask, student_logits)) * (t * t)


class SoftDiceAgreementLoss(nn.Module):
    """Symmetric soft-Dice agreement between two predictions (Deep Mutual Distillation, Xie et al.
    MICCAI 2023).

    ``p = softmax(z1 / T)``, ``q = softmax(z2 / T)``; per sample and class (all C classes), over
    the (masked) spatial dims, ``Dice = (2 sum p q + smooth) / (sum p^2 + sum q^2 + smooth)`` -
    the squared-denominator soft Dice also used by the DMD reference code - so that ``1 - Dice =
    |p - q|^2 / (|p|^2 + |q|^2)`` is 0 exactly when the predictions agree (the linear-denominator
    form is not minimal at agreement for soft predictions). Loss = ``1 - Dice`` averaged over
    classes and selected samples. Nothing is detached: both inputs receive gradients.

    Args:
        temperature: T > 0 (softening).
        smooth: Dice smoothing constant (> 0 keeps empty masks finite).

    Forward:
        logits_a, logits_b: (B, C, *spatial) raw scores of the two networks / branches.
        sample_mask: optional (B,) bool/float.
        voxel_mask: optional (B, 1, *spatial) bool/float; excluded voxels are left out of the sums.

    Returns:
        float32 scalar in [0, 1] (0 if no sample is selected).
    """

    def __init__(self, temperature: float = 2.0, smooth: float = 1e-5) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        self.temperature = float(temperature)
        self.smooth = smooth

    def forward(self, logits_a: Tensor, logits_b: Tensor, sample_mask: Tensor | None = None,
                voxel_mask: Tensor | None = None) -> Tensor:
        _check_logits(logits_a, "logits_a")
        _check_same(logits_a, logits_b, "logits_a", "logits_b")
        with _fp32(logits_a):
            p = torch.softmax(logits_a.float() / self.temperature, dim=1)
            q = torch.softmax(logits_b.float() / self.temperature, dim=1)
            sw = _sample_weights(sample_mask, logits_a).flatten()  # (B,)
            if voxel_mask is not None:
                vw = _voxel_weights(None, voxel_mask, logits_a)
                p, q = p * vw, q * vw
            dims = list(range(2, p.ndim))
            inter = (p * q).sum(dims)
            denom = (p * p).sum(dims) + (q * q).sum(dims)
            dice = (2 * inter + self.smooth) / (denom + self.smooth)  # (B, C)
            return _masked_mean((1 - dice).mean(dim=1), sw)


# ---------------------------------------------------------------------------- teacher utilities
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In-place mean-teacher update.

    Parameters: ``theta_t = decay * theta_t + (1 - decay) * theta_s`` (under ``torch.no_grad``);
    buffers (BatchNorm statistics, counters, ...) are copied from the student. Both modules must
    have the same parameter / buffer names and shapes.

    Args:
        teacher: module updated in place.
        student: module read from (unchanged).
        decay: in [0, 1]; 1 keeps the teacher, 0 copies the student.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    tp, sp = dict(teacher.named_parameters()), dict(student.named_parameters())
    tb, sb = dict(teacher.named_buffers()), dict(student.named_buffers())
    if tp.keys() != sp.keys() or tb.keys() != sb.keys():
        raise ValueError("teacher and student have different parameter/buffer names")
    with torch.no_grad():
        # one fused multi-tensor lerp (as torch.optim.swa_utils' EMA does) instead of two kernels per parameter
        # t + (1 - decay) * (s - t) = decay * t + (1 - decay) * s; exact at decay 0 and 1
        if tp:
            torch._foreach_lerp_(list(tp.values()),
                                 [sp[n].detach().to(dtype=t.dtype, device=t.device) for n, t in tp.items()],
                                 1.0 - decay)
        for name, t in tb.items():
            t.copy_(sb[name])


def constrain_pseudo_labels(probs: Tensor, allowed: Tensor) -> Tensor:
    """Zero the probability of classes that are certainly absent, then renormalise over classes.

    Args:
        probs: (B, C, *spatial) class probabilities (e.g. teacher softmax), >= 0.
        allowed: (B, C-1, *spatial); where ``allowed[:, c-1] == 0`` (threshold 0.5) class c is
            set to 0. Background (class 0) is never zeroed.

    Returns:
        float32 (B, C, *spatial) summing to 1 over classes. Where nothing is left (all allowed
        classes had probability 0) the background gets probability 1 - no division by zero.
    """
    _check_logits(probs, "probs")
    _check_same(probs, allowed, "probs", "allowed", channels=probs.shape[1] - 1)
    p = probs.float()
    keep = torch.cat([torch.ones_like(allowed[:, :1], dtype=torch.bool), allowed >= 0.5], dim=1)
    q = torch.where(keep, p, torch.zeros((), device=p.device))
    s = q.sum(dim=1, keepdim=True)
    empty = s <= 0
    bg = torch.where(empty, torch.ones_like(s), q[:, :1])
    q = torch.cat([bg, q[:, 1:]], dim=1)
    return q / torch.where(empty, torch.ones_like(s), s)


def pseudo_label_map(probs: Tensor, target: Tensor, ignore_index: int, threshold: float = 0.0,
                     sample_mask: Tensor | None = None) -> Tensor:
    """Hard label map that keeps every real label and fills unknown voxels with confident pseudo labels.

    Where ``target`` is known (``!= ignore_index``) the real label is kept. Where it is unknown and
    the sample is selected by ``sample_mask``, the voxel gets ``argmax_c probs`` if ``max_c probs
    >= threshold``, else it stays ``ignore_index``. ``probs`` should already be constrained by the
    weak labels (:func:`constrain_pseudo_labels`), so a pseudo label never contradicts a box or an
    image tag.

    Args:
        probs: (B, C, *spatial) class probabilities (teacher softmax), C = classes incl. background.
        target: (B, 1, *spatial) integer label map with ``ignore_index`` for unknown voxels.
        ignore_index: the "unknown" value of ``target`` (nnU-Net's ignore label).
        threshold: minimum confidence (max probability) for a pseudo label; 0 accepts every voxel.
        sample_mask: optional (B,) bool; unselected samples keep ``target`` unchanged.

    Returns:
        (B, 1, *spatial) tensor of ``target``'s dtype (no gradient).
    """
    _check_logits(probs, "probs")
    if target.shape != (probs.shape[0], 1, *probs.shape[2:]):
        raise ValueError(f"target must have shape {(probs.shape[0], 1, *probs.shape[2:])}, got {tuple(target.shape)}")
    with torch.no_grad():
        conf, cls = probs.float().max(dim=1, keepdim=True)
        fill = (target == ignore_index) & (conf >= threshold)
        if sample_mask is not None:
            fill &= sample_mask.to(torch.bool).view(-1, *([1] * (target.ndim - 1)))
        return torch.where(fill, cls.to(target.dtype), target)
