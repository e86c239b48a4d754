"""``nnunet-mixsup bench-speed``: per-trainer training-step time and loader throughput vs stock nnUNetTrainer.

All trainers are built in one process on the same plans and configuration. Each trainer's own
data loader produces batches in the calling process (``nnUNet_n_proc_DA=0`` while it is built, so
the throughput column is one core's augmentation rate, comparable between trainers and machines;
nnU-Net's training divides the work over its background workers); training steps are then timed
*interleaved* (trainer A step, trainer B step, ... repeated) so that machine noise hits all of them
alike, and medians are reported as ratios to ``nnUNetTrainer``. Peak memory is reported on CUDA
(``torch.cuda.max_memory_allocated``) and as the growth of the process' max RSS on CPU.

MixSup trainers are measured in the last epoch of their schedule (:func:`at_full_schedule`):
every ramp at full weight and a delayed self-training phase started (the default
``MixSupTrainer`` runs stock nnU-Net's step until then), so the numbers are their costliest phase.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path
from unittest import mock

import torch


def _make_trainer(name: str, plans: dict, config: str, dataset_json: dict, device: torch.device):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunet_mixsup.trainers as public
    from nnunet_mixsup.lab import experiment_trainers

    cls = nnUNetTrainer if name == "nnUNetTrainer" else \
        getattr(public, name, None) or getattr(experiment_trainers, name, None)
    if cls is None:
        raise ValueError(f"unknown trainer {name!r}; choose from nnUNetTrainer, {', '.join(public.PUBLIC_TRAINERS)} "
                         f"and the experiment trainers of nnunet_mixsup.lab.experiment_trainers")
    p = json.loads(json.dumps(plans))
    p["continue_training"] = False
    tr = cls(p, config, 0, dataset_json, device=device)
    tr.initialize()
    at_full_schedule(tr)
    return tr


def at_full_schedule(trainer) -> None:
    """Put a MixSup trainer into the last epoch of its schedule, with delayed self-training started.

    Ramps depend on ``current_epoch``; ``MixSupTrainer``'s self-training starts when the logged
    validation Dice shows every class, so a perfect Dice is logged for every earlier epoch. Call
    before building the loaders (their batch composition depends on the phase). Stock trainers are
    left alone.
    """
    from nnunet_mixsup.trainers import MixSupTrainerBase

    if not isinstance(trainer, MixSupTrainerBase):
        return
    trainer.current_epoch = trainer.num_epochs - 1
    if hasattr(trainer, "schedule"):
        n = len(trainer.label_manager.foreground_regions if trainer.label_manager.has_regions
                else trainer.label_manager.foreground_labels)
        trainer.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"] = \
            [[1.0] * n for _ in range(trainer.current_epoch)]
        if trainer.self_training_start() is None:
            raise RuntimeError(f"{type(trainer).__name__}: self-training did not start at the last epoch")


def bench_speed(dataset: int | str, config: str, plans_name: str, trainers: list[str], steps: int = 10,
                warmup: int = 2, device: str = "cpu", loader_batches: int | None = None) -> list[dict]:
    """Return one row per trainer: median step time, ratio, loader batches/s, peak memory.

    Each trainer's loader produces ``loader_batches`` batches (default ``steps + warmup``; fewer
    keep large patches affordable: on a GPU machine one 96x160x160 MixSup batch takes seconds in
    a single process), timed for the throughput column; the timed steps cycle through them.
    """
    n_batches = steps + warmup if loader_batches is None else max(1, min(loader_batches, steps + warmup))
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_mixsup.prepare import preprocessed_dataset_folder

    pp = preprocessed_dataset_folder(dataset)
    plans = load_json(str(pp / f"{plans_name}.json"))
    dj = load_json(str(pp / "dataset.json"))
    dev = torch.device(device)
    if "nnUNetTrainer" not in trainers:
        trainers = ["nnUNetTrainer", *trainers]
    built, batches, loader_rate = {}, {}, {}
    for name in trainers:
        torch.manual_seed(0)
        tr = _make_trainer(name, plans, config, dj, dev)
        # in this process: background workers would hand over pre-filled queues, not a rate
        with mock.patch.dict(os.environ, {"nnUNet_n_proc_DA": "0"}):
            dl_tr, dl_val = tr.get_dataloaders()
        t0 = time.perf_counter()
        batches[name] = [next(dl_tr) for _ in range(n_batches)]
        loader_rate[name] = n_batches / (time.perf_counter() - t0)
        for d in (dl_tr, dl_val):
            if hasattr(d, "_finish"):
                d._finish()
        tr.network.train()
        built[name] = tr
    times: dict[str, list[float]] = {n: [] for n in trainers}
    cpu: dict[str, list[float]] = {n: [] for n in trainers}
    mem: dict[str, float] = {}
    for i in range(steps + warmup):
        for name in trainers:
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            built[name].train_step(batches[name][i % n_batches])
            if dev.type == "cuda":
                torch.cuda.synchronize()
                mem[name] = max(mem.get(name, 0), torch.cuda.max_memory_allocated() / 2 ** 20)
            else:
                mem[name] = max(mem.get(name, 0), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    base = statistics.median(times["nnUNetTrainer"])
    cpu_base = statistics.median(cpu["nnUNetTrainer"])
    rows = []
    for name in trainers:
        med, cmed = statistics.median(times[name]), statistics.median(cpu[name])
        rows.append({"trainer": name, "step_s": med, "step_ratio": med / base, "cpu_s": cmed,
                     "cpu_ratio": cmed / cpu_base if cpu_base > 0 else float("nan"),
                     "loader_batches_per_s": loader_rate[name],
                     "loader_ratio": loader_rate[name] / loader_rate["nnUNetTrainer"], "peak_mem_mb": mem[name]})
    return rows


def format_rows(rows: list[dict], device: str) -> str:
    """Markdown table of :func:`bench_speed` rows.

    ``CPU-time ratio``: this process's CPU time per step (``time.process_time``), which other
    processes on the machine do not inflate - the number to read on a shared CPU; on a GPU the
    wall-clock ratio is the one that counts.
    """
    mem = "peak GPU memory (MiB)" if device.startswith("cuda") else "max-RSS growth (MiB)"
    out = [f"| trainer | median step (s) | step ratio | CPU-time ratio | loader batches/s | loader ratio | {mem} |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['trainer']} | {r['step_s']:.3f} | {r['step_ratio']:.2f} | {r['cpu_ratio']:.2f} | "
                   f"{r['loader_batches_per_s']:.1f} | {r['loader_ratio']:.2f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(out)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("bench-speed", help="training step time / loader throughput vs nnUNetTrainer",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-d", required=True, help="dataset id (preprocessed)")
    s.add_argument("-c", default="3d_fullres", help="configuration")
    s.add_argument("-p", default="nnUNetPlans", help="plans name")
    s.add_argument("-tr", nargs="+", default=["MixSupTrainer", "MixSupTrainer_MLDS", "MixSupTrainer_MeanTeacher",
                                          "MixSupTrainer_DualBranch", "MixSupTrainer_DMD"])
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--loader-batches", type=int, default=None,
                   help="batches each loader produces (timed; the steps cycle through them); default steps + 2")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("-o", type=Path, default=None, help="write the Markdown table here")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")

    def _run(a: argparse.Namespace) -> int:
        if a.threads:
            torch.set_num_threads(a.threads)
        rows = bench_speed(a.d, a.c, a.p, a.tr, a.steps, device=a.device, loader_batches=a.loader_batches)
        table = format_rows(rows, a.device)
        print(table)
        if a.o:
            a.o.write_text(table + "\n")
        return 0

    s.set_defaults(func=_run)
