"""Running the benchmark: datasets, one shared plans file, and train / predict / evaluate per run.

:func:`run_benchmark` sets up the nnU-Net folders and environment and takes the work directory's
lock; :func:`_run` then goes through the steps, each skipped where its output already exists (so
running the same command again resumes): check the trainers and the dense dataset, record the
settings, simulate a dataset per (budget, seed), plan once, move the plans to every other dataset
and preprocess it, write the splits, then per run train (:func:`_train`), predict
(:func:`_predict`) and evaluate (:func:`_evaluate`), and finally write the report
(:func:`nnunet_mixsup.lab.benchmark.report.write_report`). Every command goes through a
:class:`Session`, which records it in ``commands.sh`` and its output in ``logs/``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_mixsup.fileio import atomic_write_json, pid_alive
from nnunet_mixsup.lab.benchmark.config import (
    BASELINE_TRAINER,
    DEMO_ID,
    DEMO_TEST,
    DEMO_TRAIN,
    LOWER,
    PLANS_BASE,
    PRESETS,
    RESULTS_DIR,
    SCENARIOS,
    SUP_TYPES,
    UPPER,
    BenchmarkConfig,
    BenchmarkError,
    budget_label,
    split_counts,
    validate_config,
)
from nnunet_mixsup.lab.benchmark.report import result_rows, write_report
from nnunet_mixsup.lab.simulate import Amount, case_order
from nnunet_mixsup.progress import console_script, run_logged

_FIXED_SETTINGS = ("dense", "configuration", "plans_name", "planner", "small_plans", "epochs", "iterations")


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
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
@dataclass(frozen=True)
class Slot:
    """One of ``--parallel`` N places a run goes to: its share of the cores and its environment."""

    cpus: tuple[int, ...]
    env: dict[str, str]

    @property
    def cpu_list(self) -> str:
        """The cores as ``taskset -c`` takes them (``0,1``)."""
        return ",".join(map(str, self.cpus))


def parallel_slots(n: int, device: str, cpus: Sequence[int] | None = None) -> list[Slot]:
    """Split the usable cores into ``n`` equal groups, one per parallel run (in core order).

    On the CPU every run also gets ``nnUNet_mixsup_torch_threads`` = its cores, since stock
    ``nnUNetv2_train -device cpu`` would start one torch thread per core of the machine.
    Raises :class:`BenchmarkError` when there are fewer cores than runs.
    """
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpus = sorted(cpus)
    if n > len(cpus):
        raise BenchmarkError(f"--parallel {n}: only {len(cpus)} core(s) available; every run needs at least one")
    per = len(cpus) // n
    slots = []
    for i in range(n):
        mine = tuple(cpus[i * per:(i + 1) * per])
        env = {"nnUNet_mixsup_torch_threads": str(len(mine))} if device == "cpu" else {}
        slots.append(Slot(mine, env))
    return slots


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
        self._lock = threading.Lock()  # runs of ``--parallel`` share the console, commands.sh and logs

    def elapsed(self) -> str:
        return _fmt_time(time.time() - self.t0)

    def say(self, text: str) -> None:
        with self._lock:
            print(f"[benchmark] {text} ({self.elapsed()})", flush=True)

    def record(self, text: str) -> None:
        """Append a line to commands.sh (after this invocation's header)."""
        with self._lock:
            self._record(text)

    def _record(self, text: str) -> None:
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

    def run(self, cmd: Sequence[str], log_name: str, what: str, epochs: int | None = None,
            slot: Slot | None = None) -> None:
        """Run ``cmd`` (appended to commands.sh first), output to ``logs/<log_name>.log``.

        ``epochs``: for an ``nnUNetv2_train`` command, its epoch count - shows an epoch progress bar
        (not with a ``slot``: parallel runs would draw over each other). ``slot``: the cores and
        environment of one of ``--parallel`` runs; commands.sh records the command as the shell
        line that pins it the same way (``taskset``).
        """
        cmd = [str(c) for c in cmd]
        line = shlex.join(cmd)
        env = self.env
        if slot is not None:
            env = {**self.env, **slot.env}
            line = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in slot.env.items()), "taskset", "-c",
                             slot.cpu_list, line])
        self.record(line)
        log = self.logs / f"{log_name}.log"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n+ {line}\n")
        t = time.time()
        code = run_logged(cmd, env, log, desc=what if epochs and slot is None else None, total_epochs=epochs,
                          cpus=slot.cpus if slot is not None else None)
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


