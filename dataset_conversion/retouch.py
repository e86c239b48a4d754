"""RETOUCH (MICCAI 2017 retinal OCT fluid challenge) -> nnU-Net raw dataset.

Expected layout – the public training release as unpacked::

    ROOT/RETOUCH-TrainingSet-Cirrus/TRAIN001/oct.mhd (+ oct.raw)
                                            reference.mhd (+ reference.raw)
    ROOT/RETOUCH-TrainingSet-Spectralis/TRAIN025/...
    ROOT/RETOUCH-TrainingSet-Topcon/TRAIN049/...

Labels: 0 background, 1 IRF (intraretinal fluid), 2 SRF (subretinal fluid), 3 PED (pigment
epithelial detachment). Volumes are read with SimpleITK and written as NIfTI with spacing, origin
and direction kept. Case ids carry the vendor: ``Cirrus_TRAIN001``.

There is no public reference for the RETOUCH test set, so the test split is made from the
training release:

- default: a deterministic held-out fraction **per vendor** (``test_fraction``, default 0.2): the
  cases of each vendor are ordered by ``sha256(f"{seed}/{case_id}")`` (hex digest, ascending) and
  the first ``round(n * test_fraction)`` (rounded half up, at most n - 1) go to imagesTs/labelsTs.
  The order depends only on the seed and the case ids – not on the library versions, the file
  system or which other cases are present – so a split can be reproduced anywhere;
  ``test_fraction=0`` puts every case into training;
- ``test_list``: a file with one case id per line (``Cirrus_TRAIN001``; ``Cirrus/TRAIN001`` and
  ``RETOUCH-TrainingSet-Cirrus/TRAIN001`` are accepted too): exactly those cases are test cases.

The chosen test cases are recorded in ``conversion.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

import SimpleITK as sitk

from dataset_conversion.common import (
    ConversionError,
    Header,
    SourceCase,
    check_image_label_headers,
    itk_error,
    output_target,
    read_header,
    read_list_file,
    report,
    write_dataset,
)
from nnunet_mixsup.fileio import round_half_up

LABELS = {"background": 0, "IRF": 1, "SRF": 2, "PED": 3}
CHANNELS = {0: "OCT"}
DEFAULT_NAME = "RETOUCH"
VENDORS = ("Cirrus", "Spectralis", "Topcon")
DEFAULT_TEST_FRACTION = 0.2
VENDOR_PREFIX = "RETOUCH-TrainingSet-"
_TRAIN_RE = re.compile(r"^TRAIN\d+$")


def mhd_data_file(mhd: Path) -> Path | None:
    """The file named by ``ElementDataFile`` of a MetaImage header, or ``None`` (LOCAL, LIST or a pattern)."""
    for line in mhd.read_text(encoding="latin-1").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ElementDataFile":
            value = value.strip()
            if value.upper() in ("LOCAL", "LIST") or "%" in value or " " in value:
                return None
            return mhd.parent / value
    return None


def _check_mhd(path: Path, where: str, problems: list[str]) -> Header | None:
    if not path.is_file():
        problems.append(f"{where}: {path.name} missing")
        return None
    try:
        data = mhd_data_file(path)
    except OSError as e:
        problems.append(f"{where}: cannot read {path.name}: {e}")
        return None
    if data is not None and not data.is_file():
        problems.append(f"{where}: {data.name} missing (the voxel data named by {path.name})")
        return None
    try:
        return read_header(path)
    except RuntimeError as e:
        problems.append(f"{where}: cannot read {path.name}: {itk_error(e)}")
        return None


def scan_retouch(root: Path, vendors: tuple[str, ...] = VENDORS) -> tuple[list[SourceCase], list[str]]:
    """Check every vendor folder (headers only) and list the cases, all as training cases for now.

    Raises :class:`ConversionError` with every problem. Returns (cases, warnings).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConversionError([f"{root} is not a folder"], "RETOUCH")
    problems: list[str] = []
    warns: list[str] = []
    cases: list[SourceCase] = []
    for vendor in vendors:
        vdir = root / f"{VENDOR_PREFIX}{vendor}"
        if not vdir.is_dir():
            problems.append(f"{vdir.name}/ missing in {root} (convert a subset with --vendors)")
            continue
        trains = sorted(p.name for p in vdir.iterdir() if p.is_dir() and _TRAIN_RE.match(p.name))
        if not trains:
            problems.append(f"{vdir.name}/ has no TRAINxxx folders")
        for t in trains:
            cid = f"{vendor}_{t}"
            where = f"{cid} ({vdir.name}/{t})"
            img = _check_mhd(vdir / t / "oct.mhd", where, problems)
            lab = _check_mhd(vdir / t / "reference.mhd", where, problems)
            if img is None or lab is None:
                continue
            n_before = len(problems)
            check_image_label_headers(where, "oct.mhd", "reference.mhd", img, lab, problems, warns)
            if len(problems) == n_before:
                cases.append(SourceCase(cid, "train", vdir / t / "oct.mhd", vdir / t / "reference.mhd",
                                        {"vendor": vendor}))
    if problems:
        raise ConversionError(problems, f"RETOUCH folder {root}")
    return cases, warns


