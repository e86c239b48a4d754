"""The full CLI chain, as a user runs it: synthetic data -> prepare -> plan_and_preprocess ->
small plans -> stock nnUNetv2_train -tr MixSupTrainer -> stock nnUNetv2_predict -> evaluate."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from nnunet_mixsup.cli import trainers_path

BIN = Path(sys.executable).parent
# the GPU run of the same chain (nnU-Net's AMP, pinned-memory loaders, CUDA prediction); skipped without a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim,config", [(3, "3d_fullres"), (2, "2d")])
def test_plan_train_predict_evaluate(tmp_path, dim, config, device):
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = str(tmp_path / k)
        (tmp_path / k).mkdir()
    env.update(nnUNet_extTrainer=trainers_path(), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
               nnUNet_mixsup_epochs="2", nnUNet_mixsup_iterations="4", nnUNet_mixsup_val_iterations="2")
    did = "971" if dim == 3 else "972"
    ms = str(BIN / "nnunet-mixsup")
    run([ms, "synthetic-data", "-d", did, "--dim", str(dim), "--counts", "3", "2", "2", "1"], env)
    run([ms, "prepare", "-d", did], env)
    run([ms, "plan_and_preprocess", "-d", did, "-c", config, "-np", "1"], env)
    run([ms, "small-plans", "-d", did, "-c", config, "--max-features", "32", "--base-features", "4"], env)
    r = run([str(BIN / "nnUNetv2_train"), did, config, "0", "-tr", "MixSupTrainer", "-p", "nnUNetPlans_small",
             "-device", device], env)
    assert "supervision summary" in r.stdout
    res = tmp_path / "nnUNet_results"
    ckpt = next(res.rglob("checkpoint_final.pth"))
    raw = next((tmp_path / "nnUNet_raw").iterdir())
    out = tmp_path / "pred"
    run([str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", did, "-c", config,
         "-tr", "MixSupTrainer", "-p", "nnUNetPlans_small", "-f", "0", "-device", device, "-npp", "1",
         "-nps", "1"], env)
    for img in sorted((raw / "imagesTs").iterdir()):
        pred = out / img.name.replace("_0000", "")
        assert pred.is_file()
        a, b = sitk.ReadImage(str(img)), sitk.ReadImage(str(pred))
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert ckpt.is_file()
    ev = tmp_path / "eval"
    run([ms, "evaluate", str(raw / "labelsTs"), str(out), "-d", did, "-o", str(ev)], env)
    assert (ev / "summary.json").is_file()
