"""Bad image / label files: found by ``prepare``'s validation before anything is written, each naming the case.

Also: the evaluation's geometry check (shape, spacing, origin, direction) and unreadable files there.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup import manifest as manifest_module
from nnunet_mixsup.evaluation import EvaluationError, evaluate_folders
from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
from nnunet_mixsup.manifest import (
    CaseSupervision,
    Manifest,
    ManifestError,
    read_raw_dataset,
    validate_against_dataset,
)
from nnunet_mixsup.prepare import GENERATED_RECORD, prepare_dataset


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def ds(fresh_dirs) -> Path:
    """case_000, case_001: mask; case_002: box; case_003: tags; case_004: none (3D, ITK size (20, 40, 36))."""
    return make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 962, counts={"mask": 2, "box": 1, "tags": 1, "none": 1},
                                  n_test=0, seed=4)


@pytest.fixture()
def ds2ch(fresh_dirs) -> Path:
    """The same with two channels (channel 1 = a copy of channel 0)."""
    folder = make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 963, counts={"mask": 2, "box": 1, "none": 1},
                                    n_test=0, seed=5)
    for f in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        (folder / "imagesTr" / f.name.replace("_0000", "_0001")).write_bytes(f.read_bytes())
    dj = json.loads((folder / "dataset.json").read_text())
    dj["channel_names"] = {"0": "T1", "1": "T2"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def problems_of(folder: Path) -> str:
    """prepare's problems as one text; asserts that nothing was written."""
    before = tree_digest(folder)
    with pytest.raises(ManifestError) as e:
        prepare_dataset(folder, show_progress=False)
    assert tree_digest(folder) == before, "prepare wrote something although validation failed"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    return "\n".join(e.value.problems)


