"""``nnunet-mixsup prepare``: turn a raw dataset + supervision manifest into what stock nnU-Net reads.

Stock nnU-Net needs a label file for every training case. For weak and unlabelled cases we write a
*derived* label map that uses nnU-Net's ignore label ("unknown here"):

- ``box``: background (0) outside every box – no class can be there – and ignore inside the boxes;
- ``tags``: ignore everywhere, or background everywhere when the image has no foreground class;
- ``none``: ignore everywhere.

The per-class information that one label map cannot hold (class 2 absent inside a box of class 1,
classes absent from the tags) travels in the manifest, which is copied next to the preprocessed
data (``nnUNet_preprocessed/DatasetXXX/supervision.json``) for the trainers.

A user's mask is never modified: we only write label files for weak cases, record their hashes in
``.mixsup_generated.json`` and refuse to touch any other existing label file. Everything is
validated before anything is written; files are written to a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_mixsup.manifest import (
    MANIFEST_NAME,
    CaseSupervision,
    Manifest,
    ManifestError,
    RawDataset,
    parse_manifest,
    read_manifest_json,
    read_raw_dataset,
    validate_against_dataset,
)

GENERATED_RECORD = ".mixsup_generated.json"


def raw_dataset_folder(dataset: str | int) -> Path:
    """Folder of a raw dataset given its id or name (``nnUNet_raw`` must be set)."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_raw.is_set():
        raise RuntimeError("environment variable nnUNet_raw is not set")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise RuntimeError(f"dataset {dataset!r} not found in nnUNet_raw={nnUNet_raw.get()}: {e}") from None
    return Path(nnUNet_raw.get()) / name


def preprocessed_dataset_folder(dataset: str | int) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise RuntimeError("environment variable nnUNet_preprocessed is not set")
    return Path(nnUNet_preprocessed.get()) / maybe_convert_to_dataset_name(dataset)


