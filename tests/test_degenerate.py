"""Degenerate but legal data: every trainer trains a few steps with finite loss, or stops early and clearly.

Scenarios: all weak cases of one type (only boxes / only tags / only unlabelled), boxes for every class,
image tags with no foreground (``present: []``), batches without a mask sample, a class that appears in
no mask case, a single-case dataset, no mask case at all, and a user split whose training fold holds no
mask case.

How the data is made (CPU budget): one 2D synthetic dataset with cases for every scenario is prepared,
planned and preprocessed once with nnunet-mixsup; each scenario is a preprocessed dataset made of a
subset of its cases (nnU-Net preprocesses every case independently of the others given the plans, so
the subset's files are exactly what preprocessing the subset with these plans gives). The single-case
dataset is planned for real, because nnU-Net's planner itself must cope with it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers
import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_mixsup.lab.synthetic import boxes_from_label, make_synthetic_dataset
from nnunet_mixsup.manifest import TYPE_CODES, ManifestError

pytestmark = pytest.mark.slow

TRAINERS = ["MixSupTrainer", "MixSupTrainer_MLDS", "MixSupTrainer_MeanTeacher"]
SUPERSET_ID, SINGLE_ID = 981, 982


def _remove_class(folder: Path, cid: str, label_dir: str, c: int) -> None:
    """Make class ``c`` absent from a case: its voxels get the surrounding tissue intensity and background."""
    img_f, lab_f = folder / "imagesTr" / f"{cid}_0000.nii.gz", folder / label_dir / f"{cid}.nii.gz"
    img, lab = sitk.ReadImage(str(img_f)), sitk.ReadImage(str(lab_f))
    a, s = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
    tissue = a[(s == 0) & (a != 0)]
    a[s == c] = float(np.median(tissue))
    s[s == c] = 0
    for arr, ref, f in ((a, img, img_f), (s, lab, lab_f)):
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(ref)
        sitk.WriteImage(out, str(f), True)


def _build_superset(raw: Path) -> tuple[Path, dict[str, dict]]:
    """12 cases: masks 000-001 (both classes), 002-003 (no class 2); boxes 004-006 (every class present gets
    boxes); tags 007-008, 009 without any foreground (present: []); unlabelled 010-011."""
    folder = make_synthetic_dataset(raw, SUPERSET_ID, name="Degenerate", dim=2,
                                    counts={"mask": 4, "box": 3, "tags": 3, "none": 2}, n_test=0, seed=7)
    for cid in ("case_002", "case_003"):
        _remove_class(folder, cid, "labelsTr", 2)
    for c in (1, 2):
        _remove_class(folder, "case_009", "labelsTr_dense_hidden", c)
    cases: dict[str, dict] = {}
    for i in range(12):
        cid = f"case_{i:03d}"
        t = "mask" if i < 4 else "box" if i < 7 else "tags" if i < 10 else "none"
        d = "labelsTr" if t == "mask" else "labelsTr_dense_hidden"
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / d / f"{cid}.nii.gz")))
        present = sorted(int(v) for v in np.unique(seg) if v > 0)
        if t == "box":
            assert present == [1, 2], f"{cid}: the box cases must hold both classes"
            cases[cid] = {"type": "box", "boxes": boxes_from_label(seg, present)}
        elif t == "tags":
            cases[cid] = {"type": "tags", "present": present}
        else:
            cases[cid] = {"type": t}
    assert cases["case_009"] == {"type": "tags", "present": []}
    (folder / "supervision.json").write_text(json.dumps({"version": 1, "cases": cases}))
    return folder, cases


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A private nnU-Net folder tree with the superset dataset (planned) and the single-case dataset (planned)."""
    from nnunet_mixsup.preprocess import plan_and_preprocess

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("degenerate")
    d = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in d.items():
        v.mkdir()
        mp.setenv(k, str(v))
    _, cases = _build_superset(d["nnUNet_raw"])
    plans = plan_and_preprocess(SUPERSET_ID, configurations=("2d",), num_processes=1)
    single = make_synthetic_dataset(d["nnUNet_raw"], SINGLE_ID, name="Single", dim=2, counts={"mask": 1}, n_test=0,
                                    seed=8)
    plan_and_preprocess(SINGLE_ID, configurations=("2d",), num_processes=1)
    yield {**d, "plans": plans, "cases": cases, "single": single}
    mp.undo()


