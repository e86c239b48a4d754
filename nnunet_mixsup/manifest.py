"""The supervision manifest (``nnUNet_raw/DatasetXXX_Name/supervision.json``) and its validation.

Format (version 1)::

    {"version": 1,
     "cases": {
       "case_000": {"type": "mask"},
       "case_001": {"type": "box", "boxes": [{"label": 1, "min": [10, 20, 5], "max": [40, 52, 19]}]},
       "case_002": {"type": "tags", "present": [1, 3]},
       "case_003": {"type": "none"}}}

- ``mask``: a full label map exists in ``labelsTr``.
- ``box``: axis-aligned boxes; ``min`` inclusive, ``max`` exclusive, voxel indices of the raw image in
  ITK index order (x, y, z) – the order ITK-SNAP and 3D Slicer show. Classes without a box are absent.
- ``tags``: the foreground classes present in the image; all other classes are absent.
- ``none``: unlabelled.

Training cases missing from the manifest default to ``mask`` if they have a label file.

:func:`load_manifest` parses and checks the file on its own; :func:`validate_against_dataset`
checks it against the raw dataset (images, label files, dataset.json, image sizes). Both collect
*every* problem, each naming the case, and raise one :class:`ManifestError`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

SUPERVISION_TYPES = ("mask", "box", "tags", "none")
#: integer codes used in batches (``batch['sup_type']``)
TYPE_CODES = {"mask": 0, "box": 1, "tags": 2, "none": 3}
MANIFEST_NAME = "supervision.json"
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ManifestError(ValueError):
    """Raised with every problem found; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str], source: str = MANIFEST_NAME):
        self.problems = list(problems)
        text = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{text}")