def atomic_write_text(path: Path, text: str, newline: str | None = None) -> None:
    """Write a text file via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: dict | list) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_generated_record(folder: Path) -> dict[str, str]:
    """Label files this package wrote, ``{file name: sha256}``, restricted to those still unchanged."""
    rec_path = folder / GENERATED_RECORD
    if not rec_path.is_file():
        return {}
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    out = {}
    for name, digest in rec.items():
        f = folder / "labelsTr" / name
        if f.is_file() and sha256_file(f) == digest:
            out[name] = digest
    return out


def derived_label_array(sup: CaseSupervision, shape_numpy: tuple[int, ...], ignore_label: int) -> np.ndarray:
    """Label map (numpy axis order) that tells stock nnU-Net what is known about a weak case."""
    dtype = np.uint8 if ignore_label < 256 else np.uint16
    if sup.type == "tags" and not sup.present:
        return np.zeros(shape_numpy, dtype)
    if sup.type == "box":
        arr = np.zeros(shape_numpy, dtype)
        for b in sup.boxes:
            lo, hi = b.numpy_order()
            arr[tuple(slice(a, z) for a, z in zip(lo, hi))] = ignore_label
        return arr
    return np.full(shape_numpy, ignore_label, dtype)


@dataclass
class PrepareResult:
    manifest: Manifest
    ignore_label: int | None
    written: list[str]
    unchanged: list[str]
    label_names: dict[int, str]  # foreground label -> name, from dataset.json


def load_and_validate(folder: Path) -> tuple[RawDataset, Manifest, dict[str, str]]:
    """Read dataset + manifest and validate them; raises :class:`ManifestError` with every problem."""
    ds = read_raw_dataset(folder)
    generated = load_generated_record(folder)
    man_path = folder / MANIFEST_NAME
    problems: list[str] = []
    mentioned: set[str] = set()
    if man_path.is_file():
        obj = read_manifest_json(man_path)
        manifest = parse_manifest(obj, problems)
        if isinstance(obj, dict) and isinstance(obj.get("cases"), dict):
            mentioned = {k for k in obj["cases"] if k != "__duplicates__"}
    else:
        manifest = Manifest()
    if not ds.case_ids:
        raise ManifestError([f"no training images found in {folder / 'imagesTr'}"], str(folder))
    full, _ = validate_against_dataset(manifest, ds, generated=set(generated), problems=problems,
                                       mentioned=mentioned)
    if ds.ignore_label is not None:
        top = max(ds.foreground_labels) if ds.foreground_labels else 0
        if ds.ignore_label <= top:
            msg = f"dataset.json: 'ignore' ({ds.ignore_label}) must be the highest label (> {top})"
            raise ManifestError([msg], str(folder / "dataset.json"))
    return ds, full, generated


def prepare_dataset(dataset: str | int | os.PathLike, show_progress: bool = True) -> PrepareResult:
    """Validate the manifest and write derived label maps + the ignore entry. Idempotent.

    ``dataset`` is an id, a dataset name or a path to the raw dataset folder. Nothing is written if
    validation fails.
    """
    folder = Path(dataset) if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and os.sep in dataset) \
        else raw_dataset_folder(dataset)
    ds, manifest, generated = load_and_validate(folder)
    weak = [c for c, s in manifest.cases.items() if s.type != "mask"]
    ignore = ds.ignore_label
    if weak and ignore is None:
        ignore = (max(ds.foreground_labels) if ds.foreground_labels else 0) + 1

    # plan every write first (label maps are rendered into temporary files), then commit them
    tmp_dir = Path(tempfile.mkdtemp(prefix=".mixsup-prepare-", dir=folder))
    written, unchanged = [], []
    try:
        staged: dict[str, tuple[Path, str]] = {}
        for cid in tqdm(weak, desc="Rendering weak-label maps", disable=not show_progress):
            sup = manifest.cases[cid]
            img_file = ds.image_files(cid)[0]
            ref = sitk.ReadImage(str(img_file))
            arr = derived_label_array(sup, sitk.GetArrayViewFromImage(ref).shape, ignore)
            lab = sitk.GetImageFromArray(arr)
            lab.CopyInformation(ref)
            name = ds.label_file(cid).name
            tmp = tmp_dir / name
            sitk.WriteImage(lab, str(tmp), True)
            digest = sha256_file(tmp)
            if generated.get(name) == digest:
                unchanged.append(cid)
                continue
            staged[name] = (tmp, digest)

        record = dict(generated)
        record.update({n: d for n, (_, d) in staged.items()})
        # the record goes first, so an interrupted run is recognised (and finished) by the next one
        atomic_write_json(folder / GENERATED_RECORD, {"files": dict(sorted(record.items())),
                                                      "note": "label maps written by nnunet-mixsup prepare"})
        (folder / "labelsTr").mkdir(exist_ok=True)
        for name, (tmp, _) in staged.items():
            os.replace(tmp, folder / "labelsTr" / name)
            written.append(name)

        if ignore is not None and ds.dataset_json["labels"].get("ignore") != ignore:
            backup = folder / "dataset.json.mixsup-orig"
            if not backup.exists():
                shutil.copy2(folder / "dataset.json", backup)
            dj = dict(ds.dataset_json)
            dj["labels"] = {**{k: v for k, v in dj["labels"].items() if k != "ignore"}, "ignore": ignore}
            atomic_write_json(folder / "dataset.json", dj)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    # the sidecar the trainers read (training only sees nnUNet_preprocessed)
    try:
        pp = preprocessed_dataset_folder(folder.name)
        atomic_write_json(pp / MANIFEST_NAME, manifest.to_json())
    except RuntimeError:
        pass
    names = {v: k for k, v in ds.dataset_json["labels"].items() if v in ds.foreground_labels}
    return PrepareResult(manifest, ignore, written, unchanged, names)


def supervision_summary(manifest: Manifest, foreground_labels: list[int], label_names: dict[int, str]) -> str:
    """Human-readable table: cases per supervision type and, per class, how it is supervised."""
    lines = ["supervision summary:"]
    for t in ("mask", "box", "tags", "none"):
        lines.append(f"  {t:5s}: {len(manifest.of_type(t))} case(s)")
    lines.append("  per class: masks / boxes (cases, boxes) / tagged present / tagged absent")
    for c in foreground_labels:
        n_mask = len(manifest.of_type("mask"))
        box_cases = [s for s in manifest.cases.values() if s.type == "box" and any(b.label == c for b in s.boxes)]
        n_boxes = sum(sum(b.label == c for b in s.boxes) for s in box_cases)
        tags = [s for s in manifest.cases.values() if s.type == "tags"]
        pres = sum(c in s.present for s in tags)
        lines.append(f"  {c} ({label_names.get(c, '?')}): {n_mask} / {len(box_cases)}, {n_boxes} / {pres} / "
                     f"{len(tags) - pres}")
    return "\n".join(lines)
