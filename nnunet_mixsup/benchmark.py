"""``nnunet-mixsup benchmark``: MixSup trainers against both baselines, over label budgets and seeds.

For every label budget (``--masks``: fraction or number of training cases that keep their mask)
and every seed, a mixed-supervision dataset is simulated from one dense nnU-Net raw dataset
(:func:`nnunet_mixsup.lab.simulate.simulate_dataset`; the seed is the simulation seed, cases are
nested across budgets). The remaining training cases are split between boxes, image tags and
unlabelled by ``--boxes-share`` / ``--tags-share`` (shares of the non-mask cases, the rest is
unlabelled) or a named ``--scenario``. Per (budget, seed) it then trains, with stock
``nnUNetv2_train`` and ``nnUNet_extTrainer`` pointing at this package's trainers:

- ``lower``: ``nnUNetTrainer_MixSupBudget`` (stock nnU-Net) on the mask cases only (fold 1 of the
  simulated dataset's ``splits_final.json``: train = the mask cases),
- every trainer of ``--trainers`` on all cases (fold 0: train = every case),
- ``upper``: ``nnUNetTrainer_MixSupBudget`` on the dense dataset, all cases fully masked (once per
  seed, shared by all budgets; fold = the seed, every fold trains on all cases),

then predicts the dense dataset's ``imagesTs`` with stock ``nnUNetv2_predict`` and scores the
predictions against its ``labelsTs`` (:func:`nnunet_mixsup.evaluation.evaluate_folders`).

Fair comparison (see ``shared/notes/methods.md``, "Baselines that matter"): every run uses ONE plans
file. It is planned once, with ``nnunet-mixsup plan_and_preprocess`` on the first simulated
dataset (for the ``cpu-mini`` preset followed by ``small-plans``: a small network), then copied
to every other simulated dataset and to the dense dataset with
``nnUNetv2_move_plans_between_datasets`` and preprocessed there with ``nnUNetv2_preprocess``
(all datasets share the dense dataset's images, so the planned dataset's fingerprint is copied
along: it documents the normalisation every run uses).
Planning each dataset on its own would give the mask-only baseline a different batch size (the
planner scales it with the dataset). Every run gets the same schedule through the environment
variables ``nnUNet_mixsup_epochs`` / ``nnUNet_mixsup_iterations``, which all MixSup trainers and
``nnUNetTrainer_MixSupBudget`` read; trainers that ignore them are refused. nnU-Net does not seed
its training, so for ``lower`` / MixSup runs the seed selects the simulated dataset, and for
``upper`` it is a repetition index.

Annotation cost of a training set (``dice_vs_cost.png``, the ``cost`` columns): the sum over its
cases of a cost per supervision type, in units of one full mask. Defaults: mask 1.0, box 0.1,
tags 0.02, unlabelled 0 (``--cost-mask``, ``--cost-box``, ``--cost-tags``). They are rough
orders of magnitude, not measurements: in 2D annotation studies a box costs about a tenth of a
polygon mask (extreme clicking, Papadopoulos et al., ICCV 2017) and image-level labels a few
percent to a tenth of full masks (Bearman et al., ECCV 2016); a 3D voxel mask is contoured slice
by slice, while a 3D box is six extreme points and a tag one click per class, so in 3D the
ratios are if anything smaller. Set your own from your annotators' times.

Outputs in ``<workdir>/benchmark_results/``:

- ``results.csv``: one row per run and class (plus the mean over classes): budget, seed, run
  (``lower`` / ``upper`` / trainer name), trainer class, class, Dice, HD95 (mm), NSD (metric
  definitions: :mod:`nnunet_mixsup.evaluation`), the test cases scored (``n_cases``) and those in
  which the class was missed / hallucinated (``n_missed`` / ``n_hallucinated``: Dice 0, NSD 0,
  HD95 the image diagonal; for the mean row summed over classes), the cases of the training set
  per supervision type, its cost, dataset id and fold.
- ``summary.csv`` / ``summary.md``: per budget, run and class the mean +- SD over seeds of Dice,
  HD95 and NSD, the missed / hallucinated counts summed over seeds, the Dice-point gain over
  ``lower`` (mean +- SD of the per-seed differences) and the share of the lower-upper gap closed,
  ``(mixsup - lower) / (upper - lower)`` on the seed means (NaN when upper is not above lower).
- ``dice_vs_budget.png``, ``dice_vs_cost.png``: mean Dice against mask cases / annotation cost;
  points whose runs missed or hallucinated a class somewhere are labelled with those counts.
- ``commands.sh``: every command run, in order, exactly as run (with the environment as
  ``export`` lines); in-process steps appear as comments. ``logs/``: their output.
- ``benchmark.json`` (settings that must not change within a work directory: dense dataset,
  configuration, plans, schedule), ``datasets.json`` (simulated dataset id -> budget, seed,
  counts; new ids are taken from ``--id-base`` upwards, skipping ids in use).

Resuming: run the same command again. Simulated datasets, planning, preprocessing (a marker per
dataset), finished trainings (``checkpoint_final.pth``; an interrupted one continues from
``checkpoint_latest.pth`` with ``--c``), complete predictions and evaluations are skipped.
Adding budgets, seeds or trainers later reuses everything already done.

All nnU-Net folders live under ``--workdir`` unless ``--use-env-dirs`` (then the environment's
``nnUNet_raw`` / ``_preprocessed`` / ``_results`` are used; the dense dataset is only read, its
preprocessed folder gets the shared plans under their own name). Without ``--use-env-dirs`` a
``-d`` found only in the environment's ``nnUNet_raw`` is linked (symlink) into the work directory.

Presets (explicit flags override them):

- ``cpu-mini``: the built-in demo dataset (``demo-data``, built when ``-d`` is not given), 2d, the
  demo's small plans (features 16..128, batch 12), 80 epochs x 25 iterations (5 validation
  batches), 10 % masks, seeds 0 1 2, ``MixSupTrainer``; 9 trainings, meant for a 2-core CPU.
- ``gpu``: nnU-Net's own plans (stock ``ExperimentPlanner``, stored as ``nnUNetPlans_mixsupbench``
  so a user's ``nnUNetPlans`` is never overwritten), 3d_fullres, 150 epochs x 250 iterations,
  masks 5 / 10 / 20 %, seeds 0 1 2, ``MixSupTrainer``.
- ``inia19-cpu``: ``cpu-mini``'s settings on the INIA19 weak-label benchmark (``demo-data --dataset
  inia19``, id 992, built when ``-d`` is not given; six small macaque brain structures, partial
  fields of view in training; ``docs/inia19.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_mixsup.fileio import atomic_write_csv, atomic_write_json, atomic_write_text, pid_alive, round_half_up
from nnunet_mixsup.lab.simulate import Amount, case_order, fraction_or_count, resolve_counts
from nnunet_mixsup.progress import run_logged

RESULTS_DIR = "benchmark_results"
BASELINE_TRAINER = "nnUNetTrainer_MixSupBudget"
LOWER, UPPER = "lower", "upper"
PLANS_BASE = "nnUNetPlans_mixsupbench"
DEMO_ID, DEMO_TRAIN, DEMO_TEST = 990, 20, 10
SUP_TYPES = ("mask", "box", "tags", "none")
#: annotation cost per case and supervision type, in units of one full mask (see module docstring)
DEFAULT_COSTS: dict[str, float] = {"mask": 1.0, "box": 0.1, "tags": 0.02, "none": 0.0}
#: named mixes: (share of the non-mask cases with boxes, with tags, description); the rest is unlabelled
SCENARIOS: dict[str, tuple[float, float, str]] = {
    "mixed": (0.45, 0.2, "45 % boxes, 20 % tags, 35 % unlabelled (of the non-mask cases)"),
    "boxes": (1.0, 0.0, "every non-mask case has boxes"),
    "tags": (0.0, 1.0, "every non-mask case has image tags"),
    "boxes-tags": (0.5, 0.5, "half boxes, half tags, nothing unlabelled"),
    "semi": (0.0, 0.0, "every non-mask case unlabelled (semi-supervised)"),
}
_FIXED_SETTINGS = ("dense", "configuration", "plans_name", "planner", "small_plans", "epochs", "iterations")


class BenchmarkError(RuntimeError):
    """A problem that stops the benchmark, with a message saying what to do."""


# ----------------------------------------------------------------------------------------------------------
# configuration: presets and command-line overrides
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Default values of one ``--preset``."""

    configuration: str
    small_plans: dict[str, Any] | None  # make_small_plans arguments, or None for the planner's own plans
    epochs: int
    iterations: int
    budgets: tuple[Amount, ...]
    seeds: tuple[int, ...]
    trainers: tuple[str, ...]
    num_processes: int
    env_defaults: dict[str, str] = field(default_factory=dict)
    #: the dense dataset built when ``-d`` is not given: its id and extra ``demo-data`` arguments
    demo_data: tuple[int, tuple[str, ...]] = (DEMO_ID, ())