@dataclass(frozen=True)
class Box:
    """One axis-aligned box in raw ITK index order, ``min`` inclusive, ``max`` exclusive."""

    label: int
    min: tuple[int, ...]
    max: tuple[int, ...]

    def numpy_order(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(min, max) in numpy array axis order (z, y, x) as returned by ``sitk.GetArrayFromImage``."""
        return tuple(self.min[::-1]), tuple(self.max[::-1])


@dataclass(frozen=True)
class CaseSupervision:
    """The supervision of one training case."""

    case_id: str
    type: str
    boxes: tuple[Box, ...] = ()
    present: tuple[int, ...] = ()

    def to_json(self) -> dict:
        d: dict[str, Any] = {"type": self.type}
        if self.type == "box":
            d["boxes"] = [{"label": b.label, "min": list(b.min), "max": list(b.max)} for b in self.boxes]
        if self.type == "tags":
            d["present"] = list(self.present)
        return d

    def classes_maybe_present(self, foreground_labels: list[int]) -> list[int]:
        """Foreground classes not known to be absent from the image."""
        if self.type == "box":
            return sorted({b.label for b in self.boxes})
        if self.type == "tags":
            return sorted(self.present)
        return list(foreground_labels)


@dataclass
class Manifest:
    """Parsed manifest: ``cases`` maps case id to :class:`CaseSupervision`."""

    cases: dict[str, CaseSupervision] = field(default_factory=dict)
    version: int = 1

    def to_json(self) -> dict:
        return {"version": self.version, "cases": {k: v.to_json() for k, v in sorted(self.cases.items())}}

    def of_type(self, t: str) -> list[str]:
        return sorted(k for k, v in self.cases.items() if v.type == t)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    dups = []
    for k, v in pairs:
        if k in seen:
            dups.append(k)
        seen[k] = v
    if dups:
        seen["__duplicates__"] = dups
    return seen


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_manifest(obj: Any, problems: list[str]) -> Manifest:
    """Check the structure of an already decoded manifest; append problems, return what was valid."""
    man = Manifest()
    if not isinstance(obj, dict):
        problems.append("top level must be a JSON object with 'version' and 'cases'")
        return man
    if "__duplicates__" in obj:
        problems.append(f"duplicate top-level keys: {obj['__duplicates__']}")
    if obj.get("version") != 1:
        problems.append(f"'version' must be 1, got {obj.get('version')!r}")
    unknown = set(obj) - {"version", "cases", "__duplicates__"}
    if unknown:
        problems.append(f"unknown top-level keys: {sorted(unknown)}")
    cases = obj.get("cases")
    if not isinstance(cases, dict):
        problems.append("'cases' must be a JSON object mapping case ids to entries")
        return man
    for dup in cases.get("__duplicates__", []):
        problems.append(f"case {dup!r}: duplicate entry in 'cases'")
    for cid, entry in cases.items():
        if cid == "__duplicates__":
            continue
        case_problems: list[str] = []
        sup = _parse_case(cid, entry, case_problems)
        problems.extend(case_problems)
        if sup is not None:  # keep what was valid so the dataset checks can still report on it
            man.cases[cid] = sup
    return man


def _parse_case(cid: str, entry: Any, problems: list[str]) -> CaseSupervision | None:
    p = f"case {cid!r}"
    if not isinstance(cid, str) or not _CASE_ID_RE.match(cid) or ".." in cid:
        problems.append(f"{p}: invalid case id (letters, digits, '_', '-', '.' only; no path separators or '..')")
        return None
    if not isinstance(entry, dict):
        problems.append(f"{p}: entry must be an object like {{\"type\": \"mask\"}}")
        return None
    for dup in entry.get("__duplicates__", []):
        problems.append(f"{p}: duplicate key {dup!r}")
    t = entry.get("type")
    if t not in SUPERVISION_TYPES:
        problems.append(f"{p}: 'type' must be one of {list(SUPERVISION_TYPES)}, got {t!r}")
        return None
    allowed_keys = {"mask": {"type"}, "box": {"type", "boxes"}, "tags": {"type", "present"}, "none": {"type"}}[t]
    unknown = set(entry) - allowed_keys - {"__duplicates__"}
    if unknown:
        problems.append(f"{p}: unknown keys for type {t!r}: {sorted(unknown)}")
    if t == "box":
        boxes_raw = entry.get("boxes")
        if not isinstance(boxes_raw, list) or len(boxes_raw) == 0:
            problems.append(f"{p}: a 'box' case needs a non-empty 'boxes' list "
                            "(for an image without foreground use {\"type\": \"tags\", \"present\": []})")
            return None
        boxes = []
        for i, b in enumerate(boxes_raw):
            bp = f"{p}: box {i}"
            if not isinstance(b, dict) or set(b) - {"label", "min", "max"} or not {"label", "min", "max"} <= set(b):
                problems.append(f"{bp}: must be an object with exactly 'label', 'min', 'max'")
                continue
            if not _is_int(b["label"]):
                problems.append(f"{bp}: 'label' must be an integer, got {b['label']!r}")
                continue
            mn, mx = b["min"], b["max"]
            if not (isinstance(mn, list) and isinstance(mx, list) and all(_is_int(v) for v in mn + mx)):
                problems.append(f"{bp}: 'min' and 'max' must be lists of integer voxel indices")
                continue
            if len(mn) != len(mx) or len(mn) not in (2, 3):
                problems.append(f"{bp}: 'min' and 'max' must both have 2 (2D) or 3 (3D) coordinates, "
                                f"got {len(mn)} and {len(mx)}")
                continue
            bad = [a for a in range(len(mn)) if mx[a] <= mn[a]]
            if bad:
                kind = "empty" if all(mx[a] == mn[a] for a in bad) else "inverted"
                problems.append(f"{bp}: {kind} box (max must be > min; 'max' is exclusive) on axis/axes {bad}: "
                                f"min={mn}, max={mx}")
                continue
            boxes.append(Box(int(b["label"]), tuple(mn), tuple(mx)))
        if len({len(b.min) for b in boxes}) > 1:
            problems.append(f"{p}: boxes mix 2D and 3D coordinates")
        return CaseSupervision(cid, t, boxes=tuple(boxes))
    if t == "tags":
        present = entry.get("present")
        if not isinstance(present, list) or not all(_is_int(v) for v in present):
            problems.append(f"{p}: 'present' must be a list of integer labels (may be empty)")
            return None
        if len(set(present)) != len(present):
            problems.append(f"{p}: 'present' lists a label more than once: {present}")
        return CaseSupervision(cid, t, present=tuple(sorted(set(present))))
    return CaseSupervision(cid, t)


def read_manifest_json(path: str | os.PathLike) -> Any:
    """Decode the manifest file (duplicate keys are kept for reporting). Malformed JSON raises at once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([f"cannot read {path}: {e}"], str(path)) from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise ManifestError([f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"], str(path)) from None


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and structurally check a manifest file. Raises :class:`ManifestError` listing all problems."""
    problems: list[str] = []
    man = parse_manifest(read_manifest_json(path), problems)
    if problems:
        raise ManifestError(problems, str(path))
    return man


# ----------------------------------------------------------------------------------------------------------
# validation against a raw nnU-Net dataset
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RawDataset:
    """What we need to know about a raw nnU-Net dataset folder."""

    folder: Path
    dataset_json: dict
    file_ending: str
    num_channels: int
    case_ids: list[str]  # training cases with (at least) a first-channel image
    foreground_labels: list[int]
    ignore_label: int | None

    def image_files(self, case_id: str) -> list[Path]:
        return [self.folder / "imagesTr" / f"{case_id}_{c:04d}{self.file_ending}" for c in range(self.num_channels)]

    def label_file(self, case_id: str) -> Path:
        return self.folder / "labelsTr" / f"{case_id}{self.file_ending}"


def read_raw_dataset(folder: str | os.PathLike) -> RawDataset:
    """Read dataset.json and list the training cases of a raw dataset (no image data is loaded)."""
    folder = Path(folder)
    problems = []
    dj_path = folder / "dataset.json"
    try:
        dj = json.loads(dj_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError([f"cannot read {dj_path}: {e}"], str(dj_path)) from None
    fe = dj.get("file_ending")
    labels = dj.get("labels")
    channels = dj.get("channel_names", dj.get("modality"))
    if not isinstance(fe, str):
        problems.append("dataset.json: 'file_ending' missing")
    if not isinstance(labels, dict) or "background" not in labels:
        problems.append("dataset.json: 'labels' must be an object with a 'background' entry")
    elif any(not _is_int(v) for v in labels.values()):
        problems.append("dataset.json: region-based labels (lists) are not supported by nnunet-mixsup")
    if not isinstance(channels, dict) or not channels:
        problems.append("dataset.json: 'channel_names' missing")
    if "dataset" in dj:
        problems.append("dataset.json: an explicit 'dataset' file list is not supported; use imagesTr/labelsTr")
    if problems:
        raise ManifestError(problems, str(dj_path))
    ignore = labels.get("ignore")
    fg = sorted(v for k, v in labels.items() if k not in ("background", "ignore"))
    suffix = f"_0000{fe}"
    img_dir = folder / "imagesTr"
    ids = sorted(f[: -len(suffix)] for f in os.listdir(img_dir) if f.endswith(suffix)) if img_dir.is_dir() else []
    return RawDataset(folder, dj, fe, len(channels), ids, fg, ignore)


def image_info(path: Path) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(size, spacing, origin, direction) of an image in ITK order, reading the header only."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return tuple(r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection())


def _check_mask(ds: RawDataset, cid: str, valid_fg: set[int]) -> list[str]:
    """Geometry of the label file vs the image (header) and label values vs dataset.json."""
    out = []
    try:
        isize, isp, iorg, idir = image_info(ds.image_files(cid)[0])
        lsize, lsp, lorg, ldir = image_info(ds.label_file(cid))
    except RuntimeError as e:
        return [f"cannot read image or label header: {str(e).strip().splitlines()[-1]}"]
    if isize != lsize:
        return [f"label size {list(lsize)} differs from image size {list(isize)}"]
    for what, a, b in (("spacing", isp, lsp), ("origin", iorg, lorg), ("direction", idir, ldir)):
        if any(abs(x - y) > 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)):
            out.append(f"label {what} {[round(v, 5) for v in b]} differs from image {what} {[round(v, 5) for v in a]}")
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.label_file(cid))))
    except RuntimeError as e:
        return out + [f"cannot read label file: {str(e).strip().splitlines()[-1]}"]
    allowed = valid_fg | {0} | ({ds.ignore_label} if ds.ignore_label is not None else set())
    bad = sorted(int(v) for v in np.unique(arr) if int(v) not in allowed or v != int(v))
    if bad:
        out.append(f"label values {bad[:10]} are not in dataset.json labels {sorted(allowed)}")
    return out


def validate_against_dataset(manifest: Manifest, ds: RawDataset, check_label_files: bool = True,
                             generated: set[str] | None = None, problems: list[str] | None = None,
                             mentioned: set[str] | None = None) -> tuple[Manifest, list[str]]:
    """Check a manifest against a raw dataset; return the complete manifest (defaults filled in).

    ``generated`` is the set of label file names that nnunet-mixsup itself wrote (those may be
    overwritten); any other label file of a weak case is a user's mask and is an error.
    ``problems`` may carry structural problems found earlier (reported together); ``mentioned`` are
    case ids named in the file even if their entry was invalid (they get no default).
    Raises :class:`ManifestError` with every problem found; returns (manifest, warnings).
    """
    problems = problems if problems is not None else []
    mentioned = mentioned or set()
    warnings: list[str] = []
    generated = generated or set()
    ids = set(ds.case_ids)
    valid_fg = set(ds.foreground_labels)
    full = Manifest(version=manifest.version)
    for cid, sup in sorted(manifest.cases.items()):
        p = f"case {cid!r}"
        if cid not in ids:
            problems.append(f"{p}: unknown case – no image imagesTr/{cid}_0000{ds.file_ending}")
            continue
        missing = [f.name for f in ds.image_files(cid) if not f.is_file()]
        if missing:
            problems.append(f"{p}: image file(s) missing: {missing}")
            continue
        lab = ds.label_file(cid)
        if sup.type == "mask":
            if not lab.is_file() or lab.name in generated:
                problems.append(f"{p}: type 'mask' but no label file labelsTr/{lab.name}")
            elif check_label_files:
                problems.extend(f"{p}: {m}" for m in _check_mask(ds, cid, valid_fg))
        elif lab.is_file() and lab.name not in generated and check_label_files:
            problems.append(f"{p}: type {sup.type!r} but labelsTr/{lab.name} exists and was not written by "
                            "nnunet-mixsup; refusing to overwrite a user's label file (declare the case 'mask' or "
                            "move the file out of labelsTr)")
        labels_used = [b.label for b in sup.boxes] + list(sup.present)
        bad = sorted({v for v in labels_used if v not in valid_fg})
        if bad:
            problems.append(f"{p}: label(s) {bad} are not foreground labels of dataset.json "
                            f"(valid: {sorted(valid_fg)})")
        if sup.type == "box":
            try:
                size, *_ = image_info(ds.image_files(cid)[0])
            except RuntimeError as e:
                problems.append(f"{p}: cannot read image header: {str(e).strip().splitlines()[-1]}")
                continue
            for i, b in enumerate(sup.boxes):
                if len(b.min) != len(size):
                    problems.append(f"{p}: box {i}: wrong dimensionality – {len(b.min)} coordinates for a "
                                    f"{len(size)}D image of size {list(size)} (x, y[, z])")
                    continue
                out = [a for a in range(len(size)) if b.min[a] < 0 or b.max[a] > size[a]]
                if out:
                    problems.append(f"{p}: box {i}: outside the image on axis/axes {out}: min={list(b.min)}, "
                                    f"max={list(b.max)}, image size (x, y[, z]) = {list(size)}")
        full.cases[cid] = sup
    for cid in ds.case_ids:
        if cid in full.cases or cid in manifest.cases or cid in mentioned:
            continue
        if ds.label_file(cid).is_file() and ds.label_file(cid).name not in generated:
            full.cases[cid] = CaseSupervision(cid, "mask")
        else:
            problems.append(f"case {cid!r}: has an image but neither a manifest entry nor a label file")
    if not full.of_type("mask") and not any("type 'mask'" in p for p in problems):
        problems.append("the dataset has no 'mask' case: at least one fully labelled case is needed "
                        "(for the supervised loss and for validation)")
    if problems:
        raise ManifestError(problems, str(ds.folder / MANIFEST_NAME))
    return full, warnings
