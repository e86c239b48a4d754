"""Shared test helpers: a tiny-network trainer on a planned synthetic dataset, and its loaders' batches."""
from __future__ import annotations

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_mixsup.plans import shrink_configuration


def trainer_class(name: str) -> type:
    """A public trainer (:mod:`nnunet_mixsup.trainers`) or an experiment trainer, by class name."""
    import nnunet_mixsup.trainers as public
    from nnunet_mixsup.lab import experiment_trainers

    cls = getattr(public, name, None) or getattr(experiment_trainers, name, None)
    if cls is None:
        raise ValueError(f"no trainer class {name!r}")
    return cls


def make_trainer(cls_name: str, info: dict, config: str, device: str = "cpu", **attrs):
    """``cls_name`` on the fixture dataset ``info`` with a tiny network (features <= 32, base 4), initialised.

    ``attrs`` are set as attributes before ``initialize()`` (hyperparameters); 2 iterations per
    epoch, 1 validation iteration.
    """
    plans = load_json(str(info["pp"] / f"{info['plans']}.json"))
    plans["configurations"][config] = shrink_configuration(plans["configurations"][config], 32, base_features=4)
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training puts this into the plans
    dj = load_json(str(info["pp"] / "dataset.json"))
    tr = trainer_class(cls_name)(plans, config, 0, dj, device=torch.device(device))
    tr.num_iterations_per_epoch = 2
    tr.num_val_iterations_per_epoch = 1
    for k, v in attrs.items():
        setattr(tr, k, v)
    tr.initialize()
    return tr


def batches(tr, n: int, val: bool = False) -> list[dict]:
    """``n`` batches of the trainer's own training (or validation) loader; both loaders are closed."""
    dl_tr, dl_val = tr.get_dataloaders()
    try:
        return [next(dl_val if val else dl_tr) for _ in range(n)]
    finally:
        for d in (dl_tr, dl_val):
            if hasattr(d, "_finish"):
                d._finish()
