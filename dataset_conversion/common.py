"""Shared machinery of the public-dataset converters (``nnunet-mixsup convert ...``).

Every converter works in two phases so that a wrong or incomplete source folder never leaves
anything behind in ``nnUNet_raw``:

1. **scan**: walk the source folder, read only headers (NIfTI / MetaImage headers, HDF5 dataset
   shapes) and collect *every* problem – a missing file, an incomplete ``Info.cfg``, an image and
   label of different shapes, a list naming a missing case – each message naming the case. Any
   problem raises one :class:`ConversionError` before the output folder is created.
2. **write** (:func:`write_dataset`): everything goes into a hidden temporary sibling of
   ``nnUNet_raw/DatasetXXX_Name`` that is renamed at the end (see
   :func:`nnunet_mixsup.fileio.staged_folder`), so an interrupted or failed run leaves no
   half-written dataset. Label values are checked while the data is read; an unexpected value
   also aborts without leaving anything.

The written dataset is a plain nnU-Net v2 raw dataset (``imagesTr``/``labelsTr``,
``imagesTs``/``labelsTs``, ``dataset.json`` from nnU-Net's ``generate_dataset_json``, file ending
``.nii.gz``) plus

- ``supervision.json``: every training case is a ``mask`` case (validated with
  :mod:`nnunet_mixsup.manifest`); derive weak labels with ``nnunet-mixsup simulate``;
- ``conversion.json``: where every case came from (source files, split, per-case metadata) and
  any warning, for provenance.
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

FILE_ENDING = ".nii.gz"
RECORD_NAME = "conversion.json"
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: relative tolerance when comparing the geometry (spacing, origin, direction) of an image and its label
GEOMETRY_RTOL = 1e-3
_MAX_LISTED = 50


class ConversionError(ValueError):
    """A source folder cannot be converted; ``problems`` holds one message per problem, each naming the case.

    A :class:`ValueError`, so the ``nnunet-mixsup`` command line prints it as one message without a
    traceback and exits with status 1.
    """

    def __init__(self, problems: Sequence[str], source: str):
        self.problems = list(problems)
        shown = self.problems[:_MAX_LISTED]
        text = "\n".join(f"  - {p}" for p in shown)
        if len(self.problems) > len(shown):
            text += f"\n  ... and {len(self.problems) - len(shown)} more"
        super().__init__(f"{source}: {len(self.problems)} problem(s), nothing was written:\n{text}")


@dataclass
class SourceCase:
    """One case to convert: where its image and label come from and where they go.

    ``split`` is ``"train"`` (imagesTr/labelsTr) or ``"test"`` (imagesTs/labelsTs). ``image`` and
    ``label`` are the source files (for HDF5 sources both are the same file); ``info`` is
    free-form metadata recorded in ``conversion.json`` (e.g. the ACDC pathology group).
    """

    case_id: str
    split: str
    image: Path
    label: Path
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Header:
    """Geometry of an image file in ITK order, read without loading the voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int

    @property
    def dim(self) -> int:
        return len(self.size)


def read_header(path: Path) -> Header:
    """Header of an image file readable by SimpleITK. Raises :class:`RuntimeError` if unreadable."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return Header(tuple(int(v) for v in r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()),
                  tuple(r.GetDirection()), int(r.GetNumberOfComponents()))


def itk_error(e: Exception) -> str:
    """The last line of an ITK exception (the useful part of its multi-line message)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= GEOMETRY_RTOL * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


def geometry_differences(image: Header, label: Header) -> list[str]:
    """Which of spacing, origin, direction of ``label`` differ from ``image`` (sizes are checked separately)."""
    out = []
    for what in ("spacing", "origin", "direction"):
        a, b = getattr(image, what), getattr(label, what)
        if not _close(a, b):
            out.append(f"{what} {_fmt(b)} vs {_fmt(a)}")
    return out


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"


