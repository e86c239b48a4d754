"""Weak-label audit: what do the weak labels add to a trained model's predictions on the weak training cases?

Self-training methods (``MixSupTrainer`` and its teacher-student relatives) learn from a
teacher's predictions on the weak cases, constrained by the weak labels: class c is removed
outside the boxes of c and wherever the tags say c is absent. How much such a constraint can
teach depends on how much it *changes* the teacher's predictions. This audit measures it on a
benchmark work directory, where the dense truth of every weak case is known
(``labelsTr_dense_hidden/`` of each simulated dataset):

1. every trained run of a simulated dataset (``lower`` = stock nnU-Net on the mask cases, and
   each MixSup trainer) predicts the dataset's weak training cases with probabilities
   (stock ``nnUNetv2_predict`` without test-time mirroring, as a teacher labels a batch);
2. per case and class, Dice against the dense truth of the arg-max prediction (``free``) and of
   the arg-max after zeroing the classes the weak labels exclude (``constrained``; the pseudo-label
   constraint of the trainers, :func:`~nnunet_mixsup.losses.constrain_pseudo_labels`, in raw space).
   A class absent from both the prediction and the truth scores Dice 1.0, as in
   ``nnunet-mixsup evaluate``, so every case enters every mean.

``constrained - free`` for the ``lower`` run is an upper bound on what the weak-label constraint
adds to a mask-only teacher's pseudo labels; ``free`` of a MixSup run against ``lower`` is how
much training on the weak cases improved the predictions on those very cases.

Outputs in ``<workdir>/benchmark_results/``: ``weak_label_audit.csv`` (per case, class and
view) and ``weak_label_audit.md`` (means). Predictions are kept in ``audit_predictions/`` and
reused while their checkpoint is unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_mixsup.evaluation import dice_score, labels_from_dataset_json
from nnunet_mixsup.geometry import rasterize_boxes_in_patch
from nnunet_mixsup.lab.simulate import HIDDEN_LABELS_DIR
from nnunet_mixsup.manifest import CaseSupervision, Manifest, load_manifest

LOWER_TRAINER = "nnUNetTrainer_MixSupBudget"


class AuditError(RuntimeError):
    """A work directory the audit cannot use (named in the message)."""


def allowed_classes(sup: CaseSupervision, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """(K, *shape) bool in numpy axis order: where each class may be, given one case's weak label.

    Background is allowed everywhere. ``box``: foreground class c only inside the boxes of c.
    ``tags``: the present classes everywhere, the others nowhere. ``none`` and ``mask``: everything.
    """
    allowed = np.ones((num_classes, *shape), dtype=bool)
    if sup.type == "box":  # the whole image as one "patch" of the loader's box rasteriser
        boxes = [(b.label, *(np.asarray(e) for e in b.numpy_order())) for b in sup.boxes]
        allowed[1:] = rasterize_boxes_in_patch(boxes, range(1, num_classes), [0] * len(shape), shape, bool)
    elif sup.type == "tags":
        for c in range(1, num_classes):
            allowed[c] = c in sup.present
    return allowed


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of one label between two label maps; 1.0 when the label is in neither map.

    The convention of ``nnunet-mixsup evaluate`` (:func:`nnunet_mixsup.evaluation.dice_score`): a
    class correctly predicted absent is a perfect score, so every case enters every mean.
    """
    return dice_score(ref == label, pred == label)


