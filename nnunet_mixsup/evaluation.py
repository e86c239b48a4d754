"""``nnunet-mixsup evaluate``: Dice, HD95 and normalised surface Dice (NSD) per class and case.

All distances are in millimetres and take the (possibly anisotropic) voxel spacing into account.
Arrays are in numpy order (``z, y, x`` for 3D, ``y, x`` for 2D); ``spacing`` is given in the same
order as the array axes. When reading images with SimpleITK the spacing is therefore reversed
from ITK's ``x, y, z``.

Definitions, for one foreground class with reference mask ``R`` and predicted mask ``P``:

- **Dice** ``= 2 |R ∩ P| / (|R| + |P|)`` (voxel counts).
- **Boundary faces** of a mask: the faces between a mask voxel and a face-neighbour outside the
  mask; the outside of the image is background, so a mask voxel on the image border has a
  boundary face there. A face perpendicular to axis ``a`` has the area ``prod(spacing[i], i != a)``
  (mm², in 2D a length in mm).
- **Surface voxels** of a mask: the mask voxels with at least one boundary face, i.e. the mask
  minus its binary erosion with face connectivity (``scipy.ndimage.generate_binary_structure(ndim,
  1)``, ``border_value=0``). The **area** of a surface voxel is the summed area of its boundary faces.
- **Surface distances**: for every surface voxel of ``R`` the Euclidean distance (mm, between voxel
  centres) to the nearest surface voxel of ``P`` (``d(r, S_P)``), and vice versa, computed exactly
  with ``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)``.
- **HD95** ``= max(p95{d(r, S_P): r in S_R}, p95{d(p, S_R): p in S_P})``: the larger of the two
  *directed* 95th percentiles, each over the surface voxels (every voxel counts once, not weighted
  by area), ``numpy.percentile`` with linear interpolation. This is the convention of MONAI's
  ``compute_hausdorff_distance(percentile=95)`` and of most challenges; a small far-away false
  positive or missed part dominates its own direction and so is not drowned by the other
  direction's zeros, as it is when both sets are pooled into one percentile (medpy's ``hd95``,
  used here before ``METRICS_VERSION`` 2).
- **NSD** at tolerance ``tau`` mm (Nikolov et al. 2021): the share of the *area* of both surfaces
  that lies within ``tau`` of the other surface:
  ``(sum_{r in S_R} a(r) [d(r, S_P) <= tau] + sum_{p in S_P} a(p) [d(p, S_R) <= tau]) /
  (sum a(r) + sum a(p))``, ``a`` the surface-voxel area above; distances equal to ``tau`` count.
  Area weighting makes the score independent of how densely the grid samples each part of the
  surface: counting voxels instead over-weights faces normal to the coarse axis of an
  anisotropic grid (for a thin slab at 3 x 0.5 x 0.5 mm, 0.73 instead of 0.80).

Empty-mask conventions (these differ from stock nnU-Net, which reports Dice NaN when both are
empty); no case is ever left out of a mean:

- both ``R`` and ``P`` empty (a correct "class absent"): Dice 1, HD95 0, NSD 1;
- exactly one empty (the class is *missed*: ``R`` non-empty, ``P`` empty; or *hallucinated*:
  ``R`` empty, ``P`` non-empty): Dice 0, NSD 0 and HD95 = the diagonal of the image's physical
  extent, ``sqrt(sum_i (shape[i] * spacing[i])**2)`` mm. No distance between two voxel centres of
  the image reaches it, so a missed or hallucinated class always scores worse than any prediction
  that finds the class somewhere. Such cases are counted per class in the summary (``n_missed``,
  ``n_hallucinated``; ``n_both_empty`` for the first convention).

Ignore label: where the *reference* holds ``ignore_label`` the voxel is removed from both masks
before anything is computed (so ``n_ref``/``n_pred`` exclude it). Surfaces are computed on these
reduced masks, i.e. a predicted region cut by the ignore region gets a boundary there.

Summary statistics: per class and metric the mean, the sample standard deviation (``ddof=1``;
NaN for fewer than two values), ``n`` (number of non-NaN values) and ``n_nan`` over cases (the
metrics above are never NaN, so ``n`` is the number of cases; ``n_nan`` would show otherwise), and
per class ``n_cases``, ``n_missed``, ``n_hallucinated``, ``n_both_empty``. ``summary['mean']``
holds, per metric, the mean / SD over the *classes'* means and ``n`` = number of classes
contributing (a class whose mean is NaN is counted in ``n_nan``), and the case counts summed over
classes.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nnunet_mixsup.fileio import atomic_write_csv, atomic_write_text

METRICS = ("dice", "hd95", "nsd")
PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
#: version of the metric definitions above, stored in ``settings`` of every evaluation so that
#: results of other definitions are not mixed: 1 = HD95 as one percentile of both directions pooled,
#: NaN HD95 when exactly one mask is empty (left out of the means), NSD counted per voxel;
#: 2 = HD95 the max of the directed percentiles, the image diagonal for a missed / hallucinated
#: class, NSD weighted by surface area
METRICS_VERSION = 2
SPACING_TOLERANCE = 1e-3
#: origins (mm) of reference and prediction must agree within this
ORIGIN_TOLERANCE = 1e-3
#: direction cosines of reference and prediction must agree within this
DIRECTION_TOLERANCE = 1e-4


class EvaluationError(ValueError):
    """A problem with the inputs of an evaluation (missing cases, geometry mismatch, ...)."""


# ----------------------------------------------------------------------------------------------
# per-case metrics
# ----------------------------------------------------------------------------------------------
def _bounding_slices(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty ``mask`` grown by ``margin`` (clipped)."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def _surface_area(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Summed area (mm², 2D: mm) of the boundary faces of each voxel of ``mask``; 0 off the surface.

    A boundary face separates a mask voxel from a face-neighbour outside the mask or from the
    outside of the array (background). Non-zero exactly on the surface voxels (see module doc).
    """
    area = np.zeros(mask.shape, dtype=float)
    for axis in range(mask.ndim):
        face = float(np.prod([s for i, s in enumerate(spacing) if i != axis]))
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(1, None), slice(None, -1)
        lo_t, hi_t = tuple(lo), tuple(hi)
        exposed = mask.copy()  # face towards index - 1 (exposed at index 0: image border)
        exposed[lo_t] &= ~mask[hi_t]
        area += face * exposed
        exposed = mask.copy()  # face towards index + 1
        exposed[hi_t] &= ~mask[lo_t]
        area += face * exposed
    return area


