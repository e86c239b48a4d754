"""The trainers on a CUDA GPU, as nnU-Net runs them there: mixed precision (autocast + GradScaler),
every extra module (teacher, EMA, second decoder, second network) on the device, the costliest phase
(self-training started, ramps at full weight), an exact checkpoint round trip that includes the grad
scaler, and ``bench-speed``'s peak-memory column.

Skipped without a GPU (CI has none); run them on a GPU machine with ``pytest tests/test_gpu.py``.
``MIXSUP_TEST_DEVICE=cpu`` runs the same code paths on the CPU (no AMP), to check the tests themselves.
The stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` chain with ``-device cuda`` is the ``cuda`` case
of ``tests/test_end_to_end.py``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_distill import _assert_same_training_state, _batches, _trainer

from nnunet_mixsup.lab.bench_speed import at_full_schedule, bench_speed

DEVICE = os.environ.get("MIXSUP_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

# every scheme with its own training step or extra module (variants that only change numbers are covered by these)
TRAINERS = ["MixSupTrainer", "MixSupTrainer_MLDS", "MixSupTrainer_MeanTeacher", "MixSupTrainer_DualBranch",
            "MixSupTrainer_DMD", "MixSupTrainer_StrongViewAddWeak"]
WITH_EXTRA_STATE = ["MixSupTrainer", "MixSupTrainer_MeanTeacher", "MixSupTrainer_DualBranch", "MixSupTrainer_DMD"]


def _on_device(tr) -> None:
    want = torch.device(DEVICE).type
    modules = [tr.network, *getattr(tr, "extra_modules", {}).values()]
    for m in modules:
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            assert t.device.type == want, f"{type(tr).__name__}: {name} is on {t.device}, not {want}"


@pytest.mark.parametrize("cls_name", TRAINERS)
@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_amp_train_and_validation_steps_at_full_schedule(cls_name, which, config, request):
    tr = _trainer(cls_name, request.getfixturevalue(which), config, device=DEVICE)
    at_full_schedule(tr)
    assert (tr.grad_scaler is not None) == (DEVICE == "cuda")  # nnU-Net's AMP is on exactly on CUDA
    _on_device(tr)
    for b in _batches(tr, 3):
        out = tr.train_step(b)
        assert np.isfinite(out["loss"]), cls_name
        for k in getattr(tr, "loss_term_names", ()):
            assert np.isfinite(out[f"loss_{k}"]), (cls_name, k)
    _on_device(tr)  # nothing was moved back or re-created on the CPU by the step
    v = tr.validation_step(_batches(tr, 1, val=True)[0])
    assert np.isfinite(v["loss"])
    assert np.asarray(v["tp_hard"]).shape == np.asarray(v["fp_hard"]).shape


@pytest.mark.parametrize("cls_name", WITH_EXTRA_STATE)
def test_checkpoint_round_trip_with_grad_scaler(cls_name, planned_2d, tmp_path):
    tr = _trainer(cls_name, planned_2d, "2d", device=DEVICE)
    at_full_schedule(tr)
    for b in _batches(tr, 3):
        tr.train_step(b)
    f = str(tmp_path / "checkpoint_latest.pth")
    tr.save_checkpoint(f)

    tr2 = _trainer(cls_name, planned_2d, "2d", device=DEVICE)
    tr2.load_checkpoint(f)
    _on_device(tr2)
    _assert_same_training_state(tr, tr2)
    if tr.grad_scaler is not None:
        assert tr2.grad_scaler.state_dict() == tr.grad_scaler.state_dict()
    tr.current_epoch += 1  # nnU-Net stores current_epoch + 1
    b = _batches(tr, 1)[0]
    torch.manual_seed(0)
    l1 = tr.train_step(b)["loss"]
    torch.manual_seed(0)
    l2 = tr2.train_step(b)["loss"]
    assert l1 == pytest.approx(l2, rel=1e-3, abs=1e-5)  # cuDNN may pick other kernels: not bit-exact


def test_bench_speed_reports_peak_memory(planned_3d):
    rows = bench_speed(planned_3d["id"], "3d_fullres", planned_3d["plans"], ["MixSupTrainer", "MixSupTrainer_DMD"],
                       steps=1, warmup=1, device=DEVICE)
    by = {r["trainer"]: r for r in rows}
    assert all(np.isfinite(r["step_s"]) and r["step_s"] > 0 for r in rows)
    if DEVICE == "cuda":  # two networks and their activations: DMD needs more memory than stock nnU-Net
        assert 0 < by["nnUNetTrainer"]["peak_mem_mb"] < by["MixSupTrainer_DMD"]["peak_mem_mb"]
