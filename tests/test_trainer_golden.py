"""Golden per-term losses and gradients of the public trainers on fixed batches and weights.

They pin what each trainer computes, so a refactor of the trainer classes changes no behaviour it
does not mean to. Batches are synthetic (fixed generator, every supervision kind), weights are set
by name from fixed seeds, and every random draw inside a step (teacher noise) follows a fixed torch
seed. Phases: ``warmup`` (before the self-training start: the default and MLDS on mask-only
batches, as their loaders produce; the ramps of the teacher-student trainers at their start) and
``selftrain`` (after the start, ramps at full weight, mixed batches).

Record after an intended change with ``MIXSUP_RECORD_GOLDEN=1 pytest tests/test_trainer_golden.py``
and say in the commit why the values moved.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_mixsup.manifest import TYPE_CODES
from nnunet_mixsup.plans import shrink_configuration

GOLDEN = Path(__file__).parent / "golden" / "trainer_terms.json"
PUBLIC = ["MixSupTrainer", "MixSupTrainer_MLDS", "MixSupTrainer_MeanTeacher", "MixSupTrainer_DualBranch",
          "MixSupTrainer_DMD"]
CASES = [(cls, which, config, phase) for cls in PUBLIC for which, config in
         [("planned_2d", "2d"), ("planned_3d", "3d_fullres")] for phase in ("warmup", "selftrain")]


def _trainer_class(name: str):
    import nnunet_mixsup.trainers as T

    return getattr(T, name)


def _build(cls_name: str, info: dict, config: str):
    plans = load_json(str(info["pp"] / f"{info['plans']}.json"))
    plans["configurations"][config] = shrink_configuration(plans["configurations"][config], 32, base_features=4)
    plans["continue_training"] = False
    dj = load_json(str(info["pp"] / "dataset.json"))
    tr = _trainer_class(cls_name)(plans, config, 0, dj, device=torch.device("cpu"))
    tr.num_epochs = 100
    tr.initialize()
    return tr


def _fill(module: torch.nn.Module, key: str) -> None:
    """Every parameter and float buffer set from a seed of (``key``, its name): independent of build order."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(f"{key}:{name}".encode()))
            t.copy_(0.2 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0))


def _set_weights(tr) -> None:
    from nnunet_mixsup.trainers.mixsup import unwrap

    _fill(unwrap(tr.network), "network")
    for k, m in tr.extra_modules.items():
        _fill(unwrap(m), "network" if k == "teacher" else k)  # the EMA teacher starts as the student


def _batch(tr, mixed: bool) -> dict:
    """A fixed batch of 4 samples (mask, box, tags, none if ``mixed``, else 4 mask samples) at the plans' patch size."""
    g = torch.Generator().manual_seed(1234)
    patch = list(tr.configuration_manager.patch_size)
    c = tr.label_manager.num_segmentation_heads
    k = c - 1
    ign = tr.label_manager.ignore_label
    kinds = ["mask", "box", "tags", "none"] if mixed else ["mask"] * 4
    data = torch.randn(len(kinds), tr.num_input_channels, *patch, generator=g)
    seg = torch.randint(0, c, (len(kinds), 1, *patch), generator=g)
    allowed = torch.ones((len(kinds), k, *patch), dtype=seg.dtype)
    for j, kind in enumerate(kinds):
        if kind == "box":
            allowed[j] = 0
            for cls in range(k):
                lo = [s // 4 + cls for s in patch]
                hi = [s // 4 + s // 2 for s in patch]
                allowed[j, cls][tuple(slice(a, z) for a, z in zip(lo, hi))] = 1
            inside = allowed[j].amax(0, keepdim=True) > 0
            seg[j] = torch.where(inside, torch.full_like(seg[j], ign), torch.zeros_like(seg[j]))
        elif kind == "tags":
            allowed[j, 0] = 0  # class 1 absent
            seg[j] = ign
        elif kind == "none":
            seg[j] = ign
    with torch.no_grad():
        shapes = [o.shape[2:] for o in _as_list(tr.network(data[:1]))]
    target = []
    for s in shapes:
        full = torch.cat((seg, allowed), 1).float()
        target.append(torch.nn.functional.interpolate(full, size=list(s), mode="nearest-exact").to(seg.dtype))
    return {"data": data, "target": target, "keys": [f"c{j}" for j in range(len(kinds))],
            "sup_type": torch.tensor([TYPE_CODES[x] for x in kinds]),
            "tags": (allowed.flatten(2).amax(2) > 0).float(), "axes_kept": torch.ones(len(kinds), dtype=torch.bool)}


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _set_phase(tr, phase: str) -> None:
    log = tr.logger.local_logger.my_fantastic_logging
    if phase == "warmup":
        tr.current_epoch = 0
        log["dice_per_class_or_region"] = []
    else:
        tr.current_epoch = 90
        n = tr.label_manager.num_segmentation_heads - 1
        log["dice_per_class_or_region"] = [[0.9] * n for _ in range(tr.current_epoch)]


def compute(tr, phase: str) -> dict:
    """Per-term losses and per-tensor gradient summaries (norm, fixed random projection) of one step."""
    from nnunet_mixsup.trainers.mixsup import unwrap

    _set_weights(tr)
    _set_phase(tr, phase)
    mixed = phase == "selftrain" or type(tr).__name__ not in ("MixSupTrainer", "MixSupTrainer_MLDS")
    batch = _batch(tr, mixed)
    seg = [t[:, :1] for t in batch["target"]]
    allowed = [t[:, 1:] for t in batch["target"]]
    torch.manual_seed(7)
    terms = tr.forward_and_loss(batch["data"], seg, allowed, batch)
    params = {f"network.{n}": p for n, p in unwrap(tr.network).named_parameters()}
    for k, m in tr.extra_modules.items():
        params.update({f"{k}.{n}": p for n, p in unwrap(m).named_parameters() if p.requires_grad})
    for p in params.values():
        p.grad = None
    sum(terms.values()).backward()
    grads = {}
    for name, p in params.items():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        proj = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        grads[name] = [float(g.norm()), float((g * proj).sum())]
    return {"terms": {k: float(v.detach()) for k, v in terms.items() if float(v.detach()) != 0.0},
            "grads": grads}


def _key(cls, config, phase):
    return f"{cls}/{config}/{phase}"


@pytest.fixture(scope="module")
def golden() -> dict:
    if os.environ.get("MIXSUP_RECORD_GOLDEN") or not GOLDEN.is_file():
        return {}
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("cls_name,which,config,phase", CASES)
def test_trainer_terms_and_gradients_match_golden(cls_name, which, config, phase, request, golden):
    tr = _build(cls_name, request.getfixturevalue(which), config)
    got = compute(tr, phase)
    key = _key(cls_name, config, phase)
    if os.environ.get("MIXSUP_RECORD_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        data[key] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=0, sort_keys=True))
        return
    want = golden[key]
    assert sorted(got["terms"]) == sorted(want["terms"]), key
    for k, v in want["terms"].items():
        assert got["terms"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"{key}: term {k}"
    assert sorted(got["grads"]) == sorted(want["grads"]), key
    scale = max(abs(n) for n, _ in want["grads"].values()) or 1.0
    for name, (norm, proj) in want["grads"].items():
        assert got["grads"][name][0] == pytest.approx(norm, rel=1e-3, abs=1e-5 * scale), f"{key}: |grad| {name}"
        assert got["grads"][name][1] == pytest.approx(proj, rel=1e-3, abs=1e-5 * scale), f"{key}: grad {name}"
