"""The trainer refuses to guess the supervision when the manifest sidecar is missing and labels say "ignore"."""
from __future__ import annotations

import shutil

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json


def _trainer(pp, plans_name: str, dataset_json: dict):
    from nnunet_mixsup.trainers import MixSupTrainer

    plans = load_json(str(pp / f"{plans_name}.json"))
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training puts this into the plans
    return MixSupTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))


def test_manifest_sidecar_required_with_ignore_label(planned_3d, fresh_dirs):
    """Without ``supervision.json`` the derived ignore maps of weak cases would train as masks: an error.

    A copy of the preprocessed dataset without the sidecar: ``load_supervision`` raises and names the
    missing file; with the sidecar back the same trainer reads it; without an ignore label every case
    is a mask case (stock nnU-Net's data)."""
    pp = fresh_dirs["nnUNet_preprocessed"] / planned_3d["pp"].name
    shutil.copytree(planned_3d["pp"], pp)
    sidecar = pp / "supervision.json"
    sidecar.unlink()
    dj = load_json(str(pp / "dataset.json"))
    assert dj["labels"]["ignore"] == 3

    tr = _trainer(pp, planned_3d["plans"], dj)
    with pytest.raises(RuntimeError, match="supervision.json is missing but the dataset uses an ignore label") as e:
        tr.load_supervision()
    assert str(sidecar) in str(e.value)

    shutil.copy(planned_3d["pp"] / "supervision.json", sidecar)
    sup = tr.load_supervision()
    assert {s.type for s in sup.values()} > {"mask"}, "the synthetic dataset has weak cases"

    sidecar.unlink()
    no_ignore = {**dj, "labels": {k: v for k, v in dj["labels"].items() if k != "ignore"}}
    sup = _trainer(pp, planned_3d["plans"], no_ignore).load_supervision()
    assert sup and all(s.type == "mask" for s in sup.values())
