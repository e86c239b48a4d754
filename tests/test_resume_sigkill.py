"""A training killed with SIGKILL resumes with stock ``nnUNetv2_train ... --c`` and keeps its teacher.

The run uses a throw-away trainer variant (checkpoint every epoch) defined in a temporary folder
that is appended to ``nnUNet_extTrainer`` - exactly how a user would add a variant.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunet_mixsup.cli import trainers_path

BIN = Path(sys.executable).parent
VARIANT = '''
from nnunet_mixsup.trainers import MixSupTrainer_MeanTeacher


class MixSupTrainer_MeanTeacher_KillTest(MixSupTrainer_MeanTeacher):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 6, 3, 1
        self.save_every = 1
'''


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_sigkill_then_continue_restores_teacher(tmp_path):
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = str(tmp_path / k)
        (tmp_path / k).mkdir()
    extra = tmp_path / "my_trainers"
    extra.mkdir()
    (extra / "kill_test.py").write_text(VARIANT)
    env.update(nnUNet_extTrainer=os.pathsep.join([trainers_path(), str(extra)]), nnUNet_n_proc_DA="0",
               nnUNet_def_n_proc="1", nnUNet_mixsup_no_plot="1")
    env.pop("nnUNet_mixsup_epochs", None)
    env.pop("nnUNet_mixsup_iterations", None)
    ms = str(BIN / "nnunet-mixsup")
    _run([ms, "synthetic-data", "-d", "973", "--dim", "2", "--counts", "3", "2", "2", "1"], env)
    _run([ms, "plan_and_preprocess", "-d", "973", "-c", "2d", "-np", "1"], env)
    _run([ms, "small-plans", "-d", "973", "-c", "2d", "--max-features", "32", "--base-features", "4"], env)
    train = [str(BIN / "nnUNetv2_train"), "973", "2d", "0", "-tr", "MixSupTrainer_MeanTeacher_KillTest",
             "-p", "nnUNetPlans_small", "-device", "cpu"]
    proc = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = None
    t0 = time.time()
    try:
        while time.time() - t0 < 1200 and proc.poll() is None:  # generous: a loaded machine starts slowly
            found = list((tmp_path / "nnUNet_results").rglob("checkpoint_latest.pth"))
            if found:
                # checkpoints are replaced atomically, so a file that exists is complete
                ck = torch.load(found[0], map_location="cpu", weights_only=False)
                if ck.get("current_epoch", 0) >= 2 and "mixsup_state" in ck:
                    latest = found[0]
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert latest is not None, "no checkpoint with mixed-supervision state appeared before the run ended"
    assert not (latest.parent / "checkpoint_final.pth").exists(), "the run finished before it could be killed"
    before = torch.load(latest, map_location="cpu", weights_only=False)
    r = _run(train + ["--c"], env)
    final = torch.load(latest.parent / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 6
    assert set(final["mixsup_state"]) == {"teacher", "pseudo_head"}
    # the teacher kept learning from where it was: its weights moved on from the resumed state
    k = next(iter(before["mixsup_state"]["teacher"]))
    assert not torch.equal(before["mixsup_state"]["teacher"][k], final["mixsup_state"]["teacher"][k])
    assert "error" not in r.stderr.lower()