PRESETS: dict[str, Preset] = {
    "cpu-mini": Preset("2d", {"max_features": 128, "base_features": 16, "batch_size": 12, "patch_size": None},
                       80, 25, (0.1,), (0, 1, 2), ("MixSupTrainer",), 2,
                       {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "nnUNet_mixsup_val_iterations": "5"}),
    "gpu": Preset("3d_fullres", None, 150, 250, (0.05, 0.1, 0.2), (0, 1, 2), ("MixSupTrainer",),
                  min(8, os.cpu_count() or 1)),
    "inia19-cpu": Preset("2d", {"max_features": 128, "base_features": 16, "batch_size": 12, "patch_size": None},
                         80, 25, (0.1,), (0, 1, 2), ("MixSupTrainer",), 2,
                         {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "nnUNet_mixsup_val_iterations": "5"},
                         demo_data=(992, ("--dataset", "inia19"))),
}
_SMALL_DEFAULTS = {"max_features": 64, "base_features": 8, "batch_size": None, "patch_size": None}


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run needs; built from a preset and explicit flags (:func:`config_from_args`)."""

    workdir: Path
    dataset: str | None = None
    preset: str = "cpu-mini"
    configuration: str = "2d"
    budgets: list[Amount] = field(default_factory=lambda: [0.1])
    scenario: str = "mixed"
    boxes_share: float = 0.45
    tags_share: float = 0.2
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    trainers: list[str] = field(default_factory=lambda: ["MixSupTrainer"])
    epochs: int = 80
    iterations: int = 25
    small_plans: dict[str, Any] | None = None
    planner: str = "ExperimentPlanner"
    id_base: int = 800
    costs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COSTS))
    use_env_dirs: bool = False
    device: str = "auto"
    num_processes: int = 2
    nsd_tolerance_mm: float = 2.0
    env_defaults: dict[str, str] = field(default_factory=dict)
    upper: bool = True

    @property
    def plans_name(self) -> str:
        """The one plans identifier every run uses (``-p``)."""
        return PLANS_BASE + ("_small" if self.small_plans is not None else "")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """Preset values, overridden by every flag given explicitly; validated (:class:`BenchmarkError`)."""
    p = PRESETS[args.preset]
    small: dict[str, Any] | None = dict(p.small_plans) if p.small_plans is not None else None
    small_flags = {k: getattr(args, k) for k in _SMALL_DEFAULTS if getattr(args, k) is not None}
    if args.stock_plans and small_flags:
        raise BenchmarkError("--stock-plans cannot be combined with --max-features / --base-features / "
                             "--batch-size / --patch-size")
    if args.stock_plans:
        small = None
    elif small_flags:
        small = {**_SMALL_DEFAULTS, **(small or {}), **small_flags}
    scenario = args.scenario or "mixed"
    boxes_share, tags_share, _ = SCENARIOS[scenario]
    if args.boxes_share is not None:
        boxes_share = args.boxes_share
    if args.tags_share is not None:
        tags_share = args.tags_share
    trainers = list(args.trainers) if args.trainers else list(p.trainers)
    for t in args.add_trainers or []:
        if t not in trainers:
            trainers.append(t)
    costs = dict(DEFAULT_COSTS)
    for k, a in (("mask", "cost_mask"), ("box", "cost_box"), ("tags", "cost_tags")):
        if getattr(args, a) is not None:
            costs[k] = float(getattr(args, a))
    cfg = BenchmarkConfig(
        workdir=Path(args.workdir), dataset=args.d, preset=args.preset,
        configuration=args.c or p.configuration,
        budgets=list(args.masks) if args.masks else list(p.budgets),
        scenario=scenario, boxes_share=float(boxes_share), tags_share=float(tags_share),
        seeds=list(args.seeds) if args.seeds is not None else list(p.seeds),
        trainers=trainers,
        epochs=args.epochs if args.epochs is not None else p.epochs,
        iterations=args.iterations if args.iterations is not None else p.iterations,
        small_plans=small, planner=args.planner, id_base=args.id_base, costs=costs,
        use_env_dirs=args.use_env_dirs, device=args.device,
        num_processes=args.np if args.np is not None else p.num_processes,
        nsd_tolerance_mm=args.nsd_tolerance_mm, env_defaults=dict(p.env_defaults), upper=not args.no_upper)
    validate_config(cfg)
    return cfg


def validate_config(cfg: BenchmarkConfig) -> None:
    """Checks that need no data: shares, seeds, schedule, costs, ids."""
    problems = []
    for name, v in (("--boxes-share", cfg.boxes_share), ("--tags-share", cfg.tags_share)):
        if not 0.0 <= v <= 1.0:
            problems.append(f"{name} must lie in [0, 1], got {v:g}")
    if cfg.boxes_share + cfg.tags_share > 1.0 + 1e-9:
        problems.append(f"--boxes-share + --tags-share = {cfg.boxes_share + cfg.tags_share:g} > 1")
    if not cfg.seeds:
        problems.append("no seeds given")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        problems.append(f"duplicate seeds in {cfg.seeds}")
    if any(not 0 <= s <= 999 for s in cfg.seeds):
        problems.append(f"seeds must lie in 0..999 (the upper bound of seed s trains fold s), got {cfg.seeds}")
    if not cfg.budgets:
        problems.append("no mask budget given (--masks)")
    if not cfg.trainers:
        problems.append("no trainer to compare (--trainers)")
    if len(set(cfg.trainers)) != len(cfg.trainers):
        problems.append(f"duplicate trainers in {cfg.trainers}")
    if BASELINE_TRAINER in cfg.trainers:
        problems.append(f"{BASELINE_TRAINER} is the baseline trainer (lower / upper), not a trainer to compare")
    if cfg.epochs < 1 or cfg.iterations < 1:
        problems.append(f"--epochs and --iterations must be >= 1, got {cfg.epochs} and {cfg.iterations}")
    if any(c < 0 or not math.isfinite(c) for c in cfg.costs.values()):
        problems.append(f"annotation costs must be finite and >= 0, got {cfg.costs}")
    if not 1 <= cfg.id_base <= 999:
        problems.append(f"--id-base must lie in 1..999, got {cfg.id_base}")
    if cfg.num_processes < 1:
        problems.append(f"-np must be >= 1, got {cfg.num_processes}")
    if cfg.small_plans is not None:
        for k in ("max_features", "base_features", "batch_size"):
            v = cfg.small_plans.get(k)
            if v is not None and v < 1:
                problems.append(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if problems:
        raise BenchmarkError("invalid benchmark settings:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------------------
# pure computations: counts, cost, summary statistics
# ----------------------------------------------------------------------------------------------------------
def budget_label(masks: Amount) -> str:
    """How a budget is written in tables and files: ``0.1`` (fraction) or ``3`` (cases)."""
    return format(float(masks), "g") if isinstance(masks, float) else str(int(masks))


def split_counts(n_cases: int, masks: Amount, boxes_share: float, tags_share: float) -> dict[str, int]:
    """Cases per supervision type for one budget.

    ``masks`` (fraction or count) gives the mask cases as in ``nnunet-mixsup simulate``; the other
    ``R = n_cases - n_mask`` cases are split cumulatively: ``n_box = round(R * boxes_share)``,
    ``n_box + n_tags = round(R * (boxes_share + tags_share))``, the rest unlabelled (round half
    up), so the counts always add up to ``n_cases``. Raises :class:`BenchmarkError` when the budget
    leaves no mask case or asks for more cases than there are.
    """
    try:
        n_mask = resolve_counts(n_cases, masks)["mask"]
    except (ValueError, TypeError) as e:
        raise BenchmarkError(f"mask budget {budget_label(masks)} of {n_cases} training cases: {e}") from None
    rest = n_cases - n_mask
    n_box = round_half_up(rest * boxes_share)
    n_box_tags = min(rest, round_half_up(rest * (boxes_share + tags_share)))
    return {"mask": n_mask, "box": n_box, "tags": n_box_tags - n_box, "none": rest - n_box_tags}


def annotation_cost(counts: dict[str, int], costs: dict[str, float] | None = None) -> float:
    """Cost of a training set: ``sum(counts[t] * costs[t])`` (unlabelled costs 0 unless given)."""
    costs = DEFAULT_COSTS if costs is None else costs
    return float(sum(n * float(costs.get(t, 0.0)) for t, n in counts.items()))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof 1); NaN where undefined (no value, or one for the SD).

    A NaN or ``None`` among the values makes both NaN: a missing value is never skipped, which
    would silently average over fewer seeds than ``n_seeds`` says.
    """
    v = [math.nan if x is None else float(x) for x in values]
    if not v or any(math.isnan(x) for x in v):
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def gap_closed(mixsup: float, lower: float, upper: float) -> float:
    """Share of the lower-upper gap a method closes: ``(mixsup - lower) / (upper - lower)``.

    1 = as good as full supervision, 0 = no better than the mask-only baseline, negative = worse.
    NaN when an input is NaN or ``upper <= lower`` (no gap to close).
    """
    if any(math.isnan(x) for x in (mixsup, lower, upper)) or upper - lower <= 0:
        return math.nan
    return (mixsup - lower) / (upper - lower)