def check_image_label_headers(where: str, image_name: str, label_name: str, image: Header,
                              label: Header, problems: list[str], warnings_out: list[str],
                              dim: int = 3) -> None:
    """Append problems (wrong dimensionality, vector pixels, size mismatch) and geometry warnings.

    A label of the same size but slightly different header geometry is written with the image's
    geometry (the label is defined on the image's voxel grid); that is reported as a warning.
    """
    ok = True
    for name, h in ((image_name, image), (label_name, label)):
        if h.dim != dim:
            problems.append(f"{where}: {name} is {h.dim}D with size {h.size}, expected a {dim}D image")
            ok = False
        elif h.components != 1:
            problems.append(f"{where}: {name} has {h.components} components per voxel, expected a scalar image")
            ok = False
    if not ok:
        return
    if label.size != image.size:
        problems.append(f"{where}: {label_name}: shape {label.size} differs from {image_name} {image.size}")
        return
    diff = geometry_differences(image, label)
    if diff:
        warnings_out.append(f"{where}: {label_name} header differs from {image_name} ({'; '.join(diff)}); "
                            f"the label is written with the image's geometry")


def valid_case_id(case_id: str) -> bool:
    """Case ids must be usable as nnU-Net file name prefixes and manifest keys."""
    return bool(_CASE_ID_RE.match(case_id)) and ".." not in case_id