def _image_diagonal(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Diagonal (mm) of the image's physical extent, the HD95 of a missed / hallucinated class."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _dice_from_counts(intersection: int, n_ref: int, n_pred: int) -> float:
    return 1.0 if n_ref + n_pred == 0 else 2.0 * intersection / (n_ref + n_pred)


def dice_score(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice ``2 |R ∩ P| / (|R| + |P|)`` of two boolean masks of one shape; 1.0 when both are empty.

    The Dice of :func:`compute_case_metrics` (without its ignore-label handling), for other
    modules that score label maps (the weak-label audit), so that one convention holds everywhere.
    """
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"mask shapes {ref.shape} and {pred.shape} differ")
    return _dice_from_counts(int(np.count_nonzero(ref & pred)), int(np.count_nonzero(ref)),
                             int(np.count_nonzero(pred)))


def _binary_metrics(
    ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> dict[str, float]:
    n_ref = int(np.count_nonzero(ref))
    n_pred = int(np.count_nonzero(pred))
    out: dict[str, float] = {"n_ref": n_ref, "n_pred": n_pred}
    if n_ref == 0 and n_pred == 0:
        out.update(dice=1.0, hd95=0.0, nsd=1.0)
        return out
    if n_ref == 0 or n_pred == 0:
        out.update(dice=0.0, hd95=_image_diagonal(ref.shape, spacing), nsd=0.0)
        return out
    dice = _dice_from_counts(int(np.count_nonzero(ref & pred)), n_ref, n_pred)

    # Crop to the union's bounding box (+1 voxel where the image allows): all surface voxels and
    # their faces lie inside and the crop's own border is image border or background, so surfaces,
    # face areas and the EDT on the crop are exactly those of the whole image, much faster.
    crop = _bounding_slices(ref | pred)
    area_ref = _surface_area(ref[crop], spacing)
    area_pred = _surface_area(pred[crop], spacing)
    surf_ref, surf_pred = area_ref > 0, area_pred > 0
    d_ref_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)[surf_ref]
    d_pred_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)[surf_pred]
    hd95 = max(float(np.percentile(d_ref_to_pred, 95)), float(np.percentile(d_pred_to_ref, 95)))
    a_ref, a_pred = area_ref[surf_ref], area_pred[surf_pred]
    matched = float(a_ref[d_ref_to_pred <= tolerance].sum()) + float(a_pred[d_pred_to_ref <= tolerance].sum())
    nsd = matched / (float(a_ref.sum()) + float(a_pred.sum()))
    out.update(dice=float(dice), hd95=hd95, nsd=min(nsd, 1.0))
    return out


def compute_case_metrics(
    ref: np.ndarray,
    pred: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, HD95 (mm) and NSD per foreground class of one case.

    Args:
        ref: reference label map (2D or 3D integer array, numpy axis order).
        pred: predicted label map, same shape as ``ref``.
        labels: foreground label values to evaluate (each evaluated as ``map == label``).
        spacing: voxel spacing in mm, one value per array axis, in numpy axis order.
        nsd_tolerance_mm: NSD tolerance ``tau`` in mm (distances ``<= tau`` count as matched).
        ignore_label: voxels where ``ref == ignore_label`` are removed from both masks.

    Returns:
        ``{label: {'dice', 'hd95', 'nsd', 'n_ref', 'n_pred'}}``. See the module docstring for the
        exact definitions (surface voxels, directed HD95, area-weighted NSD). Conventions: both
        masks empty → dice 1, hd95 0, nsd 1; exactly one empty (missed / hallucinated class) →
        dice 0, nsd 0, hd95 the diagonal of the image extent ``sqrt(sum((shape * spacing)**2))``.

    Raises:
        ValueError: shape mismatch, wrong spacing length / non-positive spacing, bad tolerance,
            or a label equal to ``ignore_label``.
        TypeError: a label that is not an integer.
    """
    ref = np.asarray(ref)
    pred = np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} and prediction shape {pred.shape} differ")
    if ref.ndim < 1:
        raise ValueError("label maps must have at least one dimension")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != ref.ndim:
        raise ValueError(f"spacing {spacing_t} has {len(spacing_t)} values but the arrays are {ref.ndim}D")
    if not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing must be positive and finite, got {spacing_t}")
    tolerance = float(nsd_tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be a non-negative number of mm, got {nsd_tolerance_mm}")
    labels_list = [_as_label(lab) for lab in labels]
    if ignore_label is not None and int(ignore_label) in labels_list:
        raise ValueError(f"the ignore label {ignore_label} cannot be evaluated as a class")

    valid = None if ignore_label is None else ref != ignore_label
    results: dict[int, dict[str, float]] = {}
    for lab in labels_list:
        ref_mask = ref == lab
        pred_mask = pred == lab
        if valid is not None:
            ref_mask &= valid
            pred_mask &= valid
        results[lab] = _binary_metrics(ref_mask, pred_mask, spacing_t, tolerance)
    return results


def _as_label(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"labels must be integers, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------
def _list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"folder {folder} does not exist")
    return {
        p.name[: -len(file_ending)]: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(file_ending) and len(p.name) > len(file_ending)
    }


def _read_header(path: Path, case: str | None = None
                 ) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(shape, spacing) in numpy axis order, origin and direction in ITK order, without reading the voxels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        prefix = f"case {case}: " if case is not None else ""
        raise EvaluationError(f"{prefix}cannot read {path}: {lines[-1] if lines else e}") from None
    return (tuple(reader.GetSize()[::-1]), tuple(reader.GetSpacing()[::-1]), tuple(reader.GetOrigin()),
            tuple(reader.GetDirection()))


def check_geometry(case: str, ref_file: Path, pred_file: Path) -> None:
    """Raise :class:`EvaluationError` naming ``case`` unless both files have the same voxel grid.

    Shape must be equal; spacing within :data:`SPACING_TOLERANCE` mm, origin within
    :data:`ORIGIN_TOLERANCE` mm and direction cosines within :data:`DIRECTION_TOLERANCE`.
    Only the headers are read.
    """
    ref_shape, ref_spacing, ref_origin, ref_dir = _read_header(ref_file, case)
    pred_shape, pred_spacing, pred_origin, pred_dir = _read_header(pred_file, case)
    if ref_shape != pred_shape:
        raise EvaluationError(
            f"case {case}: geometry mismatch, reference shape {ref_shape} != prediction shape "
            f"{pred_shape} (numpy z,y,x order)"
        )
    if not np.allclose(ref_spacing, pred_spacing, rtol=0, atol=SPACING_TOLERANCE):
        raise EvaluationError(
            f"case {case}: geometry mismatch, reference spacing {ref_spacing} != prediction "
            f"spacing {pred_spacing} (numpy z,y,x order, tolerance {SPACING_TOLERANCE})"
        )
    if not np.allclose(ref_origin, pred_origin, rtol=0, atol=ORIGIN_TOLERANCE):
        raise EvaluationError(
            f"case {case}: geometry mismatch, reference origin {ref_origin} != prediction origin "
            f"{pred_origin} (mm, ITK x,y,z order, tolerance {ORIGIN_TOLERANCE}); the prediction is not on the "
            "reference's voxel grid"
        )
    if not np.allclose(ref_dir, pred_dir, rtol=0, atol=DIRECTION_TOLERANCE):
        raise EvaluationError(
            f"case {case}: geometry mismatch, reference direction {ref_dir} != prediction direction "
            f"{pred_dir} (tolerance {DIRECTION_TOLERANCE}); the prediction is not on the reference's voxel grid"
        )


def _format_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in total)" if len(names) > limit else "")


def _evaluate_case(task: tuple) -> dict:
    """Worker: read one reference/prediction pair and compute its metrics."""
    import SimpleITK as sitk

    from nnunet_mixsup.manifest import scan_voxels

    case, ref_file, pred_file, labels, spacing_from, ignore_label, tolerance = task
    for what, f in (("reference", ref_file), ("prediction", pred_file)):
        # SimpleITK reads a truncated NIfTI file without complaint (missing voxels become 0)
        why, n_bad = scan_voxels(Path(f))
        if why:
            raise EvaluationError(f"case {case}: cannot read the {what} {f} (truncated or corrupt file?): {why}")
        if n_bad:
            raise EvaluationError(f"case {case}: the {what} {f} has {n_bad} NaN/inf voxel(s); label maps must "
                                  "hold integer labels")
    try:
        ref_img = sitk.ReadImage(str(ref_file))
        pred_img = sitk.ReadImage(str(pred_file))
    except RuntimeError as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise EvaluationError(f"case {case}: cannot read the reference or prediction voxels (truncated or "
                              f"corrupt file?): {lines[-1] if lines else e}") from None
    ref = sitk.GetArrayFromImage(ref_img)
    pred = sitk.GetArrayFromImage(pred_img)
    if ref.shape != pred.shape:  # also checked from the headers; multi-component images etc.
        raise EvaluationError(f"case {case}: reference shape {ref.shape} != prediction shape {pred.shape}")
    img = ref_img if spacing_from == "ref" else pred_img
    spacing = tuple(img.GetSpacing()[::-1])
    metrics = compute_case_metrics(ref, pred, labels, spacing, tolerance, ignore_label)
    return {
        "case": case,
        "reference_file": str(ref_file),
        "prediction_file": str(pred_file),
        "spacing": [float(s) for s in spacing],
        "metrics": metrics,
    }


def _stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, SD (ddof 1), ``n`` non-NaN values and ``n_nan`` (NaN values are counted, never hidden)."""
    arr = np.asarray(values, dtype=float)
    finite = arr[~np.isnan(arr)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "sd": float(finite.std(ddof=1)) if n > 1 else math.nan,
        "n": n,
        "n_nan": int(arr.size - n),
    }


#: per-class case counts of the summary (see the module docstring)
CASE_COUNTS = ("n_cases", "n_missed", "n_hallucinated", "n_both_empty")


def _case_counts(metrics: Sequence[dict]) -> dict[str, int]:
    """Cases, and cases where the class is missed / hallucinated / absent from both, of one class."""
    n_ref = [int(m["n_ref"]) > 0 for m in metrics]
    n_pred = [int(m["n_pred"]) > 0 for m in metrics]
    return {
        "n_cases": len(metrics),
        "n_missed": sum(r and not p for r, p in zip(n_ref, n_pred)),
        "n_hallucinated": sum(p and not r for r, p in zip(n_ref, n_pred)),
        "n_both_empty": sum(not r and not p for r, p in zip(n_ref, n_pred)),
    }


def summarise(per_case: Sequence[dict], labels: Sequence[int]) -> dict:
    """Summary over cases (see module docstring) from ``per_case`` entries of ``evaluate_folders``.

    Returns ``{label: {metric: {'mean', 'sd', 'n', 'n_nan'}, 'n_cases', 'n_missed',
    'n_hallucinated', 'n_both_empty'}, 'mean': {...}}``; ``'mean'`` holds the statistics of the
    class means and the case counts summed over classes (``n_cases``: the number of cases).
    """
    summary: dict[Any, dict] = {}
    for lab in labels:
        metrics = [c["metrics"][lab] for c in per_case]
        summary[lab] = {m: _stats([x[m] for x in metrics]) for m in METRICS}
        summary[lab].update(_case_counts(metrics))
    summary["mean"] = {m: _stats([summary[lab][m]["mean"] for lab in labels]) for m in METRICS}
    summary["mean"]["n_cases"] = len(per_case)
    for k in CASE_COUNTS[1:]:
        summary["mean"][k] = sum(summary[lab][k] for lab in labels)
    return summary


def evaluate_folders(
    ref_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    labels: Sequence[int],
    file_ending: str = ".nii.gz",
    spacing_from: str = "ref",
    ignore_label: int | None = None,
    num_workers: int = 1,
    nsd_tolerance_mm: float = 2.0,
    progress: bool = False,
) -> dict:
    """Evaluate every prediction in ``pred_dir`` against the reference of the same name.

    Files are matched by case identifier (file name minus ``file_ending``). Every reference needs a
    prediction and every prediction a reference; shapes must be equal, spacings and origins equal
    within 1e-3 mm and directions within 1e-4 (:func:`check_geometry`). All of this is checked from
    the image headers before any metric is computed.

    Args:
        ref_dir, pred_dir: folders with the reference / predicted label maps.
        labels: foreground label values to evaluate.
        file_ending: file ending of the label maps (only such files are considered).
        spacing_from: ``'ref'`` (default) or ``'pred'``: whose spacing is used for distances.
        ignore_label: reference label excluded from evaluation (see :func:`compute_case_metrics`).
        num_workers: number of worker processes (1 = evaluate in this process).
        nsd_tolerance_mm: NSD tolerance in mm.
        progress: show a tqdm progress bar over the cases (on stderr).

    Returns:
        ``{'per_case': [{'case', 'reference_file', 'prediction_file', 'spacing', 'metrics':
        {label: {...}}}, ...] (sorted by case), 'summary': {label: {metric: {'mean', 'sd', 'n',
        'n_nan'}, 'n_cases', 'n_missed', 'n_hallucinated', 'n_both_empty'}, 'mean': {...}}
        (:func:`summarise`), 'settings': {..., 'metrics_version'}}``.

    Raises:
        EvaluationError (a ``ValueError``): missing folders, unmatched cases, geometry mismatch.
    """
    from tqdm import tqdm

    if spacing_from not in ("ref", "pred"):
        raise ValueError(f"spacing_from must be 'ref' or 'pred', got {spacing_from!r}")
    labels_list = [_as_label(lab) for lab in labels]
    if not labels_list:
        raise ValueError("no labels to evaluate")
    if len(set(labels_list)) != len(labels_list):
        raise ValueError(f"duplicate labels in {labels_list}")
    if ignore_label is not None and ignore_label in labels_list:
        raise ValueError(f"the ignore label {ignore_label} cannot be evaluated as a class")
    num_workers = int(num_workers)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")

    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    refs = _list_cases(ref_dir, file_ending)
    preds = _list_cases(pred_dir, file_ending)
    if not preds:
        raise EvaluationError(f"no predictions ending in {file_ending!r} in {pred_dir}")
    no_ref = sorted(set(preds) - set(refs))
    if no_ref:
        raise EvaluationError(f"predictions without a reference in {ref_dir}: {_format_names(no_ref)}")
    no_pred = sorted(set(refs) - set(preds))
    if no_pred:
        raise EvaluationError(f"reference cases without a prediction in {pred_dir}: {_format_names(no_pred)}")

    cases = sorted(preds)
    for case in cases:
        check_geometry(case, refs[case], preds[case])

    tasks = [
        (case, refs[case], preds[case], labels_list, spacing_from, ignore_label, float(nsd_tolerance_mm))
        for case in cases
    ]
    bar = tqdm(total=len(tasks), desc="evaluating", unit="case", disable=not progress, file=sys.stderr)
    per_case: list[dict] = []
    try:
        if num_workers == 1 or len(tasks) == 1:
            for task in tasks:
                per_case.append(_evaluate_case(task))
                bar.update()
        else:
            workers = min(num_workers, len(tasks))
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_evaluate_case, t) for t in tasks]
                for fut in as_completed(futures):
                    per_case.append(fut.result())
                    bar.update()
    finally:
        bar.close()
    per_case.sort(key=lambda c: c["case"])

    return {
        "per_case": per_case,
        "summary": summarise(per_case, labels_list),
        "settings": {
            "reference_folder": str(ref_dir),
            "prediction_folder": str(pred_dir),
            "labels": labels_list,
            "ignore_label": ignore_label,
            "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "spacing_from": spacing_from,
            "file_ending": file_ending,
            "metrics_version": METRICS_VERSION,
        },
    }


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf → None; dict keys → str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_results(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``metrics_per_case.csv``, ``summary.csv`` and ``summary.json`` into ``out_dir``.

    ``summary.csv`` has, per class and for the mean over classes, ``<metric>_<mean|sd|n|n_nan>``
    and the case counts ``n_cases``, ``n_missed``, ``n_hallucinated``, ``n_both_empty``; in
    ``metrics_per_case.csv`` a missed / hallucinated class shows as ``n_pred`` / ``n_ref`` 0 (its
    HD95 is the image-diagonal penalty). Each file is written to a temporary file in ``out_dir``
    and renamed (``os.replace``). NaN is written as ``nan`` in the CSVs and as ``null`` in the JSON
    (which holds the whole ``results`` dict, per-case values included). Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [k for k in results["summary"] if k != "mean"]

    per_case_rows: list[list[Any]] = [["case", "label", "dice", "hd95", "nsd", "n_ref", "n_pred"]]
    for c in results["per_case"]:
        for lab, m in c["metrics"].items():
            per_case_rows.append([c["case"], lab, m["dice"], m["hd95"], m["nsd"], m["n_ref"], m["n_pred"]])

    stat_keys = ("mean", "sd", "n", "n_nan")
    head = ["label"] + [f"{m}_{s}" for m in METRICS for s in stat_keys] + list(CASE_COUNTS)
    summary_rows: list[list[Any]] = [head]
    for lab in [*labels, "mean"]:
        entry = results["summary"][lab]
        summary_rows.append([lab] + [entry[m][s] for m in METRICS for s in stat_keys] + [entry[k] for k in CASE_COUNTS])

    paths = {
        "per_case_csv": out / PER_CASE_CSV,
        "summary_csv": out / SUMMARY_CSV,
        "summary_json": out / SUMMARY_JSON,
    }
    atomic_write_csv(paths["per_case_csv"], per_case_rows)
    atomic_write_csv(paths["summary_csv"], summary_rows)
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    atomic_write_text(paths["summary_json"], text, newline="")
    return paths


def format_summary(results: dict, label_names: dict[int, str] | None = None, tolerance_mm: float | None = None) -> str:
    """Plain-text table of the per-class mean Dice / HD95 / NSD (and the mean over classes).

    The last columns count the cases, and the cases where the class was missed / hallucinated
    (HD95 there: the image-diagonal penalty); for the mean row these are summed over classes.
    """
    if tolerance_mm is None:
        tolerance_mm = results.get("settings", {}).get("nsd_tolerance_mm")
    nsd_head = f"NSD@{tolerance_mm:g}mm" if tolerance_mm is not None else "NSD"
    label_names = label_names or {}
    header = ["class", "Dice", "HD95 (mm)", nsd_head, "cases", "missed", "hallucinated"]
    rows = []
    for key, entry in results["summary"].items():
        name = "mean" if key == "mean" else f"{key} {label_names.get(key, '')}".strip()
        counts = [str(entry[k]) for k in ("n_cases", "n_missed", "n_hallucinated")]
        rows.append([name] + [f"{entry[m]['mean']:.4f}" for m in METRICS] + counts)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# dataset.json / CLI
# ----------------------------------------------------------------------------------------------
def labels_from_dataset_json(dataset_json: dict) -> tuple[list[int], int | None, dict[int, str]]:
    """Foreground labels, ignore label and label names from an nnU-Net ``dataset.json`` dict.

    Foreground labels are all label values except background (0) and the ``'ignore'`` entry.
    Region-based datasets (label values that are lists of several labels, or a
    ``regions_class_order``) are rejected; a one-element list counts as that label.
    """
    if "labels" not in dataset_json or not isinstance(dataset_json["labels"], dict):
        raise EvaluationError("dataset.json has no 'labels' dict")
    if dataset_json.get("regions_class_order") is not None:
        raise EvaluationError(
            "region-based datasets (regions_class_order in dataset.json) are not supported by "
            "nnunet-mixsup evaluate; evaluate label maps with plain integer labels"
        )
    ignore_label = None
    names: dict[int, str] = {}
    for name, value in dataset_json["labels"].items():
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise EvaluationError(
                    f"dataset.json label {name!r} is a region {list(value)}; region-based evaluation "
                    "is not supported by nnunet-mixsup evaluate"
                )
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            raise EvaluationError(f"dataset.json label {name!r} has a non-integer value {value!r}")
        if name == "ignore":
            ignore_label = value
        elif value != 0:
            names[value] = name
    labels = sorted(names)
    if not labels:
        raise EvaluationError("dataset.json defines no foreground labels")
    return labels, ignore_label, names


def _load_dataset_json(dataset: str) -> dict:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_raw.is_set():
        raise EvaluationError("environment variable nnUNet_raw is not set (needed to find dataset.json)")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise EvaluationError(f"dataset {dataset!r} not found in nnUNet_raw={nnUNet_raw.get()}: {e}") from None
    path = Path(nnUNet_raw.get()) / name / "dataset.json"
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON: {e}") from None


def run_evaluate(args) -> int:
    """Body of ``nnunet-mixsup evaluate``; exceptions propagate (see :func:`_cli_evaluate`)."""
    dataset_json = _load_dataset_json(args.dataset)
    labels, ignore_label, names = labels_from_dataset_json(dataset_json)
    file_ending = args.file_ending or dataset_json.get("file_ending") or ".nii.gz"
    results = evaluate_folders(
        args.ref_dir,
        args.pred_dir,
        labels,
        file_ending=file_ending,
        ignore_label=ignore_label,
        num_workers=args.num_workers,
        nsd_tolerance_mm=args.tolerance_mm,
        progress=True,
    )
    out_dir = args.out_dir if args.out_dir is not None else args.pred_dir
    paths = write_results(results, out_dir)
    print(format_summary(results, names))
    print(f"\n{len(results['per_case'])} cases; results written to {paths['summary_json'].parent}")
    return 0


def _cli_evaluate(args) -> int:
    try:
        return run_evaluate(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"nnunet-mixsup evaluate: error: {e}", file=sys.stderr)
        return 1


def register_cli(subparsers) -> None:
    """Add the ``evaluate`` subcommand to an ``argparse`` subparsers object (sets ``func``)."""
    p = subparsers.add_parser(
        "evaluate",
        help="Dice / HD95 / NSD of predicted label maps against references",
        description=(
            "Evaluate every prediction in PRED_DIR against the reference of the same name in REF_DIR: "
            "per-class Dice, HD95 (mm) and normalised surface Dice. Labels, ignore label and file "
            "ending come from the dataset's dataset.json in nnUNet_raw. Writes metrics_per_case.csv, "
            "summary.csv and summary.json."
        ),
    )
    p.add_argument("ref_dir", metavar="REF_DIR", help="folder with the reference label maps")
    p.add_argument("pred_dir", metavar="PRED_DIR", help="folder with the predicted label maps")
    p.add_argument("-d", "--dataset", required=True, metavar="DATASET_ID", help="dataset id or name (nnUNet_raw)")
    p.add_argument("-o", "--out-dir", default=None, metavar="OUT_DIR", help="output folder (default: PRED_DIR)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default: 2.0)")
    p.add_argument(
        "--file-ending", default=None, help="file ending of the label maps (default: from dataset.json)"
    )
    p.add_argument("-np", "--num-workers", type=int, default=1, help="worker processes (default: 1)")
    p.set_defaults(func=_cli_evaluate)
