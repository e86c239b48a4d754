"""Boxes from raw image space to nnU-Net's preprocessed space and into patches.

nnU-Net preprocesses each case as (see ``DefaultPreprocessor.run_case_npy``)::

    raw image  ->  reader's array (c, a0, a1, a2)  ->  transpose(plans.transpose_forward)
               ->  crop to non-zero bbox  ->  resample to the configuration's spacing

and stores in the case's properties what the reader returned (``sitk_stuff`` / ``nibabel_stuff``),
``shape_before_cropping`` (after transposing), ``bbox_used_for_cropping`` and
``shape_after_cropping_and_before_resampling``. The final array shape is the stored data's shape.

A box (ITK index order x, y, z, ``max`` exclusive) follows the same steps. The first one depends on
the reader (:data:`MAPPED_READERS`): most readers return the raw ITK index grid as numpy (z, y, x),
the reorienting readers permute and flip its axes per image, which :func:`reader_axis_map` recovers
from the stored properties by running the reader's own reorientation on a tiny probe array (once
per orientation, cached). Voxel ``k`` covers the continuous interval ``[k, k + 1)``, so resampling
scales interval ends by ``new_size / old_size``; we round outwards (floor / ceil) so the mapped box
still covers every voxel of the object – the space outside it is used as a *certain negative*, so
erring large is the safe side.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_mixsup.manifest import Box

#: every reader nnU-Net 2.8.1 ships (class name -> module) and how its array relates to the raw ITK
#: index grid. A reader not listed here (a class added to ``nnunetv2.imageio`` by hand) is refused by
#: ``prepare`` for datasets with box cases.
MAPPED_READERS = {
    # sitk.GetArrayFromImage: the raw grid as (z, y, x)
    "SimpleITKIO": "nnunetv2.imageio.simpleitk_reader_writer",
    # sitk.DICOMOrient to its default orientation ("RAS"): axes permuted/flipped per image, recorded
    # as properties["sitk_stuff"]["original_orientation"]
    "SimpleITKIOWithReorient": "nnunetv2.imageio.simpleitk_reader_writer",
    # nibabel's (i, j, k) array transposed to (k, j, i): NIfTI voxel (i, j, k) is ITK index (x, y, z)
    "NibabelIO": "nnunetv2.imageio.nibabel_reader_writer",
    # nibabel as_reoriented(io_orientation(affine)), then transposed: axes permuted/flipped per
    # image, recorded as properties["nibabel_stuff"]["original_affine"] (+ "reoriented_affine")
    "NibabelIOWithReorient": "nnunetv2.imageio.nibabel_reader_writer",
    # skimage.io.imread (rows, columns) -> (1, rows, columns): ITK's (x, y) = (column, row)
    "NaturalImage2DIO": "nnunetv2.imageio.natural_image_reader_writer",
    # tifffile.imread (pages, rows, columns): ITK's (x, y, z) = (column, row, page)
    "Tiff3DIO": "nnunetv2.imageio.tif_reader_writer",
}


@dataclass(frozen=True)
class AxisMap:
    """How a reader's array axes relate to the raw image's numpy axes (z, y, x) = ITK index order reversed.

    Axis ``q`` of the reader's array (without the channel axis) is raw numpy axis ``perm[q]``,
    traversed backwards where ``flip[q]``.
    """

    perm: tuple[int, ...]
    flip: tuple[bool, ...]

    @property
    def is_identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm))) and not any(self.flip)

    def map_box(self, lo_np: Sequence[int], hi_np: Sequence[int],
                reader_shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """[lo, hi) in raw numpy order -> [lo, hi) in the reader's array order (``reader_shape``: that array's shape)."""
        lo, hi = [], []
        for q, (a, f) in enumerate(zip(self.perm, self.flip)):
            if f:
                lo.append(int(reader_shape[q]) - int(hi_np[a]))
                hi.append(int(reader_shape[q]) - int(lo_np[a]))
            else:
                lo.append(int(lo_np[a]))
                hi.append(int(hi_np[a]))
        return lo, hi


_PROBE_SHAPE = (4, 3, 2)
"""Raw numpy shape of the probe array: every axis >= 2, all different."""


def _axis_map_from_probe(out: np.ndarray) -> AxisMap:
    """Read the axis map off a reader's version of ``np.arange(24).reshape(_PROBE_SHAPE)``."""
    origin = np.array(np.unravel_index(int(out.flat[0]), _PROBE_SHAPE))
    perm, flip = [], []
    for q in range(out.ndim):
        unit = [0] * out.ndim
        unit[q] = 1
        step = np.array(np.unravel_index(int(out[tuple(unit)]), _PROBE_SHAPE)) - origin
        moved = np.flatnonzero(step)
        if len(moved) != 1 or abs(int(step[moved[0]])) != 1 or out.shape[q] != _PROBE_SHAPE[moved[0]]:
            raise RuntimeError(f"the reader's reorientation is not an axis permutation with flips (axis {q})")
        perm.append(int(moved[0]))
        flip.append(bool(step[moved[0]] < 0))
    if sorted(perm) != list(range(out.ndim)):
        raise RuntimeError("the reader's reorientation is not an axis permutation with flips")
    return AxisMap(tuple(perm), tuple(flip))