def dice_gain_points(mixsup: float, lower: float) -> float:
    """Dice gain over the mask-only baseline in Dice points (``100 * (mixsup - lower)``)."""
    return 100.0 * (mixsup - lower)


def _num(v: Any) -> float:
    if v is None or v == "":
        return math.nan
    return float(v)


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Summary rows from result rows (see :func:`result_rows`), per budget, run and class.

    Statistics are over seeds. For each budget the ``upper`` row uses the upper-bound runs of the
    seeds that budget has. ``n_cases`` / ``n_missed`` / ``n_hallucinated`` are summed over the
    seeds (test cases scored, and those where the class was missed / hallucinated). ``gain_mean`` /
    ``gain_sd``: Dice points over ``lower``, from the per-seed differences (seeds with both runs);
    ``gap_closed`` from the seed means of the seeds that have lower, the run and upper (MixSup runs
    only). A metric that is NaN for one of the seeds makes its mean NaN (see :func:`mean_sd`).
    """
    budgets: dict[str, int] = {}
    runs: list[str] = []
    classes: list[str] = []
    by_key: dict[tuple, dict] = {}
    for r in rows:
        if r["budget"] != "all":
            budgets.setdefault(r["budget"], int(r["n_mask"]))
        if r["run"] not in runs:
            runs.append(r["run"])
        if r["class"] not in classes:
            classes.append(r["class"])
        budget = "all" if r["run"] == UPPER else r["budget"]
        by_key[(budget, r["run"], int(r["seed"]), r["class"])] = r
    if "mean" in classes:
        classes = [c for c in classes if c != "mean"] + ["mean"]
    order = [LOWER] * (LOWER in runs) + [x for x in runs if x not in (LOWER, UPPER)] + [UPPER] * (UPPER in runs)
    out: list[dict] = []
    for b in sorted(budgets, key=lambda k: (budgets[k], k)):
        seeds = sorted({s for (bb, _run, s, _c) in by_key if bb == b})
        for run in order:
            for cls in classes:
                got = {rn: {s: by_key.get(("all" if rn == UPPER else b, rn, s, cls)) for s in seeds}
                       for rn in {run, LOWER, UPPER}}
                have = [s for s in seeds if got[run][s] is not None]
                if not have:
                    continue
                sel = [got[run][s] for s in have]
                entry: dict[str, Any] = {"budget": b, "n_mask": budgets[b], "run": run,
                                         "trainer": sel[0]["trainer"], "class": cls, "n_seeds": len(have),
                                         "seeds": " ".join(str(s) for s in have)}
                for m in ("dice", "hd95", "nsd"):
                    entry[f"{m}_mean"], entry[f"{m}_sd"] = mean_sd([_num(x[m]) for x in sel])
                for k in ("n_cases", "n_missed", "n_hallucinated"):
                    entry[k] = sum(int(x[k]) for x in sel)
                entry["cost"] = mean_sd([_num(x["cost"]) for x in sel])[0]
                entry["gain_mean"] = entry["gain_sd"] = entry["gap_closed"] = math.nan
                if run != LOWER:
                    paired = [s for s in have if got[LOWER][s] is not None]
                    entry["gain_mean"], entry["gain_sd"] = mean_sd(
                        [dice_gain_points(_num(got[run][s]["dice"]), _num(got[LOWER][s]["dice"])) for s in paired])
                if run not in (LOWER, UPPER):
                    common = [s for s in have if got[LOWER][s] is not None and got[UPPER][s] is not None]
                    if common:
                        means = [mean_sd([_num(got[rn][s]["dice"]) for s in common])[0] for rn in (run, LOWER, UPPER)]
                        entry["gap_closed"] = gap_closed(*means)
                out.append(entry)
    return out


SUMMARY_COLUMNS = ("budget", "n_mask", "run", "trainer", "class", "n_seeds", "seeds", "dice_mean", "dice_sd",
                   "hd95_mean", "hd95_sd", "nsd_mean", "nsd_sd", "n_cases", "n_missed", "n_hallucinated", "cost",
                   "gain_mean", "gain_sd", "gap_closed")
RESULT_COLUMNS = ("budget", "seed", "run", "trainer", "class", "label", "dice", "hd95", "nsd", "n_cases", "n_missed",
                  "n_hallucinated", "n_mask", "n_box", "n_tags", "n_none", "cost", "dataset", "fold")


def _pm(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def summary_markdown(summary: Sequence[dict], headings: dict[str, str] | None = None, notes: str = "") -> str:
    """The summary as Markdown: one table per budget, Dice per class and the means, gain and gap closed."""
    headings = headings or {}
    lines = ["# Benchmark summary", ""]
    if notes:
        lines += [notes, ""]
    lines += [("Values: mean ± SD over seeds. Gain: mean Dice points over `lower` (per-seed differences). "
               "Gap closed: (run − lower) / (upper − lower) on the seed means of the mean Dice. "
               "Missed / hallucinated: test cases in which a class was predicted absent although present / "
               "predicted although absent, summed over classes and seeds; they score Dice 0, NSD 0 and "
               "HD95 the image diagonal (HD95: the larger of the two directed 95th percentiles)."), ""]
    for b in dict.fromkeys(e["budget"] for e in summary):
        ent = [e for e in summary if e["budget"] == b]
        classes = [c for c in dict.fromkeys(e["class"] for e in ent) if c != "mean"]
        lines += [f"## masks {b}" + (f": {headings[b]}" if b in headings else ""), ""]
        head = ["run", "trainer", "seeds", "cost"] + [f"Dice {c}" for c in classes] + \
               ["mean Dice", "mean HD95 (mm)", "mean NSD", "missed / hallucinated", "gain (Dice pts)", "gap closed"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for run in dict.fromkeys(e["run"] for e in ent):
            by_c = {e["class"]: e for e in ent if e["run"] == run}
            mean = by_c.get("mean")
            first = next(iter(by_c.values()))
            cells = [run, f"`{first['trainer']}`", str(first["n_seeds"]), f"{first['cost']:.2f}"]
            cells += [_pm(by_c[c]["dice_mean"], by_c[c]["dice_sd"]) if c in by_c else "–" for c in classes]
            if mean is None:
                cells += ["–"] * 6
            else:
                gain = "–" if math.isnan(mean["gain_mean"]) else \
                    f"{mean['gain_mean']:+.1f}" + ("" if math.isnan(mean["gain_sd"]) else f" ± {mean['gain_sd']:.1f}")
                gap = "–" if math.isnan(mean["gap_closed"]) else f"{100 * mean['gap_closed']:.0f} %"
                cells += [_pm(mean["dice_mean"], mean["dice_sd"]), _pm(mean["hd95_mean"], mean["hd95_sd"], 2),
                          _pm(mean["nsd_mean"], mean["nsd_sd"]), f"{mean['n_missed']} / {mean['n_hallucinated']}",
                          gain, gap]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """CSV with the given columns (NaN as ``nan``), written atomically."""
    atomic_write_csv(path, [list(columns), *([r.get(c, "") for c in columns] for r in rows)])


def _mark_misses(ax: Any, entry: dict, x: float, y: float, colour: str) -> None:
    """Label a plotted point with its missed / hallucinated case counts, if any."""
    if entry["n_missed"] or entry["n_hallucinated"]:
        ax.annotate(f"{entry['n_missed']} missed, {entry['n_hallucinated']} halluc.", (x, y),
                    textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)


def plot_summary(summary: Sequence[dict], out_dir: Path, costs: dict[str, float]) -> list[Path]:
    """``dice_vs_budget.png`` and ``dice_vs_cost.png`` from the mean-over-classes summary rows.

    A point whose runs missed or hallucinated a class in some test cases is labelled
    ``"<n> missed, <m> halluc."`` (summed over classes and seeds, see :func:`summarise`).
    """
    try:
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[benchmark] matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
        return []
    mean = [e for e in summary if e["class"] == "mean"]
    runs = list(dict.fromkeys(e["run"] for e in mean))
    budgets = sorted({(e["n_mask"], e["budget"]) for e in mean})
    colours = {LOWER: "#888888", UPPER: "#3366cc"}
    palette = ["#22aa77", "#dd7722", "#aa3377", "#66aacc", "#bbbb33", "#993322"]
    paths = []
    for kind in ("budget", "cost"):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        k = 0
        for run in runs:
            ent = sorted((e for e in mean if e["run"] == run), key=lambda e: e["n_mask"])
            col = colours.get(run)
            if col is None:
                col = palette[k % len(palette)]
                k += 1
            y = [e["dice_mean"] for e in ent]
            err = [0.0 if math.isnan(e["dice_sd"]) else e["dice_sd"] for e in ent]
            if kind == "budget" and run == UPPER:
                m, s = y[0], err[0]
                ax.axhline(m, color=col, ls="--", label=f"{UPPER} (all cases masked)")
                if s:
                    ax.axhspan(m - s, m + s, color=col, alpha=0.12)
                _mark_misses(ax, ent[0], max(n for n, _ in budgets), m, col)
                continue
            if run == UPPER:
                x, y, err, ent = [ent[0]["cost"]], y[:1], err[:1], ent[:1]
            else:
                x = [e["n_mask"] if kind == "budget" else e["cost"] for e in ent]
            for e, xi, yi in zip(ent, x, y):
                _mark_misses(ax, e, xi, yi, col)
            ax.errorbar(x, y, yerr=err, color=col, marker="*" if run == UPPER else "o", capsize=3,
                        label={LOWER: "lower (mask cases only)", UPPER: "upper (all cases masked)"}.get(
                            run, f"{run} (masks + weak labels)"))
        if kind == "budget":
            ax.set_xticks([n for n, _ in budgets], [f"{n}\n({b})" for n, b in budgets])
            ax.set_xlabel("mask cases in the training set (budget)")
        else:
            ax.set_xlabel(f"annotation cost per training set (mask {costs['mask']:g}, box {costs['box']:g}, "
                          f"tags {costs['tags']:g}, unlabelled {costs.get('none', 0.0):g})")
        ax.set_ylabel("mean Dice on the test split (± SD over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"dice_vs_{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _mixsup_cli() -> list[str]:
    return [sys.executable, "-m", "nnunet_mixsup.cli"]


def _fmt_time(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"cannot read {path}: {e}") from None


def plans_signature(plans: dict, configuration: str) -> str:
    """sha256 of one configuration of a plans file plus its normalisation statistics.

    Equal signatures = same network, patch, batch, spacing and normalisation: what "same plans"
    must guarantee for the runs to be comparable.
    """
    if configuration not in plans.get("configurations", {}):
        raise BenchmarkError(f"configuration {configuration!r} is not in plans {plans.get('plans_name')!r} "
                             f"(available: {sorted(plans.get('configurations', {}))})")
    payload = {"configuration": plans["configurations"][configuration],
               "intensities": plans.get("foreground_intensity_properties_per_channel"),
               "transpose": [plans.get("transpose_forward"), plans.get("transpose_backward")]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the benchmark (nnU-Net reads them lazily)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One benchmark per work directory at a time (a stale lock of a dead process is taken over)."""
    if path.is_file():
        try:
            pid = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and pid_alive(pid):
            raise BenchmarkError(f"another benchmark (pid {pid}) is running in {path.parent}; wait for it or "
                                 f"remove {path} if that process is not a benchmark")
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _find_dataset(root: Path | None, ident: str) -> Path | None:
    """``root/DatasetXXX_*`` for an id, a full name or the part after ``DatasetXXX_``."""
    if root is None or not root.is_dir():
        return None
    if ident.isdigit():
        hits = sorted(root.glob(f"Dataset{int(ident):03d}_*"))
    elif re.match(r"^Dataset\d{3}_", ident):
        hits = [root / ident] if (root / ident).is_dir() else []
    else:
        hits = sorted(root.glob(f"Dataset[0-9][0-9][0-9]_{ident}"))
    hits = [h for h in hits if h.is_dir()]
    return hits[0] if len(hits) == 1 else None


