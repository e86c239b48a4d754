"""bench-speed: one interleaved run against stock nnU-Net, MixSup trainers in their costliest phase."""
from __future__ import annotations

import math
import os

from nnunet_mixsup.lab.bench_speed import bench_speed, format_rows
from nnunet_mixsup.manifest import TYPE_CODES


def test_bench_speed_rows_and_self_training_phase(planned_2d, monkeypatch):
    import nnunet_mixsup.trainers.mixsup as M

    calls, batches = [], []
    real_teacher, real_step = M.teacher_pseudo_labels, M.MixSupTrainer.train_step

    def teacher(*a, **k):
        calls.append("teacher")
        return real_teacher(*a, **k)

    def step(self, batch):
        batches.append(batch["sup_type"].clone())
        return real_step(self, batch)

    monkeypatch.setattr(M, "teacher_pseudo_labels", teacher)
    monkeypatch.setattr(M.MixSupTrainer, "train_step", step)
    rows = bench_speed(planned_2d["id"], "2d", planned_2d["plans"], ["MixSupTrainer"], steps=2, warmup=1,
                       device="cpu")
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "MixSupTrainer"]
    assert rows[0]["step_ratio"] == 1.0 and rows[0]["loader_ratio"] == 1.0
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in rows
               for k in ("step_s", "step_ratio", "cpu_s", "cpu_ratio", "loader_batches_per_s"))
    # measured after its warm-up: the teacher labels the weak samples of mixed batches at every step
    assert calls == ["teacher"] * 3
    assert any((b != TYPE_CODES["mask"]).any() for b in batches)
    table = format_rows(rows, "cpu")
    assert table.count("\n") == 3 and "| MixSupTrainer |" in table


def test_loader_batches_are_cycled_and_made_in_process(planned_2d, monkeypatch):
    import nnunet_mixsup.trainers.mixsup as TD

    seen, procs = [], []
    real_step, real_loaders = TD.MixSupTrainer.train_step, TD.MixSupTrainer.get_dataloaders

    def step(self, batch):
        seen.append(id(batch))
        return real_step(self, batch)

    def loaders(self):
        procs.append(os.environ.get("nnUNet_n_proc_DA"))
        return real_loaders(self)

    monkeypatch.setattr(TD.MixSupTrainer, "train_step", step)
    monkeypatch.setattr(TD.MixSupTrainer, "get_dataloaders", loaders)
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")
    rows = bench_speed(planned_2d["id"], "2d", planned_2d["plans"], ["MixSupTrainer"], steps=3, warmup=1,
                       device="cpu", loader_batches=2)
    assert len(seen) == 4 and len(set(seen)) == 2 and seen[0] == seen[2] and seen[1] == seen[3]
    assert procs == ["0"]  # single-process loader while measured ...
    assert os.environ["nnUNet_n_proc_DA"] == "3"  # ... and the user's setting restored
    assert all(math.isfinite(r["loader_batches_per_s"]) for r in rows)
