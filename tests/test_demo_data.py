"""The real-anatomy demo dataset (deformed MNI152 template): validity, variability, determinism, atomicity."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.lab import demo_data

needs_nilearn = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn not installed")
KW = {"n_train": 3, "n_test": 1, "spacing_mm": 8.0, "show_progress": False}


def _arr(p: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@needs_nilearn
def test_demo_dataset_valid_varied_deterministic(fresh_dirs):
    a = demo_data.make_demo_dataset(980, seed=0, **KW)
    assert a == fresh_dirs["nnUNet_raw"] / "Dataset980_MixSupBrainDemo"
    dj = json.loads((a / "dataset.json").read_text())
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz" and list(dj["channel_names"]) == ["0"]
    labels = dj["labels"]
    assert labels["background"] == 0 and sorted(labels.values()) == [0, 1, 2, 3]
    assert _files(a) == ["dataset.json", "imagesTr/brain_000_0000.nii.gz", "imagesTr/brain_001_0000.nii.gz",
                         "imagesTr/brain_002_0000.nii.gz", "imagesTs/brain_test_000_0000.nii.gz",
                         "labelsTr/brain_000.nii.gz", "labelsTr/brain_001.nii.gz", "labelsTr/brain_002.nii.gz",
                         "labelsTs/brain_test_000.nii.gz"]
    imgs, segs = [], []
    for split, cid in [("Tr", "brain_000"), ("Tr", "brain_001"), ("Tr", "brain_002"), ("Ts", "brain_test_000")]:
        im = sitk.ReadImage(str(a / f"images{split}" / f"{cid}_0000.nii.gz"))
        lb = sitk.ReadImage(str(a / f"labels{split}" / f"{cid}.nii.gz"))
        assert im.GetSize() == lb.GetSize() == (22, 27, 22)  # 180 x 216 x 180 mm at 8 mm
        assert im.GetSpacing() == lb.GetSpacing() == (8.0, 8.0, 8.0)
        assert np.allclose(im.GetOrigin(), lb.GetOrigin()) and np.allclose(im.GetDirection(), lb.GetDirection())
        seg = sitk.GetArrayFromImage(lb)
        img = sitk.GetArrayFromImage(im)
        assert seg.dtype == np.uint8 and img.dtype == np.float32 and np.isfinite(img).all()
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}  # every class in every case
        # appearance carries the anatomy: white matter is brighter than grey matter, ventricles darker
        assert img[seg == 1].mean() > img[seg == 2].mean() > img[seg == 3].mean()
        imgs.append(img)
        segs.append(seg)
    # substantial case-to-case variability (shape and intensity)
    for i in range(len(segs)):
        for j in range(i + 1, len(segs)):
            assert (segs[i] != segs[j]).mean() > 0.03
            assert not np.allclose(imgs[i], imgs[j])
    vols = [int((s == 1).sum()) for s in segs]
    assert max(vols) > 1.05 * min(vols)

    # deterministic for a seed, different for another
    b = demo_data.make_demo_dataset(981, seed=0, **KW)
    c = demo_data.make_demo_dataset(982, seed=1, **KW)
    for rel in _files(a):
        if rel.endswith(".nii.gz"):
            assert np.array_equal(_arr(a / rel), _arr(b / rel)), rel
    assert not np.array_equal(_arr(a / "labelsTr/brain_000.nii.gz"), _arr(c / "labelsTr/brain_000.nii.gz"))

    # nnU-Net accepts it
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(a), num_processes=1)


@needs_nilearn
def test_demo_refuses_overwrite_and_is_atomic(fresh_dirs, monkeypatch):
    kw = {**KW, "n_train": 2, "n_test": 0}
    a = demo_data.make_demo_dataset(983, **kw)
    (a / "marker").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        demo_data.make_demo_dataset(983, **kw)
    assert (a / "marker").exists()

    real, calls = demo_data.make_case, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_data, "make_case", failing)
    with pytest.raises(RuntimeError, match="boom"):
        demo_data.make_demo_dataset(983, overwrite=True, **kw)
    assert (a / "marker").exists()  # the old dataset untouched
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        demo_data.make_demo_dataset(984, **kw)
    assert sorted(p.name for p in fresh_dirs["nnUNet_raw"].iterdir()) == ["Dataset983_MixSupBrainDemo"]
    monkeypatch.setattr(demo_data, "make_case", real)
    demo_data.make_demo_dataset(983, overwrite=True, **kw)
    assert not (a / "marker").exists() and (a / "dataset.json").is_file()


@needs_nilearn
def test_demo_cli(fresh_dirs):
    from nnunet_mixsup.cli import main

    assert main(["demo-data", "-d", "985", "--train", "1", "--test", "0", "--spacing", "8"]) == 0
    assert (fresh_dirs["nnUNet_raw"] / "Dataset985_MixSupBrainDemo" / "labelsTr" / "brain_000.nii.gz").is_file()


def test_missing_nilearn_gives_clear_message(fresh_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes `import nilearn` raise ImportError
    with pytest.raises(RuntimeError, match="pip install nilearn"):
        demo_data.make_demo_dataset(986, **KW)
    assert not any(fresh_dirs["nnUNet_raw"].iterdir())