def audit_case(probs: np.ndarray, allowed: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[str, dict]:
    """Per-label Dice of the free and the constrained arg-max, and the share of voxels the constraint changed.

    Args:
        probs: (K, *shape) class probabilities (nnU-Net's ``.npz`` ``probabilities``).
        allowed: (K, *shape) bool from :func:`allowed_classes`.
        ref: (*shape) dense reference labels.
        labels: the foreground labels to score.

    Returns:
        ``{"free": {label: dice}, "constrained": {label: dice}, "changed": float}``; Dice as
        :func:`dice` (1.0 for a label in neither map).
    """
    if probs.shape != allowed.shape or probs.shape[1:] != ref.shape:
        raise AuditError(f"shapes differ: probabilities {probs.shape}, allowed {allowed.shape}, reference {ref.shape}")
    free = probs.argmax(0)
    constrained = np.where(allowed, probs, -1.0).argmax(0)
    return {"free": {c: dice(free, ref, c) for c in labels},
            "constrained": {c: dice(constrained, ref, c) for c in labels},
            "changed": float((free != constrained).mean())}


def _predict(images: Path, cases: Sequence[str], out: Path, dataset: str, trainer: str, fold: str, cfg: dict,
             ckpt: Path, device: str, env: dict[str, str]) -> None:
    """Stock ``nnUNetv2_predict`` with probabilities for ``cases``, unless ``out`` holds it for ``ckpt`` already."""
    from nnunet_mixsup.progress import console_script

    done = out / "audit_done.json"
    stamp = {"checkpoint": str(ckpt), "mtime": ckpt.stat().st_mtime, "cases": sorted(cases), "tta": False}
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return
    inp = out.parent / f".{out.name}.in"
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(inp, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    inp.mkdir(parents=True)
    for c in cases:
        for f in sorted(images.glob(f"{c}_[0-9][0-9][0-9][0-9].*")):
            (inp / f.name).symlink_to(f.resolve())
    cmd = [console_script("nnUNetv2_predict"), "-i", str(inp), "-o", str(tmp), "-d", dataset, "-c", cfg["configuration"],
           "-tr", trainer, "-p", cfg["plans_name"], "-f", fold, "-chk", "checkpoint_final.pth", "--save_probabilities",
           "--disable_tta", "-npp", "0", "-nps", "0", "-device", device, "--disable_progress_bar"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AuditError(f"nnUNetv2_predict failed for {trainer} fold {fold} on {dataset}:\n{proc.stderr[-2000:]}")
    (tmp / "audit_done.json").write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    shutil.rmtree(inp, ignore_errors=True)


def audit_workdir(workdir: Path, trainers: Sequence[str] | None = None, ids: Sequence[int] | None = None,
                  device: str = "cpu", show_progress: bool = True) -> list[dict]:
    """Audit the trained runs of the simulated datasets of a benchmark work directory (see the module doc).

    ``trainers``: trainer names and/or ``"lower"`` (default: every trained run); ``ids``: dataset
    ids (default: every simulated dataset).
    """
    import SimpleITK as sitk
    from tqdm import tqdm

    res = workdir / "benchmark_results"
    try:
        cfg = json.loads((res / "benchmark.json").read_text())
        sims = json.loads((res / "datasets.json").read_text())["datasets"]
    except (OSError, ValueError, KeyError) as e:
        raise AuditError(f"{res} is not a benchmark result folder (benchmark.json / datasets.json): {e}") from e
    jobs: dict[str, list] = {}  # simulated dataset name -> [(sim, trainer, fold, checkpoint)]
    for sim in sims:
        if ids and sim["id"] not in ids:
            continue
        base = workdir / "nnUNet_results" / sim["name"]
        for folder in sorted(base.glob(f"*__{cfg['plans_name']}__{cfg['configuration']}")) if base.is_dir() else []:
            trainer = folder.name.split("__")[0]
            if trainers and trainer not in trainers and not (trainer == LOWER_TRAINER and "lower" in trainers):
                continue
            for ckpt in sorted(folder.glob("fold_*/checkpoint_final.pth")):
                jobs.setdefault(sim["name"], []).append((sim, trainer, ckpt.parent.name[len("fold_"):], ckpt))
    if not jobs:
        raise AuditError(f"no trained run of a simulated dataset under {workdir / 'nnUNet_results'} "
                         "(the audit reads the work directory's own nnU-Net folders, not --use-env-dirs ones)")
    from nnunet_mixsup.cli import trainers_path
    env = {**os.environ, **{k: str(workdir / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
           "nnUNet_extTrainer": trainers_path()}
    rows: list[dict] = []
    progress = tqdm(total=sum(map(len, jobs.values())), desc="weak-label audit", unit="run", disable=not show_progress)
    for name, runs in jobs.items():
        raw = workdir / "nnUNet_raw" / name
        manifest = load_manifest(raw / "supervision.json")
        dataset_json = json.loads((raw / "dataset.json").read_text())
        labels, _, names = labels_from_dataset_json(dataset_json)
        weak = [c for c, s in sorted(manifest.cases.items()) if s.type != "mask"]
        refs = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(raw / HIDDEN_LABELS_DIR / f"{c}{dataset_json['file_ending']}")))
                for c in weak}
        for sim, trainer, fold, ckpt in runs:
            progress.update()
            if weak:
                rows += _audit_run(sim, trainer, fold, ckpt, raw, weak, refs, manifest, labels, names, res, cfg,
                                   device, env)
    progress.close()
    return rows


def _audit_run(sim: dict, trainer: str, fold: str, ckpt: Path, raw: Path, weak: list[str], refs: dict[str, np.ndarray],
               manifest: Manifest, labels: list[int], names: dict[int, str], res: Path, cfg: dict, device: str,
               env: dict[str, str]) -> list[dict]:
    """Rows of one trained run: predict its dataset's weak cases (cached), score free and constrained."""
    out = res / "audit_predictions" / sim["name"] / f"{trainer}_f{fold}"
    _predict(raw / "imagesTr", weak, out, str(sim["id"]), trainer, fold, cfg, ckpt, device, env)
    run = "lower" if trainer == LOWER_TRAINER else trainer
    rows = []
    for c in weak:
        ref = refs[c]
        probs = np.load(out / f"{c}.npz")["probabilities"]
        probs = probs.reshape(probs.shape[0], *ref.shape)  # 2D images: nnU-Net keeps a leading axis of 1
        r = audit_case(probs, allowed_classes(manifest.cases[c], ref.shape, probs.shape[0]), ref, labels)
        for view in ("free", "constrained"):
            d = r[view]
            rows.append({"dataset": sim["name"], "seed": sim["seed"], "budget": sim["budget"], "run": run,
                         "fold": fold, "case": c, "type": manifest.cases[c].type, "view": view,
                         **{f"dice_{names[k]}": v for k, v in d.items()}, "dice_mean": float(np.mean(list(d.values()))),
                         "changed": r["changed"]})
    return rows


def summary_markdown(rows: Sequence[dict]) -> str:
    """Mean Dice per run, case type and view over all audited cases, and the constraint's gain in points.

    Plain means over the rows: Dice is never NaN (:func:`dice`), and a NaN in ``rows`` would show as
    ``nan`` rather than be skipped.
    """
    dice_keys = [k for k in rows[0] if k.startswith("dice_")]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        for t in (r["type"], "all"):
            groups.setdefault((r["run"], t, r["view"]), []).append(r)
    lines = ["| run | cases | n | view | " + " | ".join(k[len("dice_"):] for k in dice_keys)
             + " | constraint gain (Dice pts) | voxels changed |", "|---" * (len(dice_keys) + 6) + "|"]
    for (run, t, view) in sorted(groups, key=lambda g: (g[0] != "lower", g[0], g[1] != "all", g[1], g[2] != "free")):
        rs = groups[(run, t, view)]
        means = [float(np.mean([r[k] for r in rs])) for k in dice_keys]
        gain = changed = ""
        if view == "constrained":
            free = groups[(run, t, "free")]
            gain = f"{100 * (means[-1] - float(np.mean([r['dice_mean'] for r in free]))):+.2f}"
            changed = f"{100 * float(np.mean([r['changed'] for r in rs])):.3f} %"
        lines.append(f"| {run} | {t} | {len(rs)} | {view} | " + " | ".join(f"{m:.3f}" for m in means)
                     + f" | {gain} | {changed} |")
    return "\n".join(lines) + "\n"


def _cmd_audit(args: argparse.Namespace) -> int:
    from nnunet_mixsup.lab.benchmark import write_csv

    rows = audit_workdir(args.workdir, args.trainers, args.ids, args.device)  # errors: cli.main reports them
    res = args.workdir / "benchmark_results"
    write_csv(res / "weak_label_audit.csv", list(rows[0]), rows)
    text = "# Weak-label audit\n\nDice on the weak training cases against their dense truth (see " \
           "`nnunet_mixsup/lab/audit.py`).\n\n" + summary_markdown(rows)
    (res / "weak_label_audit.md").write_text(text)
    print(text)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``weak-label-audit`` sub-command."""
    s = subparsers.add_parser("weak-label-audit", help="how much the weak labels change trained models' predictions "
                                                       "on the weak training cases (benchmark work directory)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--workdir", type=Path, required=True, help="a `nnunet-mixsup benchmark` work directory")
    s.add_argument("--trainers", nargs="+", default=None,
                   help="runs to audit: trainer names and/or 'lower' (default: every trained run)")
    s.add_argument("--ids", nargs="+", type=int, default=None,
                   help="simulated dataset ids to audit (default: all in datasets.json)")
    s.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu", help="device for prediction")
    s.set_defaults(func=_cmd_audit)
