"""The INIA19 weak-label benchmark dataset: labels, geometry, partial field of view, determinism, atomicity."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.lab import inia19_data


def _template_or_skip() -> None:
    try:
        inia19_data.template_files()  # installs Debian's mricron-data when running as root
    except RuntimeError as e:
        pytest.skip(f"INIA19 template unavailable (Debian package mricron-data could not be installed): {e}")


KW = {"n_train": 2, "n_test": 1, "spacing_mm": 3.0, "show_progress": False}
FULL = tuple(round(f / 3.0) for f in inia19_data.FOV_MM)  # ITK order (x, y, z): 25 x 32 x 24


def _arr(p: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_labels_and_structures_are_consistent():
    lab = inia19_data.labels()
    assert lab["background"] == 0 and sorted(lab.values()) == list(range(len(inia19_data.STRUCTURES) + 1))
    assert 4 <= len(inia19_data.STRUCTURES) <= 6
    assert len({v for _, v in inia19_data.STRUCTURES}) == len(inia19_data.STRUCTURES)


def test_inia19_dataset_valid_partial_fov_deterministic(fresh_dirs):
    _template_or_skip()
    a = inia19_data.make_inia19_dataset(970, seed=0, **KW)
    assert a == fresh_dirs["nnUNet_raw"] / "Dataset970_MixSupINIA19"
    assert _files(a) == ["dataset.json", "generation.json", "imagesTr/inia_000_0000.nii.gz",
                         "imagesTr/inia_001_0000.nii.gz", "imagesTs/inia_test_000_0000.nii.gz",
                         "labelsTr/inia_000.nii.gz", "labelsTr/inia_001.nii.gz", "labelsTs/inia_test_000.nii.gz"]
    dj = json.loads((a / "dataset.json").read_text())
    assert dj["labels"] == inia19_data.labels() and dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    gen = json.loads((a / "generation.json").read_text())
    n_classes = len(inia19_data.STRUCTURES)
    for split, cid in [("Tr", "inia_000"), ("Tr", "inia_001"), ("Ts", "inia_test_000")]:
        im = sitk.ReadImage(str(a / f"images{split}" / f"{cid}_0000.nii.gz"))
        lb = sitk.ReadImage(str(a / f"labels{split}" / f"{cid}.nii.gz"))
        assert im.GetSize() == lb.GetSize() and im.GetSpacing() == lb.GetSpacing() == (3.0, 3.0, 3.0)
        assert np.allclose(im.GetOrigin(), lb.GetOrigin()) and np.allclose(im.GetDirection(), lb.GetDirection())
        img, seg = sitk.GetArrayFromImage(im), sitk.GetArrayFromImage(lb)
        assert seg.dtype == np.uint8 and img.dtype == np.float32 and np.isfinite(img).all()
        assert seg.max() <= n_classes
        info = gen["cases"][cid]
        assert info["present"] == sorted(int(v) for v in np.unique(seg) if v > 0)
        if split == "Ts":  # the whole field of view and every structure
            assert im.GetSize() == FULL and info["slab"] is None
            assert info["present"] == list(range(1, n_classes + 1))
        else:  # a slab: one axis cut to 20-50 % of the brain's extent, the others whole
            axis, start, stop = info["slab"]
            full_np = FULL[::-1]
            assert seg.shape[axis] == stop - start < 0.55 * full_np[axis]
            assert all(seg.shape[k] == full_np[k] for k in range(3) if k != axis)
    # the same seed gives the same files, another seed other cases
    b = inia19_data.make_inia19_dataset(971, seed=0, **KW)
    c = inia19_data.make_inia19_dataset(972, seed=1, **KW)
    for rel in _files(a):
        if rel.endswith(".nii.gz"):
            ia, ib = sitk.ReadImage(str(a / rel)), sitk.ReadImage(str(b / rel))
            assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)), rel
            assert ia.GetOrigin() == ib.GetOrigin(), rel
    assert json.loads((b / "generation.json").read_text())["cases"] == gen["cases"]
    assert not np.array_equal(_arr(a / "labelsTs/inia_test_000.nii.gz"), _arr(c / "labelsTs/inia_test_000.nii.gz"))


def test_slab_origin_matches_full_field_of_view(fresh_dirs):
    """A training case's crop is the same anatomy at the same physical place as without the crop."""
    _template_or_skip()
    rng_args = [5, 0, 3]
    img_f, seg_f, _ = inia19_data.make_case(np.random.default_rng(rng_args), 3.0, partial_fov=False)
    img_p, seg_p, info = inia19_data.make_case(np.random.default_rng(rng_args), 3.0, partial_fov=True)
    axis, start, stop = info["slab"]
    idx = [0, 0, 0]
    idx[axis] = start  # numpy order
    assert np.allclose(seg_p.GetOrigin(), seg_f.TransformIndexToPhysicalPoint(tuple(idx[::-1])))
    # same deformation (the slab is drawn after it), so the labels inside the slab agree
    sl = [slice(None)] * 3
    sl[axis] = slice(start, stop)
    assert np.array_equal(sitk.GetArrayFromImage(seg_p), sitk.GetArrayFromImage(seg_f)[tuple(sl)])
    assert np.array_equal(sitk.GetArrayFromImage(img_p), sitk.GetArrayFromImage(img_f)[tuple(sl)])