def split_key(seed: int, case_id: str) -> str:
    """Sort key of the default split: the sha256 hex digest of ``"{seed}/{case_id}"``."""
    return hashlib.sha256(f"{seed}/{case_id}".encode()).hexdigest()


def default_test_cases(cases: list[SourceCase], test_fraction: float, seed: int) -> set[str]:
    """The held-out case ids of the default split (per vendor; see the module docstring)."""
    out: set[str] = set()
    for vendor in sorted({c.info["vendor"] for c in cases}):
        ids = sorted((c.case_id for c in cases if c.info["vendor"] == vendor), key=lambda c: split_key(seed, c))
        n_test = min(round_half_up(len(ids) * test_fraction), len(ids) - 1)
        out.update(ids[:max(n_test, 0)])
    return out


def _list_entry_id(line: str) -> str:
    parts = PurePosixPath(line.replace("\\", "/")).parts
    if len(parts) >= 2:
        vendor = parts[-2].removeprefix(VENDOR_PREFIX)
        return f"{vendor}_{parts[-1]}"
    return line


def read_test_list(path: Path, cases: list[SourceCase]) -> set[str]:
    """Case ids named in a test-list file; :class:`ConversionError` for unknown or duplicate entries."""
    try:
        entries = [_list_entry_id(e) for e in read_list_file(Path(path))]
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError([f"cannot read the test list: {e}"], str(path)) from None
    known = {c.case_id for c in cases}
    problems = [f"case {e} listed in {Path(path).name} is not in the converted vendor folders "
                f"(ids look like {min(known) if known else 'Cirrus_TRAIN001'})" for e in entries if e not in known]
    dups = sorted({e for e in entries if entries.count(e) > 1})
    problems += [f"case {d} is listed more than once" for d in dups]
    if not problems and len(set(entries)) >= len(known):
        problems.append("the test list names every case; no training case would be left")
    if problems:
        raise ConversionError(problems, f"test list {path}")
    return set(entries)


