"""``nnunet-mixsup demo``: the main job end to end on a built-in dataset – the ``demo`` benchmark preset.

One seed of the benchmark (:mod:`nnunet_mixsup.lab.benchmark`), everything under ``--workdir``:
build the dense dataset offline, simulate 10 % masks with boxes / tags / unlabelled cases for the
rest, plan and preprocess once, derive one small plans file shared by every run, train stock
``nnUNetTrainer`` on the mask cases only (lower bound), ``MixSupTrainer`` on everything and stock
``nnUNetTrainer`` on all cases fully masked (upper bound) with the same budget (80 epochs x 25
iterations), predict the test split with stock ``nnUNetv2_predict``, evaluate and print the
summary table (also ``<workdir>/benchmark_results/summary.md`` and the plots). Run it again to
resume: finished steps are skipped. ``--dataset inia19`` runs the same on the INIA19 weak-label
benchmark (``docs/inia19.md``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_mixsup.lab.benchmark import add_arguments, config_from_args, run_benchmark

DATASETS = {"mni152": ("demo", []), "inia19": ("inia19-cpu", ["--seeds", "0"])}


def demo_arguments(workdir: Path, dataset: str = "mni152", extra: list[str] | None = None) -> list[str]:
    """The ``benchmark`` arguments the demo stands for (preset, seed, work directory, ``extra`` flags)."""
    preset, flags = DATASETS[dataset]
    return ["--preset", preset, *flags, "--workdir", str(workdir), *(extra or [])]


def run_demo(workdir: Path, dataset: str = "mni152", extra: list[str] | None = None) -> Path:
    """Run (or resume) the demo; returns the summary table (Markdown) and prints it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(demo_arguments(workdir, dataset, extra)))
    summary = run_benchmark(cfg) / "summary.md"
    print(summary.read_text())
    return summary


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("demo", help="run the end-to-end demo on a built-in dataset (the benchmark's demo preset)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--workdir", type=Path, default=Path("demo_work"), help="folder for all demo data (./demo_work)")
    s.add_argument("--dataset", choices=sorted(DATASETS), default="mni152",
                   help="mni152: the MNI152 demo (weak labels say little); inia19: the INIA19 weak-label benchmark")
    s.add_argument("--no-upper", action="store_true", help="do not train the fully supervised upper bound")
    s.add_argument("--trainers", nargs="+", default=None, help="MixSup trainers to compare (default MixSupTrainer)")
    s.set_defaults(func=lambda a: (run_demo(a.workdir, a.dataset, (["--no-upper"] if a.no_upper else []) +
                                            (["--trainers", *a.trainers] if a.trainers else [])), 0)[1])