def rewrite(path: Path, fn=None, **geometry) -> None:
    """Re-write an image with its array changed by ``fn`` and/or new spacing/origin/direction."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    if fn is not None:
        arr = fn(arr)
    new = sitk.GetImageFromArray(arr)
    if arr.shape == sitk.GetArrayViewFromImage(img).shape:
        new.CopyInformation(img)
    else:
        new.SetSpacing(img.GetSpacing())
        new.SetOrigin(img.GetOrigin())
    for k, v in geometry.items():
        getattr(new, f"Set{k.capitalize()}")(v)
    sitk.WriteImage(new, str(path), True)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize("cid", ["case_000", "case_003"])  # a mask case and a weak (tags) case
def test_truncated_image_is_found_before_writing(ds, cid):
    truncate(ds / "imagesTr" / f"{cid}_0000.nii.gz")
    p = problems_of(ds)
    assert f"case '{cid}': cannot read the voxels of imagesTr/{cid}_0000.nii.gz (truncated or corrupt file?)" in p


def test_garbage_and_empty_image_files(ds):
    (ds / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"this is not an image")
    (ds / "imagesTr" / "case_004_0000.nii.gz").write_bytes(b"")
    p = problems_of(ds)
    assert "case 'case_001': cannot read image imagesTr/case_001_0000.nii.gz" in p
    assert "case 'case_004': cannot read image imagesTr/case_004_0000.nii.gz" in p


def test_gzip_with_bad_checksum(ds):
    f = ds / "imagesTr" / "case_002_0000.nii.gz"
    raw = gzip.decompress(f.read_bytes())
    data = bytearray(gzip.compress(raw))
    data[-8] ^= 0xFF  # corrupt the CRC32 of the gzip trailer
    f.write_bytes(bytes(data))
    p = problems_of(ds)
    assert "case 'case_002': cannot read" in p and "imagesTr/case_002_0000.nii.gz" in p


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_label_file(ds, keep):
    truncate(ds / "labelsTr" / "case_001.nii.gz", keep)
    p = problems_of(ds)
    assert "case 'case_001': cannot read" in p and "labelsTr/case_001.nii.gz" in p


def test_label_file_that_is_a_folder(ds):
    (ds / "labelsTr" / "case_001.nii.gz").unlink()
    (ds / "labelsTr" / "case_001.nii.gz").mkdir()
    assert "case 'case_001': type 'mask' but no label file labelsTr/case_001.nii.gz" in problems_of(ds)


# ------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("what,change,expected", [
    ("shape", {"fn": lambda a: a[:, :, :-1]}, "label size [19, 40, 36] differs from image size [20, 40, 36]"),
    ("spacing", {"spacing": (3.0, 1.0, 1.1)}, "label spacing [3.0, 1.0, 1.1] differs from image spacing"),
    ("origin", {"origin": (5.0, 5.0, 6.0)}, "label origin [5.0, 5.0, 6.0] differs from image origin [5.0, 5.0, 5.0]"),
    ("direction", {"direction": (1, 0, 0, 0, 0, 1, 0, 1, 0)}, "label direction [1.0, 0.0, 0.0, 0.0, 0.0, 1.0"),
    ("dimension", {"fn": lambda a: a[0]}, "label is 2D (size [20, 40]) but image is 3D"),
])
def test_label_geometry_mismatch(ds, what, change, expected):
    rewrite(ds / "labelsTr" / "case_000.nii.gz", **change)
    p = problems_of(ds)
    assert f"case 'case_000': {expected}" in p, p


def test_geometry_within_tolerance_is_accepted(ds):
    c, s = np.cos(1e-6), np.sin(1e-6)
    rewrite(ds / "labelsTr" / "case_000.nii.gz", origin=(5.0 + 1e-6, 5.0, 5.0 - 1e-6), spacing=(3.0 + 1e-6, 1.0, 1.0),
            direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    prepare_dataset(ds, show_progress=False)


# ------------------------------------------------------------------------------- label values
@pytest.mark.parametrize("value,dtype,expected", [
    (9, np.uint8, "label values [9] are not in dataset.json labels [0, 1, 2]"),
    (1.5, np.float32, "label file labelsTr/case_000.nii.gz has non-integer values [1.5]"),
    (np.nan, np.float32, "label file labelsTr/case_000.nii.gz contains NaN/inf values"),
    (np.inf, np.float64, "label file labelsTr/case_000.nii.gz contains NaN/inf values"),
    (-1, np.int16, "label values [-1] are not in dataset.json labels"),
])
def test_label_values(ds, value, dtype, expected):
    def put(a):
        a = a.astype(dtype)
        a[0, 0, 0] = value
        return a

    rewrite(ds / "labelsTr" / "case_000.nii.gz", fn=put)
    assert f"case 'case_000': {expected}" in problems_of(ds)


def test_float_label_map_with_integer_values_is_fine(ds):
    rewrite(ds / "labelsTr" / "case_000.nii.gz", fn=lambda a: a.astype(np.float32))
    prepare_dataset(ds, show_progress=False)


def test_multi_component_label(ds):
    lab = ds / "labelsTr" / "case_000.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
    vec = sitk.GetImageFromArray(np.stack([arr, arr], -1), isVector=True)
    vec.CopyInformation(sitk.ReadImage(str(lab)))
    sitk.WriteImage(vec, str(lab), True)
    assert "case 'case_000': label file labelsTr/case_000.nii.gz has 2 components per voxel" in problems_of(ds)


# ------------------------------------------------------------------------------- image voxels
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cid", ["case_001", "case_002"])
def test_non_finite_image_voxels(ds, value, cid):
    def put(a):
        a = a.copy()
        a[3, 4, 5] = value
        a[3, 4, 6] = value
        return a

    rewrite(ds / "imagesTr" / f"{cid}_0000.nii.gz", fn=put)
    assert f"case '{cid}': imagesTr/{cid}_0000.nii.gz has 2 non-finite (NaN/inf) voxel(s)" in problems_of(ds)


def test_4d_image(ds):
    f = ds / "imagesTr" / "case_004_0000.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr]), isVector=False), str(f), True)
    assert "case 'case_004': imagesTr/case_004_0000.nii.gz is 4D" in problems_of(ds)


def test_image_voxels_read_once_then_again_after_a_change(ds, monkeypatch):
    prepare_dataset(ds, show_progress=False)
    assert json.loads((ds / GENERATED_RECORD).read_text())["verified"]
    reads: list[str] = []
    real = manifest_module.scan_voxels

    def counting(path, *a, **k):
        reads.append(Path(str(path)).name)
        return real(path, *a, **k)

    monkeypatch.setattr(manifest_module, "scan_voxels", counting)
    snapshot = tree_digest(ds)
    prepare_dataset(ds, show_progress=False)
    assert not [r for r in reads if "_0000" in r], f"unchanged images were read again: {reads}"
    assert tree_digest(ds) == snapshot
    # a changed image is checked again (same size, new content)
    rewrite(ds / "imagesTr" / "case_003_0000.nii.gz", fn=lambda a: np.where(a == a.max(), np.nan, a))
    reads.clear()
    assert "case 'case_003': imagesTr/case_003_0000.nii.gz has" in problems_of(ds)
    assert reads.count("case_003_0000.nii.gz") == 1 and not [r for r in reads if r.startswith("case_000_")]


def test_header_only_without_check_image_data(ds, monkeypatch):
    """simulate / convert self-checks call validate_against_dataset without voxel checks: no image is read."""
    truncate(ds / "imagesTr" / "case_004_0000.nii.gz")  # header intact, voxels not
    read: list[str] = []
    real = manifest_module.sitk.ReadImage
    monkeypatch.setattr(manifest_module.sitk, "ReadImage", lambda p, *a, **k: read.append(str(p)) or real(p, *a, **k))
    man = Manifest({c: CaseSupervision(c, t) for c, t in
                    [("case_002", "none"), ("case_003", "none"), ("case_004", "none")]})
    validate_against_dataset(man, read_raw_dataset(ds), generated={"case_002.nii.gz"})
    assert all("labelsTr" in r for r in read), read  # only the mask cases' label maps are read
    with pytest.raises(ManifestError, match="case 'case_004': cannot read the voxels"):
        validate_against_dataset(man, read_raw_dataset(ds), check_image_data=True)


# ------------------------------------------------------------------------------- multi-channel
@pytest.mark.parametrize("change,expected", [
    ({"spacing": (3.0, 1.0, 2.0)}, ("channel 1 spacing [3.0, 1.0, 2.0] differs from channel 0 (case_000_0000.nii.gz) "
                                    "spacing [3.0, 1.0, 1.0]")),
    ({"origin": (0.0, 5.0, 5.0)}, "channel 1 origin [0.0, 5.0, 5.0] differs from channel 0"),
    ({"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}, "channel 1 direction"),
    ({"fn": lambda a: a[:-2]}, "channel 1 size [20, 40, 34] differs from channel 0 (case_000_0000.nii.gz) size"),
])
def test_channels_disagree_in_geometry(ds2ch, change, expected):
    rewrite(ds2ch / "imagesTr" / "case_000_0001.nii.gz", **change)
    p = problems_of(ds2ch)
    assert "case 'case_000': channel 1 (case_000_0001.nii.gz): " + expected in p, p


def test_missing_and_broken_channel(ds2ch):
    (ds2ch / "imagesTr" / "case_002_0001.nii.gz").unlink()
    truncate(ds2ch / "imagesTr" / "case_003_0001.nii.gz")
    p = problems_of(ds2ch)
    assert "case 'case_002': image file(s) missing: ['case_002_0001.nii.gz']" in p
    assert "case 'case_003': cannot read the voxels of imagesTr/case_003_0001.nii.gz" in p


def test_two_channel_dataset_prepares(ds2ch):
    res = prepare_dataset(ds2ch, show_progress=False)
    assert sorted(res.written) == ["case_002.nii.gz", "case_003.nii.gz"]


# ------------------------------------------------------------------------------- manifest vs dataset
def test_2d_boxes_for_a_3d_dataset_and_3d_boxes_for_2d(ds, fresh_dirs):
    sup = json.loads((ds / "supervision.json").read_text())
    sup["cases"]["case_002"]["boxes"] = [{"label": 1, "min": [1, 1], "max": [4, 4]}]
    (ds / "supervision.json").write_text(json.dumps(sup))
    assert ("case 'case_002': box 0: wrong dimensionality – 2 coordinates for a 3D image of size [20, 40, 36]"
            in problems_of(ds))
    ds2 = make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 964, dim=2, counts={"mask": 1, "box": 1}, n_test=0)
    sup = {"version": 1, "cases": {"case_000": {"type": "mask"},
                                   "case_001": {"type": "box", "boxes": [{"label": 1, "min": [0, 0, 0],
                                                                          "max": [2, 2, 1]}]}}}
    (ds2 / "supervision.json").write_text(json.dumps(sup))
    assert "case 'case_001': box 0: wrong dimensionality – 3 coordinates for a 2D image" in problems_of(ds2)


@pytest.mark.parametrize("cid", ["../Dataset962_MixSupSynth/imagesTr/case_000", "/etc/passwd", "..", "a/../b",
                                 "case_000/..", "C:\\evil"])
def test_case_ids_escaping_the_folder(ds, cid):
    sup = json.loads((ds / "supervision.json").read_text())
    sup["cases"][cid] = {"type": "none"}
    (ds / "supervision.json").write_text(json.dumps(sup))
    assert f"case {cid!r}: invalid case id" in problems_of(ds)
    # the same in a Manifest built in code (bypassing the parser)
    man = Manifest({cid: CaseSupervision(cid, "none"), "case_000": CaseSupervision("case_000", "mask")})
    with pytest.raises(ManifestError, match="invalid case id"):
        validate_against_dataset(man, read_raw_dataset(ds))


def test_no_mask_case(ds):
    for cid in ("case_000", "case_001"):
        (ds / "labelsTr" / f"{cid}.nii.gz").rename(ds / "labelsTr_dense_hidden" / f"{cid}.x")
    sup = json.loads((ds / "supervision.json").read_text())
    sup["cases"]["case_000"] = {"type": "tags", "present": [1]}
    sup["cases"]["case_001"] = {"type": "none"}
    (ds / "supervision.json").write_text(json.dumps(sup))
    assert "the dataset has no 'mask' case: at least one fully labelled case is needed" in problems_of(ds)


def test_defaulted_mask_cases_are_checked_too(ds):
    sup = json.loads((ds / "supervision.json").read_text())
    del sup["cases"]["case_001"]  # a mask case by default (it has a label file)
    (ds / "supervision.json").write_text(json.dumps(sup))
    rewrite(ds / "labelsTr" / "case_001.nii.gz", spacing=(1.0, 1.0, 1.0))
    assert "case 'case_001': label spacing [1.0, 1.0, 1.0] differs from image spacing [3.0, 1.0, 1.0]" in problems_of(ds)


def test_every_problem_at_once(ds):
    truncate(ds / "imagesTr" / "case_003_0000.nii.gz")
    rewrite(ds / "labelsTr" / "case_000.nii.gz", origin=(0.0, 0.0, 0.0))
    rewrite(ds / "imagesTr" / "case_004_0000.nii.gz", fn=lambda a: np.full_like(a, np.nan))
    dj = json.loads((ds / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "blob": 1, "dot": 3, "ignore": 2}
    (ds / "dataset.json").write_text(json.dumps(dj))
    p = problems_of(ds)
    for frag in ("case 'case_003': cannot read the voxels", "case 'case_000': label origin",
                 "case 'case_004': imagesTr/case_004_0000.nii.gz has", "'ignore' (2) must be the highest label (> 3)"):
        assert frag in p, (frag, p)


def test_dataset_json_problems(ds):
    dj_path = ds / "dataset.json"
    dj = json.loads(dj_path.read_text())
    for bad, expected in [
        ([1, 2], "must be a JSON object"),
        ({**dj, "file_ending": "/../x.nii.gz"}, "'file_ending' must be a file ending"),
        ({**dj, "labels": {"background": 1, "a": 2}}, "'background' must be 0"),
        ({**dj, "labels": {"background": 0, "a": 1, "b": 1}}, "share a value"),
        ({**dj, "labels": {"background": 0, "a": 1.0}}, "label values must be integers"),
        ({**dj, "labels": {"background": 0, "a": [1, 2]}}, "region-based labels"),
        ({**dj, "channel_names": []}, "'channel_names' missing"),
    ]:
        dj_path.write_text(json.dumps(bad))
        assert expected in problems_of(ds), bad
    dj_path.write_bytes(b"\xff\xfe{")
    assert "cannot read" in problems_of(ds)


# ------------------------------------------------------------------------------- evaluation
def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)


@pytest.fixture()
def eval_dirs(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    arr = np.zeros((4, 6, 8), np.uint8)
    arr[1:3, 2:4, 2:6] = 1
    for case in ("a", "b"):
        _write(ref / f"{case}.nii.gz", arr)
        _write(pred / f"{case}.nii.gz", arr)
    return ref, pred, arr


@pytest.mark.parametrize("kw,match", [
    ({"origin": (0.0, 0.0, 0.5)}, "case b: geometry mismatch, reference origin .* != prediction origin"),
    ({"direction": (1, 0, 0, 0, 0, 1, 0, 1, 0)}, "case b: geometry mismatch, reference direction"),
    ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)}, "case b: geometry mismatch, reference direction"),
])
def test_evaluation_checks_origin_and_direction(eval_dirs, kw, match):
    ref, pred, arr = eval_dirs
    _write(pred / "b.nii.gz", arr, **kw)
    with pytest.raises(EvaluationError, match=match):
        evaluate_folders(ref, pred, [1])


def test_evaluation_geometry_tolerance(eval_dirs):
    ref, pred, arr = eval_dirs
    c, s = np.cos(1e-6), np.sin(1e-6)
    _write(pred / "b.nii.gz", arr, origin=(1e-4, 0.0, -1e-4), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    res = evaluate_folders(ref, pred, [1])
    assert [c["metrics"][1]["dice"] for c in res["per_case"]] == [1.0, 1.0]


def test_evaluation_unreadable_files_name_the_case(eval_dirs):
    ref, pred, _ = eval_dirs
    truncate(pred / "b.nii.gz")
    with pytest.raises(EvaluationError, match="case b: cannot read"):
        evaluate_folders(ref, pred, [1])
    (pred / "b.nii.gz").write_bytes(b"garbage")
    with pytest.raises(EvaluationError, match="case b: cannot read .*b.nii.gz"):
        evaluate_folders(ref, pred, [1])


def test_evaluation_truncated_nifti_with_intact_header(eval_dirs):
    """SimpleITK reads such a file without complaint (missing voxels = 0): the metrics would be silently wrong."""
    ref, pred, _ = eval_dirs
    big = np.zeros((40, 60, 80), np.uint8)
    big[5:30, 10:50, 10:70] = 1
    rng = np.random.default_rng(0)
    big[rng.random(big.shape) < 0.3] = 0  # incompressible enough that half the file holds a real header
    for d in (ref, pred):
        _write(d / "b.nii.gz", big)
        _write(d / "a.nii.gz", big)
    f = pred / "b.nii.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    sitk.ReadImage(str(f))  # the header is intact
    with pytest.raises(EvaluationError, match="case b: cannot read the prediction .*truncated"):
        evaluate_folders(ref, pred, [1])


# ------------------------------------------------------------------------------- the voxel scanner
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int16])
def test_scan_voxels_formats(tmp_path, suffix, dtype):
    """NaN/inf counted and truncation found for every format (SimpleITK alone hides both for NIfTI)."""
    from nnunet_mixsup.manifest import scan_voxels

    a = (np.random.default_rng(0).random((7, 9, 11)) * 10).astype(dtype)
    n_bad = 0
    if a.dtype.kind == "f":
        a.flat[[0, 5, 300, -1]] = [np.nan, np.inf, -np.inf, np.nan]
        n_bad = 4
    f = tmp_path / f"img{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(f), True)
    assert scan_voxels(f) == (None, n_bad)
    truncate(f, 0.97)
    why, _ = scan_voxels(f)
    assert why, "a truncated file was read as complete"
