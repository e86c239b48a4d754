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

import gzip
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

SUPERVISION_TYPES = ("mask", "box", "tags", "none")
#: integer codes used in batches (``batch['sup_type']``)
TYPE_CODES = {"mask": 0, "box": 1, "tags": 2, "none": 3}
MANIFEST_NAME = "supervision.json"
_CASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
#: case ids become file names (``<id>_0000<file_ending>``): keep them well below the usual 255-byte limit
MAX_CASE_ID_LENGTH = 200
#: relative tolerance (absolute below 1) for spacing, origin and direction comparisons
GEOMETRY_TOLERANCE = 1e-4


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


class _JSONObject(dict):
    """A decoded JSON object that remembers its duplicate keys (``duplicates``) for reporting."""

    duplicates: list[str]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen = _JSONObject()
    dups = []
    for k, v in pairs:
        if k in seen:
            dups.append(k)
        seen[k] = v
    seen.duplicates = dups
    return seen


def _duplicates_of(obj: Any) -> list[str]:
    """Keys that occurred more than once in the JSON text of ``obj`` (only known for decoded files)."""
    return list(getattr(obj, "duplicates", []))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _keys_text(keys: Any) -> list[str]:
    """Sorted keys for a message (keys of a dict built in code need not be strings)."""
    return sorted((k if isinstance(k, str) else repr(k)) for k in keys)


def case_id_problem(cid: Any) -> str | None:
    """Why ``cid`` cannot be a case id (``None`` if it can): it becomes part of file names."""
    if not isinstance(cid, str) or not _CASE_ID_RE.fullmatch(cid) or ".." in cid:
        return "invalid case id (letters, digits, '_', '-', '.' only; no path separators or '..')"
    if len(cid) > MAX_CASE_ID_LENGTH:
        return f"invalid case id (longer than {MAX_CASE_ID_LENGTH} characters)"
    return None


def box_problem(label: Any, mn: Any, mx: Any) -> str | None:
    """Why a box (``label``, ``min``, ``max``) is malformed (``None`` if it is well formed)."""
    if not _is_int(label):
        return f"'label' must be an integer, got {label!r}"
    if not (isinstance(mn, (list, tuple)) and isinstance(mx, (list, tuple)) and all(_is_int(v) for v in [*mn, *mx])):
        return f"'min' and 'max' must be lists of integer voxel indices, got min={mn!r}, max={mx!r}"
    if len(mn) != len(mx) or len(mn) not in (2, 3):
        return f"'min' and 'max' must both have 2 (2D) or 3 (3D) coordinates, got {len(mn)} and {len(mx)}"
    bad = [a for a in range(len(mn)) if mx[a] <= mn[a]]
    if bad:
        kind = "empty" if all(mx[a] == mn[a] for a in bad) else "inverted"
        return (f"{kind} box (max must be > min; 'max' is exclusive) on axis/axes {bad}: "
                f"min={list(mn)}, max={list(mx)}")
    return None


def parse_manifest(obj: Any, problems: list[str]) -> Manifest:
    """Check the structure of an already decoded manifest; append problems, return what was valid.

    Never raises for any decoded JSON value: every problem is appended to ``problems`` (one string
    each, naming the case and the field) and the invalid entries are left out of the result.
    """
    man = Manifest()
    if not isinstance(obj, dict):
        problems.append("top level must be a JSON object with 'version' and 'cases'")
        return man
    if _duplicates_of(obj):
        problems.append(f"duplicate top-level keys: {_keys_text(set(_duplicates_of(obj)))}")
    version = obj.get("version")
    if not (_is_int(version) and version == 1):
        problems.append(f"'version' must be 1 (an integer), got {_short(version)}")
    unknown = set(obj) - {"version", "cases"}
    if unknown:
        problems.append(f"unknown top-level keys: {_keys_text(unknown)}")
    cases = obj.get("cases")
    if not isinstance(cases, dict):
        problems.append("'cases' must be a JSON object mapping case ids to entries")
        return man
    for dup in sorted(set(_duplicates_of(cases))):
        problems.append(f"case {dup!r}: duplicate entry in 'cases'")
    for cid, entry in cases.items():
        case_problems: list[str] = []
        sup = _parse_case(cid, entry, case_problems)
        problems.extend(case_problems)
        if sup is not None:  # keep what was valid so the dataset checks can still report on it
            man.cases[cid] = sup
    return man