def _used_ids(roots: Sequence[Path]) -> dict[int, str]:
    used: dict[int, str] = {}
    for root in roots:
        if root.is_dir():
            for p in root.iterdir():
                m = re.match(r"^Dataset(\d{3})_", p.name)
                if m and p.is_dir():
                    used.setdefault(int(m.group(1)), p.name)
    return used


# ----------------------------------------------------------------------------------------------------------
# the dense dataset and the trainers: checked before anything runs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DenseDataset:
    """The fully labelled source dataset and its test split."""

    folder: Path
    id: int
    name: str
    case_ids: list[str]
    test_ids: list[str]
    labels: list[int]
    label_names: dict[int, str]
    ignore_label: int | None
    file_ending: str


def check_dense_dataset(folder: Path) -> DenseDataset:
    """Every training case labelled, an ``imagesTs`` / ``labelsTs`` test split with matching cases."""
    from nnunet_mixsup.evaluation import EvaluationError, labels_from_dataset_json
    from nnunet_mixsup.manifest import ManifestError, read_raw_dataset

    try:
        ds = read_raw_dataset(folder)
    except ManifestError as e:
        raise BenchmarkError(f"dense dataset {folder.name}: {e}") from None
    try:
        labels, ignore, names = labels_from_dataset_json(ds.dataset_json)
    except EvaluationError as e:
        raise BenchmarkError(f"dense dataset {folder.name}: {e}") from None
    problems = []
    if not ds.case_ids:
        problems.append(f"no training images in {folder / 'imagesTr'}")
    unlabelled = [c for c in ds.case_ids if not ds.label_file(c).is_file()]
    if unlabelled:
        problems.append(f"{len(unlabelled)} training case(s) without a label in labelsTr (e.g. {unlabelled[0]!r}); "
                        f"the benchmark needs a fully labelled dataset")
    fe = ds.file_ending
    ts, lts = folder / "imagesTs", folder / "labelsTs"
    test_ids: list[str] = []
    if not ts.is_dir() or not lts.is_dir():
        problems.append(f"no test split: the benchmark predicts {ts} and scores against {lts}, and "
                        f"{'neither exists' if not ts.is_dir() and not lts.is_dir() else 'one is missing'}; "
                        f"move some labelled cases there (images as CASE_0000{fe}, labels as CASE{fe})")
    else:
        suffix = f"_0000{fe}"
        test_ids = sorted(f.name[: -len(suffix)] for f in ts.iterdir() if f.name.endswith(suffix))
        refs = sorted(f.name[: -len(fe)] for f in lts.iterdir() if f.name.endswith(fe))
        if not test_ids:
            problems.append(f"{ts} holds no test image (*{suffix})")
        if set(test_ids) != set(refs):
            no_ref = sorted(set(test_ids) - set(refs))
            no_img = sorted(set(refs) - set(test_ids))
            problems.append(f"imagesTs and labelsTs do not match: {len(no_ref)} image(s) without a label "
                            f"{no_ref[:3]}, {len(no_img)} label(s) without an image {no_img[:3]}")
    if problems:
        raise BenchmarkError(f"dense dataset {folder}:\n  - " + "\n  - ".join(problems))
    return DenseDataset(folder, int(folder.name[7:10]), folder.name, ds.case_ids, test_ids, labels, names,
                        ignore, fe)


