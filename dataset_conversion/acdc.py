"""ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017) cine MRI -> nnU-Net raw dataset.

Expected layout – the public release as unpacked (the ``database`` folder or its parent)::

    ROOT/training/patient001/ ... patient100/     training (the literature's 100 training cases)
    ROOT/testing/patient101/  ... patient150/     test (50 cases, references included in the release)
        Info.cfg                       "ED: 1", "ES: 12", "Group: DCM", "NbFrame: 30", ...
        patient001_4d.nii.gz           the whole cine sequence (not used)
        patient001_frame01.nii.gz      the ED and ES frames (frame numbers from Info.cfg, 2 digits)
        patient001_frame01_gt.nii.gz   their references: 0 background, 1 RV, 2 MYO, 3 LV
        patient001_frame12.nii.gz
        patient001_frame12_gt.nii.gz

Each ED and ES frame becomes one nnU-Net case named like the source file (``patient001_frame01``)
with the NIfTI geometry (spacing, origin, direction) kept as SimpleITK reads it. ``training/``
goes to imagesTr/labelsTr, ``testing/`` to imagesTs/labelsTs (with ``training_only`` the testing
folder may be absent). Two frames of one patient are strongly correlated: split folds by patient
if you make your own splits. The pathology group (``Group``) and the phase are recorded per case in
``conversion.json``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
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
    report,
    write_dataset,
)

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
CHANNELS = {0: "cineMRI"}
DEFAULT_NAME = "ACDC"
_PATIENT_RE = re.compile(r"^patient\d{3}$")


def parse_info_cfg(path: Path) -> dict[str, str]:
    """``Info.cfg`` as a dict (``"ED: 1"`` -> ``{"ED": "1"}``); lines without ``:`` are ignored."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def find_acdc_root(root: Path) -> Path:
    """The folder holding ``training/`` (``root`` itself or ``root/database`` as unpacked from the archive)."""
    root = Path(root)
    if not (root / "training").is_dir() and (root / "database" / "training").is_dir():
        return root / "database"
    return root


def _frame_number(pid: str, cfg: dict[str, str], key: str, problems: list[str]) -> int | None:
    if key not in cfg:
        problems.append(f"{pid}: Info.cfg has no {key} entry")
        return None
    v = cfg[key]
    try:
        n = int(float(v))
        if n != float(v) or n < 0:
            raise ValueError
    except ValueError:
        problems.append(f"{pid}: Info.cfg {key} is {v!r}, not a frame number")
        return None
    return n


def scan_acdc(root: Path, training_only: bool = False) -> tuple[list[SourceCase], list[str]]:
    """Check the ACDC folder (headers only) and list the cases; raise :class:`ConversionError` on any problem.

    Returns (cases, warnings).
    """
    root = find_acdc_root(Path(root))
    problems: list[str] = []
    warns: list[str] = []
    cases: list[SourceCase] = []
    if not root.is_dir():
        raise ConversionError([f"{root} is not a folder"], "ACDC")
    splits = [("training", "train"), ("testing", "test")]
    seen: dict[str, str] = {}
    for sub, split in splits:
        folder = root / sub
        if not folder.is_dir():
            if split == "test" and training_only:
                continue
            hint = " (or convert the training cases only with --training-only)" if split == "test" else ""
            problems.append(f"{sub}/ missing in {root}: expected {sub}/patientXXX/ folders{hint}")
            continue
        patients = sorted(p.name for p in folder.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name))
        if not patients:
            problems.append(f"{sub}/ has no patientXXX folders")
        for pid in patients:
            if pid in seen:
                problems.append(f"{pid}: present in both {seen[pid]}/ and {sub}/")
                continue
            seen[pid] = sub
            cases.extend(_scan_patient(folder / pid, pid, split, problems, warns))
    if problems:
        raise ConversionError(problems, f"ACDC folder {root}")
    return cases, warns


