"""``nnunet-mixsup evaluate``: Dice, HD95 and normalised surface Dice (NSD) per class and case.

All distances are in millimetres and take the (possibly anisotropic) voxel spacing into account.
Arrays are in numpy order (``z, y, x`` for 3D, ``y, x`` for 2D); ``spacing`` is given in the same
order as the array axes. When reading images with SimpleITK the spacing is therefore reversed
from ITK's ``x, y, z``.

Definitions, for one foreground class with reference mask ``R`` and predicted mask ``P``:

- **Dice** ``= 2 |R ∩ P| / (|R| + |P|)`` (voxel counts).
- **Surface** of a mask: its boundary voxels, i.e. the mask minus its binary erosion with
  face connectivity (``scipy.ndimage.generate_binary_structure(ndim, 1)``). Voxels on the image
  border count as boundary (the outside of the image is background).
- **Surface distances**: for every surface voxel of ``R`` the Euclidean distance (mm, voxel
  centres) to the nearest surface voxel of ``P``, and vice versa, computed with
  ``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)``.
- **HD95**: the 95th percentile (``numpy.percentile``, linear interpolation) of the distances of
  *both* directions pooled together.
- **NSD** at tolerance ``tau`` mm: the fraction of surface voxels of both masks whose distance to
  the other surface is ``<= tau``:
  ``(#{r in S_R: d(r, S_P) <= tau} + #{p in S_P: d(p, S_R) <= tau}) / (|S_R| + |S_P|)``.
  Surface elements are counted as voxels (not weighted by surface area).

Empty-mask conventions (these differ from stock nnU-Net, which reports Dice NaN when both are
empty):

- both ``R`` and ``P`` empty: Dice 1, HD95 0, NSD 1 (a correct "class absent");
- exactly one empty: Dice 0, HD95 **NaN**, NSD 0. NaN HD95 values are kept in the per-case
  results, excluded from means/SDs and counted separately (``n_nan`` in the summary).

Ignore label: where the *reference* holds ``ignore_label`` the voxel is removed from both masks
before anything is computed (so ``n_ref``/``n_pred`` exclude it). Surfaces are computed on these
reduced masks, i.e. a predicted region cut by the ignore region gets a boundary there.

Summary statistics: per class and metric the mean, the sample standard deviation (``ddof=1``;
NaN for fewer than two values) and ``n`` (number of non-NaN values) over cases, plus ``n_nan``.
``summary['mean']`` holds, per metric, the mean / SD over the *classes'* means (classes whose
mean is NaN excluded) and ``n`` = number of classes contributing.
"""
from __future__ import annotations

import csv
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

METRICS = ("dice", "hd95", "nsd")
PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
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


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


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
        out.update(dice=0.0, hd95=math.nan, nsd=0.0)
        return out
    intersection = int(np.count_nonzero(ref & pred))
    dice = 2.0 * intersection / (n_ref + n_pred)

    # Crop to the union's bounding box (+1 voxel): all surface voxels lie inside, so the EDT on
    # the crop gives exactly the same distances, much faster for small structures.
    crop = _bounding_slices(ref | pred)
    ref_c, pred_c = ref[crop], pred[crop]
    structure = ndimage.generate_binary_structure(ref.ndim, 1)
    surf_ref = _surface(ref_c, structure)
    surf_pred = _surface(pred_c, structure)
    d_ref_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)[surf_ref]
    d_pred_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)[surf_pred]
    pooled = np.concatenate([d_ref_to_pred, d_pred_to_ref])
    hd95 = float(np.percentile(pooled, 95))
    nsd = float(np.count_nonzero(pooled <= tolerance)) / pooled.size
    out.update(dice=float(dice), hd95=hd95, nsd=nsd)
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
        exact definitions. Conventions: both masks empty → dice 1, hd95 0, nsd 1; exactly one
        empty → dice 0, hd95 NaN, nsd 0.

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
    arr = np.asarray(values, dtype=float)
    finite = arr[~np.isnan(arr)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "sd": float(finite.std(ddof=1)) if n > 1 else math.nan,
        "n": n,
        "n_nan": int(arr.size - n),
    }


def summarise(per_case: Sequence[dict], labels: Sequence[int]) -> dict:
    """Summary over cases (see module docstring) from ``per_case`` entries of ``evaluate_folders``."""
    summary: dict[Any, dict] = {}
    for lab in labels:
        summary[lab] = {m: _stats([c["metrics"][lab][m] for c in per_case]) for m in METRICS}
    summary["mean"] = {}
    for m in METRICS:
        s = _stats([summary[lab][m]["mean"] for lab in labels])
        summary["mean"][m] = s
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
        'n_nan'}}, 'mean': {metric: {...}}}, 'settings': {...}}``.

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


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else format(float(value), ".10g")
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    from nnunet_mixsup.prepare import atomic_write_text

    atomic_write_text(path, text, newline="")


def _csv_text(rows: list[list[Any]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([_fmt(v) for v in row])
    return buf.getvalue()


def write_results(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``metrics_per_case.csv``, ``summary.csv`` and ``summary.json`` into ``out_dir``.

    Each file is written to a temporary file in ``out_dir`` and renamed (``os.replace``). NaN is
    written as ``nan`` in the CSVs and as ``null`` in the JSON (which holds the whole ``results``
    dict, per-case values included). Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [k for k in results["summary"] if k != "mean"]

    per_case_rows: list[list[Any]] = [["case", "label", "dice", "hd95", "nsd", "n_ref", "n_pred"]]
    for c in results["per_case"]:
        for lab, m in c["metrics"].items():
            per_case_rows.append([c["case"], lab, m["dice"], m["hd95"], m["nsd"], m["n_ref"], m["n_pred"]])

    stat_keys = ("mean", "sd", "n", "n_nan")
    summary_rows: list[list[Any]] = [["label"] + [f"{m}_{s}" for m in METRICS for s in stat_keys]]
    for lab in [*labels, "mean"]:
        entry = results["summary"][lab]
        summary_rows.append([lab] + [entry[m][s] for m in METRICS for s in stat_keys])

    paths = {
        "per_case_csv": out / PER_CASE_CSV,
        "summary_csv": out / SUMMARY_CSV,
        "summary_json": out / SUMMARY_JSON,
    }
    _atomic_write(paths["per_case_csv"], _csv_text(per_case_rows))
    _atomic_write(paths["summary_csv"], _csv_text(summary_rows))
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    _atomic_write(paths["summary_json"], text)
    return paths


def format_summary(results: dict, label_names: dict[int, str] | None = None, tolerance_mm: float | None = None) -> str:
    """Plain-text table of the per-class mean Dice / HD95 / NSD (and the mean over classes)."""
    if tolerance_mm is None:
        tolerance_mm = results.get("settings", {}).get("nsd_tolerance_mm")
    nsd_head = f"NSD@{tolerance_mm:g}mm" if tolerance_mm is not None else "NSD"
    label_names = label_names or {}
    header = ["class", "Dice", "HD95 (mm)", nsd_head, "cases", "HD95 NaN"]
    rows = []
    for key, entry in results["summary"].items():
        name = "mean" if key == "mean" else f"{key} {label_names.get(key, '')}".strip()
        n_cases = "" if key == "mean" else str(entry["dice"]["n"])
        n_nan = "" if key == "mean" else str(entry["hd95"]["n_nan"])
        rows.append([name] + [f"{entry[m]['mean']:.4f}" for m in METRICS] + [n_cases, n_nan])
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
