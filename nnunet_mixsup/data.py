"""The mixed-supervision data loader: nnU-Net's loader plus per-sample weak labels in patch space.

A batch from :class:`MixSupDataLoader` is nnU-Net's batch with extra keys:

- ``data``: (B, C, *patch) float – unchanged.
- ``target``: list over deep-supervision scales of (B, 1 + K, *s) tensors. Channel 0 is nnU-Net's
  label map (weak cases: the derived ignore-label map written by ``prepare``). Channels 1..K are the
  *allowed* maps of the K foreground classes (channel k <-> ``foreground_labels[k-1]``): 1 where the
  class may be present, 0 where it is certainly absent (outside every box of the class, class not in
  the image tags, or padding). For ``box`` samples the allowed map *is* the per-class union of boxes,
  rasterised before augmentation so that rotation, scaling, elastic deformation and mirroring move
  it exactly as they move the image. Mask samples carry all-ones (their label map says everything).
  Through nnU-Net's transforms label map and allowed maps travel packed into one channel
  (:func:`pack_targets`: a mask sample costs what it costs in stock nnU-Net) and are unpacked at
  the end of :meth:`MixSupDataLoader.generate_train_batch`.
- ``sup_type``: (B,) long, codes of :data:`nnunet_mixsup.manifest.TYPE_CODES`.
- ``tags``: (B, K) float, 1 if the class may be present somewhere in the image, 0 if absent.
- ``axes_kept``: (B,) bool, whether the sample's spatial augmentation kept the image axes (no
  rotation other than by multiples of 90 degrees): only then are its boxes still tight
  axis-aligned boxes (:class:`AxesRecordingSpatialTransform`; False when the transforms record
  nothing, True without transforms).
- ``keys``: case ids.

Composition: ``strong_fraction`` of every batch is drawn from mask cases and the rest from weak
cases (when both exist), so a few masks are not drowned by hundreds of unlabelled images.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunet_mixsup.geometry import box_to_preprocessed, rasterize_boxes_in_patch
from nnunet_mixsup.manifest import TYPE_CODES, CaseSupervision

WEAK_KINDS = tuple(k for k in TYPE_CODES if k != "mask")
"""The supervision kinds of weak samples: box, tags, none."""
LABELLED_WEAK_KINDS = ("box", "tags")
"""The weak kinds that carry labels of their own (boxes, image tags); ``none`` carries nothing."""
ALLOWED_BITS = 15
"""Allowed maps per int16 code channel (codes 0..32767)."""
FLOAT32_EXACT = 1 << 24
"""Every integer of magnitude up to 2^24 is exact in float32 (nnU-Net's resampling); larger ones may be rounded."""


def joint_channel_fits(max_label: int, k: int) -> bool:
    """Whether ``label << k | code`` is exact in float32 for every label up to ``max_label`` and K = ``k`` bits.

    The largest value is ``((max_label + 1) << k) - 1``; it must not exceed :data:`FLOAT32_EXACT`.
    """
    return (max(int(max_label), 0) + 1) << int(k) <= FLOAT32_EXACT


def n_code_channels(k: int) -> int:
    """Channels :func:`pack_allowed` uses for K allowed maps (at least one)."""
    return max(1, -(-int(k) // ALLOWED_BITS))


def pack_allowed(allowed: np.ndarray) -> np.ndarray:
    """(K, *s) 0/1 allowed maps -> (ceil(K / 15), *s) int16 codes; bit ``k % 15`` of channel ``k // 15`` is map k."""
    k = allowed.shape[0]
    codes = np.zeros((n_code_channels(k), *allowed.shape[1:]), dtype=np.int16)
    for c in range(k):
        codes[c // ALLOWED_BITS] |= (allowed[c] != 0).astype(np.int16) << (c % ALLOWED_BITS)
    return codes


def unpack_allowed(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_allowed`: (P, *s) codes -> (K, *s) int16 0/1; negative codes (padding) -> 0."""
    codes = codes.clamp_min(0)
    out = torch.empty((k, *codes.shape[1:]), dtype=torch.int16)
    for c in range(k):
        out[c] = (codes[c // ALLOWED_BITS] >> (c % ALLOWED_BITS)) & 1
    return out


def pack_targets(seg: np.ndarray, codes: np.ndarray, k: int, max_label: int | None = None) -> np.ndarray:
    """The segmentation that nnU-Net's transforms see: label map (1, *s) + allowed codes of K classes.

    ``codes``: (P, *s) from :func:`pack_allowed`, or (P, 1, ..., 1) for a code constant over the
    patch; where the label is -1 nothing is allowed, whatever ``codes`` says there. ``max_label``:
    an upper bound of the labels in ``seg`` (e.g. the ignore label, or the largest foreground label
    without one); ``None`` takes the largest label present.

    Why: nnU-Net's spatial augmentation resamples a segmentation channel label by label (one
    ``grid_sample`` per value present), so K separate 0/1 allowed channels next to the label map
    made the MixSup loader several times slower than stock at GPU patch sizes.

    - When :func:`joint_channel_fits` (``(max_label + 1) << K <= 2^24``): one int32 channel
      ``label << K | code`` (``code`` = all K allowed bits), -1 where the label is -1 (nnU-Net's
      "outside the non-zero crop", which its transforms use for masking and padding). Each value is
      a label like any other for nnU-Net's transforms, and exact in the float32 they compute in. A
      mask, tag or unlabelled sample has one code inside the crop, so its values are its labels:
      resampled exactly as stock nnU-Net resamples them, at the same cost. A box sample costs one
      resampling per (label, code) combination present; where box edges fall inside the
      interpolation kernel the most-weighted combination wins (separate channels would each take
      their own majority).
    - Otherwise (many classes, or a high ignore label such as 255 with K >= 17): the label map
      (int16, as nnU-Net stores it) followed by the :func:`pack_allowed` code channels, each value
      below 2^15.

    :func:`unpack_targets` tells the layouts apart by their channel count (1 vs 1 + P, P >= 1).
    """
    if max_label is None:
        max_label = int(seg.max()) if seg.size else 0
    if not joint_channel_fits(max_label, k):
        return np.concatenate((seg, np.broadcast_to(codes, (codes.shape[0], *seg.shape[1:])) * (seg != -1)),
                              dtype=np.int16)
    joint = seg.astype(np.int32)
    joint <<= k  # -1 becomes -2^k; | code keeps it in [-2^k, 0)
    for p in range(codes.shape[0]):
        joint |= codes[p:p + 1].astype(np.int32) << (ALLOWED_BITS * p)  # a constant code broadcasts
    np.maximum(joint, -1, out=joint)  # every negative value (label -1) back to -1
    return joint


def unpack_targets(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_targets` on a transformed segmentation: (1 + K, *s) int16, label map + K allowed maps.

    ``x``: (1, *s) joint channel or (1 + P, *s) label map + code channels, integer valued. Padding
    introduced by the transforms (-1, or 0 after nnU-Net's ``RemoveLabelTansform``) has label -1 / 0
    and nothing allowed.
    """
    if x.shape[0] != 1:
        if x.shape[0] != 1 + n_code_channels(k):
            raise ValueError(f"packed targets of {k} classes have 1 or {1 + n_code_channels(k)} channels, "
                             f"got {x.shape[0]}")
        return torch.cat((x[:1].to(torch.int16), unpack_allowed(x[1:].to(torch.int32), k)))
    joint = x[0].to(torch.int32)
    code = joint.clamp_min(0) & ((1 << k) - 1)
    out = torch.empty((1 + k, *x.shape[1:]), dtype=torch.int16)
    out[0] = joint >> k  # arithmetic shift: -1 stays -1
    for c in range(k):
        out[1 + c] = (code >> c) & 1
    return out


class MixSupDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader with weak-label channels, per-sample supervision info and batch composition.

    Extra arguments over :class:`nnUNetDataLoader`:
        supervision: case id -> :class:`CaseSupervision` for (at least) every case of ``data``.
        transpose_forward: the plans' ``transpose_forward`` (needed to map boxes).
        strong_fraction: share of each batch drawn from mask cases (rounded, ignored if one group is empty).
        mask_only_batches: the first this many training batches (counted over all loader workers)
            hold mask cases only - a warm-up in which training is stock nnU-Net on the mask cases.
        n_workers: how many background workers share the batch count (each runs its own copy of the
            loader and produces every ``n_workers``-th batch); 1 for a single-threaded loader.
        weak_kinds: the supervision kinds (``"box"``, ``"tags"``, ``"none"``) the weak samples are
            drawn from (default: every non-mask kind); a kind absent from ``data`` is simply not drawn.
        box_centered_fraction: for box samples that nnU-Net's oversampling marks as "force foreground",
            the patch is centred on a random voxel of a random box (this is the box analogue of
            nnU-Net's class-location sampling); other weak samples are cropped uniformly at random.
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 supervision: dict[str, CaseSupervision], transpose_forward: Sequence[int],
                 strong_fraction: float = 0.5, mask_only_batches: int = 0, n_workers: int = 1,
                 weak_kinds: Sequence[str] | None = None, **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        missing = [k for k in self.indices if k not in supervision]
        if missing:
            raise ValueError(f"no supervision entry for case(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.supervision = supervision
        self.transpose_forward = list(transpose_forward)
        self.foreground_labels = list(label_manager.foreground_labels)
        self.strong_fraction = float(strong_fraction)
        self.mask_only_batches = int(mask_only_batches)
        self.n_workers = max(1, int(n_workers))
        self.batches_drawn = 0
        self.mask_ids = [k for k in self.indices if supervision[k].type == "mask"]
        kinds = set(WEAK_KINDS if weak_kinds is None else weak_kinds)
        if not kinds <= set(WEAK_KINDS):
            raise ValueError(f"weak_kinds must be among {WEAK_KINDS}, got {sorted(kinds - set(WEAK_KINDS))}")
        self.weak_ids = [k for k in self.indices if supervision[k].type in kinds]

    # ----------------------------------------------------------------------------------------------
    def n_strong(self) -> int:
        """Mask samples in the next batch: ``B * strong_fraction`` with the fractional part drawn at random.

        So the expected share is exactly ``strong_fraction`` even for tiny batches (a DDP rank with
        batch 1 and ``strong_fraction = 0.5`` gets a mask sample every other step, not never).
        """
        x = self.batch_size * self.strong_fraction
        return int(np.floor(x)) + int(np.random.uniform() < x - np.floor(x))

    def in_mask_only_warmup(self) -> bool:
        """True while the batches this worker draws fall into the first ``mask_only_batches`` overall.

        Each worker counts its own batches; times ``n_workers`` that is the global count up to the
        batches still queued in the augmenter (a handful out of thousands), so the switch to mixed
        batches happens at most that many batches early.
        """
        return bool(self.mask_ids) and self.batches_drawn * self.n_workers < self.mask_only_batches

    def get_indices(self) -> list[str]:
        """Draw :meth:`n_strong` mask cases and the rest weak cases, in random order.

        During the mask-only warm-up (:meth:`in_mask_only_warmup`) every sample is a mask case.
        """
        warmup = self.in_mask_only_warmup()
        self.batches_drawn += 1
        if warmup:
            return list(np.random.choice(self.mask_ids, self.batch_size, replace=True))
        if not self.mask_ids or not self.weak_ids:
            pool = self.mask_ids or self.weak_ids or self.indices
            return list(np.random.choice(pool, self.batch_size, replace=True))
        n_strong = self.n_strong()
        keys = list(np.random.choice(self.mask_ids, n_strong, replace=True)) + \
            list(np.random.choice(self.weak_ids, self.batch_size - n_strong, replace=True))
        np.random.shuffle(keys)
        return keys

    def oversample_per_group(self, keys: Sequence[str]) -> list[bool]:
        """nnU-Net's foreground oversampling applied within the mask and within the weak samples.

        nnU-Net forces the last ``oversample_foreground_percent`` of a batch to contain foreground.
        Applied to a mixed batch by position, mask samples would get fewer forced-foreground patches
        than in stock nnU-Net; here each group gets nnU-Net's share (mask: class locations, box:
        box-centred), so small classes are sampled as often per mask sample as stock nnU-Net does.
        """
        force = [False] * len(keys)
        for group in ("mask", "weak"):
            idx = [j for j, k in enumerate(keys) if (self.supervision[k].type == "mask") == (group == "mask")]
            n = len(idx)
            for rank, j in enumerate(idx):
                if self.get_do_oversample == self._probabilistic_oversampling:
                    force[j] = np.random.uniform() < self.oversample_foreground_percent
                else:
                    force[j] = not rank < round(n * (1 - self.oversample_foreground_percent))
        return force

    def preprocessed_boxes(self, sup: CaseSupervision, properties: dict,
                           shape: Sequence[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The case's boxes as (label, lo, hi) in preprocessed voxel coordinates (see :mod:`geometry`)."""
        out = []
        for b in sup.boxes:
            m = box_to_preprocessed(b, properties, self.transpose_forward, shape)
            if m is not None:
                out.append((b.label, *m))
        return out

    def weak_bbox(self, shape: Sequence[int], force_fg: bool,
                  boxes: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[list[int], list[int]]:
        """Patch location for a weak sample: box-centred when forced to foreground, else uniform."""
        if force_fg and boxes:
            _, lo, hi = boxes[np.random.randint(len(boxes))]
            centre = [np.random.randint(a, z) for a, z in zip(lo, hi)]
            # reuse nnU-Net's bound logic by passing the centre as a one-voxel "class location"
            locs = {"box": np.array([[0, *centre]])}
            return self.get_bbox(shape, True, locs, overwrite_class="box")
        need_to_pad = self.need_to_pad.copy()
        for d in range(len(shape)):
            need_to_pad[d] = max(need_to_pad[d], self.patch_size[d] - shape[d])
        lbs = [-need_to_pad[i] // 2 for i in range(len(shape))]
        ubs = [shape[i] + need_to_pad[i] // 2 + need_to_pad[i] % 2 - self.patch_size[i] for i in range(len(shape))]
        bbox_lbs = [np.random.randint(lbs[i], ubs[i] + 1) for i in range(len(shape))]
        return bbox_lbs, [bbox_lbs[i] + self.patch_size[i] for i in range(len(shape))]

    def allowed_codes(self, sup: CaseSupervision, boxes: list[tuple[int, np.ndarray, np.ndarray]],
                      bbox_lbs: Sequence[int], seg_cropped: np.ndarray) -> np.ndarray:
        """Packed allowed maps (:func:`pack_allowed`) of the K foreground classes in the crop.

        Map k is 1 where class ``foreground_labels[k]`` may be present and 0 where it certainly is
        not: outside every box of the class (box samples), everywhere for a class absent from the
        tags (tag samples). Padding and the region outside nnU-Net's non-zero crop (label -1,
        background by nnU-Net's convention) are excluded by :func:`pack_targets`. Box samples get
        (P, *crop) codes; every other sample one constant code, (P, 1, ..., 1), so no K-map array
        is built at the large pre-augmentation crop size.
        """
        shape = seg_cropped.shape[1:]
        k = len(self.foreground_labels)
        if sup.type == "box":
            return pack_allowed(rasterize_boxes_in_patch(boxes, self.foreground_labels, bbox_lbs, shape))
        present = np.ones(k, dtype=np.int16) if sup.type != "tags" else \
            np.array([c in sup.present for c in self.foreground_labels], dtype=np.int16)
        return pack_allowed(present.reshape((k,) + (1,) * len(shape)))

    def image_tags(self, sup: CaseSupervision, properties: dict) -> np.ndarray:
        """(K,) 1 if the class may be present in the image, 0 if known absent."""
        if sup.type == "mask":
            locs = properties.get("class_locations", {})
            return np.array([float(len(locs.get(c, [])) > 0) for c in self.foreground_labels], dtype=np.float32)
        maybe = set(sup.classes_maybe_present(self.foreground_labels))
        return np.array([float(c in maybe) for c in self.foreground_labels], dtype=np.float32)

    # ----------------------------------------------------------------------------------------------
    def generate_train_batch(self) -> dict:
        selected_keys = self.get_indices()
        force = self.oversample_per_group(selected_keys)
        data_all, seg_all = None, None
        sup_types = torch.empty(self.batch_size, dtype=torch.long)
        tags = torch.empty((self.batch_size, len(self.foreground_labels)), dtype=torch.float32)
        axes_kept = torch.ones(self.batch_size, dtype=torch.bool)
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(selected_keys):
                force_fg = force[j]
                data, seg, seg_prev, properties = self._data.load_case(key)
                if seg_prev is not None:
                    raise NotImplementedError("nnunet-mixsup does not support cascaded configurations")
                shape = data.shape[1:]
                sup = self.supervision[key]
                boxes = self.preprocessed_boxes(sup, properties, shape) if sup.type == "box" else []
                if sup.type == "mask":
                    bbox_lbs, bbox_ubs = self.get_bbox(shape, force_fg, properties["class_locations"])
                else:
                    bbox_lbs, bbox_ubs = self.weak_bbox(shape, force_fg, boxes)
                bbox = [[a, z] for a, z in zip(bbox_lbs, bbox_ubs)]
                data_cropped = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                seg_np = crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)
                codes = self.allowed_codes(sup, boxes, bbox_lbs, seg_np)
                seg_cropped = torch.from_numpy(pack_targets(seg_np, codes, len(self.foreground_labels)))
                if self.patch_size_was_2d:
                    data_cropped = data_cropped[:, 0]
                    seg_cropped = seg_cropped[:, 0]
                if self.transforms is not None:
                    transformed = self.transforms(image=data_cropped, segmentation=seg_cropped)
                    data_sample, seg_sample = transformed["image"], transformed["segmentation"]
                    axes_kept[j] = bool(transformed.get(AXES_KEPT_KEY, False))
                else:
                    data_sample, seg_sample = data_cropped, seg_cropped
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *data_sample.shape), dtype=torch.float32)
                data_all[j] = data_sample
                is_list = isinstance(seg_sample, list)
                if not is_list:
                    seg_sample = [seg_sample]
                seg_sample = [unpack_targets(x, len(self.foreground_labels)) for x in seg_sample]
                if seg_all is None:
                    seg_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in seg_sample]
                for s_idx, s in enumerate(seg_sample):
                    seg_all[s_idx][j] = s
                sup_types[j] = TYPE_CODES[sup.type]
                tags[j] = torch.from_numpy(self.image_tags(sup, properties))
        target = seg_all if is_list else seg_all[0]
        return {"data": data_all, "target": target, "keys": selected_keys, "sup_type": sup_types, "tags": tags,
                "axes_kept": axes_kept}


AXES_KEPT_KEY = "mixsup_axes_kept"
"""Key that :class:`AxesRecordingSpatialTransform` adds to a transformed sample."""


def keeps_axes(affine: np.ndarray | None, tol: float = 1e-3) -> bool:
    """Whether a spatial transform's linear part maps every image axis onto one image axis.

    True for ``None`` (nnU-Net's "no rotation, no scaling"), scalings, mirrorings and rotations by
    multiples of 90 degrees; False for any other rotation (``tol``: the largest share of a row's
    absolute sum outside its dominant entry that still counts as aligned, about 0.06 degrees).
    """
    if affine is None:
        return True
    a = np.abs(np.asarray(affine, dtype=np.float64))
    big = a.max(axis=1)
    if np.any(big <= 0) or np.any(a.sum(axis=1) - big > tol * big):
        return False
    return len(set(np.argmax(a, axis=1).tolist())) == a.shape[0]


class AxesRecordingSpatialTransform(SpatialTransform):
    """nnU-Net's spatial augmentation, unchanged, that also records whether it kept the image axes.

    A box rasterised before augmentation is rotated with the image. The rotated box still bounds
    the object (certain negatives outside it stay certain), but it is no longer the tight
    axis-aligned box of the rotated object, so the tightness prior (every slice through the box
    extent crosses the object) does not hold for it. Scaling and mirroring keep boxes tight. The
    sample's dictionary gets ``AXES_KEPT_KEY``: True when no rotation (other than by multiples of
    90 degrees) and no elastic deformation was applied (:func:`keeps_axes`), so the trainer can
    apply tightness only where it is true. Parameters and randomness are exactly the parent's.
    """

    def apply(self, data_dict: dict, **params) -> dict:
        data_dict = super().apply(data_dict, **params)
        data_dict[AXES_KEPT_KEY] = keeps_axes(params.get("affine")) and params.get("elastic_offsets") is None
        return data_dict


def record_spatial_axes(transforms: BasicTransform) -> BasicTransform:
    """``transforms`` with each nnU-Net ``SpatialTransform`` (inside ``ComposeTransforms``) recording its axes.

    The recording transform is the same object state under the subclass
    :class:`AxesRecordingSpatialTransform` (same parameters, same random draws); nothing else
    changes. Returns ``transforms`` (modified in place) for chaining.
    """
    stack = [transforms]
    while stack:
        t = stack.pop()
        children = getattr(t, "transforms", None)
        if isinstance(children, list):
            for i, c in enumerate(children):
                if type(c) is SpatialTransform:
                    rec = AxesRecordingSpatialTransform.__new__(AxesRecordingSpatialTransform)
                    rec.__dict__.update(c.__dict__)
                    children[i] = rec
                else:
                    stack.append(c)
    return transforms