def check_trainers(names: Sequence[str]) -> dict[str, type]:
    """Find every trainer class as ``nnUNetv2_train`` will (nnunetv2, then ``nnUNet_extTrainer``).

    Raises :class:`BenchmarkError` for unknown names and for trainers that ignore the budget
    variables (they would train with another schedule than the baselines).
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_mixsup.lab import experiment_trainers
    from nnunet_mixsup.trainers import PUBLIC_TRAINERS, MixSupTrainerBase, nnUNetTrainer_MixSupBudget

    found: dict[str, type] = {}
    unknown = []
    for n in names:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                found[n] = recursive_find_trainer_class_by_name(n)
            except (RuntimeError, AssertionError):
                unknown.append(n)
    known = sorted({*PUBLIC_TRAINERS, *(k for k, v in vars(experiment_trainers).items()
                                         if isinstance(v, type) and issubclass(v, MixSupTrainerBase))})
    if unknown:
        raise BenchmarkError(f"unknown trainer(s) {unknown}: no such class in nnunetv2.training.nnUNetTrainer nor "
                             f"in nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer', '')}. "
                             f"MixSup trainers: {', '.join(known)}")
    ignoring = [n for n, c in found.items()
                if not issubclass(c, (MixSupTrainerBase, nnUNetTrainer_MixSupBudget))]
    if ignoring:
        raise BenchmarkError(f"trainer(s) {ignoring} do not read nnUNet_mixsup_epochs / nnUNet_mixsup_iterations, so "
                             f"they would train with another budget than the baselines; use a MixSup trainer "
                             f"(e.g. {', '.join(known[:4])}) or {BASELINE_TRAINER}")
    return found


# ----------------------------------------------------------------------------------------------------------
# commands, logs, progress
# ----------------------------------------------------------------------------------------------------------
class Session:
    """Runs and records commands: ``commands.sh`` (exact commands), ``logs/``, progress lines."""

    def __init__(self, out: Path, env: dict[str, str], exported: Sequence[str], description: str = ""):
        self.out = out
        self.env = env
        self.exported = list(exported)
        self.description = description
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands = out / "commands.sh"
        self.t0 = time.time()
        self._header_written = False

    def elapsed(self) -> str:
        return _fmt_time(time.time() - self.t0)

    def say(self, text: str) -> None:
        print(f"[benchmark] {text} ({self.elapsed()})", flush=True)

    def record(self, text: str) -> None:
        """Append a line to commands.sh (after this invocation's header)."""
        new = not self.commands.is_file()
        with open(self.commands, "a", encoding="utf-8") as f:
            if new:
                f.write("#!/usr/bin/env bash\n# Every command run by `nnunet-mixsup benchmark`, in order, appended by "
                        "each invocation.\n# Lines starting with '#' are notes on in-process steps.\nset -e\n")
            if not self._header_written:
                self._header_written = True
                f.write(f"\n# ---- nnunet-mixsup benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                if self.description:
                    f.write("# " + self.description.replace("\n", "\n# ") + "\n")
                f.writelines(f"export {k}={shlex.quote(self.env[k])}\n" for k in self.exported)
            f.write(text + "\n")

    def note(self, text: str) -> None:
        """An in-process step, as a comment in commands.sh."""
        self.record("# " + text.replace("\n", "\n# "))

    def run(self, cmd: Sequence[str], log_name: str, what: str, epochs: int | None = None) -> None:
        """Run ``cmd`` (appended to commands.sh first), output to ``logs/<log_name>.log``.

        ``epochs``: for an ``nnUNetv2_train`` command, its epoch count - shows an epoch progress bar.
        """
        cmd = [str(c) for c in cmd]
        line = shlex.join(cmd)
        self.record(line)
        log = self.logs / f"{log_name}.log"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n+ {line}\n")
        t = time.time()
        code = run_logged(cmd, self.env, log, desc=what if epochs else None, total_epochs=epochs)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"+ exit {code} after {time.time() - t:.1f} s\n")
        if code != 0:
            try:
                tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            except OSError:
                tail = ""
            raise BenchmarkError(f"{what} failed (exit {code}):\n  {line}\nlog: {log}\n--- last lines ---\n"
                                 f"{tail}")


# ----------------------------------------------------------------------------------------------------------
# datasets: simulation, one plans file, preprocessing, splits
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SimDataset:
    """One simulated mixed-supervision dataset: a (budget, seed) pair."""

    budget: str
    masks: Amount
    seed: int
    counts: dict[str, int]
    id: int = 0
    name: str = ""


def _sim_name(dense: DenseDataset, counts: dict[str, int], seed: int) -> str:
    base = dense.name[len("DatasetXXX_"):]
    return f"{base}_bench_m{counts['mask']}b{counts['box']}t{counts['tags']}u{counts['none']}_s{seed}"


def simulation_plan(cfg: BenchmarkConfig, dense: DenseDataset) -> list[SimDataset]:
    """The simulated datasets for every (budget, seed), in order; budgets giving the same counts are refused."""
    n = len(dense.case_ids)
    per_budget: dict[str, dict[str, int]] = {}
    seen: dict[int, str] = {}
    for b in cfg.budgets:
        label = budget_label(b)
        counts = split_counts(n, b, cfg.boxes_share, cfg.tags_share)
        if counts["mask"] in seen:
            raise BenchmarkError(f"mask budgets {seen[counts['mask']]} and {label} both give {counts['mask']} mask "
                                 f"case(s) of {n}; give distinct budgets (or counts)")
        seen[counts["mask"]] = label
        per_budget[label] = counts
    return [SimDataset(budget_label(b), b, s, per_budget[budget_label(b)]) for b in cfg.budgets for s in cfg.seeds]


def assign_ids(sims: list[SimDataset], record_path: Path, dense: DenseDataset, id_base: int,
               roots: Sequence[Path]) -> None:
    """Give each simulated dataset its id: recorded ones keep theirs, new ones the next free id >= ``id_base``."""
    rec = _read_json(record_path) if record_path.is_file() else {"version": 1, "dense": dense.name, "datasets": []}
    if rec.get("dense") != dense.name:
        raise BenchmarkError(f"{record_path} belongs to dense dataset {rec.get('dense')!r}, not {dense.name!r}; "
                             f"use another --workdir")
    known = {(d["seed"], tuple(d["counts"][t] for t in SUP_TYPES)): d for d in rec["datasets"]}
    used = _used_ids(roots)
    taken = {d["id"] for d in rec["datasets"]} | set(used) | {dense.id}
    changed = False
    for sim in sims:
        key = (sim.seed, tuple(sim.counts[t] for t in SUP_TYPES))
        if key in known:
            sim.id, sim.name = known[key]["id"], known[key]["name"]
            continue
        cand = id_base
        while cand in taken:
            cand += 1
        if cand > 999:
            raise BenchmarkError(f"no free dataset id from --id-base {id_base} to 999; choose a lower --id-base")
        sim.id, sim.name = cand, f"Dataset{cand:03d}_{_sim_name(dense, sim.counts, sim.seed)}"
        taken.add(cand)
        entry = {"id": sim.id, "name": sim.name, "seed": sim.seed, "budget": sim.budget, "counts": sim.counts}
        rec["datasets"].append(entry)
        known[key] = entry
        changed = True
    for sim in sims:
        other = used.get(sim.id)
        if other is not None and other != sim.name:
            raise BenchmarkError(f"dataset id {sim.id} (recorded in {record_path} for {sim.name}) is now used by "
                                 f"{other}; remove that dataset or use another --workdir")
    if changed or not record_path.is_file():
        atomic_write_json(record_path, rec)


def _check_simulated(folder: Path, sim: SimDataset, dense: DenseDataset) -> None:
    from nnunet_mixsup.lab.simulate import SIMULATION_RECORD

    rec = _read_json(folder / SIMULATION_RECORD)
    if rec.get("source", {}).get("name") != dense.name or rec.get("counts") != sim.counts or \
            rec.get("arguments", {}).get("seed") != sim.seed:
        raise BenchmarkError(f"{folder} exists but was not simulated from {dense.name} with seed {sim.seed} and "
                             f"counts {sim.counts} (see its {SIMULATION_RECORD}); remove it or use another --workdir")


def _supervision_counts(raw_folder: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """Cases per supervision type as written (a box case without foreground is a tags case), mask ids, all ids."""
    cases = _read_json(raw_folder / "supervision.json")["cases"]
    counts = {t: 0 for t in SUP_TYPES}
    for e in cases.values():
        counts[e["type"]] += 1
    return counts, sorted(c for c, e in cases.items() if e["type"] == "mask"), sorted(cases)


def _write_splits(path: Path, splits: list[dict], session: Session, protect: bool) -> None:
    """Write ``splits_final.json`` if it differs; with ``protect`` refuse to replace one not written here."""
    record = path.parent / ".mixsup_benchmark_splits.json"
    if path.is_file():
        current = path.read_bytes()
        if json.loads(current) == splits:
            return
        if protect:
            ours = _read_json(record).get("sha256") if record.is_file() else None
            if ours != hashlib.sha256(current).hexdigest():
                raise BenchmarkError(f"{path} exists and was not written by the benchmark; the upper bound needs "
                                     f"its own folds (train = every case). Move the file aside, or run without "
                                     f"--use-env-dirs so that the benchmark has its own nnU-Net folders")
    atomic_write_json(path, splits)
    if protect:
        atomic_write_json(record, {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    session.note(f"wrote {path} ({len(splits)} fold(s))")


def _dense_splits(dense: DenseDataset, n_folds: int) -> list[dict]:
    """Fold s trains on every case (the upper bound of seed s); a few seeded cases validate (logging only)."""
    n_val = max(1, min(5, len(dense.case_ids) // 5))
    return [{"train": sorted(dense.case_ids), "val": sorted(case_order(dense.case_ids, f)[:n_val])}
            for f in range(n_folds)]


# ----------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training + prediction + evaluation."""

    key: str
    budget: str
    seed: int
    run: str
    trainer: str
    dataset_id: int
    dataset_name: str
    fold: int
    counts: dict[str, int]
    n_mask_budget: int


def _mix_tag(cfg: BenchmarkConfig) -> str:
    """Part of a run key naming the mix of the non-mask cases: empty for the default mix, else ``_b<share>t<share>``.

    Runs of different mixes share a work directory (the upper bound is trained once for all of
    them), so their prediction, evaluation and log names must differ; the default mix keeps the
    short names of earlier work directories, which therefore still resume.
    """
    default_boxes, default_tags, _ = SCENARIOS["mixed"]
    if (cfg.boxes_share, cfg.tags_share) == (default_boxes, default_tags):
        return ""
    return f"_b{cfg.boxes_share:g}t{cfg.tags_share:g}"


def _run_list(cfg: BenchmarkConfig, sims: list[SimDataset], dense: DenseDataset,
              sup_counts: dict[int, dict[str, int]], classes: dict[str, type] | None = None) -> list[Run]:
    """Every run of the benchmark in order. ``classes``: trainer name -> class (default: this package's
    trainers); a trainer whose ``trains_on_weak_cases`` is False is charged its mask cases only."""
    if classes is None:
        import nnunet_mixsup.trainers as public
        from nnunet_mixsup.lab import experiment_trainers
        classes = {t: getattr(public, t, None) or getattr(experiment_trainers, t, None) for t in cfg.trainers}
    runs: list[Run] = []
    for seed in cfg.seeds:
        for sim in (s for s in sims if s.seed == seed):
            c = sup_counts[sim.id]
            tag = f"m{sim.budget}{_mix_tag(cfg)}_s{seed}"
            runs.append(Run(f"{tag}_lower", sim.budget, seed, LOWER, BASELINE_TRAINER, sim.id, sim.name, 1,
                            {"mask": c["mask"], "box": 0, "tags": 0, "none": 0}, sim.counts["mask"]))
            for t in cfg.trainers:
                used = dict(c) if getattr(classes.get(t), "trains_on_weak_cases", True) else \
                    {"mask": c["mask"], "box": 0, "tags": 0, "none": 0}
                runs.append(Run(f"{tag}_{t}", sim.budget, seed, t, t, sim.id, sim.name, 0, used, sim.counts["mask"]))
        if not cfg.upper:
            continue
        runs.append(Run(f"s{seed}_upper", "all", seed, UPPER, BASELINE_TRAINER, dense.id, dense.name, seed,
                        {"mask": len(dense.case_ids), "box": 0, "tags": 0, "none": 0}, len(dense.case_ids)))
    return runs


def result_rows(run: Run, summary: dict, dense: DenseDataset, costs: dict[str, float]) -> list[dict]:
    """results.csv rows of one run from an evaluation ``summary.json`` (per class and the mean).

    Refuses an evaluation made with other metric definitions than the current
    :data:`nnunet_mixsup.evaluation.METRICS_VERSION` (e.g. pooled HD95 with NaN for missed classes):
    its numbers are not comparable with the others.
    """
    from nnunet_mixsup.evaluation import METRICS_VERSION

    version = summary.get("settings", {}).get("metrics_version")
    if version != METRICS_VERSION:
        raise BenchmarkError(f"the evaluation of {run.key} was made with older metric definitions (metrics_version "
                             f"{version}, now {METRICS_VERSION}: HD95 was one percentile of both directions pooled "
                             "and NaN for a missed class); evaluate it again")
    base = {"budget": run.budget, "seed": run.seed, "run": run.run, "trainer": run.trainer,
            "n_mask": run.counts["mask"], "n_box": run.counts["box"], "n_tags": run.counts["tags"],
            "n_none": run.counts["none"], "cost": annotation_cost(run.counts, costs), "dataset": run.dataset_id,
            "fold": run.fold}
    if run.run != UPPER:
        base["n_mask_budget"] = run.n_mask_budget
    rows = []
    for lab in [*dense.labels, "mean"]:
        s = summary["summary"][str(lab)]
        rows.append({**base, "class": dense.label_names[lab] if lab != "mean" else "mean", "label": lab,
                     **{m: _num(s[m]["mean"]) for m in ("dice", "hd95", "nsd")},
                     **{k: int(s[k]) for k in ("n_cases", "n_missed", "n_hallucinated")}})
    return rows


def _summary_input(rows: list[dict]) -> list[dict]:
    """Rows for :func:`summarise`: ``n_mask`` of lower / MixSup rows is the budget's mask cases."""
    return [{**r, "n_mask": r.get("n_mask_budget", r["n_mask"])} for r in rows]


# ----------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------
def run_benchmark(cfg: BenchmarkConfig) -> Path:
    """Run (or resume) the benchmark; returns the results folder. See the module docstring."""
    from nnunet_mixsup.cli import trainers_path
    from nnunet_mixsup.lab.experiment_trainers import experiments_trainers_path

    validate_config(cfg)
    workdir = cfg.workdir.resolve()
    out = workdir / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    outside_raw = os.environ.get("nnUNet_raw")
    if cfg.use_env_dirs:
        missing = [k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(k)]
        if missing:
            raise BenchmarkError(f"--use-env-dirs needs {', '.join(missing)} in the environment")
        dirs = {k: Path(os.environ[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    else:
        dirs = {k: workdir / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    updates = {k: str(v) for k, v in dirs.items()}
    updates["nnUNet_extTrainer"] = os.pathsep.join((trainers_path(), experiments_trainers_path()))
    updates["nnUNet_mixsup_epochs"] = str(cfg.epochs)
    updates["nnUNet_mixsup_iterations"] = str(cfg.iterations)
    exported = list(updates)
    for k, v in {**cfg.env_defaults, "nnUNet_mixsup_no_plot": "1"}.items():
        if k not in os.environ:
            updates[k] = v
            exported.append(k)
    with _environ(updates), _lock(out / ".lock"):
        desc = (f"preset {cfg.preset}: masks {' '.join(budget_label(b) for b in cfg.budgets)}, seeds "
                f"{' '.join(map(str, cfg.seeds))}, trainers {' '.join(cfg.trainers)}, {cfg.configuration}, "
                f"{cfg.epochs} x {cfg.iterations}, scenario {cfg.scenario} ({cfg.boxes_share:g} / {cfg.tags_share:g})")
        session = Session(out, dict(os.environ), exported, desc)
        return _run(cfg, session, dirs, Path(outside_raw) if outside_raw else None)


def _run(cfg: BenchmarkConfig, session: Session, dirs: dict[str, Path], outside_raw: Path | None) -> Path:
    out = session.out
    raw, pp, res = dirs["nnUNet_raw"], dirs["nnUNet_preprocessed"], dirs["nnUNet_results"]
    ms = _mixsup_cli()
    np_ = str(cfg.num_processes)

    # ---- checks before anything runs: trainers, dense dataset, budgets, settings
    classes = check_trainers([BASELINE_TRAINER, *cfg.trainers])
    dense_folder = _dense_folder(cfg, session, raw, outside_raw)
    dense = check_dense_dataset(dense_folder)
    session.say(f"dense dataset {dense.name}: {len(dense.case_ids)} training / {len(dense.test_ids)} test cases")
    sims = simulation_plan(cfg, dense)
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"dense": dense.name, "configuration": cfg.configuration, "plans_name": cfg.plans_name,
                "planner": cfg.planner, "small_plans": cfg.small_plans, "epochs": cfg.epochs,
                "iterations": cfg.iterations}
    bj_path = out / "benchmark.json"
    bj = _read_json(bj_path) if bj_path.is_file() else {"version": 1, **settings}
    diff = [f"{k}: {bj.get(k)!r} there, {settings[k]!r} now" for k in _FIXED_SETTINGS if bj.get(k) != settings[k]]
    if diff:
        raise BenchmarkError(f"this work directory was set up with other settings ({bj_path}):\n  - " +
                             "\n  - ".join(diff) + "\nfinished runs would not be comparable; use another --workdir")
    atomic_write_json(bj_path, bj)
    assign_ids(sims, out / "datasets.json", dense, cfg.id_base, list(dirs.values()))

    # ---- simulate
    for sim in sims:
        folder = raw / sim.name
        if folder.is_dir():
            _check_simulated(folder, sim, dense)
            continue
        c = sim.counts
        session.say(f"simulating {sim.name} (masks {sim.budget}, seed {sim.seed}: {c['mask']} mask, {c['box']} box, "
                    f"{c['tags']} tags, {c['none']} unlabelled)")
        session.run(ms + ["simulate", "-d", dense.id, "--new-id", sim.id, "--name", sim.name[len("DatasetXXX_"):],
                          "--masks", c["mask"], "--boxes", c["box"], "--tags", c["tags"], "--seed", sim.seed],
                    f"simulate_{sim.id}", f"simulating {sim.name}")

    # ---- plan once, on the first simulated dataset
    if "plans_source" not in bj:
        bj["plans_source"] = {"id": sims[0].id, "name": sims[0].name}
        atomic_write_json(bj_path, bj)
    src_id, src_name = bj["plans_source"]["id"], bj["plans_source"]["name"]
    if not (raw / src_name).is_dir():
        raise BenchmarkError(f"the plans were made on {src_name} ({bj_path}), which is gone from {raw}; "
                             f"use another --workdir")
    plans_name, config = cfg.plans_name, cfg.configuration
    marker_name = f".mixsup_benchmark_{plans_name}_{config}.done"
    src_marker = pp / src_name / marker_name
    if not src_marker.is_file():
        session.say(f"planning and preprocessing once, on {src_name}")
        session.run(ms + ["plan_and_preprocess", "-d", src_id, "-c", config, "-np", np_, "-pl", cfg.planner,
                          "-overwrite_plans_name", PLANS_BASE], f"plan_{src_id}", "planning")
        planned = _read_json(pp / src_name / f"{PLANS_BASE}.json")
        if config not in planned.get("configurations", {}):
            raise BenchmarkError(f"the planner made no {config!r} configuration for {src_name} (it made "
                                 f"{sorted(planned.get('configurations', {}))}); choose one of those with -c")
        if cfg.small_plans is not None:
            sp = cfg.small_plans
            cmd = ms + ["small-plans", "-d", src_id, "-c", config, "--source-plans", PLANS_BASE,
                        "--target-plans", plans_name, "--max-features", sp["max_features"],
                        "--base-features", sp["base_features"]]
            if sp.get("batch_size") is not None:
                cmd += ["--batch-size", sp["batch_size"]]
            if sp.get("patch_size"):
                cmd += ["--patch-size", *sp["patch_size"]]
            session.run(cmd, f"plan_{src_id}", "deriving the small plans")
        sig = plans_signature(_read_json(pp / src_name / f"{plans_name}.json"), config)
        atomic_write_json(src_marker, {"plans_signature": sig})
        bj["plans_signature"] = sig
        atomic_write_json(bj_path, bj)
    shared = _read_json(pp / src_name / f"{plans_name}.json")
    signature = plans_signature(shared, config)
    if bj.get("plans_signature") != signature:
        raise BenchmarkError(f"{pp / src_name / (plans_name + '.json')} changed after the benchmark planned it "
                             f"(its {config} configuration differs); runs would not share one plans file. Restore "
                             f"it or use another --workdir")
    cm = shared["configurations"][config]
    session.say(f"shared plans {plans_name} ({config}): patch {cm['patch_size']}, batch {cm['batch_size']}, "
                f"features {cm['architecture']['arch_kwargs']['features_per_stage']}")

    # ---- the same plans for every other dataset
    targets = [(s.id, s.name, True) for s in sims if s.id != src_id] + [(dense.id, dense.name, False)]
    for did, dname, simulated in dict.fromkeys(targets):
        marker = pp / dname / marker_name
        if marker.is_file() and _read_json(marker).get("plans_signature") == signature:
            continue
        session.say(f"preprocessing {dname} with the shared plans")
        if simulated:
            session.run(ms + ["prepare", "-d", did], f"preprocess_{did}", f"preparing {dname}")
        (pp / dname).mkdir(parents=True, exist_ok=True)
        copies = [(raw / dname / "dataset.json", pp / dname / "dataset.json")]
        # nnUNetv2_train copies dataset_fingerprint.json into its output; every dataset here has the same
        # images (hard links) and the shared plans carry the source's normalisation, so the source's
        # fingerprint documents what every run used (and saves reading all images once per dataset)
        if not (pp / dname / "dataset_fingerprint.json").is_file():
            copies.append((pp / src_name / "dataset_fingerprint.json", pp / dname / "dataset_fingerprint.json"))
        for a, b in copies:
            session.record(shlex.join(["cp", str(a), str(b)]))
            shutil.copyfile(a, b)
        session.run([_bin("nnUNetv2_move_plans_between_datasets"), "-s", src_id, "-t", did, "-sp", plans_name,
                     "-tp", plans_name], f"preprocess_{did}", f"moving the plans to {dname}")
        if plans_signature(_read_json(pp / dname / f"{plans_name}.json"), config) != signature:
            raise BenchmarkError(f"the plans moved to {dname} differ from those of {src_name}")
        session.run([_bin("nnUNetv2_preprocess"), "-d", did, "-plans_name", plans_name, "-c", config, "-np", np_],
                    f"preprocess_{did}", f"preprocessing {dname}")
        atomic_write_json(marker, {"plans_signature": signature})

    # ---- splits: fold 0 = every case (MixSup), fold 1 = mask cases (lower); dense: fold s = every case
    sup_counts: dict[int, dict[str, int]] = {}
    for sim in sims:
        counts, mask_ids, all_ids = _supervision_counts(raw / sim.name)
        sup_counts[sim.id] = counts
        _write_splits(pp / sim.name / "splits_final.json",
                      [{"train": all_ids, "val": mask_ids}, {"train": mask_ids, "val": mask_ids}], session,
                      protect=False)
    dense_splits = pp / dense.name / "splits_final.json"
    n_folds = max(cfg.seeds) + 1
    if dense_splits.is_file():
        n_folds = max(n_folds, len(_read_json(dense_splits)))
    _write_splits(dense_splits, _dense_splits(dense, n_folds), session, protect=True)

    # ---- train, predict, evaluate
    runs = _run_list(cfg, sims, dense, sup_counts, classes)
    rows: list[dict] = []
    for i, run in enumerate(runs, 1):
        label = f"{i}/{len(runs)} {run.run} (masks {run.budget}, seed {run.seed})" if run.run != UPPER else \
            f"{i}/{len(runs)} upper (all cases masked, seed {run.seed})"
        summary = _do_run(run, label, session, cfg, dense, res, device, signature)
        rows += result_rows(run, summary, dense, cfg.costs)

    # ---- tables and plots
    write_csv(out / "results.csv", RESULT_COLUMNS, rows)
    summary_rows = summarise(_summary_input(rows))
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary_rows)
    n = len(dense.case_ids)
    headings = {s.budget: f"{s.counts['mask']} mask, {s.counts['box']} box, {s.counts['tags']} tags, "
                          f"{s.counts['none']} unlabelled of {n} training cases" for s in sims}
    notes = (f"Dense dataset `{dense.name}` ({n} training, {len(dense.test_ids)} test cases), configuration "
             f"`{config}`, plans `{plans_name}` (patch {cm['patch_size']}, batch {cm['batch_size']}) for every run, "
             f"{cfg.epochs} epochs x {cfg.iterations} iterations, scenario `{cfg.scenario}` (boxes share "
             f"{cfg.boxes_share:g}, tags share {cfg.tags_share:g} of the non-mask cases). Annotation cost per case: "
             f"mask {cfg.costs['mask']:g}, box {cfg.costs['box']:g}, tags {cfg.costs['tags']:g}, unlabelled "
             f"{cfg.costs['none']:g}. `lower`: {BASELINE_TRAINER} on the mask cases only; `upper`: "
             f"{BASELINE_TRAINER} on all cases fully masked.")
    atomic_write_text(out / "summary.md", summary_markdown(summary_rows, headings, notes))
    plot_summary(summary_rows, out, cfg.costs)
    print(summary_markdown(summary_rows, headings), flush=True)
    session.say(f"done: {len(runs)} runs; results in {out}")
    return out


def _dense_folder(cfg: BenchmarkConfig, session: Session, raw: Path, outside_raw: Path | None) -> Path:
    """The dense dataset's folder in the benchmark's nnUNet_raw (built, for the demo; or linked in)."""
    ms = _mixsup_cli()
    if cfg.dataset is None:
        demo_id, demo_args = PRESETS[cfg.preset].demo_data if cfg.preset in PRESETS else (DEMO_ID, ())
        found = _find_dataset(raw, str(demo_id))
        if found is None:
            session.say(f"building the demo dataset (id {demo_id}, {DEMO_TRAIN} training / {DEMO_TEST} test cases)")
            session.run(ms + ["demo-data", *demo_args, "-d", demo_id, "--train", DEMO_TRAIN, "--test", DEMO_TEST,
                              "--seed", 0], "demo_data", "building the demo dataset")
            found = _find_dataset(raw, str(demo_id))
        if found is None:
            raise BenchmarkError(f"the demo dataset {demo_id} was not written to {raw}")
        return found
    ident = str(cfg.dataset)
    found = _find_dataset(raw, ident)
    if found is not None:
        return found
    if not cfg.use_env_dirs and outside_raw is not None and outside_raw.resolve() != raw.resolve():
        src = _find_dataset(outside_raw, ident)
        if src is not None:
            dst = raw / src.name
            session.record(shlex.join(["ln", "-s", str(src.resolve()), str(dst)]))
            os.symlink(src.resolve(), dst, target_is_directory=True)
            session.say(f"linked {src} into {raw}")
            return dst
    where = f"{raw}" + (f" nor in nnUNet_raw={outside_raw}" if outside_raw and not cfg.use_env_dirs else "")
    raise BenchmarkError(f"dense dataset {ident!r} not found in {where}")


def _do_run(run: Run, label: str, session: Session, cfg: BenchmarkConfig, dense: DenseDataset, res: Path,
            device: str, signature: str) -> dict:
    """Train (unless checkpoint_final.pth exists), predict (unless complete), evaluate (unless current)."""
    from nnunet_mixsup.evaluation import METRICS_VERSION, evaluate_folders, write_results

    plans_name, config = cfg.plans_name, cfg.configuration
    base = res / run.dataset_name / f"{run.trainer}__{plans_name}__{config}"
    fold_dir = base / f"fold_{run.fold}"
    ckpt = fold_dir / "checkpoint_final.pth"
    if ckpt.is_file():
        session.say(f"{label}: already trained, skipping ({ckpt})")
    else:
        resume = (fold_dir / "checkpoint_latest.pth").is_file()
        session.say(f"{label}: training {run.trainer} on {run.dataset_name} fold {run.fold}"
                    + (" (continuing from checkpoint_latest.pth)" if resume else ""))
        cmd = [_bin("nnUNetv2_train"), run.dataset_id, config, run.fold, "-tr", run.trainer, "-p", plans_name,
               "-device", device] + (["--c"] if resume else [])
        session.run(cmd, f"train_{run.key}", f"training {run.key}", epochs=cfg.epochs)
        if not ckpt.is_file():
            raise BenchmarkError(f"training {run.key} ended without {ckpt}; see {session.logs}/train_{run.key}.log")
    run_plans = base / "plans.json"
    if run_plans.is_file() and plans_signature(_read_json(run_plans), config) != signature:
        raise BenchmarkError(f"{run_plans} differs from the shared plans: {run.key} was trained with other plans; "
                             f"remove {base} to retrain it")

    preds = session.out / "predictions"
    pred, tmp = preds / run.key, preds / f".{run.key}.tmp"
    done = pred / "prediction_done.json"
    if done.is_file() and done.stat().st_mtime >= ckpt.stat().st_mtime and \
            _read_json(done).get("checkpoint") == str(ckpt):  # made with this very checkpoint
        session.say(f"{label}: prediction complete, skipping")
    else:
        session.say(f"{label}: predicting {len(dense.test_ids)} test cases")
        shutil.rmtree(tmp, ignore_errors=True)
        # on a CPU, nnU-Net's sequential mode (-npp 0 -nps 0) saves two worker processes per prediction
        workers = 0 if device == "cpu" else min(3, cfg.num_processes)
        cmd = [_bin("nnUNetv2_predict"), "-i", dense.folder / "imagesTs", "-o", tmp, "-d", run.dataset_id,
               "-c", config, "-tr", run.trainer, "-p", plans_name, "-f", run.fold, "-chk", "checkpoint_final.pth",
               "-npp", workers, "-nps", workers, "-device", device, "--disable_progress_bar"]
        session.run(cmd, f"predict_{run.key}", f"predicting with {run.key}")
        missing = [c for c in dense.test_ids if not (tmp / f"{c}{dense.file_ending}").is_file()]
        if missing:
            raise BenchmarkError(f"nnUNetv2_predict wrote no prediction for {missing[:3]} ({len(missing)} missing)")
        atomic_write_json(tmp / "prediction_done.json", {"checkpoint": str(ckpt), "cases": len(dense.test_ids)})
        shutil.rmtree(pred, ignore_errors=True)
        os.replace(tmp, pred)

    ev = session.out / "evaluations" / run.key
    summary_json = ev / "summary.json"
    if summary_json.is_file() and summary_json.stat().st_mtime >= done.stat().st_mtime and \
            _read_json(summary_json).get("settings", {}).get("metrics_version") == METRICS_VERSION:
        session.say(f"{label}: evaluation current, skipping")
    else:
        session.note(f"in-process: {shlex.join(_mixsup_cli())} evaluate {shlex.quote(str(dense.folder / 'labelsTs'))} "
                     f"{shlex.quote(str(pred))} -d {dense.id} -o {shlex.quote(str(ev))} "
                     f"--tolerance-mm {cfg.nsd_tolerance_mm:g}")
        result = evaluate_folders(dense.folder / "labelsTs", pred, dense.labels, file_ending=dense.file_ending,
                                  ignore_label=dense.ignore_label, num_workers=min(cfg.num_processes, 4),
                                  nsd_tolerance_mm=cfg.nsd_tolerance_mm)
        write_results(result, ev)
        s = result["summary"]["mean"]
        session.say(f"{label}: mean Dice {s['dice']['mean']:.3f}, HD95 {s['hd95']['mean']:.2f} mm, "
                    f"NSD {s['nsd']['mean']:.3f}")
    return _read_json(summary_json)


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def _cmd_benchmark(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_benchmark(cfg)
    return 0


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (a number in [0, 1])") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a share must lie in [0, 1]")
    return v


def register_cli(subparsers: Any) -> None:
    """Add the ``benchmark`` sub-command."""
    s = subparsers.add_parser(
        "benchmark", help="MixSup trainers vs the mask-only and fully supervised baselines, over budgets and seeds",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-d", default=None, help="dense (fully labelled) raw dataset id or name with imagesTs/labelsTs "
                                            f"(default: the demo dataset {DEMO_ID}, built if missing)")
    s.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mini",
                   help="default values (default cpu-mini); every flag below overrides its preset value")
    s.add_argument("-c", default=None, help="configuration (cpu-mini: 2d, gpu: 3d_fullres)")
    s.add_argument("--masks", nargs="+", type=fraction_or_count, default=None,
                   help="mask budgets: fractions (0.1) or numbers of cases (3) (cpu-mini: 0.1; gpu: 0.05 0.1 0.2)")
    s.add_argument("--scenario", choices=sorted(SCENARIOS), default=None,
                   help="named mix of the non-mask cases: " + "; ".join(f"{k}: {v[2]}" for k, v in SCENARIOS.items())
                        .replace("%", "%%") + " (default mixed)")
    s.add_argument("--boxes-share", type=_share, default=None,
                   help="share of the non-mask cases with boxes (overrides --scenario; mixed: 0.45)")
    s.add_argument("--tags-share", type=_share, default=None,
                   help="share of the non-mask cases with image tags (overrides --scenario; mixed: 0.2); the rest "
                        "is unlabelled")
    s.add_argument("--seeds", nargs="+", type=int, default=None, help="simulation seeds / repetitions (0 1 2)")
    s.add_argument("--trainers", nargs="+", default=None,
                   help="trainers to compare, each on all cases (replaces the preset's MixSupTrainer)")
    s.add_argument("--add-trainers", nargs="+", default=None,
                   help="trainers to compare in addition to the preset's (e.g. MixSupTrainer_MeanTeacher)")
    s.add_argument("--epochs", type=int, default=None, help="epochs of every run (cpu-mini 80, gpu 150)")
    s.add_argument("--iterations", type=int, default=None,
                   help="training iterations per epoch of every run (cpu-mini 25, gpu 250)")
    s.add_argument("--workdir", type=Path, default=Path("benchmark_work"),
                   help="folder for the nnU-Net folders and benchmark_results/ (default ./benchmark_work)")
    s.add_argument("--use-env-dirs", action="store_true",
                   help="use the environment's nnUNet_raw / _preprocessed / _results instead of folders in --workdir")
    s.add_argument("--id-base", type=int, default=800,
                   help="first dataset id for the simulated datasets (default 800; ids in use are skipped)")
    s.add_argument("--cost-mask", type=float, default=None, help="annotation cost of a mask case (default 1.0)")
    s.add_argument("--cost-box", type=float, default=None,
                   help="annotation cost of a box case (default 0.1: a box is about a tenth of a mask)")
    s.add_argument("--cost-tags", type=float, default=None,
                   help="annotation cost of an image-tag case (default 0.02: a click per class); unlabelled: 0")
    s.add_argument("--max-features", type=int, default=None, help="small plans: max features (cpu-mini 128)")
    s.add_argument("--base-features", type=int, default=None, help="small plans: first-stage features (cpu-mini 16)")
    s.add_argument("--batch-size", type=int, default=None, help="small plans: batch size (cpu-mini 12)")
    s.add_argument("--patch-size", type=int, nargs="+", default=None, help="small plans: patch size")
    s.add_argument("--stock-plans", action="store_true",
                   help="use the planner's own plans, no small network (the gpu preset's default)")
    s.add_argument("--planner", default="ExperimentPlanner", help="nnU-Net experiment planner class")
    s.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="device for training and prediction (auto: cuda if available)")
    s.add_argument("-np", type=int, default=None, help="processes for preprocessing (cpu-mini 2, gpu up to 8)")
    s.add_argument("--no-upper", action="store_true",
                   help="skip the upper-bound runs (all cases masked), e.g. for an ablation whose upper bound is "
                        "already known; the summary then has no gap closed")
    s.add_argument("--nsd-tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    s.set_defaults(func=_cmd_benchmark)