def _scan_patient(pdir: Path, pid: str, split: str, problems: list[str], warns: list[str]) -> list[SourceCase]:
    cfg_path = pdir / "Info.cfg"
    if not cfg_path.is_file():
        problems.append(f"{pid}: Info.cfg missing")
        return []
    try:
        cfg = parse_info_cfg(cfg_path)
    except OSError as e:
        problems.append(f"{pid}: cannot read Info.cfg: {e}")
        return []
    ed = _frame_number(pid, cfg, "ED", problems)
    es = _frame_number(pid, cfg, "ES", problems)
    if ed is None or es is None:
        return []
    if ed == es:
        problems.append(f"{pid}: Info.cfg gives the same frame for ED and ES ({ed})")
        return []
    nb = cfg.get("NbFrame")
    if nb is not None and nb.isdigit():
        for key, n in (("ED", ed), ("ES", es)):
            if not 1 <= n <= int(nb):
                problems.append(f"{pid}: Info.cfg {key} frame {n} is outside 1..NbFrame={nb}")
    out = []
    for phase, n in (("ED", ed), ("ES", es)):
        cid = f"{pid}_frame{n:02d}"
        img_p, lab_p = pdir / f"{cid}.nii.gz", pdir / f"{cid}_gt.nii.gz"
        missing = [p.name for p in (img_p, lab_p) if not p.is_file()]
        if missing:
            problems.extend(f"{pid}: {m} missing ({phase} frame {n} of Info.cfg)" for m in missing)
            continue
        headers: list[Header] = []
        for p in (img_p, lab_p):
            try:
                headers.append(read_header(p))
            except RuntimeError as e:
                problems.append(f"{pid}: cannot read {p.name}: {itk_error(e)}")
        if len(headers) < 2:
            continue
        n_before = len(problems)
        check_image_label_headers(pid, img_p.name, lab_p.name, headers[0], headers[1], problems, warns)
        if len(problems) > n_before:
            continue
        info: dict[str, Any] = {"patient": pid, "phase": phase, "frame": n}
        if "Group" in cfg:
            info["group"] = cfg["Group"]
        out.append(SourceCase(cid, split, img_p, lab_p, info))
    return out


def _load(case: SourceCase) -> tuple[sitk.Image, sitk.Image]:
    return sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label))


def convert_acdc(source: str | Path, dataset_id: int, name: str = DEFAULT_NAME, overwrite: bool = False,
                 training_only: bool = False, show_progress: bool = True) -> Path:
    """Convert an ACDC release folder into ``nnUNet_raw/DatasetXXX_<name>``; return the new folder.

    Everything is checked before anything is written (see the module docstring for the layout).
    """
    target = output_target(dataset_id, name, overwrite)
    cases, warns = scan_acdc(Path(source), training_only=training_only)
    return write_dataset(
        target, cases, _load, channel_names=CHANNELS, labels=LABELS, dataset_name=name,
        description="ACDC cine MRI, ED and ES frames as separate cases (converted by nnunet-mixsup)",
        reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
        licence="see the ACDC terms of use (CREATIS)",
        record={"tool": "nnunet-mixsup convert acdc", "source": str(find_acdc_root(Path(source)).resolve()),
                "arguments": {"training_only": training_only}},
        conversion_warnings=warns, overwrite=overwrite, show_progress=show_progress)


def _cmd(args: argparse.Namespace) -> int:
    target = convert_acdc(args.source, args.dataset_id, args.name, overwrite=args.overwrite,
                          training_only=args.training_only)
    print(report(target))
    return 0


def add_parser(sub: Any) -> None:
    """Register ``convert acdc``."""
    s = sub.add_parser("acdc", help="ACDC cardiac cine MRI (ED/ES frames; RV, MYO, LV)",
                       description="Convert the ACDC release (ROOT/training/patientXXX, ROOT/testing/patientXXX with "
                                   "Info.cfg and patientXXX_frameYY[_gt].nii.gz) into nnUNet_raw/DatasetXXX_NAME: "
                                   "each ED and ES frame is one case, training -> imagesTr/labelsTr, testing -> "
                                   "imagesTs/labelsTs. Labels: 1 RV, 2 MYO, 3 LV. Everything is checked first; "
                                   "nothing is written if anything is wrong.")
    s.add_argument("source", help="the ACDC folder holding training/ and testing/ (or its parent with database/)")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    s.add_argument("--name", default=DEFAULT_NAME, help=f"dataset name (default: {DEFAULT_NAME})")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME folder")
    s.add_argument("--training-only", action="store_true", help="allow a missing testing/ folder")
    s.set_defaults(func=_cmd)