def _parse_case(cid: str, entry: Any, problems: list[str]) -> CaseSupervision | None:
    p = f"case {cid!r}"
    bad_id = case_id_problem(cid)
    if bad_id:
        problems.append(f"{p}: {bad_id}")
        return None
    if not isinstance(entry, dict):
        problems.append(f"{p}: entry must be an object like {{\"type\": \"mask\"}}, got {_short(entry)}")
        return None
    for dup in sorted(set(_duplicates_of(entry))):
        problems.append(f"{p}: duplicate key {dup!r}")
    t = entry.get("type")
    if not isinstance(t, str) or t not in SUPERVISION_TYPES:
        problems.append(f"{p}: 'type' must be one of {list(SUPERVISION_TYPES)}, got {_short(t)}")
        return None
    allowed_keys = {"mask": {"type"}, "box": {"type", "boxes"}, "tags": {"type", "present"}, "none": {"type"}}[t]
    unknown = set(entry) - allowed_keys
    if unknown:
        problems.append(f"{p}: unknown keys for type {t!r}: {_keys_text(unknown)}")
    if t == "box":
        boxes_raw = entry.get("boxes")
        if not isinstance(boxes_raw, list) or len(boxes_raw) == 0:
            problems.append(f"{p}: a 'box' case needs a non-empty 'boxes' list, got {_short(boxes_raw)} "
                            "(for an image without foreground use {\"type\": \"tags\", \"present\": []})")
            return None
        boxes = []
        for i, b in enumerate(boxes_raw):
            bp = f"{p}: box {i}"
            if not isinstance(b, dict) or set(b) - {"label", "min", "max"} or not {"label", "min", "max"} <= set(b):
                got = _keys_text(b) if isinstance(b, dict) else _short(b)
                problems.append(f"{bp}: must be an object with exactly 'label', 'min', 'max', got {got}")
                continue
            for dup in sorted(set(_duplicates_of(b))):
                problems.append(f"{bp}: duplicate key {dup!r}")
            why = box_problem(b["label"], b["min"], b["max"])
            if why:
                problems.append(f"{bp}: {why}")
                continue
            boxes.append(Box(int(b["label"]), tuple(int(v) for v in b["min"]), tuple(int(v) for v in b["max"])))
        if len({len(b.min) for b in boxes}) > 1:
            problems.append(f"{p}: boxes mix 2D and 3D coordinates")
        return CaseSupervision(cid, t, boxes=tuple(boxes))
    if t == "tags":
        present = entry.get("present")
        if not isinstance(present, list) or not all(_is_int(v) for v in present):
            problems.append(f"{p}: 'present' must be a list of integer labels (may be empty), got {_short(present)}")
            return None
        if len(set(present)) != len(present):
            problems.append(f"{p}: 'present' lists a label more than once: {present}")
        return CaseSupervision(cid, t, present=tuple(sorted({int(v) for v in present})))
    return CaseSupervision(cid, t)


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a (user-given) value, cut to ``limit`` characters for messages."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # very deep nesting / huge integers
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def supervision_problems(sup: CaseSupervision) -> list[str]:
    """Structural problems of a :class:`CaseSupervision` built in code (``parse_manifest`` output has none)."""
    p = f"case {sup.case_id!r}"
    bad_id = case_id_problem(sup.case_id)
    if bad_id:
        return [f"{p}: {bad_id}"]
    if not isinstance(sup.type, str) or sup.type not in SUPERVISION_TYPES:
        return [f"{p}: 'type' must be one of {list(SUPERVISION_TYPES)}, got {_short(sup.type)}"]
    out = []
    for i, b in enumerate(sup.boxes if sup.type == "box" else ()):
        why = box_problem(b.label, b.min, b.max) if isinstance(b, Box) else "must be a Box"
        if why:
            out.append(f"{p}: box {i}: {why}")
    if sup.type == "tags" and not all(_is_int(v) for v in sup.present):
        out.append(f"{p}: 'present' must be a list of integer labels, got {_short(sup.present)}")
    return out


