"""Checks for tools that write a new nnU-Net raw dataset (``simulate``, ``demo-data``, ``convert``).

Where ``nnUNet_raw`` is, what makes a valid dataset id and name, refusing an id that nnU-Net already
knows under another name (nnU-Net finds a dataset by the ``DatasetXXX_`` prefix of its folder, so
one id must have one name in the raw, preprocessed and results folders), and the package version
that provenance files such as ``simulation.json`` record.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

#: the part of a dataset folder name after ``DatasetXXX_``
DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def raw_root() -> Path:
    """``nnUNet_raw`` as a Path (clear error when unset)."""
    from nnunetv2.paths import nnUNet_raw

    if not nnUNet_raw.is_set():
        raise RuntimeError("environment variable nnUNet_raw is not set (export nnUNet_raw=/path/to/nnUNet_raw)")
    return Path(nnUNet_raw.get())


def validate_dataset_id(dataset_id: Any) -> int:
    """``dataset_id`` as an int if it is one in 1..999 (nnU-Net's three digits), else :class:`ValueError`."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be an integer in 1..999, got {dataset_id!r}")
    return int(dataset_id)


def check_dataset_name(name: Any) -> str:
    """``name`` if it can follow ``DatasetXXX_`` in a folder name, else :class:`ValueError`."""
    if not isinstance(name, str) or not DATASET_NAME_RE.match(name):
        raise ValueError(f"invalid dataset name {name!r}: it must start with a letter or digit and contain only "
                         "letters, digits, '_' and '-'")
    return name


def check_target_id(dataset_id: int, folder_name: str) -> None:
    """Refuse a dataset id already used under another name in nnUNet_raw / _preprocessed / _results."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results

    prefix = f"Dataset{dataset_id:03d}_"
    for var in (nnUNet_raw, nnUNet_preprocessed, nnUNet_results):
        root = var.get()
        if not root or not os.path.isdir(root):
            continue
        others = sorted(n for n in os.listdir(root) if n.startswith(prefix) and n != folder_name
                        and os.path.isdir(os.path.join(root, n)))
        if others:
            raise FileExistsError(f"dataset id {dataset_id} is already used by {others[0]} in {root}; "
                                  f"choose another id (nnU-Net needs one name per id)")


def package_version() -> str | None:
    """The installed nnunet-mixsup version, for provenance records (None if it cannot be found)."""
    try:
        from nnunet_mixsup import __version__

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        return version("nnunet-mixsup")
    except Exception:  # noqa: BLE001 - optional information only
        return None