def test_refuses_overwrite_and_is_atomic(fresh_dirs, monkeypatch):
    _template_or_skip()
    kw = {**KW, "n_train": 2, "n_test": 0}
    a = inia19_data.make_inia19_dataset(973, **kw)
    (a / "marker").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        inia19_data.make_inia19_dataset(973, **kw)
    assert (a / "marker").exists()
    real, calls = inia19_data.make_case, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(inia19_data, "make_case", failing)
    with pytest.raises(RuntimeError, match="boom"):
        inia19_data.make_inia19_dataset(973, overwrite=True, **kw)
    assert (a / "marker").exists()  # the old dataset untouched
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        inia19_data.make_inia19_dataset(974, **kw)
    assert sorted(p.name for p in fresh_dirs["nnUNet_raw"].iterdir()) == ["Dataset973_MixSupINIA19"]
    monkeypatch.setattr(inia19_data, "make_case", real)
    inia19_data.make_inia19_dataset(973, overwrite=True, **kw)
    assert not (a / "marker").exists() and (a / "dataset.json").is_file()


def test_cli_dataset_choice(fresh_dirs):
    _template_or_skip()
    from nnunet_mixsup.cli import main

    assert main(["demo-data", "--dataset", "inia19", "-d", "975", "--train", "1", "--test", "0",
                 "--spacing", "3"]) == 0
    assert (fresh_dirs["nnUNet_raw"] / "Dataset975_MixSupINIA19" / "labelsTr" / "inia_000.nii.gz").is_file()


def test_missing_template_gives_clear_message(fresh_dirs, monkeypatch, tmp_path):
    monkeypatch.setattr(inia19_data, "DEBIAN_FOLDER", tmp_path / "nowhere")
    monkeypatch.setenv(inia19_data.ENV_FOLDER, str(tmp_path / "empty"))
    monkeypatch.setattr(inia19_data, "_install_debian_package", lambda: "E: simulated failure")
    with pytest.raises(RuntimeError, match="apt-get install mricron-data"):
        inia19_data.template_files(install=False)
    with pytest.raises(RuntimeError, match="apt-get install mricron-data"):
        inia19_data.make_inia19_dataset(976, **KW)
    assert not any(fresh_dirs["nnUNet_raw"].iterdir())


def test_benchmark_preset_builds_the_inia19_dataset(tmp_path, monkeypatch):
    """``--preset inia19-cpu`` without ``-d`` builds dataset 992 with ``demo-data --dataset inia19``."""
    from nnunet_mixsup.lab import benchmark
    from nnunet_mixsup.lab.benchmark.runner import _dense_folder

    p = benchmark.PRESETS["inia19-cpu"]
    assert p.demo_data == (inia19_data.DEFAULT_ID, ("--dataset", "inia19"))
    assert benchmark.PRESETS["cpu-mini"].demo_data == (benchmark.DEMO_ID, ())
    assert (p.configuration, p.small_plans, p.epochs, p.iterations) == (
        "2d", benchmark.PRESETS["cpu-mini"].small_plans, 200, 25)
    parser = argparse.ArgumentParser()
    benchmark.register_cli(parser.add_subparsers())
    cfg = benchmark.config_from_args(parser.parse_args(["benchmark", "--preset", "inia19-cpu", "--workdir",
                                                        str(tmp_path)]))
    assert cfg.dataset is None and cfg.configuration == "2d" and cfg.small_plans == p.small_plans

    raw = tmp_path / "raw"
    raw.mkdir()
    commands: list[list[str]] = []

    class FakeSession:
        def say(self, text: str) -> None:
            pass

        def run(self, cmd, *args, **kwargs) -> None:
            commands.append([str(c) for c in cmd])
            (raw / f"Dataset{inia19_data.DEFAULT_ID}_MixSupINIA19").mkdir()

    found = _dense_folder(cfg, FakeSession(), raw, None)
    assert found == raw / f"Dataset{inia19_data.DEFAULT_ID}_MixSupINIA19"
    assert commands[0][-11:] == ["demo-data", "--dataset", "inia19", "-d", str(inia19_data.DEFAULT_ID), "--train",
                                 "20", "--test", "10", "--seed", "0"]