def _probe() -> np.ndarray:
    return np.arange(int(np.prod(_PROBE_SHAPE)), dtype=np.int16).reshape(_PROBE_SHAPE)


@functools.cache
def sitk_reorient_axis_map(original_orientation: str) -> AxisMap | None:
    """Axis map of ``SimpleITKIOWithReorient`` for an image of this orientation code (``None``: identity).

    The reader applies ``sitk.DICOMOrient(image, orientation)``, whose permutation and flips depend
    only on the image's orientation code: we apply it to a probe image with that code.
    """
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIOWithReorient

    target = inspect.signature(SimpleITKIOWithReorient.read_images).parameters["orientation"].default
    img = sitk.GetImageFromArray(_probe())
    img.SetDirection(sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(original_orientation))
    amap = _axis_map_from_probe(sitk.GetArrayFromImage(sitk.DICOMOrient(img, target)))
    return None if amap.is_identity else amap


@functools.lru_cache(maxsize=4096)
def _nibabel_reorient_axis_map(affine_bytes: bytes) -> AxisMap | None:
    import nibabel
    from nibabel.orientations import io_orientation

    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    img = nibabel.Nifti1Image(_probe().transpose((2, 1, 0)), affine)  # nibabel's (i, j, k) = ITK (x, y, z)
    out = img.as_reoriented(io_orientation(affine)).get_fdata().transpose((2, 1, 0))
    amap = _axis_map_from_probe(np.rint(out).astype(np.int64))
    return None if amap.is_identity else amap


def nibabel_reorient_axis_map(affine: np.ndarray) -> AxisMap | None:
    """Axis map of ``NibabelIOWithReorient`` for an image with this (original) affine (``None``: identity).

    The reader applies ``as_reoriented(io_orientation(affine))`` to nibabel's array; we apply the
    same call to a probe image with that affine.
    """
    return _nibabel_reorient_axis_map(np.ascontiguousarray(affine, dtype=np.float64).tobytes())


def nibabel_file_axis_map(path: str | Path) -> AxisMap | None:
    """:func:`nibabel_reorient_axis_map` of a NIfTI file, from its header (no voxel is read)."""
    import nibabel

    return nibabel_reorient_axis_map(nibabel.load(str(path)).affine)


def reader_axis_map(properties: dict) -> AxisMap | None:
    """The axis map of the reader that produced a case, from its stored properties (``None``: identity).

    ``SimpleITKIOWithReorient`` leaves ``sitk_stuff.original_orientation``, ``NibabelIOWithReorient``
    ``nibabel_stuff.reoriented_affine`` (next to ``original_affine``); every other reader of
    :data:`MAPPED_READERS` returns the raw grid. Cached per orientation: for the default readers this
    is two dictionary look-ups.
    """
    sitk_stuff = properties.get("sitk_stuff")
    if isinstance(sitk_stuff, dict) and "original_orientation" in sitk_stuff:
        return sitk_reorient_axis_map(str(sitk_stuff["original_orientation"]))
    nib_stuff = properties.get("nibabel_stuff")
    if isinstance(nib_stuff, dict) and "reoriented_affine" in nib_stuff:
        return nibabel_reorient_axis_map(np.asarray(nib_stuff["original_affine"]))
    return None


def box_to_preprocessed(box: Box, properties: dict, transpose_forward: Sequence[int],
                        final_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Map one raw box to integer [lo, hi) bounds in the preprocessed array (its axis order).

    ``properties``: nnU-Net's properties of the case (the reader's entries and the preprocessing
    keys listed in the module docstring). Returns None when the box lies entirely outside the
    cropped region. 2D images are read by nnU-Net as (1, y, x); a 2D box (x, y) becomes [0, 1) on
    that first axis.
    """
    lo_np, hi_np = box.numpy_order()
    if len(lo_np) == 2:
        lo_np, hi_np = (0, *lo_np), (1, *hi_np)
    tf = list(transpose_forward)
    amap = reader_axis_map(properties)
    if amap is not None:
        if len(box.min) != len(amap.perm):
            raise ValueError(f"a {len(box.min)}D box for an image the reader reoriented in {len(amap.perm)}D")
        reader_shape = [0] * len(tf)
        for i, q in enumerate(tf):
            reader_shape[q] = int(properties["shape_before_cropping"][i])
        lo_np, hi_np = amap.map_box(lo_np, hi_np, reader_shape)
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