def _decode_json(text: str, hook: Any = None) -> Any:
    """``json.loads`` whose every failure is a ``ValueError`` with a readable message."""
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise ValueError(f"malformed JSON: {e}") from None


def read_manifest_json(path: str | os.PathLike) -> Any:
    """Decode the manifest file (duplicate keys are kept for reporting). Malformed JSON raises at once.

    Raises :class:`ManifestError` for an unreadable file (missing, a folder, not UTF-8) and for
    any JSON syntax problem (including nesting too deep and integers too long to convert).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([f"cannot read {path}: {e}"], str(path)) from None
    try:
        return _decode_json(text, _reject_duplicates)
    except ValueError as e:
        raise ManifestError([str(e)], str(path)) from None


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
    """Read dataset.json and list the training cases of a raw dataset (no image data is loaded).

    Raises :class:`ManifestError` (source ``dataset.json``) with every problem of dataset.json.
    """
    folder = Path(folder)
    problems = []
    dj_path = folder / "dataset.json"
    try:
        dj = _decode_json(dj_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError([f"cannot read {dj_path}: {e}"], str(dj_path)) from None
    if not isinstance(dj, dict):
        raise ManifestError([f"dataset.json: must be a JSON object, got {_short(dj)}"], str(dj_path))
    fe = dj.get("file_ending")
    labels = dj.get("labels")
    channels = dj.get("channel_names", dj.get("modality"))
    if not isinstance(fe, str) or not fe.startswith(".") or len(fe) < 2 or any(c in fe for c in "/\\\0"):
        problems.append(f"dataset.json: 'file_ending' must be a file ending like '.nii.gz', got {_short(fe)}")
    if not isinstance(labels, dict) or "background" not in labels:
        problems.append("dataset.json: 'labels' must be an object with a 'background' entry")
    elif any(isinstance(v, (list, tuple)) for v in labels.values()):
        problems.append("dataset.json: region-based labels (lists) are not supported by nnunet-mixsup")
    elif any(not _is_int(v) for v in labels.values()):
        bad = {k: v for k, v in labels.items() if not _is_int(v)}
        problems.append(f"dataset.json: label values must be integers, got {_short(bad)}")
    else:
        if labels["background"] != 0:
            problems.append(f"dataset.json: 'background' must be 0, got {labels['background']!r}")
        if any(v < 0 for v in labels.values()):
            problems.append(f"dataset.json: label values must not be negative: {_short(labels)}")
        values = list(labels.values())
        if len(set(values)) != len(values):
            problems.append(f"dataset.json: two label names share a value: {_short(labels)}")
    if not isinstance(channels, dict) or not channels:
        problems.append("dataset.json: 'channel_names' missing (an object like {\"0\": \"CT\"})")
    if "dataset" in dj:
        problems.append("dataset.json: an explicit 'dataset' file list is not supported; use imagesTr/labelsTr")
    if problems:
        raise ManifestError(problems, str(dj_path))
    ignore = labels.get("ignore")
    fg = sorted(v for k, v in labels.items() if k not in ("background", "ignore"))
    suffix = f"_0000{fe}"
    img_dir = folder / "imagesTr"
    try:
        names = os.listdir(img_dir) if img_dir.is_dir() else []
    except OSError as e:
        raise ManifestError([f"cannot list {img_dir}: {e}"], str(folder)) from None
    ids = sorted(f[: -len(suffix)] for f in names if f.endswith(suffix) and len(f) > len(suffix))
    return RawDataset(folder, dj, fe, len(channels), ids, fg, ignore)


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says, in ITK order (read without loading voxels)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1


def image_header(path: Path) -> ImageHeader:
    """Header of an image file (SimpleITK ``ReadImageInformation``); raises ``RuntimeError`` if unreadable."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return ImageHeader(tuple(r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection()),
                       int(r.GetNumberOfComponents()))