# ----------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------
def run_benchmark(cfg: BenchmarkConfig) -> Path:
    """Run (or resume) the benchmark; returns the results folder. See :mod:`nnunet_mixsup.lab.benchmark`."""
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
    """Every step of the benchmark, in order, inside the environment and lock of :func:`run_benchmark`."""
    raw, pp, res = dirs["nnUNet_raw"], dirs["nnUNet_preprocessed"], dirs["nnUNet_results"]
    # checks before anything runs: trainers, dense dataset, budgets, settings
    classes = check_trainers([BASELINE_TRAINER, *cfg.trainers])
    dense = check_dense_dataset(_dense_folder(cfg, session, raw, outside_raw))
    session.say(f"dense dataset {dense.name}: {len(dense.case_ids)} training / {len(dense.test_ids)} test cases")
    sims = simulation_plan(cfg, dense)
    device = _device(cfg.device)
    record = _settings_record(cfg, dense, session.out / "benchmark.json")
    assign_ids(sims, session.out / "datasets.json", dense, cfg.id_base, list(dirs.values()))

    _simulate(sims, dense, session, raw)
    plans = _plan_once(cfg, session, record, sims, raw, pp)
    _share_plans(cfg, session, plans, sims, dense, raw, pp)
    sup_counts = _write_all_splits(cfg, session, sims, dense, raw, pp)

    runs = _run_list(cfg, sims, dense, sup_counts, classes)
    labels = [f"{i}/{len(runs)} {run.run} (masks {run.budget}, seed {run.seed})" if run.run != UPPER else
              f"{i}/{len(runs)} upper (all cases masked, seed {run.seed})" for i, run in enumerate(runs, 1)]
    if cfg.parallel <= 1:
        summaries = [_do_run(run, label, session, cfg, dense, res, device, plans.signature)
                     for run, label in zip(runs, labels)]
    else:
        summaries = _do_runs_parallel(runs, labels, session, cfg, dense, res, device, plans.signature)
    rows: list[dict] = []
    for run, summary in zip(runs, summaries):
        rows += result_rows(run, summary, dense, cfg.costs)

    write_report(session.out, rows, cfg, dense, sims, plans.configuration)
    session.say(f"done: {len(runs)} runs; results in {session.out}")
    return session.out


def _device(device: str) -> str:
    """``auto``: cuda if torch sees a GPU, else cpu; any other value as given."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _settings_record(cfg: BenchmarkConfig, dense: DenseDataset, path: Path) -> dict:
    """``benchmark.json``: written on the first run; later runs must have the same fixed settings.

    Returns the record, to which :func:`_plan_once` adds the plans source and signature.
    """
    settings = {"dense": dense.name, "configuration": cfg.configuration, "plans_name": cfg.plans_name,
                "planner": cfg.planner, "small_plans": cfg.small_plans, "epochs": cfg.epochs,
                "iterations": cfg.iterations}
    record = _read_json(path) if path.is_file() else {"version": 1, **settings}
    diff = [f"{k}: {record.get(k)!r} there, {settings[k]!r} now" for k in _FIXED_SETTINGS
            if record.get(k) != settings[k]]
    if diff:
        raise BenchmarkError(f"this work directory was set up with other settings ({path}):\n  - " +
                             "\n  - ".join(diff) + "\nfinished runs would not be comparable; use another --workdir")
    atomic_write_json(path, record)
    return record


def _simulate(sims: list[SimDataset], dense: DenseDataset, session: Session, raw: Path) -> None:
    """``nnunet-mixsup simulate`` for every (budget, seed) whose dataset is not there yet."""
    for sim in sims:
        folder = raw / sim.name
        if folder.is_dir():
            _check_simulated(folder, sim, dense)
            continue
        c = sim.counts
        session.say(f"simulating {sim.name} (masks {sim.budget}, seed {sim.seed}: {c['mask']} mask, {c['box']} box, "
                    f"{c['tags']} tags, {c['none']} unlabelled)")
        session.run(_mixsup_cli() + ["simulate", "-d", dense.id, "--new-id", sim.id, "--name",
                                     sim.name[len("DatasetXXX_"):], "--masks", c["mask"], "--boxes", c["box"],
                                     "--tags", c["tags"], "--seed", sim.seed],
                    f"simulate_{sim.id}", f"simulating {sim.name}")


@dataclass
class SharedPlans:
    """The one plans file every run uses: where it was planned, its signature, its configuration's entry."""

    source_id: int
    source_name: str
    signature: str
    configuration: dict[str, Any]


def _plans_marker(cfg: BenchmarkConfig) -> str:
    """File in a preprocessed dataset folder recording the signature of the shared plans it was preprocessed with."""
    return f".mixsup_benchmark_{cfg.plans_name}_{cfg.configuration}.done"


