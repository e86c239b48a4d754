"""``nnunet-mixsup benchmark``: the pure computations (hand-computed values), the early checks, and a
tiny end-to-end run (simulate -> one plans file -> lower / MixSup / upper -> predict -> evaluate ->
tables and plots) that is then resumed without redoing anything."""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from nnunet_mixsup.cli import build_parser, main, trainers_path
from nnunet_mixsup.lab.benchmark import (
    DEFAULT_COSTS,
    LOWER,
    SUMMARY_COLUMNS,
    UPPER,
    BenchmarkError,
    DenseDataset,
    SimDataset,
    annotation_cost,
    check_dense_dataset,
    check_trainers,
    config_from_args,
    dice_gain_points,
    gap_closed,
    mean_sd,
    plans_signature,
    plot_summary,
    split_counts,
    summarise,
    summary_markdown,
)
from nnunet_mixsup.lab.benchmark.runner import _run_list
from nnunet_mixsup.lab.synthetic import make_synthetic_dataset


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cfg(*argv: str):
    return config_from_args(build_parser().parse_args(["benchmark", *argv]))


# ------------------------------------------------------------------------------------------------ counts and cost
def test_split_counts_hand_values():
    # 20 cases, 10 % masks: 2 mask; the other 18: round(18 * 0.45) = 8 boxes, round(18 * 0.65) = 12 -> 4 tags, 6 none
    assert split_counts(20, 0.1, 0.45, 0.2) == {"mask": 2, "box": 8, "tags": 4, "none": 6}
    # 5 %: 1 mask; 19 others: round(8.55) = 9 boxes, round(12.35) = 12 -> 3 tags, 7 none
    assert split_counts(20, 0.05, 0.45, 0.2) == {"mask": 1, "box": 9, "tags": 3, "none": 7}
    # a count: 2 of 6; 4 others: round(1.8) = 2 boxes, round(2.6) = 3 -> 1 tags, 1 none
    assert split_counts(6, 2, 0.45, 0.2) == {"mask": 2, "box": 2, "tags": 1, "none": 1}
    assert split_counts(10, 0.2, 1.0, 0.0) == {"mask": 2, "box": 8, "tags": 0, "none": 0}
    assert split_counts(10, 0.2, 0.0, 0.0) == {"mask": 2, "box": 0, "tags": 0, "none": 8}
    for n in (20, 33, 41):
        for b in (0.05, 0.1, 0.2, 0.5, 1.0, 1, 3):
            c = split_counts(n, b, 0.45, 0.2)
            assert sum(c.values()) == n and min(c.values()) >= 0


def test_split_counts_refuses_budgets_without_mask_case():
    with pytest.raises(BenchmarkError, match="at least one 'mask' case"):
        split_counts(20, 0.01, 0.45, 0.2)
    with pytest.raises(BenchmarkError, match="only 5 training cases"):
        split_counts(5, 6, 0.45, 0.2)


def test_annotation_cost_hand_values():
    counts = {"mask": 2, "box": 8, "tags": 4, "none": 6}
    assert annotation_cost(counts) == pytest.approx(2 * 1.0 + 8 * 0.1 + 4 * 0.02)  # 2.88
    assert annotation_cost(counts, {"mask": 2.0, "box": 0.5, "tags": 0.25, "none": 0.0}) == pytest.approx(9.0)
    assert annotation_cost({"mask": 20, "box": 0, "tags": 0, "none": 0}) == 20.0


