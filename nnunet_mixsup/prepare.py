"""``nnunet-mixsup prepare``: turn a raw dataset + supervision manifest into what stock nnU-Net reads.

Stock nnU-Net needs a label file for every training case. For weak and unlabelled cases we write a
*derived* label map that uses nnU-Net's ignore label ("unknown here"):

- ``box``: background (0) outside every box – no class can be there – and ignore inside the boxes;
- ``tags``: ignore everywhere, or background everywhere when the image has no foreground class;
- ``none``: ignore everywhere.

The per-class information that one label map cannot hold (class 2 absent inside a box of class 1,
classes absent from the tags) travels in the manifest, which is copied next to the preprocessed
data (``nnUNet_preprocessed/DatasetXXX/supervision.json``) for the trainers.

Boxes are mapped into the array nnU-Net's reader returns by :mod:`nnunet_mixsup.geometry`; a
dataset with box cases whose dataset.json selects a reader not known there
(``overwrite_image_reader_writer``) is refused, and so is a box case whose image
``NibabelIOWithReorient`` would reorient differently from its derived label map.

A user's mask is never modified: we only write label files for weak cases, record their hashes in
``.mixsup_generated.json`` and refuse to touch any other existing label file. Everything is
validated before anything is written (manifest, dataset.json, every image and mask, voxels
included); files are written to a temporary name and renamed.

Interruptions: the label maps are rendered into a hidden staging folder *next to* the dataset
folder, so an interruption while rendering leaves the dataset untouched (the next run removes the
stale staging folder). The commit (record, renames, dataset.json) is short; an exception during it
(KeyboardInterrupt included) rolls every change back. A hard kill during the commit leaves a state
that the next run recognises (the record lists the old and the new hash of every file in flight)
and completes.
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

from nnunet_mixsup.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    json_text,
    link_or_copy,
    pid_alive,
)
from nnunet_mixsup.geometry import MAPPED_READERS, nibabel_file_axis_map
from nnunet_mixsup.manifest import (
    MANIFEST_NAME,
    CaseSupervision,
    Manifest,
    ManifestError,
    RawDataset,
    _short,
    image_header,
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_record(folder: Path) -> dict:
    """The generated-files record as a dict ({} if missing or unreadable)."""
    rec_path = folder / GENERATED_RECORD
    if not rec_path.is_file():
        return {}
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return rec if isinstance(rec, dict) else {}


def load_generated_record(folder: Path) -> dict[str, str]:
    """Label files this package wrote, ``{file name: sha256}``, restricted to those still unchanged.

    A file counts as written by us if its hash is the recorded one, or one of the hashes recorded
    as ``pending`` by a commit that was interrupted.
    """
    rec = _read_record(folder)
    files = rec.get("files")
    pending = rec.get("pending")
    files = files if isinstance(files, dict) else {}
    pending = pending if isinstance(pending, dict) else {}
    out = {}
    for name in sorted(set(files) | set(pending)):
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            continue
        f = folder / "labelsTr" / name
        if not f.is_file():
            continue
        digest = sha256_file(f)
        if digest in (files.get(name), pending.get(name)):
            out[name] = digest
    return out


def load_verified_images(folder: Path) -> dict[str, list[int]]:
    """Image files whose voxels a previous successful run checked: ``{relative path: file stamp}``."""
    ver = _read_record(folder).get("verified")
    if not isinstance(ver, dict):
        return {}
    return {k: v for k, v in ver.items() if isinstance(k, str) and isinstance(v, list)}


def derived_label_array(sup: CaseSupervision, shape_numpy: tuple[int, ...], ignore_label: int) -> np.ndarray:
    """Label map (numpy axis order) that tells stock nnU-Net what is known about a weak case."""
    dtype = np.uint8 if ignore_label < 256 else np.uint16 if ignore_label < 65536 else np.uint32
    if sup.type == "tags" and not sup.present:
        return np.zeros(shape_numpy, dtype)
    if sup.type == "box":
        arr = np.zeros(shape_numpy, dtype)
        for b in sup.boxes:
            lo, hi = b.numpy_order()
            arr[tuple(slice(a, z) for a, z in zip(lo, hi))] = ignore_label
        return arr
    return np.full(shape_numpy, ignore_label, dtype)


def configured_reader(dataset_json: dict) -> type | None:
    """The reader class that dataset.json's ``overwrite_image_reader_writer`` selects, as nnU-Net resolves it.

    ``None`` when nnU-Net picks the reader from the file ending (then always one of its own
    readers, see ``determine_reader_writer_from_file_ending``), including a name it cannot find.
    """
    from nnunetv2.imageio import reader_writer_registry

    name = dataset_json.get("overwrite_image_reader_writer", "None")
    if not isinstance(name, str) or name == "None":
        return None  # a name that is not a string is reported by reader_problems
    try:
        return reader_writer_registry.recursive_find_reader_writer_by_name(name)
    except RuntimeError:
        return None


def reader_problems(dataset_json: dict, manifest: Manifest) -> list[str]:
    """Why the boxes of ``manifest`` cannot be mapped through the reader dataset.json selects (empty if they can).

    Boxes are voxel indices of the raw image in ITK index order; :mod:`nnunet_mixsup.geometry`
    knows how each reader in :data:`~nnunet_mixsup.geometry.MAPPED_READERS` relates its array to
    that grid. Any other reader may permute or flip axes in ways we cannot see, which would put the
    certain negatives of a box onto its object. Only box cases are affected: the derived maps of
    tag and unlabelled cases are constant. A reader name that is not a string is always a problem.
    """
    key = "overwrite_image_reader_writer"
    if key in dataset_json and not isinstance(dataset_json[key], str):  # nnU-Net itself would fail on it
        return [f"dataset.json: {key!r} must be a reader class name (a string), got {_short(dataset_json[key])}"]
    n_box = len(manifest.of_type("box"))
    if not n_box:
        return []
    cls = configured_reader(dataset_json)
    if cls is None or MAPPED_READERS.get(cls.__name__) == cls.__module__:
        return []
    return [(f"dataset.json: 'overwrite_image_reader_writer' selects the reader {cls.__module__}.{cls.__name__}, "
             f"which nnunet-mixsup does not know: the boxes of {n_box} box case(s) (voxel indices of the raw "
             "image in ITK index order) cannot be mapped into the array this reader returns. Use one of nnU-Net's "
             f"readers {sorted(MAPPED_READERS)} or give these cases as tags")]


def _reorientation_problem(ds: RawDataset, cid: str, label: Path) -> str | None:
    """Why ``NibabelIOWithReorient`` would reorient a box case's image and its derived label map differently.

    The label map is written with SimpleITK on the image's ITK geometry. When the image's NIfTI
    header is ambiguous (sform and qform disagree, or neither is set), nibabel and ITK choose
    different affines, so the reader would flip or permute the label map unlike the image.
    """
    from nibabel.filebasedimages import ImageFileError

    image = ds.image_files(cid)[0]
    try:
        a, b = nibabel_file_axis_map(image), nibabel_file_axis_map(label)
    except (ImageFileError, OSError, ValueError, EOFError) as e:
        return f"case {cid!r}: NibabelIOWithReorient cannot read the header of imagesTr/{image.name}: {e}"
    if a == b:
        return None
    return (f"case {cid!r}: NibabelIOWithReorient (dataset.json 'overwrite_image_reader_writer') would reorient "
            f"imagesTr/{image.name} and its derived label map differently: nibabel and SimpleITK read different "
            "orientations from the image's NIfTI header (sform and qform disagree, or neither is set). Make sform "
            "and qform agree, or use SimpleITKIOWithReorient")


@dataclass
class PrepareResult:
    manifest: Manifest
    ignore_label: int | None
    written: list[str]
    unchanged: list[str]
    label_names: dict[int, str]  # foreground label -> name, from dataset.json


def load_and_validate(folder: Path, check_image_data: bool = True,
                      image_data_cache: dict[str, list[int]] | None = None
                      ) -> tuple[RawDataset, Manifest, dict[str, str]]:
    """Read dataset + manifest and validate them; raises :class:`ManifestError` with every problem.

    ``check_image_data`` reads every image voxel (truncated files, NaN/inf); ``image_data_cache``
    (see :func:`nnunet_mixsup.manifest.check_image_data`) skips files verified before and collects
    the ones verified now. Nothing is written.
    """
    ds = read_raw_dataset(folder)
    generated = load_generated_record(folder)
    man_path = folder / MANIFEST_NAME
    problems: list[str] = []
    mentioned: set[str] = set()
    if man_path.is_file():
        obj = read_manifest_json(man_path)
        manifest = parse_manifest(obj, problems)
        if isinstance(obj, dict) and isinstance(obj.get("cases"), dict):
            mentioned = set(obj["cases"])
    elif man_path.exists():
        raise ManifestError([f"{man_path} exists but is not a file"], str(man_path))
    else:
        manifest = Manifest()
    if not ds.case_ids:
        raise ManifestError([f"no training images found in {folder / 'imagesTr'}"], str(folder))
    if ds.ignore_label is not None:
        top = max(ds.foreground_labels) if ds.foreground_labels else 0
        if ds.ignore_label <= top:
            problems.append(f"dataset.json: 'ignore' ({ds.ignore_label}) must be the highest label (> {top})")
    problems.extend(reader_problems(ds.dataset_json, manifest))
    full, _ = validate_against_dataset(manifest, ds, generated=set(generated), problems=problems,
                                       mentioned=mentioned, check_image_data=check_image_data,
                                       image_data_cache=image_data_cache)
    return ds, full, generated


def _staging_dir(folder: Path) -> Path:
    """A new hidden staging folder beside ``folder`` (inside it if the parent is not writable).

    Stale staging folders of this dataset left by a killed run (their process is gone) are removed.
    """
    prefix = f".{folder.name}.mixsup-prepare-"
    for parent in (folder.parent, folder):
        try:
            for old in parent.iterdir():
                if old.name.startswith(prefix) and old.is_dir():
                    pid = old.name[len(prefix):].split("-", 1)[0]
                    if pid.isdigit() and not pid_alive(int(pid)):
                        shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    for parent in (folder.parent, folder):
        try:
            return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
        except OSError:
            if parent == folder:
                raise
    raise AssertionError("unreachable")


def _render(ds: RawDataset, sup: CaseSupervision, ignore: int, out: Path) -> None:
    """Write the derived label map of a weak case to ``out`` on the grid of its first image (header only)."""
    h = image_header(ds.image_files(sup.case_id)[0])
    arr = derived_label_array(sup, tuple(h.size[::-1]), ignore)
    lab = sitk.GetImageFromArray(arr)
    lab.SetSpacing(h.spacing)
    lab.SetOrigin(h.origin)
    lab.SetDirection(h.direction)
    sitk.WriteImage(lab, str(out), True)


class _Commit:
    """Apply staged changes to a dataset folder; :meth:`rollback` undoes everything done so far."""

    def __init__(self, folder: Path, backup_dir: Path):
        self.folder = folder
        self.backup_dir = backup_dir
        self.undo: list = []

    def write_bytes_atomic(self, path: Path, data: bytes | None) -> None:
        old = path.read_bytes() if path.is_file() else None
        self.undo.append(lambda: _restore_file(path, old))
        if data is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, data)

    def replace(self, src: Path, dst: Path) -> None:
        if dst.is_file():
            bak = self.backup_dir / f"{dst.name}.bak"
            link_or_copy(dst, bak)
            self.undo.append(lambda: os.replace(bak, dst))
        else:
            self.undo.append(lambda: dst.unlink(missing_ok=True))
        os.replace(src, dst)

    def mkdir(self, path: Path) -> None:
        if not path.is_dir():
            path.mkdir()
            self.undo.append(lambda: _rmdir_if_empty(path))

    def copy_new(self, src: Path, dst: Path) -> None:
        tmp = self.backup_dir / f"{dst.name}.new"
        shutil.copy2(src, tmp)
        self.undo.append(lambda: dst.unlink(missing_ok=True))
        os.replace(tmp, dst)

    def rollback(self) -> None:
        errors = []
        for action in reversed(self.undo):
            try:
                action()
            except OSError as e:  # keep undoing the rest
                errors.append(str(e))
        self.undo.clear()
        if errors:
            raise RuntimeError(f"prepare was interrupted and could not undo everything: {errors}")


def _restore_file(path: Path, old: bytes | None) -> None:
    if old is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(path, old)


def _rmdir_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def prepare_dataset(dataset: str | int | os.PathLike, show_progress: bool = True) -> PrepareResult:
    """Validate the manifest and write derived label maps + the ignore entry. Idempotent.

    ``dataset`` is an id, a dataset name or a path to the raw dataset folder. Nothing is written if
    validation fails (:class:`ManifestError` listing every problem). Every image voxel is checked
    once; files unchanged since a successful run are not read again. See the module docstring for
    what an interruption leaves behind.
    """
    folder = Path(dataset) if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and os.sep in dataset) \
        else raw_dataset_folder(dataset)
    if not folder.is_dir():
        raise ManifestError([f"dataset folder {folder} does not exist"], str(folder))
    verified = load_verified_images(folder)
    ds, manifest, generated = load_and_validate(folder, check_image_data=True, image_data_cache=verified)
    weak = [c for c, s in manifest.cases.items() if s.type != "mask"]
    ignore = ds.ignore_label
    if weak and ignore is None:
        ignore = (max(ds.foreground_labels) if ds.foreground_labels else 0) + 1
    reader = configured_reader(ds.dataset_json)
    check_reorientation = reader is not None and reader.__name__ == "NibabelIOWithReorient"
    current_images = {f"imagesTr/{f.name}" for c in ds.case_ids for f in ds.image_files(c)}
    verified = {k: v for k, v in sorted(verified.items()) if k in current_images}

    # render every label map into the staging folder first, then commit
    tmp_dir = _staging_dir(folder)
    written, unchanged = [], []
    try:
        staged: dict[str, tuple[Path, str]] = {}
        orientation_problems = []
        for cid in tqdm(sorted(weak), desc="Rendering weak-label maps", disable=not show_progress):
            name = ds.label_file(cid).name
            tmp = tmp_dir / name
            _render(ds, manifest.cases[cid], ignore, tmp)
            if check_reorientation and manifest.cases[cid].type == "box":
                why = _reorientation_problem(ds, cid, tmp)
                if why:
                    orientation_problems.append(why)
                    continue
            digest = sha256_file(tmp)
            if generated.get(name) == digest:
                unchanged.append(cid)
                continue
            staged[name] = (tmp, digest)
        if orientation_problems:
            raise ManifestError(orientation_problems, str(folder / MANIFEST_NAME))

        record = dict(generated)
        record.update({n: d for n, (_, d) in staged.items()})
        final = {"files": dict(sorted(record.items())), "verified": verified,
                 "note": "label maps written by nnunet-mixsup prepare"}
        commit = _Commit(folder, tmp_dir)
        try:
            if staged:
                # the record goes first and lists old and new hashes: a killed commit is finished next time
                in_flight = {**final, "files": dict(sorted(generated.items())),
                             "pending": {n: d for n, (_, d) in sorted(staged.items())}}
                commit.write_bytes_atomic(folder / GENERATED_RECORD, json_text(in_flight).encode("utf-8"))
                commit.mkdir(folder / "labelsTr")
                for name, (tmp, _) in staged.items():
                    commit.replace(tmp, folder / "labelsTr" / name)
                    written.append(name)
            rec_bytes = json_text(final).encode("utf-8")
            rec_path = folder / GENERATED_RECORD
            if not rec_path.is_file() or rec_path.read_bytes() != rec_bytes:
                commit.write_bytes_atomic(rec_path, rec_bytes)
            if ignore is not None and ds.dataset_json["labels"].get("ignore") != ignore:
                backup = folder / "dataset.json.mixsup-orig"
                if not backup.exists():
                    commit.copy_new(folder / "dataset.json", backup)
                dj = dict(ds.dataset_json)
                dj["labels"] = {**{k: v for k, v in dj["labels"].items() if k != "ignore"}, "ignore": ignore}
                commit.write_bytes_atomic(folder / "dataset.json", json_text(dj).encode("utf-8"))
        except BaseException:
            written.clear()
            commit.rollback()
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    # the sidecar the trainers read (training only sees nnUNet_preprocessed)
    try:
        pp = preprocessed_dataset_folder(folder.name)
        atomic_write_json(pp / MANIFEST_NAME, manifest.to_json())
    except (RuntimeError, ValueError):
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
