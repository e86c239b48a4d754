"""``nnunet-mixsup demo``: the main job end to end on the built-in real-anatomy demo dataset.

demo-data (dense, id 990) -> simulate 10 % masks + boxes / tags / unlabelled (id 991) ->
plan_and_preprocess once on 991 -> a small derived plans file shared by every run (the same plans
moved to 990 for the upper bound) -> train with the same budget and seed:

- ``lower``: stock nnUNetTrainer on the mask cases only (991, training split = mask cases),
- ``mixsup``: MixSupTrainer on all cases of 991,
- ``upper``: stock nnUNetTrainer on all cases with full masks (990),

-> stock nnUNetv2_predict on the held-out test split -> evaluate -> a table (Markdown + CSV) and
a bar plot. Every step is skipped when its output already exists, so an interrupted demo resumes.
All nnU-Net folders live under the work directory; nothing of the user's is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from nnunet_mixsup.progress import console_script, run_logged

SOURCE_ID, TARGET_ID = 990, 991
PLANS = "nnUNetPlans_demo"
DEMO_EPOCHS, DEMO_ITERATIONS = 80, 25  # shorter runs can miss the small ventricle class entirely
RUNS = {  # name -> (dataset id, trainer, fold, description); the budget comes from the environment
    "lower": (TARGET_ID, "nnUNetTrainer_MixSupBudget", 1, "nnUNetTrainer, mask cases only"),
    "mixsup": (TARGET_ID, "MixSupTrainer", 0, "MixSupTrainer, masks + weak labels"),
    "upper": (SOURCE_ID, "nnUNetTrainer_MixSupBudget", 0, "nnUNetTrainer, all cases fully masked"),
}


def _run(cmd: list[str], env: dict, log: Path, progress: str | None = None, epochs: int | None = None) -> None:
    """Run ``cmd`` with its output appended to ``log``; ``progress``: label of an epoch progress bar."""
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
    code = run_logged(cmd, env, log, desc=progress, total_epochs=epochs)
    if code != 0:
        raise RuntimeError(f"command failed (exit {code}): {' '.join(cmd)} – see {log}")


def run_demo(workdir: Path, config: str = "2d", seed: int = 0, masks: float = 0.1, n_train: int = 20,
             n_test: int = 10, skip_upper: bool = False, extra_trainers: tuple[str, ...] = ()) -> Path:
    """Run the demo in ``workdir``; returns the path of the results table (Markdown).

    ``extra_trainers``: further public MixSup trainers (e.g. ``MixSupTrainer_MeanTeacher``), trained
    on the mixed-supervision dataset like ``MixSupTrainer`` (same plans and budget).
    """
    from nnunet_mixsup.cli import trainers_path

    workdir = workdir.resolve()
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = os.environ[k] = str(workdir / k)
        (workdir / k).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = os.environ["nnUNet_extTrainer"] = trainers_path()
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_n_proc_DA", "1")
    env.setdefault("nnUNet_mixsup_no_plot", "1")
    # every run (baselines included) gets the same budget through the environment
    env.setdefault("nnUNet_mixsup_epochs", str(DEMO_EPOCHS))
    env.setdefault("nnUNet_mixsup_iterations", str(DEMO_ITERATIONS))
    env.setdefault("nnUNet_mixsup_val_iterations", "5")
    log = workdir / "demo_log.txt"
    t0 = time.time()

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    raw = workdir / "nnUNet_raw"
    if not list(raw.glob(f"Dataset{SOURCE_ID}_*")):
        from nnunet_mixsup.lab.demo_data import make_demo_dataset
        print(f"[demo] building the real-anatomy demo dataset ({n_train} train / {n_test} test)")
        make_demo_dataset(dataset_id=SOURCE_ID, n_train=n_train, n_test=n_test, seed=seed)
    if not list(raw.glob(f"Dataset{TARGET_ID}_*")):
        from nnunet_mixsup.lab.simulate import simulate_dataset
        rest = 1.0 - masks
        print(f"[demo] simulating weak labels: {masks:.0%} masks, rest boxes / tags / unlabelled")
        simulate_dataset(SOURCE_ID, TARGET_ID, masks=masks, boxes=0.4 * rest / 0.9, tags=0.2 * rest / 0.9,
                         unlabeled=None, seed=seed)
    src_name = maybe_convert_to_dataset_name(SOURCE_ID)
    tgt_name = maybe_convert_to_dataset_name(TARGET_ID)
    pp = workdir / "nnUNet_preprocessed"
    ms = [sys.executable, "-m", "nnunet_mixsup.cli"]

    plans_marker = pp / tgt_name / f".mixsup_demo_{PLANS}_{config}.done"
    if not plans_marker.is_file():
        print("[demo] planning and preprocessing (once, on the mixed-supervision dataset)")
        _run(ms + ["plan_and_preprocess", "-d", str(TARGET_ID), "-c", config, "-np", "2"], env, log)
        _run(ms + ["small-plans", "-d", str(TARGET_ID), "-c", config, "--target-plans", PLANS,
                   "--max-features", "128", "--base-features", "16", "--batch-size", "12"], env, log)
        plans_marker.write_text("planned and preprocessed\n")
    sup = json.loads((raw / tgt_name / "supervision.json").read_text())["cases"]
    mask_ids = sorted(c for c, s in sup.items() if s["type"] == "mask")
    all_ids = sorted(sup)
    # fold 0: every case trains (MixSup); fold 1: mask cases only (lower bound). Validation is on the
    # mask cases (it is not used for the comparison, which is on the held-out test split).
    (pp / tgt_name / "splits_final.json").write_text(json.dumps(
        [{"train": all_ids, "val": mask_ids}, {"train": mask_ids, "val": mask_ids}], indent=1))

    done_marker = pp / src_name / f".mixsup_demo_{PLANS}_{config}.done"
    if not skip_upper and not done_marker.is_file():
        print("[demo] same plans for the fully supervised upper bound")
        _run([console_script("nnUNetv2_extract_fingerprint"), "-d", str(SOURCE_ID), "-np", "2"], env, log)
        shutil.copyfile(raw / src_name / "dataset.json", pp / src_name / "dataset.json")
        _run([console_script("nnUNetv2_move_plans_between_datasets"), "-s", str(TARGET_ID), "-t", str(SOURCE_ID),
              "-sp", PLANS, "-tp", PLANS], env, log)
        _run([console_script("nnUNetv2_preprocess"), "-d", str(SOURCE_ID), "-plans_name", PLANS, "-c", config, "-np", "2"],
             env, log)
        done_marker.write_text("preprocessed\n")
    if not skip_upper:
        (pp / src_name / "splits_final.json").write_text(json.dumps([{"train": all_ids, "val": mask_ids}], indent=1))

    results = workdir / "results"
    results.mkdir(exist_ok=True)
    rows = []
    runs = dict(RUNS)
    for t in extra_trainers:
        runs[t] = (TARGET_ID, t, 0, f"{t}, masks + weak labels")
    for name, (did, trainer, fold, desc) in runs.items():
        if skip_upper and name == "upper":
            continue
        dname = maybe_convert_to_dataset_name(did)
        out = workdir / "nnUNet_results" / dname / f"{trainer}__{PLANS}__{config}" / f"fold_{fold}"
        if not (out / "checkpoint_final.pth").is_file():
            print(f"[demo] training {name}: {desc}  ({time.time() - t0:.0f} s so far)")
            _run([console_script("nnUNetv2_train"), str(did), config, str(fold), "-tr", trainer, "-p", PLANS,
                  "-device", "cpu" if not _has_cuda() else "cuda"], env, log, progress=f"training {name}",
                 epochs=int(env["nnUNet_mixsup_epochs"]))
        pred = results / f"pred_{name}"
        if not pred.is_dir() or not any(pred.glob("*.nii.gz")):
            print(f"[demo] predicting the test split with {name}")
            _run([console_script("nnUNetv2_predict"), "-i", str(raw / tgt_name / "imagesTs"), "-o", str(pred), "-d", str(did),
                  "-c", config, "-tr", trainer, "-p", PLANS, "-f", str(fold), "-chk", "checkpoint_final.pth",
                  "-npp", "1", "-nps", "1", "-device", "cpu" if not _has_cuda() else "cuda"], env, log)
        from nnunet_mixsup.evaluation import evaluate_folders, write_results
        dj = json.loads((raw / src_name / "dataset.json").read_text())
        labels = sorted(v for k, v in dj["labels"].items() if k not in ("background", "ignore"))
        res = evaluate_folders(raw / tgt_name / "labelsTs", pred, labels)
        write_results(res, results / f"eval_{name}")
        rows.append((name, desc, res))

    table = _table(rows, json.loads((raw / src_name / "dataset.json").read_text())["labels"])
    md = results / "demo_results.md"
    md.write_text(table + f"\nconfiguration `{config}`, plans `{PLANS}`, seed {seed}, "
                          f"{len(mask_ids)} mask cases of {len(all_ids)}; total time {time.time() - t0:.0f} s\n")
    _plot(rows, results / "demo_results.png")
    print(table)
    print(f"[demo] done in {time.time() - t0:.0f} s; results in {results}")
    return md


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _table(rows: list, label_map: dict) -> str:
    names = {v: k for k, v in label_map.items() if k not in ("background", "ignore")}
    classes = sorted(names)
    head = "| run | " + " | ".join(f"Dice {names[c]}" for c in classes) + " | mean Dice | mean HD95 (mm) |\n"
    head += "|---|" + "---|" * (len(classes) + 2) + "\n"
    lines = []
    for name, desc, res in rows:
        s = res["summary"]
        d = [s[c]["dice"]["mean"] for c in classes]
        lines.append(f"| {name}: {desc} | " + " | ".join(f"{v:.3f}" for v in d) +
                     f" | {s['mean']['dice']['mean']:.3f} | {s['mean']['hd95']['mean']:.2f} |")
    return head + "\n".join(lines) + "\n"


def _plot(rows: list, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r[0] for r in rows]
    vals = []
    for _, _, res in rows:
        vals.append(res["summary"]["mean"]["dice"]["mean"])
    ax.bar(names, vals, color=["#999", "#2a7", "#37c"][: len(names)])
    ax.set_ylabel("mean Dice (test split)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("demo", help="run the end-to-end demo on the built-in demo dataset",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--workdir", type=Path, default=Path("demo_work"), help="folder for all demo data (default "
                                                                         "./demo_work)")
    s.add_argument("-c", "--config", default="2d", choices=("2d", "3d_fullres"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--masks", type=float, default=0.1, help="fraction of training cases with full masks")
    s.add_argument("--train", type=int, default=20)
    s.add_argument("--test", type=int, default=10)
    s.add_argument("--skip-upper", action="store_true", help="do not train the fully supervised upper bound")
    s.add_argument("--extra-trainers", nargs="*", default=[], help="more MixSup trainers to compare, e.g. "
                                                                  "MixSupTrainer_MeanTeacher")
    s.set_defaults(func=lambda a: (run_demo(a.workdir, a.config, a.seed, a.masks, a.train, a.test, a.skip_upper,
                                            tuple(a.extra_trainers)), 0)[1])
