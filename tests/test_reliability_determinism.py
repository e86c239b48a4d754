"""Determinism (same seed -> same simulation, splits, loader sampling) and no unsafe deserialisation.

No user-provided file is read with pickle / eval: raw data is read with SimpleITK, JSON and our own NIfTI
scanner only. The only unpickling loads in the package are ``torch.load(..., weights_only=False)`` of
nnU-Net checkpoints in ``nnUNet_results`` (exactly as nnU-Net itself loads them) - listed in ALLOWED below;
nnU-Net's own ``.pkl`` properties in ``nnUNet_preprocessed`` are read by nnU-Net, not by this package.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_mixsup.splits import mixsup_splits

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ simulate
def test_simulation_is_bytewise_deterministic(fresh_dirs):
    from test_simulate import make_source

    from nnunet_mixsup.lab.simulate import simulate_dataset

    make_source(fresh_dirs["nnUNet_raw"], n=12)
    kw = {"masks": 0.25, "boxes": 0.25, "tags": 0.25, "box_margin_mm": 1.0, "box_jitter_mm": 2.0,
          "show_progress": False}
    a = tree_digest(simulate_dataset(500, 501, seed=11, **kw))
    b = tree_digest(simulate_dataset(500, 501, seed=11, overwrite=True, **kw))
    assert a == b, "same seed, different simulated dataset"
    c = tree_digest(simulate_dataset(500, 501, seed=12, overwrite=True, **kw))
    assert c["supervision.json"] != a["supervision.json"]


# ------------------------------------------------------------------------------------------ splits
def test_splits_are_deterministic_and_order_independent():
    masks = [f"m{i:02d}" for i in range(11)]
    weak = [f"w{i:02d}" for i in range(7)]
    a = mixsup_splits(masks, weak, seed=12345)
    b = mixsup_splits(list(reversed(masks)), weak[::-1], seed=12345)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(mixsup_splits(masks, weak, seed=1)) != json.dumps(a)
    for fold in a:  # weak cases always train, validation holds mask cases only
        assert set(weak) <= set(fold["train"]) and set(fold["val"]) <= set(masks)
    assert sorted(v for f in a for v in f["val"]) == masks


# ------------------------------------------------------------------------------------------ loader
def _loader(info: dict, config: str, batch_size: int = 4, strong_fraction: float = 0.5):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mixsup.data import MixSupDataLoader
    from nnunet_mixsup.manifest import parse_manifest

    pm = PlansManager(str(info["pp"] / f"{info['plans']}.json"))
    cm = pm.get_configuration(config)
    dj = load_json(str(info["pp"] / "dataset.json"))
    problems: list[str] = []
    sup = parse_manifest(json.loads((info["pp"] / "supervision.json").read_text()), problems).cases
    assert not problems
    folder = str(info["pp"] / cm.data_identifier)
    ds = infer_dataset_class(folder)(folder)
    return MixSupDataLoader(ds, batch_size, cm.patch_size, cm.patch_size, pm.get_label_manager(dj), supervision=sup,
                            transpose_forward=pm.transpose_forward, strong_fraction=strong_fraction,
                            oversample_foreground_percent=0.33, transforms=None)


def _batches(info: dict, seed: int, n: int = 4) -> tuple[list, str]:
    np.random.seed(seed)
    dl = _loader(info, "2d")
    keys, h = [], hashlib.sha256()
    for _ in range(n):
        b = dl.generate_train_batch()
        keys.append(list(b["keys"]))
        t = b["target"] if not isinstance(b["target"], list) else b["target"][0]
        for arr in (b["data"], t, b["sup_type"], b["tags"]):
            h.update(arr.numpy().tobytes())
    return keys, h.hexdigest()


def test_loader_sampling_is_deterministic_for_a_numpy_seed(planned_2d):
    k1, h1 = _batches(planned_2d, 0)
    k2, h2 = _batches(planned_2d, 0)
    assert k1 == k2 and h1 == h2, "same numpy seed, different batches"
    _, h3 = _batches(planned_2d, 1)
    assert h3 != h1


# ------------------------------------------------------------------------------------------ no pickle / eval
#: (file, call) pairs that deserialise with pickle on purpose, and why
ALLOWED = {
    # nnU-Net checkpoints (nnUNet_results): nnU-Net loads them the same way (torch.load weights_only=False)
    ("nnunet_mixsup/trainers/mixsup.py", "torch.load"): 2,
}
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
                "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "yaml.unsafe_load",
                "yaml.full_load", "pd.read_pickle", "pandas.read_pickle", "load_pickle", "torch.load",
                "numpy.load", "np.load", "eval", "exec", "yaml.load", "jsonpickle.decode"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _unsafe(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    if name not in UNSAFE_CALLS:
        return None
    kw = {k.arg: k.value for k in call.keywords}
    if name in ("np.load", "numpy.load"):  # safe unless allow_pickle=True
        v = kw.get("allow_pickle")
        return name if v is not None and not (isinstance(v, ast.Constant) and v.value is False) else None
    if name == "torch.load":  # safe with weights_only=True
        v = kw.get("weights_only")
        return None if isinstance(v, ast.Constant) and v.value is True else name
    if name == "yaml.load":
        v = kw.get("Loader")
        return None if v is not None and "Safe" in (_dotted(v) or "") else name
    return name


def test_no_user_file_is_unpickled_or_evaluated():
    found: dict[tuple[str, str], int] = {}
    imports = []
    for folder in ("nnunet_mixsup", "trainers", "dataset_conversion"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            tree = ast.parse(f.read_text(encoding="utf-8"), filename=rel)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = _unsafe(node)
                    if name:
                        found[(rel, name)] = found.get((rel, name), 0) + 1
                if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "marshal", "shelve"):
                    imports.append(f"{rel}: from {node.module} import ...")
                if isinstance(node, ast.ImportFrom) and any(a.name == "load_pickle" for a in node.names):
                    imports.append(f"{rel}: imports load_pickle")
    assert not imports, imports
    unexpected = {k: v for k, v in found.items() if ALLOWED.get(k) != v}
    assert not unexpected, f"unsafe deserialisation / eval (or a change to the allow-list): {unexpected}"


def test_the_scanner_finds_what_it_should():
    bad = ("import pickle, numpy as np, torch\npickle.load(open('x', 'rb'))\nnp.load('x', allow_pickle=True)\n"
           "torch.load('x')\neval('1')\nnp.load('y')\ntorch.load('z', weights_only=True)\n")
    hits = [n for node in ast.walk(ast.parse(bad)) if isinstance(node, ast.Call) for n in [_unsafe(node)] if n]
    assert hits == ["pickle.load", "np.load", "torch.load", "eval"]


@pytest.mark.parametrize("module", ["nnunet_mixsup.manifest", "nnunet_mixsup.prepare", "nnunet_mixsup.evaluation"])
def test_json_is_read_with_json(module):
    """Manifests, dataset.json and records are parsed with ``json`` (no object hooks that build code objects)."""
    import importlib

    src = Path(importlib.import_module(module).__file__).read_text()
    assert "object_hook=" not in src.replace("object_pairs_hook=", "")