def _plan_once(cfg: BenchmarkConfig, session: Session, record: dict, sims: list[SimDataset], raw: Path,
               pp: Path) -> SharedPlans:
    """Plan and preprocess the first simulated dataset (once per work directory), derive the small plans.

    The plans source and signature go into ``benchmark.json`` (``record``); plans changed since then
    are refused, since the runs would no longer share one plans file.
    """
    record_path = session.out / "benchmark.json"
    if "plans_source" not in record:
        record["plans_source"] = {"id": sims[0].id, "name": sims[0].name}
        atomic_write_json(record_path, record)
    src_id, src_name = record["plans_source"]["id"], record["plans_source"]["name"]
    if not (raw / src_name).is_dir():
        raise BenchmarkError(f"the plans were made on {src_name} ({record_path}), which is gone from {raw}; "
                             f"use another --workdir")
    plans_name, config = cfg.plans_name, cfg.configuration
    src_marker = pp / src_name / _plans_marker(cfg)
    if not src_marker.is_file():
        ms = _mixsup_cli()
        session.say(f"planning and preprocessing once, on {src_name}")
        session.run(ms + ["plan_and_preprocess", "-d", src_id, "-c", config, "-np", str(cfg.num_processes),
                          "-pl", cfg.planner, "-overwrite_plans_name", PLANS_BASE], f"plan_{src_id}", "planning")
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
        record["plans_signature"] = sig
        atomic_write_json(record_path, record)
    shared = _read_json(pp / src_name / f"{plans_name}.json")
    signature = plans_signature(shared, config)
    if record.get("plans_signature") != signature:
        raise BenchmarkError(f"{pp / src_name / (plans_name + '.json')} changed after the benchmark planned it "
                             f"(its {config} configuration differs); runs would not share one plans file. Restore "
                             f"it or use another --workdir")
    cm = shared["configurations"][config]
    session.say(f"shared plans {plans_name} ({config}): patch {cm['patch_size']}, batch {cm['batch_size']}, "
                f"features {cm['architecture']['arch_kwargs']['features_per_stage']}")
    return SharedPlans(src_id, src_name, signature, cm)


def _share_plans(cfg: BenchmarkConfig, session: Session, plans: SharedPlans, sims: list[SimDataset],
                 dense: DenseDataset, raw: Path, pp: Path) -> None:
    """Move the shared plans to every other simulated dataset and the dense one, and preprocess them there."""
    plans_name, config, np_ = cfg.plans_name, cfg.configuration, str(cfg.num_processes)
    src_id, src_name = plans.source_id, plans.source_name
    targets = [(s.id, s.name, True) for s in sims if s.id != src_id] + [(dense.id, dense.name, False)]
    for did, dname, simulated in dict.fromkeys(targets):
        marker = pp / dname / _plans_marker(cfg)
        if marker.is_file() and _read_json(marker).get("plans_signature") == plans.signature:
            continue
        session.say(f"preprocessing {dname} with the shared plans")
        if simulated:
            session.run(_mixsup_cli() + ["prepare", "-d", did], f"preprocess_{did}", f"preparing {dname}")
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
        session.run([console_script("nnUNetv2_move_plans_between_datasets"), "-s", src_id, "-t", did,
                     "-sp", plans_name, "-tp", plans_name], f"preprocess_{did}", f"moving the plans to {dname}")
        if plans_signature(_read_json(pp / dname / f"{plans_name}.json"), config) != plans.signature:
            raise BenchmarkError(f"the plans moved to {dname} differ from those of {src_name}")
        session.run([console_script("nnUNetv2_preprocess"), "-d", did, "-plans_name", plans_name, "-c", config,
                     "-np", np_], f"preprocess_{did}", f"preprocessing {dname}")
        atomic_write_json(marker, {"plans_signature": plans.signature})


def _write_all_splits(cfg: BenchmarkConfig, session: Session, sims: list[SimDataset], dense: DenseDataset,
                      raw: Path, pp: Path) -> dict[int, dict[str, int]]:
    """Splits: fold 0 = every case (MixSup), fold 1 = mask cases (lower); dense: fold s = every case (upper).

    Returns the cases per supervision type of every simulated dataset as written (dataset id -> counts).
    """
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
    return sup_counts


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
            device: str, signature: str, slot: Slot | None = None) -> dict:
    """Train, predict and evaluate one run, each step skipped when its output is current; the evaluation summary."""
    ckpt = _train(run, label, session, cfg, res, device, signature, slot)
    pred, done = _predict(run, label, session, cfg, dense, device, ckpt, slot)
    return _evaluate(run, label, session, cfg, dense, pred, done)