def make_scenario(dirs: dict, name: str, ids: list[str], splits: list[dict] | None = None) -> dict:
    """A preprocessed dataset holding the cases ``ids`` of the superset (see the module docstring)."""
    src = dirs["nnUNet_preprocessed"] / f"Dataset{SUPERSET_ID}_Degenerate"
    n = 983 + sum(1 for p in dirs["nnUNet_preprocessed"].iterdir() if p.name.startswith("Dataset9"))
    dst = dirs["nnUNet_preprocessed"] / f"Dataset{n:03d}_{name}"
    dst.mkdir()
    for f in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy2(src / f, dst / f)
    plans = load_json(str(src / f"{dirs['plans']}.json"))
    plans["dataset_name"] = dst.name
    (dst / f"{dirs['plans']}.json").write_text(json.dumps(plans))
    for sub in [p for p in src.iterdir() if p.is_dir()]:
        (dst / sub.name).mkdir()
        for f in sub.iterdir():
            if any(f.name.startswith(f"{c}.") or f.name.startswith(f"{c}_seg.") for c in ids):
                shutil.copy2(f, dst / sub.name / f.name)
    (dst / "supervision.json").write_text(json.dumps({"version": 1,
                                                      "cases": {c: dirs["cases"][c] for c in sorted(ids)}}))
    if splits is not None:
        (dst / "splits_final.json").write_text(json.dumps(splits))
    return {"pp": dst, "plans": dirs["plans"]}


def make_trainer(cls_name: str, info: dict, **attrs):
    """The shared tiny-network trainer (2d, batch 4) with every ramped term at full weight."""
    tr = helpers.make_trainer(cls_name, info, "2d", **{"batch_size": 4, **attrs})
    tr.current_epoch = 10 ** 6
    return tr


def train_steps(tr, n: int = 2) -> list[tuple[dict, dict]]:
    dl_tr, dl_val = tr.get_dataloaders()
    try:
        out = []
        for _ in range(n):
            batch = next(dl_tr)
            out.append((batch, tr.train_step(batch)))
        return out
    finally:
        for d in (dl_tr, dl_val):
            if hasattr(d, "_finish"):
                d._finish()


def assert_finite(tr, results) -> None:
    for _, o in results:
        assert np.isfinite(o["loss"]), o
        for k in tr.loss_term_names:
            assert np.isfinite(o[f"loss_{k}"]), (k, o)


MASKS = ["case_000", "case_001"]
SCENARIOS = {
    "OnlyBoxes": MASKS + ["case_004", "case_005", "case_006"],   # boxes for every class
    "OnlyTags": MASKS + ["case_007", "case_008", "case_009"],    # incl. tags with no foreground
    "OnlyNone": MASKS + ["case_010", "case_011"],
    "ClassInNoMask": ["case_002", "case_003", "case_004", "case_005", "case_008"],  # class 2 only in weak cases
}


@pytest.fixture(scope="module")
def scenarios(dirs) -> dict[str, dict]:
    return {name: make_scenario(dirs, name, ids) for name, ids in SCENARIOS.items()}