# ------------------------------------------------------------------------------------------------ statistics
def test_mean_sd_gap_and_gain():
    m, s = mean_sd([0.5, 0.7])
    assert m == pytest.approx(0.6) and s == pytest.approx(math.sqrt(0.02))
    m, s = mean_sd([0.4])
    assert m == pytest.approx(0.4) and math.isnan(s)
    m, s = mean_sd([0.2, math.nan, 0.4])  # a missing value is not skipped silently: no mean
    assert math.isnan(m) and math.isnan(s)
    assert all(math.isnan(v) for v in mean_sd([]))
    assert gap_closed(0.7, 0.6, 0.9) == pytest.approx(1 / 3)
    assert gap_closed(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert gap_closed(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)
    assert math.isnan(gap_closed(0.7, 0.6, 0.6)) and math.isnan(gap_closed(0.7, 0.8, 0.6))
    assert math.isnan(gap_closed(math.nan, 0.6, 0.9))
    assert dice_gain_points(0.734, 0.7) == pytest.approx(3.4)


def _row(run: str, seed: int, cls: str, dice: float, budget: str = "0.1", cost: float = 2.0, missed: int = 0,
         hallucinated: int = 0) -> dict:
    trainer = "nnUNetTrainer_MixSupBudget" if run in (LOWER, UPPER) else run
    return {"budget": "all" if run == UPPER else budget, "n_mask": 20 if run == UPPER else 2, "seed": seed,
            "run": run, "trainer": trainer, "class": cls, "dice": dice, "hd95": 10.0 * seed + 1.0, "nsd": dice,
            "cost": cost, "n_cases": 5, "n_missed": missed, "n_hallucinated": hallucinated}


def test_summarise_hand_values():
    rows = []
    for seed, (lo, mx, up) in enumerate([(0.5, 0.6, 0.9), (0.7, 0.8, 1.0)]):
        for cls, shift in (("a", 0.0), ("mean", -0.1)):
            rows += [_row(LOWER, seed, cls, lo + shift), _row("MixSupTrainer", seed, cls, mx + shift, cost=2.88),
                     _row(UPPER, seed, cls, up + shift, cost=20.0)]
    summary = summarise(rows)
    assert [(e["run"], e["class"]) for e in summary] == [
        (LOWER, "a"), (LOWER, "mean"), ("MixSupTrainer", "a"), ("MixSupTrainer", "mean"), (UPPER, "a"),
        (UPPER, "mean")]
    by = {(e["run"], e["class"]): e for e in summary}
    lo, mx, up = by[(LOWER, "a")], by[("MixSupTrainer", "a")], by[(UPPER, "a")]
    assert lo["dice_mean"] == pytest.approx(0.6) and lo["dice_sd"] == pytest.approx(math.sqrt(0.02))
    assert lo["n_seeds"] == 2 and lo["seeds"] == "0 1" and lo["budget"] == "0.1"
    assert mx["dice_mean"] == pytest.approx(0.7) and up["dice_mean"] == pytest.approx(0.95)
    assert lo["hd95_mean"] == pytest.approx(6.0) and lo["hd95_sd"] == pytest.approx(math.sqrt(50))
    # gain: per-seed differences 10 and 10 Dice points; gap: (0.7 - 0.6) / (0.95 - 0.6)
    assert mx["gain_mean"] == pytest.approx(10.0) and mx["gain_sd"] == pytest.approx(0.0)
    assert mx["gap_closed"] == pytest.approx(0.1 / 0.35)
    # the upper row reports the full-vs-mask-only gap as its gain: differences 40 and 30
    assert up["gain_mean"] == pytest.approx(35.0) and up["gain_sd"] == pytest.approx(math.sqrt(50))
    assert math.isnan(up["gap_closed"]) and math.isnan(lo["gain_mean"]) and math.isnan(lo["gap_closed"])
    assert mx["cost"] == pytest.approx(2.88) and up["cost"] == pytest.approx(20.0)
    assert by[("MixSupTrainer", "mean")]["gap_closed"] == pytest.approx(0.1 / 0.35)

    md = summary_markdown(summary, {"0.1": "2 mask of 20"})
    assert "## masks 0.1: 2 mask of 20" in md
    assert "0.600 ± 0.141" in md and "+10.0 ± 0.0" in md and "29 %" in md


def test_summarise_budgets_sorted_and_unpaired_seeds():
    rows = [_row(LOWER, 0, "mean", 0.5, budget="0.2"), _row(LOWER, 0, "mean", 0.4, budget="0.1"),
            _row("T", 0, "mean", 0.45, budget="0.1"), _row("T", 1, "mean", 0.55, budget="0.1"),
            _row(UPPER, 0, "mean", 0.8), _row(UPPER, 1, "mean", 0.9)]
    rows[0]["n_mask"] = 4
    summary = summarise(rows)
    assert [e["budget"] for e in summary if e["run"] == LOWER] == ["0.1", "0.2"]
    t = next(e for e in summary if e["run"] == "T")
    # seed 1 has no lower run: the gain and the gap use seed 0 only; the mean Dice uses both seeds
    assert t["dice_mean"] == pytest.approx(0.5) and t["gain_mean"] == pytest.approx(5.0)
    assert t["gap_closed"] == pytest.approx((0.45 - 0.4) / (0.8 - 0.4))
    up_02 = next(e for e in summary if e["run"] == UPPER and e["budget"] == "0.2")
    assert up_02["n_seeds"] == 1 and up_02["dice_mean"] == pytest.approx(0.8)


def test_summarise_carries_missed_and_hallucinated_counts():
    """Cases where a class is missed / hallucinated are summed over seeds into the summary, its table and plots."""
    rows = [_row(LOWER, 0, "a", 0.5, missed=2), _row(LOWER, 1, "a", 0.6, missed=1, hallucinated=1),
            _row(LOWER, 0, "mean", 0.5, missed=2), _row(LOWER, 1, "mean", 0.6, missed=1, hallucinated=3),
            _row("T", 0, "a", 0.7), _row("T", 0, "mean", 0.7)]
    summary = summarise(rows)
    by = {(e["run"], e["class"]): e for e in summary}
    assert (by[(LOWER, "a")]["n_missed"], by[(LOWER, "a")]["n_hallucinated"], by[(LOWER, "a")]["n_cases"]) == (3, 1, 10)
    assert (by[(LOWER, "mean")]["n_missed"], by[(LOWER, "mean")]["n_hallucinated"]) == (3, 3)
    assert (by[("T", "mean")]["n_missed"], by[("T", "mean")]["n_hallucinated"]) == (0, 0)
    assert {"n_cases", "n_missed", "n_hallucinated"} <= set(SUMMARY_COLUMNS)
    md = summary_markdown(summary)
    assert "missed / hallucinated" in md
    lower_line = next(line for line in md.splitlines() if line.startswith("| lower |"))
    assert "| 3 / 3 |" in lower_line
    assert "| 0 / 0 |" in next(line for line in md.splitlines() if line.startswith("| T |"))


def test_plots_mark_missed_and_hallucinated_cases(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    texts: list[str] = []
    original = Axes.annotate

    def recording(self, text, *args, **kwargs):
        texts.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", recording)
    rows = [_row(LOWER, 0, "mean", 0.5, missed=2, hallucinated=1), _row("T", 0, "mean", 0.7),
            _row(UPPER, 0, "mean", 0.9, cost=20.0, hallucinated=4)]
    paths = plot_summary(summarise(rows), tmp_path, DEFAULT_COSTS)
    assert [p.name for p in paths] == ["dice_vs_budget.png", "dice_vs_cost.png"]
    assert texts.count("2 missed, 1 halluc.") == 2  # the lower point in both plots
    assert texts.count("0 missed, 4 halluc.") == 2  # upper: its line / point
    assert not any(t.startswith("0 missed, 0 halluc.") for t in texts)  # nothing to mark for T


def _eval_summary(version):
    """An evaluation ``summary.json`` as write_results stores it (string keys)."""
    per_class = {"1": (0.8, 3.0, 0.9, 1, 0), "2": (0.4, 50.0, 0.3, 0, 2), "mean": (0.6, 26.5, 0.6, 1, 2)}
    summary = {k: {"dice": {"mean": d}, "hd95": {"mean": h}, "nsd": {"mean": n}, "n_cases": 3, "n_missed": mi,
                   "n_hallucinated": ha, "n_both_empty": 0} for k, (d, h, n, mi, ha) in per_class.items()}
    settings = {} if version is None else {"metrics_version": version}
    return {"summary": summary, "settings": settings}


def test_result_rows_carry_counts_and_refuse_old_metric_definitions():
    from nnunet_mixsup.evaluation import METRICS_VERSION
    from nnunet_mixsup.lab.benchmark import RESULT_COLUMNS, Run, result_rows

    dense = DenseDataset(Path("/nowhere"), 961, "Dataset961_Dense", [f"c{i}" for i in range(6)], ["t0", "t1", "t2"],
                         [1, 2], {1: "blob", 2: "dot"}, None, ".nii.gz")
    run = Run("m0.1_s0_lower", "0.1", 0, LOWER, "nnUNetTrainer_MixSupBudget", 700, "Dataset700_X", 1,
              {"mask": 2, "box": 0, "tags": 0, "none": 0}, 2)
    rows = result_rows(run, _eval_summary(METRICS_VERSION), dense, DEFAULT_COSTS)
    assert [(r["class"], r["hd95"], r["n_cases"], r["n_missed"], r["n_hallucinated"]) for r in rows] == \
        [("blob", 3.0, 3, 1, 0), ("dot", 50.0, 3, 0, 2), ("mean", 26.5, 3, 1, 2)]
    assert {"n_cases", "n_missed", "n_hallucinated"} <= set(RESULT_COLUMNS)
    # an evaluation written before HD95 became the max of the directed percentiles (no version)
    for old in (None, METRICS_VERSION - 1):
        with pytest.raises(BenchmarkError, match="m0.1_s0_lower.*older metric definitions"):
            result_rows(run, _eval_summary(old), dense, DEFAULT_COSTS)


def test_a_real_evaluation_through_the_benchmark_tables(tmp_path):
    """evaluate_folders -> summary.json -> results rows -> summary.csv / .md: a missed class is counted and penalised."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_mixsup.evaluation import evaluate_folders, write_results
    from nnunet_mixsup.lab.benchmark import RESULT_COLUMNS, Run, result_rows, write_csv
    from nnunet_mixsup.lab.benchmark.report import _summary_input

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for case, hit in (("t0", True), ("t1", False)):
        ref = np.zeros((1, 10, 20), np.uint8)
        ref[0, 2:6, 2:6] = 1
        ref[0, 2:6, 12:16] = 2
        pred = ref.copy()
        if not hit:
            pred[pred == 2] = 0  # class 2 missed
        for folder, arr in ((ref_dir, ref), (pred_dir, pred)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{case}.nii.gz"))
    write_results(evaluate_folders(ref_dir, pred_dir, [1, 2]), tmp_path / "ev")
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    dense = DenseDataset(tmp_path, 961, "Dataset961_Dense", ["c0", "c1"], ["t0", "t1"], [1, 2], {1: "a", 2: "b"},
                         None, ".nii.gz")
    run = Run("m1_s0_lower", "1", 0, LOWER, "nnUNetTrainer_MixSupBudget", 700, "Dataset700_X", 1,
              {"mask": 1, "box": 0, "tags": 0, "none": 0}, 1)
    rows = result_rows(run, summary, dense, DEFAULT_COSTS)
    diagonal = math.sqrt(1 + 10**2 + 20**2)
    b = next(r for r in rows if r["class"] == "b")
    assert (b["dice"], b["n_cases"], b["n_missed"], b["n_hallucinated"]) == (0.5, 2, 1, 0)
    assert b["hd95"] == pytest.approx(diagonal / 2)  # 0 on t0, the image diagonal on t1: both counted
    write_csv(tmp_path / "results.csv", RESULT_COLUMNS, rows)
    assert _csv(tmp_path / "results.csv")[1]["n_missed"] == "1"
    entries = summarise(_summary_input(rows))
    mean = next(e for e in entries if e["class"] == "mean")
    assert (mean["n_missed"], mean["n_hallucinated"], mean["n_cases"]) == (1, 0, 2)
    assert "| 1 / 0 |" in summary_markdown(entries)


def test_plans_signature():
    plans = {"configurations": {"2d": {"batch_size": 12, "patch_size": [56, 48]}},
             "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}, "dataset_name": "A"}
    other = json.loads(json.dumps(plans))
    other["dataset_name"] = "B"
    assert plans_signature(plans, "2d") == plans_signature(other, "2d")
    other["configurations"]["2d"]["batch_size"] = 4
    assert plans_signature(plans, "2d") != plans_signature(other, "2d")
    with pytest.raises(BenchmarkError, match="not in plans"):
        plans_signature(plans, "3d_fullres")


# ------------------------------------------------------------------------------------------------ presets and flags
def test_presets_and_overrides(tmp_path):
    c = _cfg()
    assert (c.preset, c.configuration, c.epochs, c.iterations) == ("cpu-mini", "2d", 80, 25)
    assert c.budgets == [0.1] and c.seeds == [0, 1, 2] and c.trainers == ["MixSupTrainer"]
    assert c.small_plans == {"max_features": 128, "base_features": 16, "batch_size": 12, "patch_size": None}
    assert c.plans_name == "nnUNetPlans_mixsupbench_small" and c.dataset is None
    assert (c.boxes_share, c.tags_share) == (0.45, 0.2)
    assert c.costs == {"mask": 1.0, "box": 0.1, "tags": 0.02, "none": 0.0}

    g = _cfg("--preset", "gpu", "-d", "27")
    assert (g.configuration, g.epochs, g.iterations, g.small_plans) == ("3d_fullres", 150, 250, None)
    assert g.budgets == [0.05, 0.1, 0.2] and g.plans_name == "nnUNetPlans_mixsupbench" and g.dataset == "27"

    o = _cfg("--epochs", "3", "--masks", "0.2", "3", "--seeds", "5", "--trainers", "MixSupTrainer_MeanTeacher",
             "--batch-size", "4", "--scenario", "boxes", "--tags-share", "0", "--cost-box", "0.3")
    assert (o.epochs, o.iterations, o.budgets, o.seeds) == (3, 25, [0.2, 3], [5])
    assert o.trainers == ["MixSupTrainer_MeanTeacher"] and o.small_plans["batch_size"] == 4
    assert o.small_plans["max_features"] == 128 and (o.boxes_share, o.tags_share) == (1.0, 0.0)
    assert o.costs["box"] == 0.3 and o.costs["mask"] == 1.0
    assert _cfg("--add-trainers", "MixSupTrainer_DMD").trainers == ["MixSupTrainer", "MixSupTrainer_DMD"]
    assert _cfg("--preset", "gpu", "--max-features", "32").small_plans == {
        "max_features": 32, "base_features": 8, "batch_size": None, "patch_size": None}
    assert _cfg("--stock-plans").small_plans is None

    with pytest.raises(BenchmarkError, match="> 1"):
        _cfg("--boxes-share", "0.7", "--tags-share", "0.5")
    with pytest.raises(BenchmarkError, match="baseline trainer"):
        _cfg("--trainers", "nnUNetTrainer_MixSupBudget")
    with pytest.raises(BenchmarkError, match="cannot be combined"):
        _cfg("--stock-plans", "--batch-size", "2")


def test_no_upper_skips_only_the_upper_bound_runs(tmp_path):
    dense = DenseDataset(tmp_path, 960, "Dataset960_x", [f"c{i}" for i in range(10)], ["t0"], [1], {1: "a"}, None,
                         ".nii.gz")
    counts = {"mask": 1, "box": 4, "tags": 2, "none": 3}
    sims = [SimDataset("0.1", 0.1, s, counts, 961 + s, f"Dataset{961 + s}_x_s{s}") for s in (0, 1)]
    sup = {s.id: counts for s in sims}
    full = _run_list(_cfg("--seeds", "0", "1"), sims, dense, sup)
    assert [r.run for r in full] == [LOWER, "MixSupTrainer", UPPER] * 2
    cfg = _cfg("--seeds", "0", "1", "--no-upper", "--add-trainers", "MixSupTrainer_StrongView")
    assert cfg.upper is False and _cfg().upper is True
    runs = _run_list(cfg, sims, dense, sup)
    assert [(r.run, r.seed) for r in runs] == [(LOWER, 0), ("MixSupTrainer", 0), ("MixSupTrainer_StrongView", 0),
                                               (LOWER, 1), ("MixSupTrainer", 1), ("MixSupTrainer_StrongView", 1)]


def test_mask_only_trainers_are_charged_their_masks_only(tmp_path):
    dense = DenseDataset(tmp_path, 960, "Dataset960_x", [f"c{i}" for i in range(10)], ["t0"], [1], {1: "a"}, None,
                         ".nii.gz")
    counts = {"mask": 1, "box": 4, "tags": 2, "none": 3}
    sims = [SimDataset("0.1", 0.1, 0, counts, 961, "Dataset961_x_s0")]
    runs = _run_list(_cfg("--seeds", "0", "--no-upper", "--trainers", "MixSupTrainer", "MixSupTrainer_MLDS",
                          "MixSupTrainer_MeanTeacher", "MixSupTrainer_MaskOnly2x"), sims, dense, {961: counts})
    by_run = {r.run: r.counts for r in runs}
    assert by_run["MixSupTrainer"] == by_run["MixSupTrainer_MeanTeacher"] == counts
    assert by_run["MixSupTrainer_MaskOnly2x"] == {"mask": 1, "box": 0, "tags": 0, "none": 0}
    assert by_run["MixSupTrainer_MLDS"] == by_run[LOWER] == {"mask": 1, "box": 0, "tags": 0, "none": 0}
    assert annotation_cost(by_run["MixSupTrainer_MLDS"]) == 1.0


def test_run_keys_of_different_mixes_do_not_collide(tmp_path):
    """Another --scenario in the same work directory must not overwrite the predictions of the default mix."""
    dense = DenseDataset(tmp_path, 960, "Dataset960_x", [f"c{i}" for i in range(10)], ["t0"], [1], {1: "a"}, None,
                         ".nii.gz")
    counts = {"mask": 1, "box": 9, "tags": 0, "none": 0}
    sims = [SimDataset("0.1", 0.1, 0, counts, 961, "Dataset961_x_s0")]
    sup = {961: counts}
    keys = {}
    for args in ([], ["--scenario", "mixed"], ["--scenario", "boxes"], ["--boxes-share", "0.5"]):
        keys[" ".join(args)] = [r.key for r in _run_list(_cfg("--seeds", "0", *args), sims, dense, sup)]
    assert keys[""] == keys["--scenario mixed"] == ["m0.1_s0_lower", "m0.1_s0_MixSupTrainer", "s0_upper"]
    assert keys["--scenario boxes"] == ["m0.1_b1t0_s0_lower", "m0.1_b1t0_s0_MixSupTrainer", "s0_upper"]
    assert keys["--boxes-share 0.5"][:2] == ["m0.1_b0.5t0.2_s0_lower", "m0.1_b0.5t0.2_s0_MixSupTrainer"]


# ------------------------------------------------------------------------------------------------ early checks
def test_unknown_or_budgetless_trainer_is_refused(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", trainers_path())
    found = check_trainers(["nnUNetTrainer_MixSupBudget", "MixSupTrainer", "MixSupTrainer_MeanTeacher"])
    assert set(found) == {"nnUNetTrainer_MixSupBudget", "MixSupTrainer", "MixSupTrainer_MeanTeacher"}
    with pytest.raises(BenchmarkError, match="unknown trainer.*MixSupTrainer_Nope"):
        check_trainers(["MixSupTrainer", "MixSupTrainer_Nope"])
    with pytest.raises(BenchmarkError, match="do not read nnUNet_mixsup_epochs"):
        check_trainers(["nnUNetTrainer"])


def test_dense_dataset_checks(tmp_path):
    folder = make_synthetic_dataset(tmp_path, 961, name="Dense", dim=2, counts={"mask": 4}, n_test=2)
    ds = check_dense_dataset(folder)
    assert (ds.id, len(ds.case_ids), ds.test_ids, ds.labels) == (961, 4, ["test_000", "test_001"], [1, 2])
    (folder / "labelsTs" / "test_001.nii.gz").unlink()
    with pytest.raises(BenchmarkError, match="do not match"):
        check_dense_dataset(folder)
    shutil.rmtree(folder / "labelsTs")
    shutil.rmtree(folder / "imagesTs")
    with pytest.raises(BenchmarkError, match="no test split"):
        check_dense_dataset(folder)
    (folder / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(BenchmarkError, match="without a label"):
        check_dense_dataset(folder)


def test_cli_fails_early_with_a_message(tmp_path, capsys):
    make_synthetic_dataset(tmp_path / "nnUNet_raw", 961, name="Dense", dim=2, counts={"mask": 4}, n_test=0)
    base = ["benchmark", "-d", "961", "--workdir", str(tmp_path), "--device", "cpu"]
    assert main(base) == 1
    assert "holds no test image" in capsys.readouterr().err
    assert main([*base, "--trainers", "NoSuchTrainer"]) == 1
    assert "unknown trainer" in capsys.readouterr().err
    make_synthetic_dataset(tmp_path / "nnUNet_raw", 962, name="Dense2", dim=2, counts={"mask": 4}, n_test=1)
    assert main([*base[:2], "962", *base[3:], "--masks", "0.1"]) == 1
    assert "at least one 'mask' case" in capsys.readouterr().err
    # nothing was simulated or trained
    assert not list((tmp_path / "nnUNet_raw").glob("Dataset8*")) and not list((tmp_path / "nnUNet_results").iterdir())


# ------------------------------------------------------------------------------------------------ end to end
def test_parallel_slots_split_the_cores_and_cap_torch_threads_on_the_cpu():
    from nnunet_mixsup.lab.benchmark.runner import parallel_slots

    slots = parallel_slots(2, "cpu", [5, 0, 1, 2, 3])
    assert [s.cpus for s in slots] == [(0, 1), (2, 3)]  # equal shares in core order, the odd core unused
    assert [s.env for s in slots] == [{"nnUNet_mixsup_torch_threads": "2"}] * 2 and slots[1].cpu_list == "2,3"
    assert parallel_slots(1, "cuda", [0, 1])[0].env == {}  # GPU runs: torch threads are nnU-Net's business
    with pytest.raises(BenchmarkError, match="only 2 core"):
        parallel_slots(3, "cpu", [0, 1])
    with pytest.raises(BenchmarkError, match="--parallel must be >= 1"):
        _cfg("--parallel", "0")
    assert _cfg().parallel == 1 and _cfg("--parallel", "2").parallel == 2


def test_session_run_in_a_slot_pins_the_command_and_records_the_same_shell_line(tmp_path):
    import os
    import sys

    from nnunet_mixsup.lab.benchmark.runner import Session, Slot

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("core pinning needs Linux")
    core = min(os.sched_getaffinity(0))
    session = Session(tmp_path, dict(os.environ), [])
    slot = Slot((core,), {"nnUNet_mixsup_torch_threads": "1"})
    code = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['nnUNet_mixsup_torch_threads'])"
    session.run([sys.executable, "-c", code], "probe", "probe", epochs=3, slot=slot)
    assert f"[{core}] 1" in (tmp_path / "logs" / "probe.log").read_text()
    line = (tmp_path / "commands.sh").read_text().splitlines()[-1]
    assert line.startswith(f"nnUNet_mixsup_torch_threads=1 taskset -c {core} ")


def test_parallel_runs_keep_the_run_order_and_start_nothing_after_a_failure(tmp_path, monkeypatch):
    import threading

    from nnunet_mixsup.lab.benchmark import runner

    started, active, most = [], [0], [0]
    lock = threading.Lock()

    def fake_do_run(run, label, session, cfg, dense, res, device, signature, slot=None):
        with lock:
            started.append(run.key)
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2 if run.key != "bad" else 0.05)
        with lock:
            active[0] -= 1
        if run.key == "bad":
            raise BenchmarkError("bad broke")
        return {"key": run.key, "cores": slot.cpus}

    monkeypatch.setattr(runner, "_do_run", fake_do_run)
    monkeypatch.setattr(runner, "parallel_slots", lambda n, device: [runner.Slot((i,), {}) for i in range(n)])
    session = runner.Session(tmp_path, {}, [])
    cfg = _cfg("--parallel", "2")
    runs = [runner.Run(f"r{i}", "0.1", 0, "x", "x", 1, "D", 0, {}, 1) for i in range(4)]
    out = runner._do_runs_parallel(runs, [r.key for r in runs], session, cfg, None, tmp_path, "cpu", "sig")
    assert [o["key"] for o in out] == ["r0", "r1", "r2", "r3"] and most[0] == 2  # two at a time, results in order
    assert {o["cores"] for o in out} == {(0,), (1,)}

    started.clear()
    runs = [runner.Run(k, "0.1", 0, "x", "x", 1, "D", 0, {}, 1) for k in ("bad", "r0", "r1", "r3", "r4")]
    with pytest.raises(BenchmarkError, match="bad broke"):
        runner._do_runs_parallel(runs, [r.key for r in runs], session, cfg, None, tmp_path, "cpu", "sig")
    assert sorted(started) == ["bad", "r0"]  # failed while r0 ran: r1, r3, r4 never started, r0 finished


def _two_cores_or_one() -> int:
    import os

    return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_and_resume(tmp_path, capsys):
    make_synthetic_dataset(tmp_path / "nnUNet_raw", 961, name="Dense", dim=2, counts={"mask": 6}, n_test=2, seed=3)
    argv = ["benchmark", "-d", "961", "--workdir", str(tmp_path), "--masks", "2", "--seeds", "0",
            "--trainers", "MixSupTrainer", "--epochs", "1", "--iterations", "2", "-c", "2d",
            "--max-features", "16", "--base-features", "4", "--batch-size", "2", "-np", "1", "--device", "cpu",
            "--id-base", "700", "--parallel", str(_two_cores_or_one())]
    t0 = time.time()
    assert main(argv) == 0, capsys.readouterr().err
    first = time.time() - t0
    out1 = capsys.readouterr().out
    res = tmp_path / "benchmark_results"
    for f in ("results.csv", "summary.csv", "summary.md", "dice_vs_budget.png", "dice_vs_cost.png", "commands.sh",
              "benchmark.json", "datasets.json"):
        assert (res / f).is_file(), f
    assert out1.count(": training ") == 3 and "[benchmark] 3/3" in out1

    rows = _csv(res / "results.csv")
    assert {(r["run"], r["class"]) for r in rows} == {(run, c) for run in ("lower", "MixSupTrainer", "upper")
                                                      for c in ("blob", "dot", "mean")}
    by_run = {r["run"]: r for r in rows if r["class"] == "mean"}
    assert (by_run["lower"]["n_mask"], by_run["lower"]["n_box"], by_run["lower"]["fold"]) == ("2", "0", "1")
    assert (by_run["MixSupTrainer"]["n_mask"], by_run["MixSupTrainer"]["n_box"]) == ("2", "2")
    assert by_run["upper"]["n_mask"] == "6" and by_run["upper"]["budget"] == "all"
    assert by_run["lower"]["dataset"] == by_run["MixSupTrainer"]["dataset"] == "700"
    assert by_run["upper"]["dataset"] == "961"
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert float(by_run["upper"]["cost"]) == 6.0 and float(by_run["lower"]["cost"]) == 2.0
    summary = _csv(res / "summary.csv")
    assert {s["run"] for s in summary} == {"lower", "MixSupTrainer", "upper"}
    assert json.loads((res / "datasets.json").read_text())["datasets"][0]["id"] == 700

    # one plans file for every run: the same configuration in each run's plans.json
    run_plans = sorted((tmp_path / "nnUNet_results").glob("*/*__nnUNetPlans_mixsupbench_small__2d/plans.json"))
    assert len(run_plans) == 3
    cfgs = [json.loads(p.read_text())["configurations"]["2d"] for p in run_plans]
    assert {c["batch_size"] for c in cfgs} == {2}
    assert len({json.dumps(c, sort_keys=True) for c in cfgs}) == 1

    commands = (res / "commands.sh").read_text()
    assert commands.count("nnUNetv2_train ") == 3 and commands.count("nnUNetv2_predict ") == 3
    assert "nnUNetv2_move_plans_between_datasets -s 700 -t 961" in commands
    assert commands.count(" plan_and_preprocess ") == 1 and "export nnUNet_mixsup_epochs=1" in commands

    # resume: nothing is trained, predicted or evaluated again
    t0 = time.time()
    assert main(argv) == 0
    second = time.time() - t0
    out2 = capsys.readouterr().out
    assert out2.count("already trained") == 3 and out2.count("prediction complete") == 3
    assert out2.count("evaluation current") == 3 and "simulating" not in out2 and "planning" not in out2
    assert (res / "commands.sh").read_text().count("nnUNetv2_train ") == 3
    assert second < first / 2, (first, second)
    assert _csv(res / "results.csv") == rows

    # other settings in the same work directory are refused (finished runs would not be comparable)
    assert main([*argv, "--epochs", "5"]) == 1
    assert "other settings" in capsys.readouterr().err

    # the weak-label audit on the trained runs: the 4 weak training cases, free and constrained, both runs
    assert main(["weak-label-audit", "--workdir", str(tmp_path)]) == 0, capsys.readouterr().err
    audit = _csv(res / "weak_label_audit.csv")
    assert {(r["run"], r["view"]) for r in audit} == {(run, v) for run in ("lower", "MixSupTrainer")
                                                      for v in ("free", "constrained")}
    assert len(audit) == 2 * 2 * 4
    for r in audit:
        assert all(v == "nan" or 0.0 <= float(v) <= 1.0 for k, v in r.items() if k.startswith("dice_"))
        assert 0.0 <= float(r["changed"]) <= 1.0
    assert "constraint gain" in (res / "weak_label_audit.md").read_text()
    stamps = sorted((res / "audit_predictions").glob("*/*/audit_done.json"))
    assert len(stamps) == 2
    before = [p.stat().st_mtime_ns for p in stamps]
    assert main(["weak-label-audit", "--workdir", str(tmp_path), "--trainers", "lower"]) == 0
    assert [p.stat().st_mtime_ns for p in stamps] == before  # predictions reused, not redone
    assert {r["run"] for r in _csv(res / "weak_label_audit.csv")} == {"lower"}



@pytest.mark.slow
def test_gpu_preset_path_end_to_end_on_a_tiny_3d_dataset(tmp_path, capsys, monkeypatch):
    """The gpu preset (the planner's own 3d_fullres plans, no small network) shrunk to 1 epoch x 2 iterations."""
    monkeypatch.setenv("nnUNet_mixsup_val_iterations", "2")
    make_synthetic_dataset(tmp_path / "nnUNet_raw", 962, name="Dense3d", dim=3, counts={"mask": 5}, n_test=1, seed=4)
    argv = ["benchmark", "--preset", "gpu", "-d", "962", "--workdir", str(tmp_path), "--masks", "2", "--seeds", "0",
            "--epochs", "1", "--iterations", "2", "-np", "1", "--device", "cpu", "--no-upper", "--id-base", "710"]
    assert main(argv) == 0, capsys.readouterr().err
    res = tmp_path / "benchmark_results"
    bj = json.loads((res / "benchmark.json").read_text())
    assert (bj["configuration"], bj["plans_name"], bj["small_plans"]) == ("3d_fullres", "nnUNetPlans_mixsupbench", None)
    rows = _csv(res / "results.csv")
    assert {r["run"] for r in rows} == {"lower", "MixSupTrainer"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    run_plans = sorted((tmp_path / "nnUNet_results").glob("*/*__nnUNetPlans_mixsupbench__3d_fullres/plans.json"))
    assert len(run_plans) == 2
    arch = json.loads(run_plans[0].read_text())["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"][0] == 32  # nnU-Net's own network, not the small plans
