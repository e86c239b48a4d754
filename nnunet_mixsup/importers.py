"""``nnunet-mixsup import-boxes`` / ``import-tags``: weak labels drawn in other tools -> ``supervision.json``.

Sources of boxes (``import-boxes``):

- 3D Slicer markups ROI files (``.mrk.json``, one or more ROIs per file). Each ROI is read from the
  published markups schema: ``coordinateSystem`` (``LPS`` or ``RAS``, default ``LPS``),
  ``coordinateUnits`` (``mm``, default, or ``um``), ``center``, ``size`` (along the ROI's own axes)
  and ``orientation`` (3x3, row-major; column ``j`` is the ROI's ``j``-th axis, identity if missing).
  An ROI without ``center`` / ``size`` is the bounding box of its control points. ROIs must be saved
  in the image's frame (harden any parent transform in Slicer before saving). The class comes from
  ``--label``, else from a mapping file (``--label-map``: ROI name -> class), else from the ROI's
  ``name`` / ``description`` matched against dataset.json's labels (case-insensitive; Slicer's
  automatic suffixes such as ``liver_1`` or ``liver-2`` are ignored; a number is a label value).
  Which case a file belongs to: ``--case``, else a folder named after the case, else the file name
  (``CASE.mrk.json`` or ``CASE_<anything>.mrk.json``, the longest matching case id wins).
- CSV files, one row per box: ``case, label, x0, y0[, z0], x1, y1[, z1]`` (an optional header row
  starts with ``case``; ``,``, ``;`` or tab separated; ``#`` starts a comment line). ``--units``
  says what the corners are: ``lps`` / ``ras`` world coordinates in mm (two opposite corners of a
  box whose faces are parallel to the world axes), or ``voxel`` indices of the raw image in ITK
  order, ``min`` inclusive and ``max`` exclusive as in supervision.json (``--inclusive-max``: the
  second corner is the last voxel inside the box, as read off a viewer).
- Label images per case (e.g. painted roughly in ITK-SNAP), named like the case (rules as for
  markups files): one box per connected component (26-/8-connectivity) of every class. Values
  are dataset.json label values, or mapped by ``--label-map`` (painted value -> class). A label
  image on another grid than the case's image is mapped through world coordinates.

``import-tags`` reads CSV files with one row per case: ``case, classes...`` where the classes
(names or values) fill the following cells or are separated by ``;`` / ``|`` inside one cell; a
row without classes says that no foreground class is present. A spreadsheet-style header
``case, <label name>, <label name>, ...`` switches to one column per class with yes/no cells
(``1 / 0``, ``yes / no``, ``true / false``, ``x`` / empty).

World coordinates -> voxel indices: SimpleITK's physical point convention is LPS
(``point = origin + direction @ diag(spacing) @ index``, the index of a voxel is its centre); RAS
points are LPS with the sign of x and y flipped. Voxel ``k`` covers the continuous index interval
``[k - 1/2, k + 1/2]``. A region is mapped by its corners (all 8 for a rotated ROI, 4 in 2D) to
continuous indices ``a..b`` per axis, and the box is ``min = floor(a + 1/2)``, ``max = ceil(b + 1/2)``
(exclusive): every voxel that overlaps the region, so voxels outside the box are truly outside it
(a rotated ROI gets the smallest axis-aligned index box that contains it). Overlaps below
:data:`INDEX_TOLERANCE` voxels (rounding of coordinates) do not count. Corner points at voxel
centres and at voxel faces both give the box of those voxels. World boxes reaching beyond the
image are cut to it (reported as a note); a box entirely outside is a problem. Voxel-index boxes
must lie inside the image. For 2D images the z coordinate of a markups ROI is ignored.

Writing: every input is read and checked first; the merged manifest must pass the validation
that ``nnunet-mixsup prepare`` runs (:func:`nnunet_mixsup.manifest.validate_against_dataset`,
without reading image voxels). Problems – a case given by two sources, a label not in
dataset.json, a box outside its image, a case without image, a row or file that does not parse,
and every validation problem – are collected and raised together as one
:class:`~nnunet_mixsup.manifest.ManifestError`, each naming the file and line or the case; then
nothing is written. Otherwise ``supervision.json`` is written atomically (temporary file +
``os.replace``). Cases that already have an entry keep it unless ``replace`` is set. A case is
"given twice" when two sources name it: two CSV files, two label images, or markups files and
another source (several markups files of one case are its ROIs together, as Slicer saves one ROI
per file). With ``partial``, training cases that still have no supervision (and a dataset without
any mask case yet) are notes instead of problems, so boxes and tags can be imported one after the
other; ``prepare`` still refuses such a manifest.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnunet_mixsup.fileio import atomic_write_json
from nnunet_mixsup.manifest import (
    MANIFEST_NAME,
    Box,
    CaseSupervision,
    ImageHeader,
    Manifest,
    ManifestError,
    RawDataset,
    box_problem,
    geometry_differences,
    image_header,
    parse_manifest,
    read_manifest_json,
    read_raw_dataset,
    validate_against_dataset,
)
from nnunet_mixsup.prepare import load_generated_record, raw_dataset_folder

#: overlaps of a region with a voxel below this many voxels (coordinate rounding) do not count
INDEX_TOLERANCE = 1e-3
#: what the corners of a CSV box are
CSV_UNITS = ("lps", "ras", "voxel")
MARKUPS_ENDINGS = (".mrk.json", ".json")
LABEL_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl", ".png", ".tif",
                       ".tiff", ".bmp")
_TRUE = {"1", "yes", "y", "true", "x", "present", "+"}
_FALSE = {"0", "no", "n", "false", "", "absent", "-"}
_AUTO_SUFFIX = re.compile(r"[\s_-]+\d+$")
_UNITS_MM = {"mm": 1.0, "um": 1e-3}


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------
def _index_matrix(header: ImageHeader) -> np.ndarray:
    """``direction @ diag(spacing)``: continuous index -> physical offset from the origin (LPS)."""
    d = len(header.size)
    return np.asarray(header.direction, float).reshape(d, d) * np.asarray(header.spacing, float)


def physical_to_index(header: ImageHeader, points_lps: np.ndarray) -> np.ndarray:
    """Continuous ITK indices (N, d) of physical points (N, d) given in LPS (SimpleITK's convention)."""
    pts = np.atleast_2d(np.asarray(points_lps, float))
    return np.linalg.solve(_index_matrix(header), (pts - np.asarray(header.origin, float)).T).T


def index_to_physical(header: ImageHeader, indices: np.ndarray) -> np.ndarray:
    """Physical LPS points (N, d) of continuous ITK indices (N, d) – the inverse of :func:`physical_to_index`."""
    idx = np.atleast_2d(np.asarray(indices, float))
    return idx @ _index_matrix(header).T + np.asarray(header.origin, float)


def enclosing_box(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest index box ``[min, max)`` of the voxels that overlap the hull of continuous indices (N, d).

    Voxel ``k`` covers ``[k - 1/2, k + 1/2]``: ``min = floor(a + 1/2)``, ``max = ceil(b + 1/2)`` with
    ``a`` / ``b`` the smallest / largest coordinate per axis, overlaps below :data:`INDEX_TOLERANCE`
    ignored; never empty (a flat region still gives one voxel).
    """
    idx = np.atleast_2d(np.asarray(indices, float))
    lo = np.floor(idx.min(0) + 0.5 + INDEX_TOLERANCE).astype(int)
    hi = np.ceil(idx.max(0) + 0.5 - INDEX_TOLERANCE).astype(int)
    return lo, np.maximum(hi, lo + 1)


def cuboid_corners(lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """All ``2^d`` corners (2^d, d) of the axis-aligned cuboid between ``lo`` and ``hi``."""
    return np.array(list(itertools.product(*zip(lo, hi))), dtype=float)


def clip_to_image(lo: np.ndarray, hi: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """``[lo, hi)`` cut to the image ``[0, size)``; ``None`` when nothing of it is inside."""
    lo_c, hi_c = np.maximum(lo, 0), np.minimum(hi, np.asarray(size))
    return None if np.any(hi_c <= lo_c) else (lo_c, hi_c)


def roi_corners_lps(center: Sequence[float], size: Sequence[float], orientation: Sequence[float],
                    coordinate_system: str, scale: float = 1.0) -> np.ndarray:
    """The 8 corners (8, 3) in LPS mm of a markups ROI (centre, size along its axes, row-major axes matrix)."""
    axes = np.asarray(orientation, float).reshape(3, 3)  # column j = the ROI's axis j
    offsets = cuboid_corners(-0.5 * np.asarray(size, float), 0.5 * np.asarray(size, float))
    pts = (np.asarray(center, float) + offsets @ axes.T) * scale
    if coordinate_system == "RAS":
        pts[:, :2] *= -1
    return pts


def world_region_to_box(corners_lps: np.ndarray, header: ImageHeader) -> tuple[tuple[int, ...], tuple[int, ...],
                                                                                  bool] | None:
    """Index box (ITK order) of the voxels overlapping a world region given by its corners; cut to the image.

    Returns ``(min, max, was_cut)`` or ``None`` when the region misses the image. For a 2D image only
    the first two (x, y) coordinates of the corners are used.
    """
    d = len(header.size)
    lo, hi = enclosing_box(physical_to_index(header, np.asarray(corners_lps, float)[:, :d]))
    clipped = clip_to_image(lo, hi, header.size)
    if clipped is None:
        return None
    lo_c, hi_c = clipped
    cut = bool(np.any(lo_c != lo) or np.any(hi_c != hi))
    return tuple(int(v) for v in lo_c), tuple(int(v) for v in hi_c), cut


# ----------------------------------------------------------------------------------------------------------
# labels, cases, sources
# ----------------------------------------------------------------------------------------------------------
class LabelResolver:
    """Class names / values -> foreground label values of dataset.json, optionally through a mapping."""

    def __init__(self, labels: dict[str, int], foreground: Sequence[int], mapping: dict[str, str] | None = None):
        self.foreground = sorted(int(v) for v in foreground)
        self.by_name = {k.strip().lower(): int(v) for k, v in labels.items() if int(v) in self.foreground}
        self.names = {v: k for k, v in labels.items() if int(v) in self.foreground}
        self.mapping = {k.strip().lower(): v for k, v in (mapping or {}).items()}

    def valid_text(self) -> str:
        return ", ".join(f"{self.names[v]}={v}" for v in self.foreground)

    def resolve(self, token: Any) -> int | None:
        """Foreground label of a class name (case-insensitive) or value; ``None`` if it is neither."""
        text = str(token).strip()
        if text.lower() in self.by_name:
            return self.by_name[text.lower()]
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() and int(value) in self.foreground else None

    def resolve_text(self, *texts: str) -> int | None:
        """Class of an ROI from its name / description: through the mapping if one is given, else directly.

        Each text is tried as it is and without a trailing automatic suffix (``_1``, ``-2``, `` 3``).
        """
        for text in texts:
            text = (text or "").strip()
            for t in dict.fromkeys((text, _AUTO_SUFFIX.sub("", text))):
                if not t:
                    continue
                if self.mapping:
                    if t.lower() in self.mapping:
                        return self.resolve(self.mapping[t.lower()])
                else:
                    found = self.resolve(t) if t == text else self.by_name.get(t.lower())
                    if found is not None:
                        return found
        return None


def read_label_map(path: Path, problems: list[str], delimiter: str | None = None) -> dict[str, str]:
    """A mapping file: a JSON object ``{"ROI name or painted value": "class name or value"}`` or a CSV of pairs."""
    if path.name.lower().endswith(".json"):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{path}: cannot read the label map: {e}")
            return {}
        if not isinstance(obj, dict) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                for v in obj.values()):
            problems.append(f"{path}: a JSON label map must be an object of names -> class names or values")
            return {}
        return {str(k): str(v) for k, v in obj.items()}
    out: dict[str, str] = {}
    for line, cells in _csv_rows(path, problems, delimiter):
        if len(cells) != 2:
            problems.append(f"{path}:{line}: a label map row needs 2 cells (name, class), got {len(cells)}")
            continue
        if cells[0].strip().lower() in {k.lower() for k in out}:
            problems.append(f"{path}:{line}: {cells[0]!r} is mapped twice")
        out[cells[0].strip()] = cells[1]
    return out


def _strip_ending(name: str, endings: Iterable[str]) -> str:
    for e in sorted(endings, key=len, reverse=True):
        if name.lower().endswith(e.lower()):
            return name[: -len(e)]
    return name


def _case_of_file(path: Path, root: Path | None, case_ids: set[str], endings: Iterable[str]) -> str | None:
    """The case a file belongs to: its folder's name, else its name (``CASE`` or ``CASE_<anything>``)."""
    if root is not None and path.parent != root and path.parent.name in case_ids:
        return path.parent.name
    stem = _strip_ending(path.name, endings)
    if stem in case_ids:
        return stem
    matches = [c for c in case_ids if stem.startswith(c) and stem[len(c)] in "_-. "]
    return max(matches, key=len) if matches else None


def _expand(paths: Sequence[str | os.PathLike], endings: Sequence[str],
            problems: list[str]) -> list[tuple[Path, Path | None]]:
    """Files given directly or found (recursively) in given folders: ``(file, folder it was found in)``."""
    out: list[tuple[Path, Path | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(tuple(endings))
                           and not f.name.startswith("."))
            if not found:
                problems.append(f"{p}: no {' / '.join(endings)} files in this folder")
            out.extend((f, p) for f in found)
        elif p.is_file():
            out.append((p, None))
        else:
            problems.append(f"{p}: no such file or folder")
    return out


def _csv_rows(path: Path, problems: list[str], delimiter: str | None = None) -> list[tuple[int, list[str]]]:
    """Non-empty, non-comment rows of a CSV file as ``(line number, stripped cells)``; trailing empty cells dropped.

    The delimiter (``,``, ``;`` or tab) is detected from the file unless given. A byte-order mark
    (spreadsheet exports) is skipped.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read: {e}")
        return []
    if delimiter is None:
        sample = "\n".join(ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))[:8192]
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
        except csv.Error:
            delimiter = ","
    rows = []
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        for cells in reader:
            cells = [c.strip() for c in cells]
            while cells and not cells[-1]:
                cells.pop()
            if not cells or cells[0].startswith("#"):
                continue
            rows.append((reader.line_num, cells))
    except csv.Error as e:
        problems.append(f"{path}:{reader.line_num}: cannot parse the CSV: {e}")
    return rows


@dataclass
class _Collector:
    """Boxes / tags found so far per case, where each case came from, problems and notes."""

    ds: RawDataset
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    present: dict[str, list[int]] = field(default_factory=dict)
    sources: dict[str, dict[str, str]] = field(default_factory=dict)
    bad_cases: set[str] = field(default_factory=set)
    _headers: dict[str, ImageHeader | None] = field(default_factory=dict)

    def header(self, cid: str, where: str) -> ImageHeader | None:
        """Header of the case's first-channel image (cached); a problem naming ``where`` if unreadable."""
        if cid not in self._headers:
            try:
                self._headers[cid] = image_header(self.ds.image_files(cid)[0])
            except RuntimeError as e:
                self._headers[cid] = None
                self.problems.append(f"{where}: case {cid!r}: cannot read imagesTr/{self.ds.image_files(cid)[0].name}: "
                                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}")
        return self._headers[cid]

    def known_case(self, cid: str, where: str) -> bool:
        if cid in self.ds.case_ids:
            return True
        self.problems.append(f"{where}: case {cid!r} has no image imagesTr/{cid}_0000{self.ds.file_ending}")
        return False

    def source(self, cid: str, key: str, name: str | None = None) -> None:
        """Record that ``cid`` is given by source ``key`` (shown as ``name``; markups files add up)."""
        known = self.sources.setdefault(cid, {})
        name = name or key
        if key not in known:
            known[key] = name
        elif key == "markups" and name not in known[key]:
            known[key] += f", {name}"

    def fail(self, cid: str | None, message: str) -> None:
        self.problems.append(message)
        if cid is not None:
            self.bad_cases.add(cid)

    def check_twice(self) -> None:
        for cid, srcs in sorted(self.sources.items()):
            if len(srcs) > 1:
                self.fail(cid, f"case {cid!r} is given twice: in {' and in '.join(srcs.values())}")


# ----------------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------------
def _numbers(values: Any, n: int) -> list[float] | None:
    if not isinstance(values, list) or len(values) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def _read_markups(path: Path, cid: str, col: _Collector, labels: LabelResolver, forced: int | None) -> None:
    """Every ROI of one markups file -> boxes of case ``cid``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        col.fail(cid, f"{path}: cannot read markups JSON: {e}")
        return
    markups = obj.get("markups") if isinstance(obj, dict) else None
    if not isinstance(markups, list) or not markups:
        col.fail(cid, f"{path}: not a markups file (no non-empty 'markups' list)")
        return
    header = col.header(cid, str(path))
    col.source(cid, "markups", f"markups file {path}")
    for i, m in enumerate(markups):
        name = m.get("name", "") if isinstance(m, dict) else ""
        where = f"{path}: markup {i}" + (f" ({name!r})" if name else "")
        if not isinstance(m, dict) or m.get("type") != "ROI":
            got = m.get("type") if isinstance(m, dict) else m
            col.fail(cid, f"{where}: not an ROI (type {got!r}); only ROI markups describe boxes")
            continue
        cs = m.get("coordinateSystem", "LPS")
        if cs not in ("LPS", "RAS"):
            col.fail(cid, f"{where}: 'coordinateSystem' must be 'LPS' or 'RAS', got {cs!r}")
            continue
        units = m.get("coordinateUnits", "mm")
        units = units[0] if isinstance(units, list) and units else units
        if units not in _UNITS_MM:
            col.fail(cid, f"{where}: 'coordinateUnits' must be 'mm' or 'um', got {units!r}")
            continue
        if m.get("insideOut") is True:
            col.fail(cid, f"{where}: an inside-out ROI (everything outside the box) cannot be a box label")
            continue
        center, size = _numbers(m.get("center"), 3), _numbers(m.get("size"), 3)
        orientation = _numbers(m.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1]), 9)
        if center is None and size is None and m.get("center") is None and m.get("size") is None:
            pts = [_numbers(p.get("position"), 3) for p in m.get("controlPoints") or [] if isinstance(p, dict)]
            pts = [p for p in pts if p is not None]
            if pts:
                a = np.asarray(pts)
                center, size, orientation = list((a.min(0) + a.max(0)) / 2), list(a.max(0) - a.min(0)), \
                    [1.0, 0, 0, 0, 1, 0, 0, 0, 1]
        if center is None or size is None or orientation is None or min(size) < 0:
            col.fail(cid, f"{where}: needs 'center' (3 numbers), 'size' (3 numbers >= 0) and 'orientation' "
                          f"(9 numbers), got center={m.get('center')!r}, size={m.get('size')!r}, "
                          f"orientation={m.get('orientation')!r}")
            continue
        if abs(np.linalg.det(np.asarray(orientation).reshape(3, 3))) < 1e-6:
            col.fail(cid, f"{where}: 'orientation' {orientation} is not a rotation (singular matrix)")
            continue
        label = forced if forced is not None else labels.resolve_text(name, str(m.get("description", "")))
        if label is None:
            how = "the label map" if labels.mapping else f"dataset.json's labels ({labels.valid_text()})"
            col.fail(cid, f"{where}: case {cid!r}: no class for this ROI: its name {name!r} / description "
                          f"{m.get('description', '')!r} match nothing in {how}; use --label or --label-map")
            continue
        if header is None:
            continue
        res = world_region_to_box(roi_corners_lps(center, size, orientation, cs, _UNITS_MM[units]), header)
        if res is None:
            col.fail(cid, f"{where}: case {cid!r}: the ROI lies outside the image (size {list(header.size)})")
            continue
        lo, hi, cut = res
        if cut:
            col.notes.append(f"{where}: case {cid!r}: ROI cut to the image")
        col.boxes.setdefault(cid, []).append(Box(label, lo, hi))


def _read_box_csv(path: Path, col: _Collector, labels: LabelResolver, units: str, inclusive_max: bool,
                  delimiter: str | None) -> None:
    """One box per row: ``case, label, corner 1, corner 2`` (see the module docstring)."""
    rows = _csv_rows(path, col.problems, delimiter)
    if rows and rows[0][1][0].lower() == "case":
        rows = rows[1:]
    if not rows:
        col.problems.append(f"{path}: no box rows")
    for line, cells in tqdm(rows, desc=f"boxes from {path.name}", unit="row", leave=False, disable=len(rows) < 500):
        where = f"{path}:{line}"
        cid = cells[0]
        if len(cells) not in (6, 8):
            col.fail(cid, f"{where}: expected 'case, label, x0, y0[, z0], x1, y1[, z1]' (6 or 8 cells), "
                          f"got {len(cells)}: {cells}")
            continue
        try:
            nums = [float(c) for c in cells[2:]]
        except ValueError:
            col.fail(cid, f"{where}: the corners must be numbers, got {cells[2:]}")
            continue
        if not all(math.isfinite(v) for v in nums):
            col.fail(cid, f"{where}: the corners must be finite numbers, got {cells[2:]}")
            continue
        if not col.known_case(cid, where):
            continue
        col.source(cid, str(path))
        label = labels.resolve(cells[1])
        if label is None:
            col.fail(cid, f"{where}: case {cid!r}: label {cells[1]!r} is not a foreground label of dataset.json "
                          f"({labels.valid_text()})")
            continue
        header = col.header(cid, where)
        if header is None:
            continue
        d = len(nums) // 2
        if d != len(header.size):
            col.fail(cid, f"{where}: case {cid!r}: {d}D corners for a {len(header.size)}D image")
            continue
        a, b = nums[:d], nums[d:]
        if units == "voxel":
            if not all(v.is_integer() for v in nums):
                col.fail(cid, f"{where}: voxel corners must be integers, got {cells[2:]}")
                continue
            mn = tuple(int(v) for v in a)
            mx = tuple(int(v) + int(inclusive_max) for v in b)
            why = box_problem(label, list(mn), list(mx))
            if why:
                col.fail(cid, f"{where}: case {cid!r}: {why}")
                continue
            out = [i for i in range(d) if mn[i] < 0 or mx[i] > header.size[i]]
            if out:
                col.fail(cid, f"{where}: case {cid!r}: box outside the image on axis/axes {out}: min={list(mn)}, "
                              f"max={list(mx)}, image size (x, y[, z]) = {list(header.size)}")
                continue
            col.boxes.setdefault(cid, []).append(Box(label, mn, mx))
            continue
        corners = cuboid_corners(np.minimum(a, b), np.maximum(a, b))
        if units == "ras":
            corners[:, :2] *= -1
        res = world_region_to_box(corners, header)
        if res is None:
            col.fail(cid, f"{where}: case {cid!r}: box outside the image (size {list(header.size)}, "
                          f"{units.upper()} corners {a}, {b})")
            continue
        lo, hi, cut = res
        if cut:
            col.notes.append(f"{where}: case {cid!r}: box cut to the image")
        col.boxes.setdefault(cid, []).append(Box(label, lo, hi))


def _read_label_image(path: Path, cid: str, col: _Collector, labels: LabelResolver) -> None:
    """One box per connected component of every class of a (rough) label image of case ``cid``."""
    header = col.header(cid, str(path))
    col.source(cid, str(path))
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        col.fail(cid, f"{path}: cannot read the label image: {str(e).strip().splitlines()[-1]}")
        return
    if header is None:
        return
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != len(header.size):
        col.fail(cid, f"{path}: case {cid!r}: a label image must be a {len(header.size)}D image with one value per "
                      f"voxel like the case's image, got {img.GetDimension()}D with "
                      f"{img.GetNumberOfComponentsPerPixel()} component(s)")
        return
    lab_header = ImageHeader(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                             tuple(img.GetDirection()))
    same_grid = not geometry_differences(header, lab_header, "label image", "image")
    arr = sitk.GetArrayFromImage(img)
    values = np.unique(arr)
    if arr.dtype.kind in "fc":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            col.fail(cid, f"{path}: case {cid!r}: non-integer values {bad[:5].tolist()} in a label image")
            return
    found = False
    for v in (int(x) for x in values if x != 0):
        label = labels.resolve(labels.mapping[str(v)]) if str(v) in labels.mapping else \
            (None if labels.mapping else labels.resolve(v))
        if label is None:
            how = "the label map" if labels.mapping else f"dataset.json's foreground labels ({labels.valid_text()})"
            col.fail(cid, f"{path}: case {cid!r}: value {v} is not in {how}")
            continue
        comp, _ = ndimage.label(arr == v, structure=np.ones((3,) * arr.ndim))
        for sl in ndimage.find_objects(comp):
            if sl is None:
                continue
            mn = tuple(s.start for s in sl)[::-1]
            mx = tuple(s.stop for s in sl)[::-1]
            if not same_grid:
                corners = cuboid_corners(np.asarray(mn) - 0.5, np.asarray(mx) - 0.5)
                res = world_region_to_box(index_to_physical(lab_header, corners), header)
                if res is None:
                    col.fail(cid, f"{path}: case {cid!r}: a component of value {v} lies outside the image")
                    continue
                mn, mx, _ = res
            col.boxes.setdefault(cid, []).append(Box(label, mn, mx))
            found = True
    if not same_grid:
        col.notes.append(f"{path}: case {cid!r}: label image on another grid than the image; boxes mapped through "
                         "world coordinates")
    if not found and cid not in col.bad_cases:
        col.fail(cid, f"{path}: case {cid!r}: no labelled voxel in the label image (an image without foreground "
                      "is a tags case with no class: use import-tags)")


def _read_tags_csv(path: Path, col: _Collector, labels: LabelResolver, delimiter: str | None) -> None:
    """One row per case: ``case, classes...`` or a one-column-per-class spreadsheet (see the module docstring)."""
    rows = _csv_rows(path, col.problems, delimiter)
    columns: list[int] | None = None
    if rows and rows[0][1][0].lower() == "case":
        head = rows[0][1][1:]
        if head and all(h.strip().lower() in labels.by_name for h in head):
            columns = [labels.by_name[h.strip().lower()] for h in head]
        rows = rows[1:]
    if not rows:
        col.problems.append(f"{path}: no tag rows")
    for line, cells in rows:
        where = f"{path}:{line}"
        cid = cells[0]
        if not col.known_case(cid, where):
            continue
        seen = cid in col.sources
        col.source(cid, where)
        if seen:  # reported by check_twice with both lines
            continue
        present: set[int] = set()
        if columns is not None:
            if len(cells) - 1 > len(columns):
                col.fail(cid, f"{where}: case {cid!r}: {len(cells) - 1} cells after the case but {len(columns)} "
                              "class columns")
                continue
            for c, cell in itertools.zip_longest(columns, cells[1:], fillvalue=""):
                if cell.lower() in _TRUE:
                    present.add(c)
                elif cell.lower() not in _FALSE:
                    col.fail(cid, f"{where}: case {cid!r}: cannot read {cell!r} in column {labels.names[c]!r} as "
                                  "present / absent (1/0, yes/no, true/false, x/empty)")
        else:
            for t in (t.strip() for cell in cells[1:] for t in re.split(r"[;|]", cell)):
                if not t:
                    continue
                label = labels.resolve(t)
                if label is None:
                    col.fail(cid, f"{where}: case {cid!r}: class {t!r} is not a foreground label of dataset.json "
                                  f"({labels.valid_text()})")
                else:
                    present.add(label)
        col.present[cid] = sorted(present)


# ----------------------------------------------------------------------------------------------------------
# merge, validate, write
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    """What an import did (or, with ``dry_run``, would do)."""

    path: Path
    manifest: Manifest
    added: list[str]
    replaced: list[str]
    kept: list[str]
    notes: list[str]
    written: bool

    def summary(self) -> str:
        lines = [f"{self.path}: {len(self.added)} case(s) added, {len(self.replaced)} replaced"
                 + ("" if self.written else " (nothing written)")]
        if self.kept:
            lines.append(f"kept the existing entries of {len(self.kept)} case(s) (use --replace to overwrite): "
                         + ", ".join(self.kept[:10]) + (" ..." if len(self.kept) > 10 else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def dataset_folder(dataset: str | int | os.PathLike) -> Path:
    """The raw dataset folder of an id, a name or a path (a path contains a separator or is a ``PathLike``)."""
    folder = Path(dataset) if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and os.sep in dataset) \
        else raw_dataset_folder(dataset)
    if not folder.is_dir():
        raise ManifestError([f"dataset folder {folder} does not exist"], str(folder))
    return folder


def _merge(folder: Path, col: _Collector, imported: dict[str, CaseSupervision], replace: bool, partial: bool,
           dry_run: bool) -> ImportResult:
    """Merge with the existing manifest, validate like ``prepare``, write atomically only if no problem at all."""
    ds, problems = col.ds, col.problems
    man_path = folder / MANIFEST_NAME
    existing, mentioned = Manifest(), set()
    if man_path.exists():
        try:
            obj = read_manifest_json(man_path)
        except ManifestError as e:
            problems.extend(f"existing {MANIFEST_NAME}: {p}" for p in e.problems)
            obj = None
        if obj is not None:
            found: list[str] = []
            existing = parse_manifest(obj, found)
            problems.extend(f"existing {MANIFEST_NAME}: {p}" for p in found)
            if isinstance(obj, dict) and isinstance(obj.get("cases"), dict):
                mentioned = set(obj["cases"])
    merged = Manifest(version=1, cases=dict(existing.cases))
    added, replaced, kept = [], [], []
    for cid, sup in sorted(imported.items()):
        if cid in existing.cases or cid in mentioned:
            if replace:
                merged.cases[cid] = sup
                replaced.append(cid)
            else:
                kept.append(cid)
        else:
            merged.cases[cid] = sup
            added.append(cid)
    generated = set(load_generated_record(folder))
    check = Manifest(version=1, cases=dict(merged.cases))
    waiting = [c for c in ds.case_ids if c not in merged.cases and c not in mentioned and c not in col.bad_cases
               and not (ds.label_file(c).is_file() and ds.label_file(c).name not in generated)]
    listed = ", ".join(waiting[:10]) + (" ..." if len(waiting) > 10 else "")
    if waiting and partial:
        col.notes.append(f"{len(waiting)} training case(s) have no supervision yet (prepare needs one for every "
                         f"case): {listed}")
    elif waiting:
        problems.append(f"{len(waiting)} training case(s) would have no supervision (neither an entry nor a label "
                        f"file): {listed}; import them in the same run, or use --partial to write an incomplete "
                        "manifest and import them later")
    for cid in [*waiting, *col.bad_cases]:  # placeholders: reported already (or allowed), not again by validation
        if cid not in check.cases and cid not in mentioned and cid in ds.case_ids:
            check.cases[cid] = CaseSupervision(cid, "none")
    try:
        validate_against_dataset(check, ds, check_label_files=True, generated=generated, problems=[],
                                 mentioned=mentioned)
    except ManifestError as e:
        for p in e.problems:
            if partial and p.startswith("the dataset has no 'mask' case"):
                col.notes.append(p)
            else:
                problems.append(p)
    if problems:
        raise ManifestError(problems, f"{man_path} (nothing written)")
    write = bool(added or replaced) and not dry_run
    if write:
        atomic_write_json(man_path, merged.to_json())
    return ImportResult(man_path, merged, added, replaced, kept, col.notes, write)


def _labels(ds: RawDataset, label_map: str | os.PathLike | None, problems: list[str],
            delimiter: str | None) -> LabelResolver:
    mapping = read_label_map(Path(label_map), problems, delimiter) if label_map is not None else None
    res = LabelResolver(ds.dataset_json["labels"], ds.foreground_labels, mapping)
    for key, target in (mapping or {}).items():
        if res.resolve(target) is None:
            problems.append(f"{label_map}: {key!r} maps to {target!r}, which is not a foreground label of "
                            f"dataset.json ({res.valid_text()})")
    return res


def import_boxes(dataset: str | int | os.PathLike, *, markups: Sequence[str | os.PathLike] = (),
                 csv_files: Sequence[str | os.PathLike] = (), label_images: Sequence[str | os.PathLike] = (),
                 units: str | None = None, inclusive_max: bool = False, label: str | None = None,
                 label_map: str | os.PathLike | None = None, case: str | None = None, replace: bool = False,
                 partial: bool = False, dry_run: bool = False, delimiter: str | None = None,
                 show_progress: bool = True) -> ImportResult:
    """Read boxes from markups files, CSV files and label images into the dataset's ``supervision.json``.

    ``dataset``: id, name or raw dataset folder. ``units``: ``lps``, ``ras`` or ``voxel`` (required
    with ``csv_files``). ``label``: class of every markups ROI; ``label_map``: ROI names / painted
    values -> classes; ``case``: the case of every markups file and label image. Raises
    :class:`~nnunet_mixsup.manifest.ManifestError` with every problem (nothing written). See the
    module docstring for formats, conventions and the rules of the merge.
    """
    if not (markups or csv_files or label_images):
        raise ValueError("nothing to import: give markups files (--markups), CSV files (--csv) or label images "
                         "(--label-images)")
    if csv_files and units not in CSV_UNITS:
        raise ValueError(f"CSV boxes need --units, one of {list(CSV_UNITS)} (world coordinates in mm or voxel "
                         f"indices), got {units!r}")
    folder = dataset_folder(dataset)
    ds = read_raw_dataset(folder)
    col = _Collector(ds)
    labels = _labels(ds, label_map, col.problems, delimiter)
    forced = None
    if label is not None:
        forced = labels.resolve(label)
        if forced is None:
            col.problems.append(f"--label {label!r} is not a foreground label of dataset.json ({labels.valid_text()})")
    ids = set(ds.case_ids)
    if case is not None:
        col.known_case(case, "--case")

    def case_for(path: Path, root: Path | None, endings: Sequence[str]) -> str | None:
        if case is not None:
            return case if case in ids else None
        cid = _case_of_file(path, root, ids, endings)
        if cid is None:
            stem = _strip_ending(path.name, endings)
            col.problems.append(f"{path}: case {stem!r} (from the file name) has no image "
                                f"imagesTr/{stem}_0000{ds.file_ending}; name files CASE..., CASE_<anything>... or "
                                "put them in a folder named CASE, or give --case")
        return cid

    files = _expand(markups, MARKUPS_ENDINGS, col.problems)
    for path, root in tqdm(files, desc="markups files", unit="file", leave=False,
                           disable=not show_progress or not files):
        cid = case_for(path, root, MARKUPS_ENDINGS)
        if cid is not None:
            _read_markups(path, cid, col, labels, forced)
    for path in tqdm([Path(p) for p in csv_files], desc="CSV files", unit="file", leave=False,
                     disable=not show_progress or not csv_files):
        _read_box_csv(path, col, labels, units or "", inclusive_max, delimiter)
    endings = tuple(dict.fromkeys((ds.file_ending, *LABEL_IMAGE_ENDINGS)))
    files = _expand(label_images, endings, col.problems)
    for path, root in tqdm(files, desc="label images", unit="file", leave=False,
                           disable=not show_progress or not files):
        cid = case_for(path, root, endings)
        if cid is not None:
            _read_label_image(path, cid, col, labels)
    col.check_twice()
    imported = {c: CaseSupervision(c, "box", boxes=tuple(b)) for c, b in col.boxes.items()
                if c not in col.bad_cases and b}
    for c in sorted(set(col.sources) - set(imported) - col.bad_cases):
        col.fail(c, f"case {c!r}: no box found in {' and '.join(col.sources[c].values())}")
    return _merge(folder, col, imported, replace, partial, dry_run)


def import_tags(dataset: str | int | os.PathLike, csv_files: Sequence[str | os.PathLike], *, replace: bool = False,
                partial: bool = False, dry_run: bool = False, delimiter: str | None = None,
                show_progress: bool = True) -> ImportResult:
    """Read image-level tags (classes present per case) from CSV files into the dataset's ``supervision.json``.

    Same merge, validation and all-or-nothing writing as :func:`import_boxes`.
    """
    if not csv_files:
        raise ValueError("nothing to import: give CSV files (--csv)")
    folder = dataset_folder(dataset)
    ds = read_raw_dataset(folder)
    col = _Collector(ds)
    labels = LabelResolver(ds.dataset_json["labels"], ds.foreground_labels)
    for path in tqdm([Path(p) for p in csv_files], desc="CSV files", unit="file", leave=False,
                     disable=not show_progress):
        _read_tags_csv(path, col, labels, delimiter)
    col.check_twice()
    imported = {c: CaseSupervision(c, "tags", present=tuple(p)) for c, p in col.present.items()
                if c not in col.bad_cases}
    return _merge(folder, col, imported, replace, partial, dry_run)


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def _cmd_import_boxes(args: argparse.Namespace) -> int:
    res = import_boxes(args.d, markups=args.markups, csv_files=args.csv, label_images=args.label_images,
                       units=args.units, inclusive_max=args.inclusive_max, label=args.label, label_map=args.label_map,
                       case=args.case, replace=args.replace, partial=args.partial, dry_run=args.dry_run,
                       delimiter=args.delimiter)
    print(res.summary())
    return 0


def _cmd_import_tags(args: argparse.Namespace) -> int:
    res = import_tags(args.d, args.csv, replace=args.replace, partial=args.partial, dry_run=args.dry_run,
                      delimiter=args.delimiter)
    print(res.summary())
    return 0


def _common_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("-d", required=True, help="dataset id or name (nnUNet_raw/DatasetXXX_NAME)")
    s.add_argument("--replace", action="store_true", help="replace the entries of cases already in supervision.json "
                                                          "(default: keep them)")
    s.add_argument("--partial", action="store_true",
                   help="allow training cases without supervision yet (e.g. boxes now, tags later); prepare still "
                        "needs every case")
    s.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    s.add_argument("--delimiter", default=None, help="CSV delimiter (default: detected among , ; and tab)")


def register_cli(subparsers: Any) -> None:
    """Add ``import-boxes`` and ``import-tags``."""
    s = subparsers.add_parser(
        "import-boxes", help="boxes from 3D Slicer ROIs, CSV files or rough label images -> supervision.json",
        description="Write or update supervision.json (next to dataset.json) with box cases read from 3D Slicer "
                    "markups ROI files (.mrk.json), CSV files (one box per row: case, label, x0, y0[, z0], x1, y1"
                    "[, z1]) or label images (one box per connected component and class). World coordinates go "
                    "through each image's origin, spacing and direction; a rotated ROI becomes the smallest index "
                    "box containing it. Every problem is reported at once, naming file and line or case; then "
                    "nothing is written. The result passes the validation of 'nnunet-mixsup prepare'.")
    _common_flags(s)
    s.add_argument("--markups", nargs="+", default=[], metavar="PATH",
                   help="Slicer .mrk.json files or folders (case: --case, a folder named CASE, or the file name "
                        "CASE.mrk.json / CASE_<anything>.mrk.json)")
    s.add_argument("--csv", nargs="+", default=[], metavar="FILE", help="CSV files of boxes (needs --units)")
    s.add_argument("--units", choices=CSV_UNITS, default=None,
                   help="CSV corners: lps / ras world coordinates in mm, or voxel indices (ITK x, y, z; min "
                        "inclusive, max exclusive)")
    s.add_argument("--inclusive-max", action="store_true",
                   help="with --units voxel: the second corner is the last voxel inside the box")
    s.add_argument("--label-images", nargs="+", default=[], metavar="PATH",
                   help="label images (files or folders), named like markups files")
    s.add_argument("--label", default=None, help="class (name or value) of every markups ROI")
    s.add_argument("--label-map", default=None, metavar="FILE",
                   help="JSON object or two-column CSV: ROI name or painted value -> class name or value")
    s.add_argument("--case", default=None, help="the case of every markups file and label image given")
    s.set_defaults(func=_cmd_import_boxes)

    s = subparsers.add_parser(
        "import-tags", help="image-level tags (classes present per case) from CSV -> supervision.json",
        description="Write or update supervision.json with tags cases from CSV files: one row per case, "
                    "'case, class, class, ...' (names or values; several in one cell separated by ; or |; none: no "
                    "foreground class present), or a spreadsheet export with a header 'case, <class name>, ...' "
                    "and yes/no cells. Every problem is reported at once; then nothing is written.")
    _common_flags(s)
    s.add_argument("--csv", nargs="+", required=True, metavar="FILE", help="CSV files of tags")
    s.set_defaults(func=_cmd_import_tags)