@pytest.mark.parametrize("cls_name", TRAINERS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_weak_type_trains(scenarios, scenario, cls_name):
    tr = make_trainer(cls_name, scenarios[scenario])
    res = train_steps(tr)
    assert_finite(tr, res)
    if scenario == "ClassInNoMask":  # class 2 is supervised only through the weak cases
        sup = tr.load_supervision()
        assert all(sup[k].type == "mask" for k in tr.do_split()[1])


@pytest.mark.parametrize("cls_name", ["MixSupTrainer", "MixSupTrainer_MeanTeacher"])
@pytest.mark.parametrize("scenario", ["OnlyNone", "OnlyBoxes"])
def test_batches_without_a_mask_sample(scenarios, scenario, cls_name):
    """strong_fraction 0: every sample of every batch is weak (for OnlyNone: nothing but ignore labels).

    The default trainer's mask-only warm-up is taken as over (self-training started at epoch 0),
    so its pseudo-label path runs on batches without any mask sample.
    """
    from helpers import trainer_class

    extra = {"self_training_start": lambda: 0, "pseudo_ramp": lambda: 1.0} \
        if hasattr(trainer_class(cls_name), "self_training_start") else {}
    if cls_name == "MixSupTrainer":
        extra["weak_batch_extra"] = 0.0  # weak samples inside the plans' batch, so strong_fraction 0 holds
    tr = make_trainer(cls_name, scenarios[scenario], strong_fraction=0.0, **extra)
    res = train_steps(tr)
    for batch, _ in res:
        assert not (batch["sup_type"] == TYPE_CODES["mask"]).any()
    assert_finite(tr, res)


def test_small_batch_keeps_the_expected_mask_share(scenarios):
    """Batch 2 x strong_fraction 0.2: 0.4 mask samples per batch on average (not round(0.4) = 0, never)."""
    from nnunet_mixsup.data import MixSupDataLoader

    tr = make_trainer("MixSupTrainer", scenarios["OnlyBoxes"], strong_fraction=0.2, batch_size=2, weak_batch_extra=0.0)
    assert_finite(tr, train_steps(tr, 3))
    dl = MixSupDataLoader.__new__(MixSupDataLoader)
    dl.batch_size, dl.strong_fraction = 2, 0.2
    np.random.seed(0)
    draws = [dl.n_strong() for _ in range(4000)]
    assert set(draws) <= {0, 1} and abs(np.mean(draws) - 0.4) < 0.03


@pytest.mark.parametrize("cls_name", [
    "MixSupTrainer", "MixSupTrainer_MLDS",
    "MixSupTrainer_MeanTeacher",
    "MixSupTrainer_DualBranch", "MixSupTrainer_DMD"])
def test_single_case_dataset(dirs, cls_name):
    """One mask case and nothing else (so no ignore label in dataset.json)."""
    info = {"pp": dirs["nnUNet_preprocessed"] / f"Dataset{SINGLE_ID}_Single", "plans": dirs["plans"]}
    tr = make_trainer(cls_name, info)
    tr_keys, val_keys = tr.do_split()
    assert tr_keys == val_keys == ["case_000"]  # one fold that validates on its own training case
    assert_finite(tr, train_steps(tr))


def test_no_mask_case_fails_early_in_prepare(dirs, tmp_path):
    raw = tmp_path / "raw"
    folder = make_synthetic_dataset(raw, 990, dim=2, counts={"box": 1, "tags": 1, "none": 1}, n_test=0)
    with pytest.raises(ManifestError, match="the dataset has no 'mask' case"):
        from nnunet_mixsup.prepare import prepare_dataset

        prepare_dataset(folder, show_progress=False)


@pytest.mark.parametrize("cls_name", ["MixSupTrainer", "MixSupTrainer_MLDS"])
def test_no_mask_case_in_preprocessed_data_fails_clearly(dirs, cls_name):
    """Preprocessed data without any mask case (prepare was bypassed): a clear error before training."""
    info = make_scenario(dirs, f"NoMask{cls_name[-4:]}", ["case_004", "case_007", "case_010"])
    with pytest.raises((RuntimeError, ValueError), match="no mask case"):
        tr = make_trainer(cls_name, info)
        train_steps(tr)


def test_user_split_without_mask_case_in_training(dirs):
    """A user's fold that trains on weak cases only: MixSupTrainer trains (weak supervision only) ..."""
    weak = ["case_004", "case_005", "case_007", "case_010"]
    info = make_scenario(dirs, "WeakTrainFold", MASKS + weak, splits=[{"train": weak, "val": MASKS}])
    tr = make_trainer("MixSupTrainer", info)
    res = train_steps(tr)
    assert all(not (b["sup_type"] == TYPE_CODES["mask"]).any() for b, _ in res)
    assert_finite(tr, res)


def test_user_split_without_mask_case_in_training_mlds(dirs):
    """... and the mask-only MLDS variant has nothing to train on: a clear error is expected."""
    weak = ["case_004", "case_005", "case_007", "case_010"]
    info = make_scenario(dirs, "WeakTrainFoldMLDS", MASKS + weak, splits=[{"train": weak, "val": MASKS}])
    with pytest.raises(RuntimeError, match="mask case"):
        tr = make_trainer("MixSupTrainer_MLDS", info)
        train_steps(tr)
