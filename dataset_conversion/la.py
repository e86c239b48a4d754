"""2018 Left Atrium Segmentation Challenge (LGE-MRI), h5 distribution -> nnU-Net raw dataset.

This is the preprocessed HDF5 version that semi-supervised segmentation papers use (introduced
with UA-MT, reused by SASSNet, DTC, SS-Net, ...), not the original NRRD release. Expected layout::

    ROOT/<case>/mri_norm2.h5     datasets "image" (float, normalised) and "label" (uint8, 0/1)
    ROOT/../train.list           one case folder name per line (80 in the common split)
    ROOT/../test.list            (20 in the common split)

(``ROOT`` is e.g. ``data/2018LA_Seg_Training Set``). The list files are looked for next to the case
folders first, then one level up, or in ``lists_dir`` / ``--lists-dir``. A list line may also be a
path ending in ``<case>/mri_norm2.h5``. Case folders not named in either list are not converted
(reported as a warning).

Geometry: the arrays are indexed (x, y, z) in the UA-MT convention and carry no header; they are
written as NIfTI with ITK size = the h5 shape, the given spacing (default 0.625 mm isotropic, the
resolution of the challenge data, in (x, y, z) order), origin 0 and identity direction. Labels:
0 background, 1 left_atrium. The images are already intensity-normalised in this distribution;
nnU-Net's z-score normalisation (channel "MRI") leaves them essentially unchanged.

Needs ``h5py`` (``pip install 'nnunet-mixsup[convert]'``); it is imported only when used.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import (
    ConversionError,
    SourceCase,
    output_target,
    read_list_file,
    report,
    valid_case_id,
    write_dataset,
)

LABELS = {"background": 0, "left_atrium": 1}
CHANNELS = {0: "MRI"}
DEFAULT_NAME = "LeftAtrium"
DEFAULT_SPACING = (0.625, 0.625, 0.625)
H5_NAME = "mri_norm2.h5"
LIST_NAMES = {"train": "train.list", "test": "test.list"}


def require_h5py() -> Any:
    """Import h5py, or raise a :class:`RuntimeError` that says how to install it."""
    try:
        import h5py
    except ImportError:
        raise RuntimeError("the LA converter reads .h5 files and needs h5py, which is not installed: "
                           "pip install h5py (or pip install 'nnunet-mixsup[convert]')") from None
    return h5py


def find_lists_dir(root: Path, lists_dir: Path | None = None) -> Path:
    """The folder with train.list / test.list: ``lists_dir``, else ``root``, else ``root/..``."""
    if lists_dir is not None:
        lists_dir = Path(lists_dir)
        if not (lists_dir / LIST_NAMES["train"]).is_file():
            raise ConversionError([f"--lists-dir {lists_dir}: {LIST_NAMES['train']} missing"], "LA")
        return lists_dir
    for cand in (root, root.parent):
        if (cand / LIST_NAMES["train"]).is_file():
            return cand
    msg = (f"no {LIST_NAMES['train']} found in {root} or {root.parent}; give the folder holding "
           f"{LIST_NAMES['train']} and {LIST_NAMES['test']} with --lists-dir")
    raise ConversionError([msg], "LA")


def _entry_name(line: str) -> str:
    p = PurePosixPath(line.replace("\\", "/"))
    return p.parent.name if p.name == H5_NAME else p.name


def check_spacing(spacing: float | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    """One value (isotropic) or three (x, y, z), all positive and finite."""
    sp = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(float(v) for v in spacing)
    if len(sp) == 1:
        sp = sp * 3
    if len(sp) != 3 or not all(math.isfinite(v) and v > 0 for v in sp):
        raise ValueError(f"spacing must be one or three positive numbers (mm, x y z), got {spacing!r}")
    return sp  # type: ignore[return-value]


def scan_la(root: Path, lists_dir: Path | None = None) -> tuple[list[SourceCase], list[str]]:
    """Check the lists and every listed h5 file (dataset shapes only); raise :class:`ConversionError` on problems.

    Returns (cases, warnings).
    """
    h5py = require_h5py()
    root = Path(root)
    if not root.is_dir():
        raise ConversionError([f"{root} is not a folder"], "LA")
    ldir = find_lists_dir(root, lists_dir)
    problems: list[str] = []
    warns: list[str] = []
    listed: dict[str, str] = {}
    order: list[tuple[str, str]] = []
    for split, fname in LIST_NAMES.items():
        lp = ldir / fname
        if not lp.is_file():
            problems.append(f"{fname} missing in {ldir} (next to {LIST_NAMES['train']})")
            continue
        try:
            entries = [_entry_name(e) for e in read_list_file(lp)]
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"cannot read {lp}: {e}")
            continue
        if not entries:
            problems.append(f"{fname} lists no case")
        for name in entries:
            if name in listed:
                where = "twice in " + fname if listed[name] == fname else f"in both {listed[name]} and {fname}"
                problems.append(f"case {name} is listed {where}")
                continue
            listed[name] = fname
            order.append((name, split))
    cases: list[SourceCase] = []
    for name, split in order:
        fname = LIST_NAMES[split]
        if not valid_case_id(name):
            problems.append(f"case {name!r} listed in {fname}: not usable as an nnU-Net case id (letters, digits, "
                            "'_', '-', '.' only)")
            continue
        h5 = root / name / H5_NAME
        if not h5.is_file():
            problems.append(f"case {name} listed in {fname} has no {H5_NAME} (expected {h5})")
            continue
        msg = _check_h5(h5py, h5)
        if msg:
            problems.append(f"case {name} ({name}/{H5_NAME}): {msg}")
            continue
        cases.append(SourceCase(name, split, h5, h5, {"list": fname}))
    unlisted = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / H5_NAME).is_file()
                      and p.name not in listed)
    if unlisted:
        warns.append(f"{len(unlisted)} case folder(s) in {root} are in neither list and were not converted, "
                     f"e.g. {unlisted[0]}")
    if problems:
        raise ConversionError(problems, f"LA folder {root} (lists in {ldir})")
    return cases, warns


def _check_h5(h5py: Any, path: Path) -> str | None:
    """Problem with the datasets of one h5 file (reads shapes and dtypes only), or ``None``."""
    try:
        with h5py.File(path, "r") as f:
            shapes = {}
            for key, kinds in (("image", "fiu"), ("label", "fiub")):
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    return f"no '{key}' dataset (found: {sorted(f.keys())})"
                d = f[key]
                if d.ndim != 3:
                    return f"'{key}' has shape {d.shape}, expected a 3D array (x, y, z)"
                if d.dtype.kind not in kinds:
                    return f"'{key}' has dtype {d.dtype}, expected numbers"
                shapes[key] = tuple(d.shape)
    except OSError as e:
        return f"cannot read the file: {e}"
    if shapes["label"] != shapes["image"]:
        return f"label shape {shapes['label']} differs from image shape {shapes['image']}"
    return None


def _make_loader(spacing: tuple[float, float, float]) -> Any:
    h5py = require_h5py()

    def load(case: SourceCase) -> tuple[sitk.Image, sitk.Image]:
        with h5py.File(case.image, "r") as f:
            image = np.asarray(f["image"][...], dtype=np.float32)
            label = np.asarray(f["label"][...])
        if label.dtype == bool:
            label = label.astype(np.uint8)
        out = []
        for arr in (image, label):
            im = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # (x,y,z) -> numpy (z,y,x)
            im.SetSpacing(spacing)
            out.append(im)
        return out[0], out[1]

    return load


def convert_la(source: str | Path, dataset_id: int, name: str = DEFAULT_NAME, overwrite: bool = False,
               lists_dir: str | Path | None = None,
               spacing: float | tuple[float, ...] = DEFAULT_SPACING, show_progress: bool = True) -> Path:
    """Convert the LA h5 distribution into ``nnUNet_raw/DatasetXXX_<name>``; return the new folder.

    ``train.list`` cases go to imagesTr/labelsTr, ``test.list`` cases to imagesTs/labelsTs. Everything
    is checked before anything is written (see the module docstring).
    """
    sp = check_spacing(spacing)
    require_h5py()
    target = output_target(dataset_id, name, overwrite)
    root = Path(source)
    cases, warns = scan_la(root, Path(lists_dir) if lists_dir is not None else None)
    return write_dataset(
        target, cases, _make_loader(sp), channel_names=CHANNELS, labels=LABELS, dataset_name=name,
        description="2018 Left Atrium Segmentation Challenge, h5 distribution (mri_norm2.h5), "
                    "train.list/test.list split (converted by nnunet-mixsup)",
        reference="http://atriaseg2018.cardiacatlas.org/",
        licence="see the 2018 Atrial Segmentation Challenge terms of use",
        record={"tool": "nnunet-mixsup convert la", "source": str(root.resolve()),
                "arguments": {"lists_dir": str(find_lists_dir(root, Path(lists_dir) if lists_dir else None)
                                               .resolve()),
                              "spacing": list(sp)}},
        conversion_warnings=warns, overwrite=overwrite, show_progress=show_progress)


def _cmd(args: argparse.Namespace) -> int:
    target = convert_la(args.source, args.dataset_id, args.name, overwrite=args.overwrite, lists_dir=args.lists_dir,
                        spacing=tuple(args.spacing))
    print(report(target))
    return 0


def add_parser(sub: Any) -> None:
    """Register ``convert la``."""
    s = sub.add_parser("la", help="2018 Left Atrium challenge, h5 distribution (mri_norm2.h5 + train/test.list)",
                       description="Convert the h5 distribution of the 2018 Left Atrium challenge "
                                   "(ROOT/<case>/mri_norm2.h5 with 'image' and 'label', train.list and test.list "
                                   "in ROOT or ROOT/..) into nnUNet_raw/DatasetXXX_NAME: train.list -> "
                                   "imagesTr/labelsTr, test.list -> imagesTs/labelsTs. Label 1: left atrium. "
                                   "Needs h5py. Everything is checked first; nothing is written if anything is "
                                   "wrong.")
    s.add_argument("source", help="the folder holding the case folders (e.g. '2018LA_Seg_Training Set')")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    s.add_argument("--name", default=DEFAULT_NAME, help=f"dataset name (default: {DEFAULT_NAME})")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME folder")
    s.add_argument("--lists-dir", default=None, help="folder with train.list and test.list (default: SOURCE, "
                                                     "then SOURCE/..)")
    s.add_argument("--spacing", type=float, nargs="+", default=list(DEFAULT_SPACING), metavar="MM",
                   help="voxel spacing in mm: one value (isotropic) or three (x y z); default 0.625")
    s.set_defaults(func=_cmd)