def read_list_file(path: Path) -> list[str]:
    """Non-empty lines of a list file, stripped; lines starting with ``#`` are comments."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (ln.strip() for ln in lines) if s and not s.startswith("#")]


def label_values_problem(where: str, arr: np.ndarray, allowed: Iterable[int]) -> str | None:
    """A message if ``arr`` holds values that are not integer labels in ``allowed``, else ``None``."""
    vals = np.unique(arr)
    if not np.all(np.isfinite(vals)) or not np.all(vals == np.round(vals)):
        return f"{where}: label map holds non-integer values (e.g. {vals[vals != np.round(vals)][:5].tolist()})"
    bad = sorted(int(v) for v in vals if int(v) not in set(allowed))
    if bad:
        return f"{where}: label values {bad[:10]} are not among the dataset's labels {sorted(set(allowed))}"
    return None


def as_label_image(label: sitk.Image, image: sitk.Image, where: str, allowed: Iterable[int]) -> sitk.Image:
    """``label`` as uint8 on ``image``'s grid; :class:`ConversionError` if sizes or values are wrong.

    Called while writing (the data is read only then); the size check repeats the scan's header
    check in case a file changed in between.
    """
    if label.GetSize() != image.GetSize():
        msg = f"{where}: label shape {label.GetSize()} differs from image shape {image.GetSize()}"
        raise ConversionError([msg], where)
    arr = sitk.GetArrayViewFromImage(label)
    msg = label_values_problem(where, arr, allowed)
    if msg:
        raise ConversionError([msg], where)
    out = sitk.GetImageFromArray(np.asarray(arr).astype(np.uint8))
    out.CopyInformation(image)
    return out


def output_target(dataset_id: int, name: str, overwrite: bool) -> Path:
    """``nnUNet_raw/DatasetXXX_Name``, checked: nnUNet_raw set, id valid and unused, folder absent or ``overwrite``.

    Nothing is created here; called before the (possibly long) scan so that an obvious mistake is
    reported at once.
    """
    from nnunet_mixsup.raw_datasets import check_dataset_name, check_target_id, raw_root, validate_dataset_id

    dataset_id = validate_dataset_id(dataset_id)
    check_dataset_name(name)
    root = raw_root()
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    check_target_id(dataset_id, folder_name)
    target = root / folder_name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; refusing to overwrite it (use --overwrite / "
                              "overwrite=True to replace it)")
    return target


Loader = Callable[[SourceCase], tuple[sitk.Image, sitk.Image]]


def write_dataset(target: Path, cases: Sequence[SourceCase], load: Loader, *, channel_names: dict[int, str],
                  labels: dict[str, int], dataset_name: str, description: str, reference: str,
                  licence: str, record: dict[str, Any], conversion_warnings: Sequence[str] = (),
                  overwrite: bool = False, show_progress: bool = True) -> Path:
    """Write the converted dataset into ``target`` (atomically) and return ``target``.

    ``load(case)`` returns the (image, label) SimpleITK images of a case; the label is checked
    against ``labels`` and written as uint8 with the image's geometry. ``record`` is stored in
    ``conversion.json`` together with the per-case sources and ``conversion_warnings``. The result
    is self-checked with the supervision manifest validator before it is moved into place.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from tqdm import tqdm

    from nnunet_mixsup.fileio import atomic_write_json, staged_folder
    from nnunet_mixsup.manifest import (
        MANIFEST_NAME,
        ManifestError,
        parse_manifest,
        read_raw_dataset,
        validate_against_dataset,
    )
    from nnunet_mixsup.raw_datasets import package_version

    train = [c for c in cases if c.split == "train"]
    test = [c for c in cases if c.split == "test"]
    if not train:
        raise ConversionError(["no training cases"], str(target.name))
    ids = [c.case_id for c in cases]
    dups = sorted({c for c in ids if ids.count(c) > 1})
    if dups:
        raise ConversionError([f"case id {d!r} occurs more than once" for d in dups], str(target.name))
    allowed = sorted(set(labels.values()))
    if overwrite and target.exists():
        from nnunetv2.paths import nnUNet_preprocessed

        pp = nnUNet_preprocessed.get()
        if pp and (Path(pp) / target.name).exists():
            warnings.warn(f"replacing {target.name}: its preprocessed data in {pp} is now stale; re-run "
                          "plan_and_preprocess", stacklevel=2)

    with staged_folder(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test else ()):
            (tmp / sub).mkdir()
        for case in tqdm(cases, desc=f"converting into {target.name}", unit="case", disable=not show_progress,
                         file=sys.stderr):
            img, lab = load(case)
            lab = as_label_image(lab, img, f"{case.case_id} ({case.label})", allowed)
            sfx = "Tr" if case.split == "train" else "Ts"
            sitk.WriteImage(img, str(tmp / f"images{sfx}" / f"{case.case_id}_0000{FILE_ENDING}"), True)
            sitk.WriteImage(lab, str(tmp / f"labels{sfx}" / f"{case.case_id}{FILE_ENDING}"), True)
        generate_dataset_json(str(tmp), dict(channel_names), dict(labels), len(train), FILE_ENDING,
                              dataset_name=dataset_name, description=description, reference=reference,
                              license=licence, converted_by="nnunet-mixsup convert")
        manifest = {"version": 1, "cases": {c.case_id: {"type": "mask"} for c in sorted(train, key=_key)}}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        rec = {"version": 1, "package_version": package_version(), **record,
               "num_training": len(train), "num_test": len(test),
               "cases": {c.case_id: {"split": c.split, "image": str(c.image), "label": str(c.label), **c.info}
                         for c in sorted(cases, key=_key)},
               "warnings": list(conversion_warnings)}
        atomic_write_json(tmp / RECORD_NAME, rec)
        # self-check: the result must be a valid (all-mask) mixed-supervision dataset (label values and
        # grids were checked above while writing, so the label files are not read a second time)
        problems: list[str] = []
        man = parse_manifest(manifest, problems)
        if problems:
            raise ManifestError(problems, "converted " + MANIFEST_NAME)
        validate_against_dataset(man, read_raw_dataset(tmp), check_label_files=False)
    return target


def _key(c: SourceCase) -> str:
    return c.case_id


def report(target: Path) -> str:
    """Summary of a converted dataset (from its ``conversion.json``), printed by the command line."""
    rec = json.loads((target / RECORD_NAME).read_text(encoding="utf-8"))
    lines = [(f"wrote {target}: {rec['num_training']} training case(s) (imagesTr/labelsTr, all 'mask' in "
              f"supervision.json), {rec['num_test']} test case(s) (imagesTs/labelsTs)")]
    lines.extend(f"warning: {w}" for w in rec.get("warnings", []))
    lines.append(f"next: nnunet-mixsup simulate -d {int(target.name[7:10])} --new-id ID --masks 0.1 --boxes 0.4 "
                 "to derive weak labels, or nnunet-mixsup plan_and_preprocess to train on the masks")
    return "\n".join(lines)