def image_info(path: Path) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(size, spacing, origin, direction) of an image in ITK order, reading the header only."""
    h = image_header(path)
    return h.size, h.spacing, h.origin, h.direction


def _itk_message(e: BaseException) -> str:
    """The informative last line of an ITK exception, shortened."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _differs(a: float, b: float) -> bool:
    return not (abs(a - b) <= GEOMETRY_TOLERANCE * max(1.0, abs(a)))  # NaN counts as different


def geometry_differences(ref: ImageHeader, other: ImageHeader, what: str, ref_what: str) -> list[str]:
    """Messages for every way ``other`` is not on the voxel grid of ``ref`` (empty if it is).

    Size must be equal; spacing, origin and direction equal within :data:`GEOMETRY_TOLERANCE`
    (relative, absolute below 1). A size difference is reported alone (the rest is then moot).
    """
    if len(ref.size) != len(other.size):
        return [(f"{what} is {len(other.size)}D (size {list(other.size)}) but {ref_what} is {len(ref.size)}D "
                 f"(size {list(ref.size)})")]
    if ref.size != other.size:
        return [f"{what} size {list(other.size)} differs from {ref_what} size {list(ref.size)}"]
    out = []
    for name in ("spacing", "origin", "direction"):
        a, b = getattr(ref, name), getattr(other, name)
        if len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b)):
            out.append(f"{what} {name} {[round(v, 5) for v in b]} differs from {ref_what} {name} "
                       f"{[round(v, 5) for v in a]}")
    return out


def file_stamp(path: Path) -> list[int]:
    """``[size, mtime_ns, inode]`` of a file: identifies an unchanged file for the image-data cache."""
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


#: NIfTI datatype codes of floating point / complex data (which can hold NaN/inf) -> numpy dtype
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}


