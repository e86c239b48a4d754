"""Boxes from raw image space to nnU-Net's preprocessed space and into patches.

nnU-Net preprocesses each case as (see ``DefaultPreprocessor.run_case_npy``)::

    raw numpy array (z, y, x)  ->  transpose(plans.transpose_forward)  ->  crop to non-zero bbox
                               ->  resample to the configuration's spacing

and stores in the case's properties ``shape_before_cropping`` (after transposing),
``bbox_used_for_cropping`` and ``shape_after_cropping_and_before_resampling``. The final array
shape is the stored data's shape. A box (ITK x, y, z order, ``max`` exclusive) follows the same
three steps. Voxel ``k`` covers the continuous interval ``[k, k + 1)``, so resampling scales interval
ends by ``new_size / old_size``; we round outwards (floor / ceil) so the mapped box still covers
every voxel of the object – the space outside it is used as a *certain negative*, so erring large is
the safe side.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnunet_mixsup.manifest import Box


def box_to_preprocessed(box: Box, properties: dict, transpose_forward: Sequence[int],
                        final_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Map one raw box to integer [lo, hi) bounds in the preprocessed array (its axis order).

    Returns None when the box lies entirely outside the cropped region.
    2D images are read by nnU-Net as (1, y, x); a 2D box (x, y) becomes [0, 1) on that first axis.
    """
    lo_np, hi_np = box.numpy_order()
    if len(lo_np) == 2:
        lo_np, hi_np = (0, *lo_np), (1, *hi_np)
    tf = list(transpose_forward)
    lo_t = np.array([lo_np[i] for i in tf], dtype=float)
    hi_t = np.array([hi_np[i] for i in tf], dtype=float)
    bbox = np.array(properties["bbox_used_for_cropping"], dtype=float)
    crop_shape = np.array(properties["shape_after_cropping_and_before_resampling"], dtype=float)
    lo_c = np.clip(lo_t - bbox[:, 0], 0, crop_shape)
    hi_c = np.clip(hi_t - bbox[:, 0], 0, crop_shape)
    if np.any(hi_c <= lo_c):
        return None
    scale = np.asarray(final_shape, dtype=float) / crop_shape
    lo = np.floor(lo_c * scale + 1e-6).astype(int)
    hi = np.ceil(hi_c * scale - 1e-6).astype(int)
    hi = np.maximum(hi, lo + 1)
    hi = np.minimum(hi, np.asarray(final_shape))
    return lo, hi


def rasterize_boxes_in_patch(boxes: Sequence[tuple[int, np.ndarray, np.ndarray]], foreground_labels: Sequence[int],
                             patch_lbs: Sequence[int], patch_shape: Sequence[int],
                             dtype=np.int16) -> np.ndarray:
    """Per-class union of preprocessed-space boxes, cut to the patch ``[patch_lbs, patch_lbs + patch_shape)``.

    ``boxes`` holds ``(label, lo, hi)`` in preprocessed coordinates. Returns (K, *patch_shape) with
    K = len(foreground_labels), 1 inside a box of that class, else 0.
    """
    out = np.zeros((len(foreground_labels), *patch_shape), dtype=dtype)
    index = {c: i for i, c in enumerate(foreground_labels)}
    plb = np.asarray(patch_lbs)
    for label, lo, hi in boxes:
        a = np.clip(lo - plb, 0, patch_shape)
        z = np.clip(hi - plb, 0, patch_shape)
        if np.any(z <= a):
            continue
        out[(index[label], *[slice(i, j) for i, j in zip(a, z)])] = 1
    return out