def convert_retouch(source: str | Path, dataset_id: int, name: str = DEFAULT_NAME, overwrite: bool = False,
                    test_fraction: float | None = None, seed: int = 0, test_list: str | Path | None = None,
                    vendors: tuple[str, ...] | list[str] = VENDORS, show_progress: bool = True) -> Path:
    """Convert the RETOUCH training release into ``nnUNet_raw/DatasetXXX_<name>``; return the new folder.

    The test split is the default per-vendor hashed fraction or ``test_list`` (see the module
    docstring). Everything is checked before anything is written.
    """
    vendors = tuple(vendors)
    bad = [v for v in vendors if v not in VENDORS]
    if bad or not vendors or len(set(vendors)) != len(vendors):
        raise ValueError(f"vendors must be distinct names out of {list(VENDORS)}, got {list(vendors)}")
    if test_list is not None and test_fraction is not None:
        raise ValueError("give either a test fraction or a test list, not both")
    frac = DEFAULT_TEST_FRACTION if test_fraction is None else float(test_fraction)
    if not (math.isfinite(frac) and 0 <= frac < 1):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    target = output_target(dataset_id, name, overwrite)
    cases, warns = scan_retouch(Path(source), vendors)
    if test_list is not None:
        test = read_test_list(Path(test_list), cases)
        split: dict[str, Any] = {"test_list": str(Path(test_list).resolve())}
    else:
        test = default_test_cases(cases, frac, seed)
        split = {"test_fraction": frac, "seed": seed, "method": "per vendor, sha256('{seed}/{case_id}') order"}
    for c in cases:
        c.split = "test" if c.case_id in test else "train"
    return write_dataset(
        target, cases, _load, channel_names=CHANNELS, labels=LABELS, dataset_name=name,
        description="RETOUCH retinal OCT fluid segmentation (training release; test split made from it, see "
                    "conversion.json) (converted by nnunet-mixsup)",
        reference="https://retouch.grand-challenge.org/",
        licence="see the RETOUCH challenge terms of use",
        record={"tool": "nnunet-mixsup convert retouch", "source": str(Path(source).resolve()),
                "arguments": {"vendors": list(vendors), **split}, "test_cases": sorted(test)},
        conversion_warnings=warns, overwrite=overwrite, show_progress=show_progress)


def _load(case: SourceCase) -> tuple[sitk.Image, sitk.Image]:
    return sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label))


def _cmd(args: argparse.Namespace) -> int:
    target = convert_retouch(args.source, args.dataset_id, args.name, overwrite=args.overwrite,
                             test_fraction=args.test_fraction, seed=args.seed, test_list=args.test_list,
                             vendors=tuple(args.vendors))
    print(report(target))
    return 0


def add_parser(sub: Any) -> None:
    """Register ``convert retouch``."""
    s = sub.add_parser("retouch", help="RETOUCH retinal OCT (IRF, SRF, PED; Cirrus, Spectralis, Topcon)",
                       description="Convert the RETOUCH training release (ROOT/RETOUCH-TrainingSet-VENDOR/TRAINxxx/"
                                   "oct.mhd and reference.mhd) into nnUNet_raw/DatasetXXX_NAME with case ids like "
                                   "Cirrus_TRAIN001. Labels: 1 IRF, 2 SRF, 3 PED. There is no public test "
                                   "reference: by default a deterministic fraction of each vendor's cases "
                                   f"(--test-fraction, default {DEFAULT_TEST_FRACTION}; cases ordered by "
                                   "sha256('SEED/CASE_ID')) goes to imagesTs/labelsTs, or give the test cases with "
                                   "--test-list. Everything is checked first; nothing is written if anything is "
                                   "wrong.")
    s.add_argument("source", help="the folder holding the RETOUCH-TrainingSet-* folders")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    s.add_argument("--name", default=DEFAULT_NAME, help=f"dataset name (default: {DEFAULT_NAME})")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME folder")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--test-fraction", type=float, default=None,
                   help=f"held-out fraction per vendor (default {DEFAULT_TEST_FRACTION}; 0: no test set)")
    g.add_argument("--test-list", default=None, help="file with one test case id per line (e.g. Cirrus_TRAIN001)")
    s.add_argument("--seed", type=int, default=0, help="seed of the default split (default 0)")
    s.add_argument("--vendors", nargs="+", choices=VENDORS, default=list(VENDORS),
                   help="vendor folders to convert (default: all three)")
    s.set_defaults(func=_cmd)
