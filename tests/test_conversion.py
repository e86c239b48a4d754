"""Dataset converters (``dataset_conversion``): ACDC, LA (h5), RETOUCH.

Fixtures are tiny volumes written in the exact on-disk layout of the public releases: ACDC NIfTI
files written with nibabel (rotated affines) plus ``Info.cfg``, the UA-MT ``mri_norm2.h5`` files with
``train.list`` / ``test.list``, RETOUCH MetaImage ``.mhd`` + ``.raw`` pairs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion.acdc import convert_acdc
from dataset_conversion.common import ConversionError
from dataset_conversion.retouch import convert_retouch, default_test_cases, split_key
from nnunet_mixsup.cli import main
from nnunet_mixsup.manifest import load_manifest

# ------------------------------------------------------------------------------------------------------
# fixtures in the public layouts
# ------------------------------------------------------------------------------------------------------
ACDC_TRAIN = (1, 2, 3)
ACDC_TEST = (101, 102)


def _affine(spacing: tuple[float, float, float], angle: float, offset: tuple[float, float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = offset
    return a


def _acdc_es(pid: int) -> int:
    return 2 + pid % 3  # ES frame varies per patient


def make_acdc(root: Path, train: tuple[int, ...] = ACDC_TRAIN, test: tuple[int, ...] = ACDC_TEST) -> Path:
    """``root/database/{training,testing}/patientXXX`` like the unpacked ACDC archive."""
    import nibabel as nib

    db = root / "database"
    rng = np.random.default_rng(0)
    for sub, pids in (("training", train), ("testing", test)):
        (db / sub).mkdir(parents=True, exist_ok=True)
        for pid in pids:
            name = f"patient{pid:03d}"
            pdir = db / sub / name
            pdir.mkdir()
            ed, es, nb = 1, _acdc_es(pid), 5
            (pdir / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {('DCM', 'HCM', 'NOR')[pid % 3]}\n"
                                           f"Height: 184.0\nNbFrame: {nb}\nWeight: 95.0\n")
            shape = (8 + pid % 2, 10, 6)
            aff = _affine((1.5 + 0.05 * (pid % 4), 1.4, 10.0), 0.2 * pid, (-100.0 + pid, 20.0, 5.0))
            cine = rng.integers(0, 800, size=shape + (nb,)).astype(np.int16)
            nib.save(nib.Nifti1Image(cine, aff), str(pdir / f"{name}_4d.nii.gz"))
            for frame in (ed, es):
                gt = np.zeros(shape, np.uint8)
                gt[2:6, 3:7, 1:5] = 1
                gt[3:5, 4:6, 2:4] = 2
                gt[4, 5, 3] = 3
                nib.save(nib.Nifti1Image(cine[..., frame - 1], aff), str(pdir / f"{name}_frame{frame:02d}.nii.gz"))
                nib.save(nib.Nifti1Image(gt, aff), str(pdir / f"{name}_frame{frame:02d}_gt.nii.gz"))
    (db / "MANDATORY_CITATION.md").write_text("cite the ACDC paper\n")
    return root


LA_TRAIN = ("0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "1GU15S0GJ6PN4OUGHE0B", "2XL5HSFSE93RMOJDRGR4")
LA_TEST = ("3Q0U7HQG15RKIQ4Q53PY", "44GOZ8OFP5CWHJGK6L8D")


def _la_shape(i: int) -> tuple[int, int, int]:
    return (8 + i % 3, 10, 6)


def make_la(base: Path, lists_next_to_cases: bool = False, unlisted: bool = True) -> Path:
    """``base/data/2018LA_Seg_Training Set/<case>/mri_norm2.h5`` and ``base/data/{train,test}.list`` (UA-MT)."""
    import h5py

    root = base / "data" / "2018LA_Seg_Training Set"
    rng = np.random.default_rng(1)
    names = LA_TRAIN + LA_TEST + (("5QFK2PMHNX7UALK52NNA",) if unlisted else ())
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        shape = _la_shape(i)
        img = rng.normal(size=shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[2:5, 3:8, 1:4] = 1
        lab[0, 0, 0] = 1  # marks the (x, y, z) = (0, 0, 0) corner
        with h5py.File(root / name / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=img, compression="gzip")
            f.create_dataset("label", data=lab, compression="gzip")
    lists = root if lists_next_to_cases else root.parent
    (lists / "train.list").write_text("\n".join(LA_TRAIN) + "\n")
    (lists / "test.list").write_text("\n".join(LA_TEST) + "\n")
    return root


RETOUCH_CASES = {"Cirrus": (1, 2, 3), "Spectralis": (25, 26, 27), "Topcon": (49, 50, 51)}
RETOUCH_SPACING = {"Cirrus": (0.0117, 0.00195, 0.0472), "Spectralis": (0.0113, 0.0039, 0.1212),
                   "Topcon": (0.0117, 0.0026, 0.0472)}


def make_retouch(root: Path) -> Path:
    """``root/RETOUCH-TrainingSet-VENDOR/TRAINxxx/{oct,reference}.{mhd,raw}``."""
    rng = np.random.default_rng(2)
    for vendor, nums in RETOUCH_CASES.items():
        for n in nums:
            d = root / f"RETOUCH-TrainingSet-{vendor}" / f"TRAIN{n:03d}"
            d.mkdir(parents=True)
            dtype = np.uint16 if vendor == "Spectralis" else np.uint8
            arr = rng.integers(0, 200, size=(6, 10, 8)).astype(dtype)  # numpy (z, y, x): ITK size (8, 10, 6)
            ref = np.zeros((6, 10, 8), np.uint8)
            ref[1:3, 2:5, 2:6] = 1
            ref[3, 6:8, 1:3] = 2
            ref[4:6, 8, 4:7] = 3
            for a, fname in ((arr, "oct.mhd"), (ref, "reference.mhd")):
                im = sitk.GetImageFromArray(a)
                im.SetSpacing(RETOUCH_SPACING[vendor])
                im.SetOrigin((0.5, -1.0, 2.0))
                sitk.WriteImage(im, str(d / fname), False)
    return root


def _raw_entries(dirs: dict[str, Path]) -> list[str]:
    return sorted(os.listdir(dirs["nnUNet_raw"]))


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def _check_nnunet_dataset(folder: Path, n_train: int, n_test: int, labels: dict[str, int]) -> dict:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == labels
    assert dj["numTraining"] == n_train
    assert dj["file_ending"] == ".nii.gz"
    assert len(dj["channel_names"]) == 1
    assert len(os.listdir(folder / "imagesTr")) == n_train == len(os.listdir(folder / "labelsTr"))
    if n_test:
        assert len(os.listdir(folder / "imagesTs")) == n_test == len(os.listdir(folder / "labelsTs"))
    else:
        assert not (folder / "imagesTs").exists()
    verify_dataset_integrity(str(folder), num_processes=1)
    man = load_manifest(folder / "supervision.json")
    assert len(man.cases) == n_train and man.of_type("mask") == sorted(man.cases)
    assert sorted(man.cases) == sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(folder / "imagesTr"))
    return dj


# ------------------------------------------------------------------------------------------------------
# ACDC
# ------------------------------------------------------------------------------------------------------
def test_acdc_converts_with_geometry_split_and_manifest(tmp_path, fresh_dirs):
    src = make_acdc(tmp_path / "ACDC")
    out = convert_acdc(src, 601, show_progress=False)
    assert out == fresh_dirs["nnUNet_raw"] / "Dataset601_ACDC"
    assert _raw_entries(fresh_dirs) == ["Dataset601_ACDC"]  # no temporary folder left behind
    _check_nnunet_dataset(out, 2 * len(ACDC_TRAIN), 2 * len(ACDC_TEST),
                          {"background": 0, "RV": 1, "MYO": 2, "LV": 3})
    db = src / "database"
    for sub, pids, sfx in (("training", ACDC_TRAIN, "Tr"), ("testing", ACDC_TEST, "Ts")):
        for pid in pids:
            for frame in (1, _acdc_es(pid)):
                cid = f"patient{pid:03d}_frame{frame:02d}"
                s_img = sitk.ReadImage(str(db / sub / f"patient{pid:03d}" / f"{cid}.nii.gz"))
                s_lab = sitk.ReadImage(str(db / sub / f"patient{pid:03d}" / f"{cid}_gt.nii.gz"))
                o_img = sitk.ReadImage(str(out / f"images{sfx}" / f"{cid}_0000.nii.gz"))
                o_lab = sitk.ReadImage(str(out / f"labels{sfx}" / f"{cid}.nii.gz"))
                _same_geometry(s_img, o_img)
                _same_geometry(s_img, o_lab)
                np.testing.assert_allclose(o_img.GetSpacing(), (1.5 + 0.05 * (pid % 4), 1.4, 10.0), rtol=1e-5)
                np.testing.assert_array_equal(sitk.GetArrayFromImage(o_img), sitk.GetArrayFromImage(s_img))
                np.testing.assert_array_equal(sitk.GetArrayFromImage(o_lab), sitk.GetArrayFromImage(s_lab))
                assert o_lab.GetPixelID() == sitk.sitkUInt8
    rec = json.loads((out / "conversion.json").read_text())
    assert rec["cases"]["patient001_frame01"]["phase"] == "ED"
    assert rec["cases"]["patient002_frame04"] == {**rec["cases"]["patient002_frame04"], "phase": "ES",
                                                  "group": "NOR", "split": "train"}
    assert rec["cases"]["patient101_frame01"]["split"] == "test"


def test_acdc_result_works_with_prepare_and_simulate(tmp_path, fresh_dirs):
    from nnunet_mixsup.lab.simulate import simulate_dataset
    from nnunet_mixsup.prepare import prepare_dataset

    convert_acdc(make_acdc(tmp_path / "ACDC") / "database", 602, show_progress=False)  # database/ given directly
    res = prepare_dataset(602, show_progress=False)
    assert res.manifest.of_type("mask") == sorted(res.manifest.cases) and len(res.manifest.cases) == 6
    assert res.written == []
    sim = simulate_dataset(602, 603, masks=2, boxes=2, tags=1, seed=0, show_progress=False)
    man = load_manifest(sim / "supervision.json")
    assert len(man.of_type("mask")) == 2 and len(man.of_type("box")) == 2


def test_acdc_training_only(tmp_path, fresh_dirs):
    src = make_acdc(tmp_path / "ACDC", test=())
    os.rmdir(src / "database" / "testing")
    with pytest.raises(ConversionError, match=r"testing/ missing.*--training-only"):
        convert_acdc(src, 604, show_progress=False)
    assert _raw_entries(fresh_dirs) == []
    out = convert_acdc(src, 604, training_only=True, show_progress=False)
    _check_nnunet_dataset(out, 6, 0, {"background": 0, "RV": 1, "MYO": 2, "LV": 3})


def _break_acdc(src: Path, what: str) -> str:
    """Break the fixture in one way; return a regex the error message must match."""
    train = src / "database" / "training"
    if what == "missing_gt":
        (train / "patient002" / "patient002_frame04_gt.nii.gz").unlink()
        return r"patient002: patient002_frame04_gt.nii.gz missing"
    if what == "no_es":
        cfg = train / "patient003" / "Info.cfg"
        cfg.write_text("".join(ln for ln in cfg.read_text().splitlines(True) if not ln.startswith("ES")))
        return r"patient003: Info.cfg has no ES entry"
    if what == "bad_ed":
        cfg = train / "patient001" / "Info.cfg"
        cfg.write_text(cfg.read_text().replace("ED: 1", "ED: first"))
        return r"patient001: Info.cfg ED is 'first', not a frame number"
    if what == "no_cfg":
        (src / "database" / "testing" / "patient101" / "Info.cfg").unlink()
        return r"patient101: Info.cfg missing"
    if what == "shape":
        import nibabel as nib

        p = train / "patient001" / "patient001_frame01_gt.nii.gz"
        img = nib.load(str(p))
        nib.save(nib.Nifti1Image(np.zeros((5, 10, 6), np.uint8), img.affine), str(p))
        return r"patient001: patient001_frame01_gt.nii.gz: shape \(5, 10, 6\) differs from patient001_frame01.nii.gz"
    if what == "values":
        import nibabel as nib

        p = train / "patient003" / "patient003_frame01_gt.nii.gz"
        img = nib.load(str(p))
        arr = np.asarray(img.dataobj).copy()
        arr[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(arr, img.affine), str(p))
        return r"patient003_frame01.*label values \[7\]"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing_gt", "no_es", "bad_ed", "no_cfg", "shape", "values"])
def test_acdc_broken_folder_is_rejected_and_nothing_written(tmp_path, fresh_dirs, what):
    src = make_acdc(tmp_path / "ACDC")
    pattern = _break_acdc(src, what)
    with pytest.raises(ConversionError, match=pattern):
        convert_acdc(src, 605, show_progress=False)
    assert _raw_entries(fresh_dirs) == []


def test_acdc_reports_every_problem_at_once(tmp_path, fresh_dirs):
    src = make_acdc(tmp_path / "ACDC")
    _break_acdc(src, "missing_gt")
    _break_acdc(src, "no_es")
    with pytest.raises(ConversionError) as ei:
        convert_acdc(src, 605, show_progress=False)
    assert len(ei.value.problems) == 2
    assert "2 problem(s)" in str(ei.value)


def test_refuses_to_overwrite_unless_asked(tmp_path, fresh_dirs):
    src = make_acdc(tmp_path / "ACDC", train=(1,), test=(101,))
    out = convert_acdc(src, 606, show_progress=False)
    (out / "marker.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_acdc(src, 606, show_progress=False)
    assert (out / "marker.txt").is_file()
    with pytest.raises(FileExistsError, match="already used by Dataset606_ACDC"):
        convert_acdc(src, 606, name="Other", show_progress=False)
    out2 = convert_acdc(src, 606, overwrite=True, show_progress=False)
    assert out2 == out and not (out / "marker.txt").exists()
    assert _raw_entries(fresh_dirs) == ["Dataset606_ACDC"]


def test_nnunet_raw_unset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_raw is not set"):
        convert_acdc(make_acdc(tmp_path / "ACDC", train=(1,), test=(101,)), 607, show_progress=False)


# ------------------------------------------------------------------------------------------------------
# LA
# ------------------------------------------------------------------------------------------------------
def test_la_converts_with_spacing_orientation_and_split(tmp_path, fresh_dirs):
    import h5py

    from dataset_conversion.la import convert_la

    root = make_la(tmp_path / "UA-MT")
    out = convert_la(root, 611, show_progress=False)
    assert out.name == "Dataset611_LeftAtrium"
    _check_nnunet_dataset(out, len(LA_TRAIN), len(LA_TEST), {"background": 0, "left_atrium": 1})
    for names, sfx in ((LA_TRAIN, "Tr"), (LA_TEST, "Ts")):
        for name in names:
            with h5py.File(root / name / "mri_norm2.h5", "r") as f:
                img, lab = f["image"][...], f["label"][...]
            o_img = sitk.ReadImage(str(out / f"images{sfx}" / f"{name}_0000.nii.gz"))
            o_lab = sitk.ReadImage(str(out / f"labels{sfx}" / f"{name}.nii.gz"))
            assert o_img.GetSize() == img.shape  # ITK (x, y, z) = h5 axes
            np.testing.assert_allclose(o_img.GetSpacing(), (0.625,) * 3)
            _same_geometry(o_img, o_lab)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(o_img), img.transpose(2, 1, 0))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(o_lab), lab.transpose(2, 1, 0))
            assert o_lab.GetPixel(0, 0, 0) == 1
    rec = json.loads((out / "conversion.json").read_text())
    assert any("neither list" in w for w in rec["warnings"])  # the unlisted case folder
    assert "5QFK2PMHNX7UALK52NNA" not in rec["cases"]


def test_la_lists_next_to_cases_lists_dir_and_spacing_option(tmp_path, fresh_dirs):
    from dataset_conversion.la import convert_la

    root = make_la(tmp_path / "a", lists_next_to_cases=True, unlisted=False)
    out = convert_la(root, 612, spacing=(0.7, 0.8, 1.25), show_progress=False)
    _check_nnunet_dataset(out, len(LA_TRAIN), len(LA_TEST), {"background": 0, "left_atrium": 1})
    img = sitk.ReadImage(str(out / "imagesTr" / f"{LA_TRAIN[0]}_0000.nii.gz"))
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.8, 1.25), rtol=1e-6)

    root2 = make_la(tmp_path / "b", unlisted=False)
    lists = tmp_path / "mylists"
    lists.mkdir()
    (lists / "train.list").write_text(f"{LA_TRAIN[0]}\n\n{LA_TRAIN[1]}/mri_norm2.h5\n")  # blank line, path form
    (lists / "test.list").write_text(f"{LA_TEST[0]}\n")
    rc = main(["convert", "la", str(root2), "-d", "613", "--lists-dir", str(lists), "--spacing", "1.0"])
    assert rc == 0
    out = fresh_dirs["nnUNet_raw"] / "Dataset613_LeftAtrium"
    _check_nnunet_dataset(out, 2, 1, {"background": 0, "left_atrium": 1})
    img = sitk.ReadImage(str(out / "imagesTs" / f"{LA_TEST[0]}_0000.nii.gz"))
    np.testing.assert_allclose(img.GetSpacing(), (1.0,) * 3)


def _break_la(root: Path, what: str) -> str:
    import h5py

    if what == "missing_h5":
        (root / LA_TRAIN[1] / "mri_norm2.h5").unlink()
        return rf"case {LA_TRAIN[1]} listed in train.list has no mri_norm2.h5"
    if what == "list_names_missing_case":
        with open(root.parent / "test.list", "a") as f:
            f.write("NOSUCHCASE00000000000\n")
        return r"case NOSUCHCASE00000000000 listed in test.list has no mri_norm2.h5"
    if what == "shape":
        with h5py.File(root / LA_TEST[0] / "mri_norm2.h5", "r+") as f:
            del f["label"]
            f.create_dataset("label", data=np.zeros((3, 3, 3), np.uint8))
        return rf"case {LA_TEST[0]} .*label shape \(3, 3, 3\) differs from image shape"
    if what == "no_label":
        with h5py.File(root / LA_TRAIN[2] / "mri_norm2.h5", "r+") as f:
            del f["label"]
        return rf"case {LA_TRAIN[2]} .*no 'label' dataset"
    if what == "in_both":
        with open(root.parent / "test.list", "a") as f:
            f.write(LA_TRAIN[0] + "\n")
        return rf"case {LA_TRAIN[0]} is listed in both train.list and test.list"
    if what == "no_test_list":
        (root.parent / "test.list").unlink()
        return r"test.list missing"
    if what == "no_lists":
        (root.parent / "test.list").unlink()
        (root.parent / "train.list").unlink()
        return r"no train.list found .*--lists-dir"
    if what == "values":
        with h5py.File(root / LA_TRAIN[3] / "mri_norm2.h5", "r+") as f:
            f["label"][0, 0, 0] = 2
        return rf"{LA_TRAIN[3]} .*label values \[2\]"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing_h5", "list_names_missing_case", "shape", "no_label", "in_both",
                                  "no_test_list", "no_lists", "values"])
def test_la_broken_folder_is_rejected_and_nothing_written(tmp_path, fresh_dirs, what):
    from dataset_conversion.la import convert_la

    root = make_la(tmp_path / "UA-MT")
    pattern = _break_la(root, what)
    with pytest.raises(ConversionError, match=pattern):
        convert_la(root, 614, show_progress=False)
    assert _raw_entries(fresh_dirs) == []


def test_la_without_h5py_is_a_clear_error(tmp_path, fresh_dirs, monkeypatch):
    from dataset_conversion.la import convert_la

    monkeypatch.setitem(sys.modules, "h5py", None)  # makes "import h5py" raise ImportError
    with pytest.raises(RuntimeError, match=r"needs h5py.*pip install"):
        convert_la(tmp_path, 615, show_progress=False)
    assert _raw_entries(fresh_dirs) == []


def test_la_bad_spacing(tmp_path, fresh_dirs):
    from dataset_conversion.la import convert_la

    with pytest.raises(ValueError, match="spacing"):
        convert_la(tmp_path, 616, spacing=(1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------------
# RETOUCH
# ------------------------------------------------------------------------------------------------------
RETOUCH_LABELS = {"background": 0, "IRF": 1, "SRF": 2, "PED": 3}


def test_retouch_converts_with_default_per_vendor_split(tmp_path, fresh_dirs):
    src = make_retouch(tmp_path / "RETOUCH")
    out = convert_retouch(src, 621, show_progress=False)
    assert out.name == "Dataset621_RETOUCH"
    _check_nnunet_dataset(out, 6, 3, RETOUCH_LABELS)  # round(3 * 0.2) = 1 test case per vendor
    test_ids = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(out / "imagesTs"))
    assert sorted(t.split("_")[0] for t in test_ids) == ["Cirrus", "Spectralis", "Topcon"]
    for vendor, nums in RETOUCH_CASES.items():  # documented rule: smallest sha256("{seed}/{case_id}")
        ids = [f"{vendor}_TRAIN{n:03d}" for n in nums]
        assert min(ids, key=lambda c: split_key(0, c)) in test_ids
        for cid in ids:
            sfx = "Ts" if cid in test_ids else "Tr"
            d = src / f"RETOUCH-TrainingSet-{vendor}" / cid.split("_")[1]
            s_img, s_ref = sitk.ReadImage(str(d / "oct.mhd")), sitk.ReadImage(str(d / "reference.mhd"))
            o_img = sitk.ReadImage(str(out / f"images{sfx}" / f"{cid}_0000.nii.gz"))
            o_lab = sitk.ReadImage(str(out / f"labels{sfx}" / f"{cid}.nii.gz"))
            _same_geometry(s_img, o_img)
            _same_geometry(s_img, o_lab)
            np.testing.assert_allclose(o_img.GetSpacing(), RETOUCH_SPACING[vendor], rtol=1e-5)
            assert o_img.GetPixelID() == s_img.GetPixelID()
            np.testing.assert_array_equal(sitk.GetArrayFromImage(o_img), sitk.GetArrayFromImage(s_img))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(o_lab), sitk.GetArrayFromImage(s_ref))
    rec = json.loads((out / "conversion.json").read_text())
    assert rec["test_cases"] == test_ids and rec["arguments"]["test_fraction"] == 0.2

    # deterministic: the same split again; another seed may differ but stays per vendor
    again = convert_retouch(src, 621, overwrite=True, show_progress=False)
    assert sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(again / "imagesTs")) == test_ids
    from dataset_conversion.retouch import scan_retouch

    cases, _ = scan_retouch(src)
    assert default_test_cases(cases, 0.2, 0) == set(test_ids)
    assert default_test_cases(cases, 0.0, 0) == set()
    assert len(default_test_cases(cases, 0.9, 5)) == 6  # at most n - 1 per vendor


def test_retouch_test_list_vendor_subset_and_prepare(tmp_path, fresh_dirs):
    from nnunet_mixsup.prepare import prepare_dataset

    src = make_retouch(tmp_path / "RETOUCH")
    tl = tmp_path / "test_cases.txt"
    tl.write_text("Cirrus_TRAIN002\nRETOUCH-TrainingSet-Topcon/TRAIN050\n")
    out = convert_retouch(src, 622, test_list=tl, show_progress=False)
    _check_nnunet_dataset(out, 7, 2, RETOUCH_LABELS)
    assert sorted(os.listdir(out / "imagesTs")) == ["Cirrus_TRAIN002_0000.nii.gz", "Topcon_TRAIN050_0000.nii.gz"]
    res = prepare_dataset(622, show_progress=False)
    assert len(res.manifest.of_type("mask")) == 7

    out = convert_retouch(src, 623, vendors=["Spectralis"], test_fraction=0.0, show_progress=False)
    _check_nnunet_dataset(out, 3, 0, RETOUCH_LABELS)

    tl.write_text("Cirrus_TRAIN099\n")
    with pytest.raises(ConversionError, match="case Cirrus_TRAIN099 listed in test_cases.txt"):
        convert_retouch(src, 624, test_list=tl, show_progress=False)
    with pytest.raises(ValueError, match="either a test fraction or a test list"):
        convert_retouch(src, 624, test_list=tl, test_fraction=0.1)
    assert not (fresh_dirs["nnUNet_raw"] / "Dataset624_RETOUCH").exists()


def test_retouch_label_geometry_differing_header_is_a_warning(tmp_path, fresh_dirs):
    src = make_retouch(tmp_path / "RETOUCH")
    p = src / "RETOUCH-TrainingSet-Cirrus" / "TRAIN001" / "reference.mhd"
    ref = sitk.ReadImage(str(p))
    ref.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(ref, str(p), False)
    out = convert_retouch(src, 625, test_fraction=0.0, show_progress=False)
    lab = sitk.ReadImage(str(out / "labelsTr" / "Cirrus_TRAIN001.nii.gz"))
    np.testing.assert_allclose(lab.GetSpacing(), RETOUCH_SPACING["Cirrus"], rtol=1e-5)
    rec = json.loads((out / "conversion.json").read_text())
    assert any("Cirrus_TRAIN001" in w and "spacing" in w for w in rec["warnings"])


def _break_retouch(src: Path, what: str) -> str:
    d = src / "RETOUCH-TrainingSet-Spectralis" / "TRAIN026"
    if what == "shape":
        ref = sitk.GetImageFromArray(np.zeros((6, 10, 7), np.uint8))
        ref.SetSpacing(RETOUCH_SPACING["Spectralis"])
        sitk.WriteImage(ref, str(d / "reference.mhd"), False)
        return r"Spectralis_TRAIN026 \(RETOUCH-TrainingSet-Spectralis/TRAIN026\): reference.mhd: shape \(7, 10, 6\) " \
               r"differs from oct.mhd \(8, 10, 6\)"
    if what == "missing_reference":
        (d / "reference.mhd").unlink()
        return r"Spectralis_TRAIN026 .*reference.mhd missing"
    if what == "missing_raw":
        (d / "oct.raw").unlink()
        return r"Spectralis_TRAIN026 .*oct.raw missing"
    if what == "missing_vendor":
        for f in sorted((src / "RETOUCH-TrainingSet-Topcon").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (src / "RETOUCH-TrainingSet-Topcon").rmdir()
        return r"RETOUCH-TrainingSet-Topcon/ missing .*--vendors"
    if what == "values":
        ref = sitk.ReadImage(str(d / "reference.mhd"))
        arr = sitk.GetArrayFromImage(ref)
        arr[0, 0, 0] = 4
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(ref)
        sitk.WriteImage(im, str(d / "reference.mhd"), False)
        return r"Spectralis_TRAIN026 .*label values \[4\]"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["shape", "missing_reference", "missing_raw", "missing_vendor", "values"])
def test_retouch_broken_folder_is_rejected_and_nothing_written(tmp_path, fresh_dirs, what):
    src = make_retouch(tmp_path / "RETOUCH")
    pattern = _break_retouch(src, what)
    with pytest.raises(ConversionError, match=pattern):
        convert_retouch(src, 626, show_progress=False)
    assert _raw_entries(fresh_dirs) == []


# ------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["convert"], ["convert", "acdc"], ["convert", "la"], ["convert", "retouch"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv + ["--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    assert "--help" in text or "-h" in text
    if len(argv) == 1:
        assert all(k in text for k in ("acdc", "la", "retouch"))
    else:
        assert all(k in text for k in ("--dataset-id", "--name", "--overwrite"))


def test_cli_converts_and_fails_cleanly_on_a_broken_folder(tmp_path, fresh_dirs, capsys):
    src = make_retouch(tmp_path / "RETOUCH")
    assert main(["convert", "retouch", str(src), "-d", "631", "--test-fraction", "0.34", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "Dataset631_RETOUCH" in out and "6 training case(s)" in out and "3 test case(s)" in out
    _break_retouch(src, "shape")
    rc = main(["convert", "retouch", str(src), "-d", "632"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "nnunet-mixsup convert: error:" in err and "Spectralis_TRAIN026" in err and "shape" in err
    assert "Traceback" not in err
    assert _raw_entries(fresh_dirs) == ["Dataset631_RETOUCH"]
    # existing target without --overwrite
    assert main(["convert", "retouch", str(src), "-d", "631", "--vendors", "Cirrus"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    # ACDC: missing gt via the command line
    acdc = make_acdc(tmp_path / "ACDC")
    _break_acdc(acdc, "missing_gt")
    assert main(["convert", "acdc", str(acdc), "-d", "633"]) == 1
    assert "patient002_frame04_gt.nii.gz missing" in capsys.readouterr().err
    assert _raw_entries(fresh_dirs) == ["Dataset631_RETOUCH"]