def _do_runs_parallel(runs: list[Run], labels: list[str], session: Session, cfg: BenchmarkConfig,
                      dense: DenseDataset, res: Path, device: str, signature: str) -> list[dict]:
    """:func:`_do_run` for every run, ``cfg.parallel`` at a time, each pinned to its own cores (:func:`parallel_slots`).

    Runs start in list order as slots free up. After a failure no further run starts; the runs
    in progress finish (their results stay on disk for the next invocation) and the first
    failure in run order is raised. Returns the summaries in the order of ``runs``.
    """
    slots = parallel_slots(cfg.parallel, device)
    free = list(reversed(slots))
    lock, stop = threading.Lock(), threading.Event()
    session.say(f"running {len(runs)} runs {cfg.parallel} at a time, on cores "
                + " | ".join(s.cpu_list for s in slots))

    def one(run: Run, label: str) -> dict | None:
        if stop.is_set():
            return None
        with lock:
            slot = free.pop()
        try:
            return _do_run(run, f"{label} [cores {slot.cpu_list}]", session, cfg, dense, res, device, signature,
                           slot)
        except BaseException:
            stop.set()
            raise
        finally:
            with lock:
                free.append(slot)

    with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
        futures = [pool.submit(one, run, label) for run, label in zip(runs, labels)]
        wait(futures)
    for f in futures:
        if f.exception() is not None:
            raise f.exception()
    return [f.result() for f in futures]


def _train(run: Run, label: str, session: Session, cfg: BenchmarkConfig, res: Path, device: str,
           signature: str, slot: Slot | None = None) -> Path:
    """``nnUNetv2_train`` unless ``checkpoint_final.pth`` exists (continuing an interrupted training); the checkpoint."""
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
        cmd = [console_script("nnUNetv2_train"), run.dataset_id, config, run.fold, "-tr", run.trainer,
               "-p", plans_name, "-device", device] + (["--c"] if resume else [])
        session.run(cmd, f"train_{run.key}", f"training {run.key}", epochs=cfg.epochs, slot=slot)
        if not ckpt.is_file():
            raise BenchmarkError(f"training {run.key} ended without {ckpt}; see {session.logs}/train_{run.key}.log")
    run_plans = base / "plans.json"
    if run_plans.is_file() and plans_signature(_read_json(run_plans), config) != signature:
        raise BenchmarkError(f"{run_plans} differs from the shared plans: {run.key} was trained with other plans; "
                             f"remove {base} to retrain it")
    return ckpt


def _predict(run: Run, label: str, session: Session, cfg: BenchmarkConfig, dense: DenseDataset, device: str,
             ckpt: Path, slot: Slot | None = None) -> tuple[Path, Path]:
    """``nnUNetv2_predict`` of the test cases unless a complete prediction with ``ckpt`` exists.

    Predictions go to a temporary folder renamed at the end. Returns the prediction folder and its
    ``prediction_done.json``.
    """
    preds = session.out / "predictions"
    pred, tmp = preds / run.key, preds / f".{run.key}.tmp"
    done = pred / "prediction_done.json"
    if done.is_file() and done.stat().st_mtime >= ckpt.stat().st_mtime and \
            _read_json(done).get("checkpoint") == str(ckpt):  # made with this very checkpoint
        session.say(f"{label}: prediction complete, skipping")
        return pred, done
    session.say(f"{label}: predicting {len(dense.test_ids)} test cases")
    shutil.rmtree(tmp, ignore_errors=True)
    # on a CPU, nnU-Net's sequential mode (-npp 0 -nps 0) saves two worker processes per prediction
    workers = 0 if device == "cpu" else min(3, cfg.num_processes)
    cmd = [console_script("nnUNetv2_predict"), "-i", dense.folder / "imagesTs", "-o", tmp, "-d", run.dataset_id,
           "-c", cfg.configuration, "-tr", run.trainer, "-p", cfg.plans_name, "-f", run.fold,
           "-chk", "checkpoint_final.pth", "-npp", workers, "-nps", workers, "-device", device,
           "--disable_progress_bar"]
    session.run(cmd, f"predict_{run.key}", f"predicting with {run.key}", slot=slot)
    missing = [c for c in dense.test_ids if not (tmp / f"{c}{dense.file_ending}").is_file()]
    if missing:
        raise BenchmarkError(f"nnUNetv2_predict wrote no prediction for {missing[:3]} ({len(missing)} missing)")
    atomic_write_json(tmp / "prediction_done.json", {"checkpoint": str(ckpt), "cases": len(dense.test_ids)})
    shutil.rmtree(pred, ignore_errors=True)
    os.replace(tmp, pred)
    return pred, done


def _evaluate(run: Run, label: str, session: Session, cfg: BenchmarkConfig, dense: DenseDataset, pred: Path,
              done: Path) -> dict:
    """Score the predictions against ``labelsTs`` unless an evaluation newer than them exists; its summary."""
    from nnunet_mixsup.evaluation import METRICS_VERSION, evaluate_folders, write_results

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
