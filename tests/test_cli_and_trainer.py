"""CLI surface, trainer discovery through nnUNet_extTrainer, splits, mask-only intensity statistics."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.cli import build_parser, trainers_path
from nnunet_mixsup.splits import mixsup_splits

#: every sub-command of ``nnunet-mixsup``, listed by hand: a sub-command that disappears (its module no
#: longer imports or no longer registers it) fails here instead of being skipped
SUBCOMMANDS = ["trainers-path", "prepare", "plan_and_preprocess", "small-plans", "synthetic-data", "simulate",
               "demo-data", "evaluate", "demo", "bench-speed", "benchmark", "weak-label-audit", "convert",
               "import-boxes", "import-tags", "show"]


def _registered() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def test_registered_subcommands_are_exactly_the_listed_ones():
    assert sorted(_registered()) == sorted(SUBCOMMANDS), "update SUBCOMMANDS when adding or removing a sub-command"


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nnunet-mixsup {cmd}") and len(out.splitlines()) > 3


def test_help_in_a_fresh_interpreter_lists_every_subcommand():
    r = subprocess.run([sys.executable, "-m", "nnunet_mixsup.cli", "--help"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert all(cmd in r.stdout for cmd in SUBCOMMANDS)


def test_broken_subcommand_module_fails_loudly(monkeypatch, capsys):
    from nnunet_mixsup import cli

    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*cli.SUBCOMMAND_MODULES, "nnunet_mixsup._no_such_module"))
    with pytest.raises(ImportError, match="nnunet_mixsup._no_such_module"):
        cli.build_parser()
    assert cli.main(["prepare", "--help"]) == 1
    err = capsys.readouterr().err
    assert "cannot import nnunet_mixsup._no_such_module" in err and "Traceback" not in err
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("nnunet_mixsup.splits",))  # imports, registers nothing
    with pytest.raises(ImportError, match="no register_cli"):
        cli.build_parser()


def test_cli_error_exits_nonzero_with_clear_message(fresh_dirs):
    r = subprocess.run([sys.executable, "-m", "nnunet_mixsup.cli", "prepare", "-d", "777"], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 1
    assert "error" in r.stderr and "Traceback" not in r.stderr


def test_synthetic_data_size_and_spacing(fresh_dirs, capsys):
    from nnunet_mixsup.cli import main

    assert main(["synthetic-data", "-d", "981", "--size", "24", "20", "12", "--spacing", "1", "1", "2.5",
                 "--counts", "1", "1", "0", "0", "--test", "1"]) == 0
    img = sitk.ReadImage(str(next((fresh_dirs["nnUNet_raw"] / "Dataset981_MixSupSynth" / "imagesTr").iterdir())))
    assert img.GetSize() == (24, 20, 12) and img.GetSpacing() == (1.0, 1.0, 2.5)
    assert main(["synthetic-data", "-d", "982", "--size", "24", "20"]) == 1  # 3D needs three values
    assert "--size needs 3 values" in capsys.readouterr().err
    assert not (fresh_dirs["nnUNet_raw"] / "Dataset982_MixSupSynth").exists()  # nothing written


def test_trainer_found_by_nnunet_and_picklable(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", trainers_path())
    import importlib

    import nnunetv2.utilities.find_objects as fo

    importlib.reload(fo)
    from nnunet_mixsup.trainers import PUBLIC_TRAINERS

    for name in PUBLIC_TRAINERS:
        cls = fo.recursive_find_trainer_class_by_name(name)
        assert cls.__module__.startswith("nnunet_mixsup.trainers.")
        assert pickle.loads(pickle.dumps(cls)) is cls


def test_splits_validate_on_masks_only():
    masks = [f"m{i}" for i in range(7)]
    weak = [f"w{i}" for i in range(20)]
    s = mixsup_splits(masks, weak)
    assert len(s) == 5
    assert sorted(v for f in s for v in f["val"]) == sorted(masks)
    for f in s:
        assert f["val"] and set(f["val"]) <= set(masks)
        assert set(weak) <= set(f["train"]) and not set(f["val"]) & set(f["train"])
    assert len(mixsup_splits(masks[:3], weak)) == 3
    assert mixsup_splits(masks[:1], weak) == [{"train": masks[:1] + sorted(weak), "val": masks[:1]}]


def test_intensity_statistics_come_from_mask_foreground_only(planned_3d):
    fp = json.loads((planned_3d["pp"] / "dataset_fingerprint.json").read_text())
    stats = fp["foreground_intensity_properties_per_channel"]["0"]
    raw = planned_3d["raw"]
    sup = json.loads((raw / "supervision.json").read_text())["cases"]
    vals = []
    for cid, s in sup.items():
        if s["type"] == "mask":
            img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{cid}_0000.nii.gz")))
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{cid}.nii.gz")))
            vals.append(img[(seg == 1) | (seg == 2)])
    # nnU-Net draws the same number of samples from every case: expected mean = mean of case means
    expected = np.mean([x.mean() for x in vals])
    v = np.concatenate(vals)
    assert abs(stats["mean"] - expected) < 0.05 * v.std()
    assert v.min() - 1e-6 <= stats["percentile_00_5"] and stats["percentile_99_5"] <= v.max() + 1e-6
    # stock nnU-Net would have used seg > 0 incl. ignore = whole boxes and unlabelled images (mostly tissue)
    assert fp["nnunet_mixsup"]["num_mask_cases"] == 3


@pytest.mark.slow
def test_regular_install_ships_the_trainer_folder(tmp_path):
    """``pip install .`` (non-editable) must carry trainers/ as nnunet_mixsup.ext_trainers."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(root)], capture_output=True, text=True, check=False)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip("setuptools/wheel not available for an isolated build")
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "nnunet_mixsup/ext_trainers/mixsup_trainers.py" in names
    for module in ("nnunet_mixsup/trainers/mixsup.py", "nnunet_mixsup/lab/benchmark/runner.py",
                   "nnunet_mixsup/lab/ext_trainers/mixsup_experiments.py"):
        assert module in names, module
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(next(tmp_path.glob("*.whl")))], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", "import nnunet_mixsup.cli as c; print(c.trainers_path())"],
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str((target / "nnunet_mixsup" / "ext_trainers").resolve())