def _nifti_layout(head: bytes) -> tuple[int, int, str | None] | None:
    """(data offset, data bytes, numpy dtype if floating point) from a NIfTI-1/2 header; ``None`` if unusable."""
    for end in "<>":
        if len(head) >= 348 and struct.unpack(end + "i", head[:4])[0] == 348:
            dim = struct.unpack(end + "8h", head[40:56])
            datatype, bitpix = struct.unpack(end + "hh", head[70:74])
            offset = struct.unpack(end + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(end + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(end + "hh", head[12:16])
            dim = struct.unpack(end + "8q", head[16:80])
            offset = struct.unpack(end + "q", head[168:176])[0]
            break
    else:
        return None
    nd = dim[0]
    if not 1 <= nd <= 7 or any(d < 1 for d in dim[1:nd + 1]) or bitpix <= 0 or not math.isfinite(offset) \
            or offset < 0:
        return None
    n_bytes = math.prod(dim[1:nd + 1]) * bitpix // 8
    dt = _NIFTI_FLOAT_TYPES.get(datatype)
    return int(offset), int(n_bytes), (end + dt if dt else None)


def _scan_nifti(path: Path) -> tuple[str | None, int] | None:
    """Stream a .nii / .nii.gz file once: (problem, NaN/inf count); ``None`` if it is not a usable NIfTI file.

    SimpleITK does not notice a truncated NIfTI file (the missing voxels read as 0) and reads NaN
    and inf in NIfTI files as 0, so both are checked here on the raw bytes.
    """
    gz = path.name.lower().endswith(".gz")
    n_bad = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return None
            offset, n_bytes, dtype = layout
            if not gz and dtype is None:  # nothing to look at in the voxels: the size says it all
                size = path.stat().st_size
                got = max(0, size - offset)
                if got < n_bytes:
                    return f"file holds {got} of the {n_bytes} data bytes its header announces (truncated?)", 0
                return None, 0
            carry = head[offset:] if offset < len(head) else b""
            skip = max(0, offset - len(head))
            while skip:
                chunk = f.read(min(skip, 1 << 22))
                if not chunk:
                    break
                skip -= len(chunk)
            item = np.dtype(dtype).itemsize if dtype else 1
            got = 0  # data bytes looked at (whole items only)
            while got < n_bytes:
                chunk = f.read(1 << 22)
                data, carry = (carry + chunk)[: n_bytes - got], b""
                if dtype:
                    usable = len(data) - len(data) % item
                    data, carry = data[:usable], data[usable:]
                    if data:
                        values = np.frombuffer(data, dtype=dtype)
                        n_bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                got += len(data)
                if not chunk:
                    break
            if gz and got >= n_bytes:
                while f.read(1 << 22):  # the rest of the stream: the gzip checksum is verified at its end
                    pass
    except (EOFError, OSError, zlib.error) as e:
        return f"damaged file: {e}", n_bad
    if got < n_bytes:
        return f"file holds {got} of the {n_bytes} data bytes its header announces (truncated?)", n_bad
    return None, n_bad


def scan_voxels(path: Path) -> tuple[str | None, int]:
    """Read every voxel of an image file: (why it cannot be read or ``None``, number of NaN/inf voxels).

    NIfTI files are streamed by :func:`_scan_nifti` (SimpleITK hides truncation and NaN there); other
    formats are read with SimpleITK, which reports truncated files itself.
    """
    if path.name.lower().endswith((".nii", ".nii.gz")):
        res = _scan_nifti(path)
        if res is not None:
            return res
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        return _itk_message(e), 0
    arr = sitk.GetArrayViewFromImage(img)  # a view: ``img`` must stay alive while it is used
    if arr.dtype.kind in "fc":
        return None, int(arr.size - np.count_nonzero(np.isfinite(arr)))
    return None, 0


def check_image_data(path: Path, name: str, cache: dict[str, list[int]] | None = None) -> str | None:
    """Read every voxel of an image: a problem message for a truncated/corrupt file or NaN/inf voxels.

    ``cache`` maps ``name`` to the :func:`file_stamp` of a file already found valid; such a file is
    not read again, and a file found valid now is added.
    """
    stamp = file_stamp(path)
    if cache is not None and cache.get(name) == stamp:
        return None
    why, n_bad = scan_voxels(path)
    if why:
        return f"cannot read the voxels of {name} (truncated or corrupt file?): {why}"
    if n_bad:
        return (f"{name} has {n_bad} non-finite (NaN/inf) voxel(s); nnU-Net would read them as 0 (SimpleITK) "
                "or NaN (nibabel) - replace them by a meaningful intensity")
    if cache is not None:
        cache[name] = stamp
    return None


#: endings read by SimpleITK in nnU-Net, where a file must hold exactly one channel
_SCALAR_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")


def _check_images(ds: RawDataset, cid: str, check_data: bool,
                  cache: dict[str, list[int]] | None) -> tuple[list[str], ImageHeader | None]:
    """Headers of every channel (readable, 2D/3D, one component, same grid as channel 0), optionally voxels.

    Returns (problems without the case prefix, header of channel 0 or ``None`` if it is unusable).
    """
    files = ds.image_files(cid)
    out: list[str] = []
    headers: list[ImageHeader | None] = []
    for f in files:
        try:
            headers.append(image_header(f))
        except RuntimeError as e:
            out.append(f"cannot read image imagesTr/{f.name}: {_itk_message(e)}")
            headers.append(None)
    h0 = headers[0]
    if h0 is not None and len(h0.size) not in (2, 3):
        out.append(f"imagesTr/{files[0].name} is {len(h0.size)}D (size {list(h0.size)}); nnU-Net needs 2D or "
                   "3D images (one file per channel)")
        h0 = None
    for f, h in zip(files, headers):
        if h is not None and h.components != 1 and ds.file_ending in _SCALAR_ENDINGS:
            out.append(f"imagesTr/{f.name} has {h.components} components per voxel; nnU-Net needs one file per "
                       "channel (_0000, _0001, ...)")
    if h0 is not None:
        for c, (f, h) in enumerate(zip(files[1:], headers[1:]), start=1):
            if h is not None:
                out.extend(f"channel {c} ({f.name}): {m}" for m in
                           geometry_differences(h0, h, f"channel {c}", f"channel 0 ({files[0].name})"))
    if check_data and not out:
        for f in files:
            why = check_image_data(f, f"imagesTr/{f.name}", cache)
            if why:
                out.append(why)
    return out, (h0 if not out else None)


def _check_mask(ds: RawDataset, cid: str, valid_fg: set[int], image: ImageHeader | None = None) -> list[str]:
    """Geometry of the label file vs the image (header) and label values vs dataset.json."""
    lab = ds.label_file(cid)
    rel = f"labelsTr/{lab.name}"
    if image is None:
        try:
            image = image_header(ds.image_files(cid)[0])
        except RuntimeError as e:
            return [f"cannot read image header: {_itk_message(e)}"]
    try:
        lh = image_header(lab)
    except RuntimeError as e:
        return [f"cannot read label file {rel}: {_itk_message(e)}"]
    if lh.components != 1:
        return [f"label file {rel} has {lh.components} components per voxel; a label map needs one"]
    out = geometry_differences(image, lh, "label", "image")
    if image.size != lh.size:
        return out
    why, n_bad = scan_voxels(lab)
    if why:
        return out + [f"cannot read the voxels of label file {rel} (truncated or corrupt file?): {why}"]
    try:
        lab_img = sitk.ReadImage(str(lab))
    except RuntimeError as e:
        return out + [f"cannot read the voxels of label file {rel} (truncated or corrupt file?): {_itk_message(e)}"]
    vals = np.unique(sitk.GetArrayViewFromImage(lab_img))
    del lab_img
    if n_bad:
        out.append(f"label file {rel} contains NaN/inf values ({n_bad} voxel(s))")
    if vals.dtype.kind in "fc":
        vals = vals[np.isfinite(vals)]
        frac = vals[vals != np.round(vals)]
        if frac.size:
            out.append(f"label file {rel} has non-integer values {[float(v) for v in frac[:5]]}")
        vals = vals[vals == np.round(vals)]
    allowed = valid_fg | {0} | ({ds.ignore_label} if ds.ignore_label is not None else set())
    bad = sorted(int(v) for v in vals if int(v) not in allowed)
    if bad:
        out.append(f"label values {bad[:10]} are not in dataset.json labels {sorted(allowed)}")
    return out


def _check_case(ds: RawDataset, cid: str, sup: CaseSupervision, generated: set[str], check_label_files: bool,
                check_data: bool, cache: dict[str, list[int]] | None) -> list[str]:
    """Every problem of one case that is known to the dataset, each prefixed with the case."""
    p = f"case {cid!r}"
    missing = [f.name for f in ds.image_files(cid) if not f.is_file()]
    if missing:
        return [f"{p}: image file(s) missing: {missing}"]
    img_problems, header = _check_images(ds, cid, check_data, cache)
    problems = [f"{p}: {m}" for m in img_problems]
    lab = ds.label_file(cid)
    if sup.type == "mask":
        if not lab.is_file() or lab.name in generated:
            problems.append(f"{p}: type 'mask' but no label file labelsTr/{lab.name}")
        elif check_label_files and header is not None:
            problems.extend(f"{p}: {m}" for m in _check_mask(ds, cid, set(ds.foreground_labels), header))
    elif lab.is_file() and lab.name not in generated and check_label_files:
        problems.append(f"{p}: type {sup.type!r} but labelsTr/{lab.name} exists and was not written by "
                        "nnunet-mixsup; refusing to overwrite a user's label file (declare the case 'mask' or "
                        "move the file out of labelsTr)")
    valid_fg = set(ds.foreground_labels)
    labels_used = [b.label for b in sup.boxes] + list(sup.present)
    bad = sorted({int(v) for v in labels_used if v not in valid_fg})
    if bad:
        problems.append(f"{p}: label(s) {bad} are not foreground labels of dataset.json (valid: {sorted(valid_fg)})")
    if sup.type == "box" and header is not None:
        size = header.size
        for i, b in enumerate(sup.boxes):
            if len(b.min) != len(size):
                problems.append(f"{p}: box {i}: wrong dimensionality – {len(b.min)} coordinates for a "
                                f"{len(size)}D image of size {list(size)} (x, y[, z])")
                continue
            out = [a for a in range(len(size)) if b.min[a] < 0 or b.max[a] > size[a]]
            if out:
                problems.append(f"{p}: box {i}: outside the image on axis/axes {out}: min={list(b.min)}, "
                                f"max={list(b.max)}, image size (x, y[, z]) = {list(size)}")
    return problems


def validate_against_dataset(manifest: Manifest, ds: RawDataset, check_label_files: bool = True,
                             generated: set[str] | None = None, problems: list[str] | None = None,
                             mentioned: set[str] | None = None, *, check_image_data: bool = False,
                             image_data_cache: dict[str, list[int]] | None = None) -> tuple[Manifest, list[str]]:
    """Check a manifest against a raw dataset; return the complete manifest (defaults filled in).

    ``generated`` is the set of label file names that nnunet-mixsup itself wrote (those may be
    overwritten); any other label file of a weak case is a user's mask and is an error.
    ``problems`` may carry structural problems found earlier (reported together); ``mentioned`` are
    case ids named in the file even if their entry was invalid (they get no default).

    Checked for every case: the manifest entry itself (also for manifests built in code: case id,
    type, box coordinates), the image files of every channel (readable headers, 2D/3D, one
    component, all channels on the grid of channel 0), for mask cases – given or defaulted – the
    label file (readable, same grid as the image, values in dataset.json), box labels and box
    coordinates against the image size. ``check_image_data`` also reads every image voxel (truncated
    files, NaN/inf); ``image_data_cache`` (see :func:`check_image_data`) skips files already verified.
    Nothing is written. Raises :class:`ManifestError` with every problem found; returns (manifest, warnings).
    """
    problems = problems if problems is not None else []
    mentioned = mentioned or set()
    warnings: list[str] = []
    generated = generated or set()
    ids = set(ds.case_ids)
    full = Manifest(version=manifest.version)
    for cid, sup in sorted(manifest.cases.items(), key=lambda kv: str(kv[0])):
        p = f"case {cid!r}"
        if not isinstance(sup, CaseSupervision):
            problems.append(f"{p}: entry must be a CaseSupervision, got {_short(sup)}")
            continue
        structural = [m.replace(f"case {sup.case_id!r}", p, 1) for m in supervision_problems(sup)]
        if case_id_problem(cid):
            structural.insert(0, f"{p}: {case_id_problem(cid)}")
        if structural:
            problems.extend(structural)
            continue
        if cid not in ids:
            problems.append(f"{p}: unknown case – no image imagesTr/{cid}_0000{ds.file_ending}")
            continue
        problems.extend(_check_case(ds, cid, sup, generated, check_label_files, check_image_data, image_data_cache))
        full.cases[cid] = sup
    for cid in ds.case_ids:
        if cid in full.cases or cid in manifest.cases or cid in mentioned:
            continue
        if ds.label_file(cid).is_file() and ds.label_file(cid).name not in generated:
            sup = CaseSupervision(cid, "mask")
            problems.extend(_check_case(ds, cid, sup, generated, check_label_files, check_image_data,
                                        image_data_cache))
            full.cases[cid] = sup
        else:
            problems.append(f"case {cid!r}: has an image but neither a manifest entry nor a label file")
    if not full.of_type("mask") and not any("type 'mask'" in p for p in problems):
        problems.append("the dataset has no 'mask' case: at least one fully labelled case is needed "
                        "(for the supervised loss and for validation)")
    if problems:
        raise ManifestError(problems, str(ds.folder / MANIFEST_NAME))
    return full, warnings
