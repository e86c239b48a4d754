"""Derived plans for CPU tests and benchmarks (``nnunet-mixsup small-plans``).

nnU-Net's default networks take seconds per iteration on a 2-core CPU. A *derived* plans file keeps
the preprocessed data (same ``data_identifier``, same spacing and normalisation) and only shrinks
the network (features per stage), the patch and optionally the batch size. Baselines and MixSup
trainers must then use the same derived plans (``-p NAME``) so the comparison stays fair.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_mixsup.fileio import atomic_write_json
from nnunet_mixsup.prepare import preprocessed_dataset_folder


def shrink_configuration(cfg: dict, max_features: int, patch_size: Sequence[int] | None = None,
                         batch_size: int | None = None, base_features: int | None = None) -> dict:
    """Copy of one plans configuration with a smaller network / patch / batch.

    Stages are dropped from the bottom until every axis of the patch is divisible by the cumulative
    stride and at least 4 voxels remain at the coarsest stage.
    """
    cfg = copy.deepcopy(cfg)
    ak = cfg["architecture"]["arch_kwargs"]
    if patch_size is not None:
        cfg["patch_size"] = [int(p) for p in patch_size]
    patch = np.array(cfg["patch_size"])
    n = ak["n_stages"]
    while n > 2:
        cum = np.prod(np.array(ak["strides"][:n]), axis=0)
        if np.all(patch % cum == 0) and np.all(patch // cum >= 4):
            break
        n -= 1
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        ak[key] = ak[key][:n]
    ak["n_conv_per_stage_decoder"] = ak["n_conv_per_stage_decoder"][: n - 1]
    ak["n_stages"] = n
    f0 = base_features or ak["features_per_stage"][0]
    ak["features_per_stage"] = [int(min(f0 * 2 ** i, max_features)) for i in range(n)]
    if batch_size is not None:
        cfg["batch_size"] = int(batch_size)
    return cfg


def make_small_plans(dataset: int | str, source_plans: str = "nnUNetPlans", target_plans: str = "nnUNetPlans_small",
                     configurations: Sequence[str] = ("2d", "3d_fullres"), max_features: int = 64,
                     base_features: int = 8, patch_size: Sequence[int] | None = None,
                     batch_size: int | None = None) -> Path:
    """Write ``target_plans.json`` next to the source plans; preprocessed data is shared."""
    folder = preprocessed_dataset_folder(dataset)
    plans = json.loads((folder / f"{source_plans}.json").read_text())
    out = copy.deepcopy(plans)
    out["plans_name"] = target_plans
    for name in configurations:
        if name not in plans["configurations"]:
            continue
        cfg = plans["configurations"][name]
        if "architecture" not in cfg:  # inheriting configuration (e.g. 3d_cascade_fullres)
            continue
        ps = patch_size if patch_size is None or len(patch_size) == len(cfg["patch_size"]) else None
        out["configurations"][name] = shrink_configuration(cfg, max_features, ps, batch_size, base_features)
        out["configurations"][name]["data_identifier"] = cfg["data_identifier"]
    path = folder / f"{target_plans}.json"
    atomic_write_json(path, out)
    return path
