"""Benchmark settings: presets, :class:`BenchmarkConfig`, the command-line flags and their checks.

Also the pure computations that follow from the settings alone: how a budget and a scenario split
the training cases into supervision types (:func:`split_counts`) and what a training set costs to
annotate (:func:`annotation_cost`). Nothing here touches the disk.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_mixsup.fileio import round_half_up
from nnunet_mixsup.lab.simulate import Amount, fraction_or_count, resolve_counts

RESULTS_DIR = "benchmark_results"
BASELINE_TRAINER = "nnUNetTrainer_MixSupBudget"
LOWER, UPPER = "lower", "upper"
PLANS_BASE = "nnUNetPlans_mixsupbench"
DEMO_ID, DEMO_TRAIN, DEMO_TEST = 990, 20, 10
SUP_TYPES = ("mask", "box", "tags", "none")
#: annotation cost per case and supervision type, in units of one full mask (see :mod:`nnunet_mixsup.lab.benchmark`)
DEFAULT_COSTS: dict[str, float] = {"mask": 1.0, "box": 0.1, "tags": 0.02, "none": 0.0}
#: named mixes: (share of the non-mask cases with boxes, with tags, description); the rest is unlabelled
SCENARIOS: dict[str, tuple[float, float, str]] = {
    "mixed": (0.45, 0.2, "45 % boxes, 20 % tags, 35 % unlabelled (of the non-mask cases)"),
    "boxes": (1.0, 0.0, "every non-mask case has boxes"),
    "tags": (0.0, 1.0, "every non-mask case has image tags"),
    "boxes-tags": (0.5, 0.5, "half boxes, half tags, nothing unlabelled"),
    "semi": (0.0, 0.0, "every non-mask case unlabelled (semi-supervised)"),
}


class BenchmarkError(RuntimeError):
    """A problem that stops the benchmark, with a message saying what to do."""


# ----------------------------------------------------------------------------------------------------------
# presets and the configuration
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
    "demo": Preset("2d", {"max_features": 128, "base_features": 16, "batch_size": 12, "patch_size": None},
                   80, 25, (0.1,), (0,), ("MixSupTrainer",), 2,
                   {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1", "nnUNet_mixsup_val_iterations": "5"}),
    # 200 epochs: at 80 nnU-Net learns none of the six small low-contrast classes (docs/inia19.md)
    "inia19-cpu": Preset("2d", {"max_features": 128, "base_features": 16, "batch_size": 12, "patch_size": None},
                         200, 25, (0.1,), (0, 1, 2), ("MixSupTrainer",), 2,
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
    parallel: int = 1

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
        nsd_tolerance_mm=args.nsd_tolerance_mm, env_defaults=dict(p.env_defaults), upper=not args.no_upper,
        parallel=args.parallel)
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
    if cfg.parallel < 1:
        problems.append(f"--parallel must be >= 1, got {cfg.parallel}")
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
# counts and cost
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


# ----------------------------------------------------------------------------------------------------------
# command-line flags
# ----------------------------------------------------------------------------------------------------------
def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (a number in [0, 1])") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a share must lie in [0, 1]")
    return v


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The flags of ``nnunet-mixsup benchmark`` (read by :func:`config_from_args`)."""
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
    s.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run N trainings at once, each pinned to its share of the cores (default 1: one after the "
                        "other). On a CPU machine one run per core is the fastest way through many runs; the runs "
                        "and their numbers are those of N=1")
    s.add_argument("--nsd-tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
