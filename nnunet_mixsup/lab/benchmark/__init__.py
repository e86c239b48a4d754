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
- ``demo``: ``cpu-mini`` with one seed (0): what ``nnunet-mixsup demo`` runs (3 trainings).
- ``gpu``: nnU-Net's own plans (stock ``ExperimentPlanner``, stored as ``nnUNetPlans_mixsupbench``
  so a user's ``nnUNetPlans`` is never overwritten), 3d_fullres, 150 epochs x 250 iterations,
  masks 5 / 10 / 20 %, seeds 0 1 2, ``MixSupTrainer``.
- ``inia19-cpu``: ``cpu-mini``'s settings with 200 epochs x 25 iterations on the INIA19 weak-label
  benchmark (``demo-data --dataset inia19``, id 992, built when ``-d`` is not given; six small
  macaque brain structures, partial fields of view in training; ``docs/inia19.md``): at 80 epochs
  nnU-Net learns none of its classes.
"""
from __future__ import annotations

import argparse
from typing import Any

from nnunet_mixsup.lab.benchmark.config import (
    BASELINE_TRAINER,
    DEFAULT_COSTS,
    DEMO_ID,
    LOWER,
    PRESETS,
    RESULTS_DIR,
    SCENARIOS,
    UPPER,
    BenchmarkConfig,
    BenchmarkError,
    Preset,
    add_arguments,
    annotation_cost,
    budget_label,
    config_from_args,
    split_counts,
    validate_config,
)
from nnunet_mixsup.lab.benchmark.report import (
    RESULT_COLUMNS,
    SUMMARY_COLUMNS,
    dice_gain_points,
    gap_closed,
    mean_sd,
    plot_summary,
    result_rows,
    summarise,
    summary_markdown,
    write_csv,
    write_report,
)
from nnunet_mixsup.lab.benchmark.runner import (
    DenseDataset,
    Run,
    Session,
    SimDataset,
    assign_ids,
    check_dense_dataset,
    check_trainers,
    plans_signature,
    run_benchmark,
    simulation_plan,
)

__all__ = [
    "BASELINE_TRAINER", "DEFAULT_COSTS", "DEMO_ID", "LOWER", "PRESETS", "RESULTS_DIR", "RESULT_COLUMNS", "SCENARIOS",
    "SUMMARY_COLUMNS", "UPPER", "BenchmarkConfig", "BenchmarkError", "DenseDataset", "Preset", "Run", "Session",
    "SimDataset", "add_arguments", "annotation_cost", "assign_ids", "budget_label", "check_dense_dataset",
    "check_trainers", "config_from_args", "dice_gain_points", "gap_closed", "mean_sd",
    "plans_signature", "plot_summary", "register_cli", "result_rows", "run_benchmark", "simulation_plan",
    "split_counts", "summarise", "summary_markdown", "validate_config", "write_csv", "write_report",
]


def _cmd_benchmark(args: argparse.Namespace) -> int:
    run_benchmark(config_from_args(args))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``benchmark`` sub-command."""
    s = subparsers.add_parser(
        "benchmark", help="MixSup trainers vs the mask-only and fully supervised baselines, over budgets and seeds",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(s)
    s.set_defaults(func=_cmd_benchmark)
