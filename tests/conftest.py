"""Shared fixtures: synthetic datasets in a temporary nnU-Net folder tree, planned and preprocessed once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_mixsup_no_plot", "1")


#: fixtures that write an nnU-Net dataset (raw, preprocessed or results folders): tests using one belong to the
#: integration tier and are marked ``slow`` automatically, so ``pytest -m "not slow"`` is the fast unit tier
DATASET_FIXTURES = {"nnunet_dirs", "fresh_dirs", "planned_2d", "planned_3d"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: integration tier - builds an nnU-Net dataset or runs nnU-Net end to end")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)  # fixtures fetched with request.getfixturevalue(param)
        if callspec is not None:
            used |= {v for v in callspec.params.values() if isinstance(v, str)}
        if DATASET_FIXTURES & used:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nnunet")
    d = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in d.items():
        v.mkdir()
        os.environ[k] = str(v)
    return d


@pytest.fixture()
def fresh_dirs(tmp_path, monkeypatch) -> dict[str, Path]:
    """A private nnU-Net folder tree for tests that modify datasets."""
    d = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in d.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return d


@pytest.fixture(scope="session")
def planned_3d(nnunet_dirs) -> dict:
    """Synthetic 3D dataset 951 (anisotropic, transposed, cropped), prepared, planned, preprocessed."""
    from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
    from nnunet_mixsup.preprocess import plan_and_preprocess

    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], 951, seed=1)
    plans = plan_and_preprocess(951, configurations=("3d_fullres",), num_processes=1)
    return {"id": 951, "raw": folder, "pp": nnunet_dirs["nnUNet_preprocessed"] / folder.name, "plans": plans}


@pytest.fixture(scope="session")
def planned_2d(nnunet_dirs) -> dict:
    """Synthetic 2D dataset 952, prepared, planned, preprocessed (2d configuration)."""
    from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
    from nnunet_mixsup.preprocess import plan_and_preprocess

    folder = make_synthetic_dataset(nnunet_dirs["nnUNet_raw"], 952, dim=2, seed=2)
    plans = plan_and_preprocess(952, configurations=("2d",), num_processes=1)
    return {"id": 952, "raw": folder, "pp": nnunet_dirs["nnUNet_preprocessed"] / folder.name, "plans": plans}
