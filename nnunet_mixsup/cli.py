"""The ``nnunet-mixsup`` command line: one sub-command per job, each with ``--help``.

Errors are printed as one clear message (no traceback) and give exit code 1; set
``NNUNET_MIXSUP_DEBUG=1`` to see the traceback. Sub-commands of other modules are registered from
:data:`SUBCOMMAND_MODULES`; if one of them cannot be imported, every invocation fails (exit code 1,
naming the module) instead of quietly running without that sub-command.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

#: modules whose ``register_cli(subparsers)`` adds sub-commands. Every one must import: a module that
#: cannot (a missing dependency, a syntax error) makes the whole command line fail with a message
#: naming it, so a broken import never silently removes a sub-command.
SUBCOMMAND_MODULES = ("nnunet_mixsup.lab.simulate", "nnunet_mixsup.lab.demo_data", "nnunet_mixsup.evaluation",
                      "nnunet_mixsup.lab.demo", "nnunet_mixsup.lab.bench_speed", "nnunet_mixsup.lab.benchmark",
                      "nnunet_mixsup.lab.audit", "nnunet_mixsup.importers", "nnunet_mixsup.show",
                      "dataset_conversion.cli")


class SubcommandImportError(ImportError):
    """A module listed in :data:`SUBCOMMAND_MODULES` cannot be imported or registers nothing."""


def trainers_path() -> str:
    """Folder holding the thin trainer modules (works for editable and regular installs)."""
    spec = importlib.util.find_spec("nnunet_mixsup.ext_trainers")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    here = Path(__file__).resolve().parent.parent / "trainers"  # running from a source checkout
    if here.is_dir():
        return str(here)
    raise RuntimeError("cannot locate the nnunet_mixsup trainer folder; is the package installed?")


def _cmd_trainers_path(args: argparse.Namespace) -> int:
    print(trainers_path())
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from nnunet_mixsup.prepare import prepare_dataset, supervision_summary

    res = prepare_dataset(args.d)
    print(supervision_summary(res.manifest, sorted(res.label_names), res.label_names))
    print(f"wrote {len(res.written)} derived label map(s), {len(res.unchanged)} unchanged; "
          f"ignore label: {res.ignore_label}")
    return 0


def _cmd_plan_and_preprocess(args: argparse.Namespace) -> int:
    from nnunet_mixsup.preprocess import plan_and_preprocess

    for d in args.d:
        name = plan_and_preprocess(d, configurations=args.c, num_processes=args.np, planner=args.pl,
                                   gpu_memory_target=args.gpu_memory_target, plans_name=args.overwrite_plans_name,
                                   verify_dataset_integrity=args.verify_dataset_integrity, no_pp=args.no_pp,
                                   verbose=args.verbose)
        print(f"dataset {d}: plans {name} done")
    return 0


def _cmd_small_plans(args: argparse.Namespace) -> int:
    from nnunet_mixsup.plans import make_small_plans

    p = make_small_plans(args.d, args.source_plans, args.target_plans, args.c, args.max_features,
                         args.base_features, args.patch_size, args.batch_size)
    print(p)
    return 0


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from nnunetv2.paths import nnUNet_raw

    from nnunet_mixsup.lab.synthetic import make_synthetic_dataset

    counts = dict(zip(("mask", "box", "tags", "none"), args.counts))
    for opt in ("size", "spacing"):
        v = getattr(args, opt)
        if v is not None and len(v) != args.dim:
            raise ValueError(f"--{opt} needs {args.dim} values for --dim {args.dim}, got {len(v)}")
    if args.size is not None and min(args.size) < 8:
        raise ValueError(f"--size {args.size}: every axis needs at least 8 voxels")
    if args.spacing is not None and min(args.spacing) <= 0:
        raise ValueError(f"--spacing {args.spacing}: spacings must be positive")
    print(make_synthetic_dataset(nnUNet_raw.require(), args.d, dim=args.dim, counts=counts, n_test=args.test,
                                 size_itk=args.size, spacing_itk=args.spacing, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet-mixsup", description="Mixed-supervision training for nnU-Net v2.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer",
                       description="Print the folder to put in nnUNet_extTrainer: "
                                   "export nnUNet_extTrainer=$(nnunet-mixsup trainers-path)")
    s.set_defaults(func=_cmd_trainers_path)

    s = sub.add_parser("prepare", help="validate supervision.json and write derived label maps",
                       description="Validate nnUNet_raw/DatasetXXX/supervision.json against the dataset and write "
                                   "what stock nnU-Net needs (ignore-label maps for weak cases, the ignore entry in "
                                   "dataset.json). Never modifies a user's mask; idempotent; writes nothing on error.")
    s.add_argument("-d", required=True, help="dataset id or name")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("plan_and_preprocess", help="prepare + nnU-Net planning/preprocessing (mask-only intensities)",
                       description="prepare, then nnU-Net's fingerprint extraction (with foreground intensity "
                                   "statistics from labelled voxels of mask cases only), planning and preprocessing.")
    s.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    s.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"], help="configurations to preprocess")
    s.add_argument("-np", type=int, default=2, help="number of processes")
    s.add_argument("-pl", default="ExperimentPlanner", help="nnU-Net experiment planner class")
    s.add_argument("-gpu_memory_target", type=float, default=None)
    s.add_argument("-overwrite_plans_name", default=None)
    s.add_argument("--verify_dataset_integrity", action="store_true")
    s.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=_cmd_plan_and_preprocess)

    s = sub.add_parser("small-plans", help="derive a plans file with a small network for CPU runs",
                       description="Write a derived plans file sharing the preprocessed data but with fewer "
                                   "features, optionally another patch and batch size. Train with -p NAME.")
    s.add_argument("-d", required=True)
    s.add_argument("--source-plans", default="nnUNetPlans")
    s.add_argument("--target-plans", default="nnUNetPlans_small")
    s.add_argument("-c", nargs="+", default=["2d", "3d_fullres"])
    s.add_argument("--max-features", type=int, default=64)
    s.add_argument("--base-features", type=int, default=8)
    s.add_argument("--patch-size", type=int, nargs="+", default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.set_defaults(func=_cmd_small_plans)

    s = sub.add_parser("synthetic-data", help="write the small synthetic mixed-supervision dataset used by tests",
                       description="Write a synthetic dataset with mask, box, tags and unlabelled cases into "
                                   "nnUNet_raw.")
    s.add_argument("-d", type=int, default=901)
    s.add_argument("--dim", type=int, choices=(2, 3), default=3)
    s.add_argument("--counts", type=int, nargs=4, default=[3, 2, 2, 1], metavar=("MASK", "BOX", "TAGS", "NONE"))
    s.add_argument("--test", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                   help="image size in voxels, x y [z] as in ITK (default 20 40 36 in 3D, 48 40 in 2D; "
                        "e.g. 160 160 96 for GPU-sized stock plans)")
    s.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="voxel spacing in mm, x y [z] (default 3 1 1 in 3D: anisotropic, 1 1 in 2D)")
    s.set_defaults(func=_cmd_synthetic)

    for mod in SUBCOMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            raise SubcommandImportError(f"cannot import {mod}, which provides sub-commands: {e}") from e
        if not hasattr(m, "register_cli"):
            raise SubcommandImportError(f"{mod} has no register_cli(subparsers) function")
        m.register_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except SubcommandImportError as e:
        if os.environ.get("NNUNET_MIXSUP_DEBUG"):
            traceback.print_exc()
        print(f"nnunet-mixsup: error: broken installation: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear message instead of a traceback from deep inside
        if os.environ.get("NNUNET_MIXSUP_DEBUG"):
            traceback.print_exc()
        print(f"nnunet-mixsup {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
