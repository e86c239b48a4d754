"""``nnunet-mixsup plan_and_preprocess``: prepare + nnU-Net's fingerprint, planning and preprocessing.

One fix stock nnU-Net lacks: its fingerprint collects foreground intensities from ``seg > 0``,
which includes ignore-label voxels. For weak cases those are whole boxes or whole images, which
skews CT-style normalisation. We recompute ``foreground_intensity_properties_per_channel`` from the
truly labelled foreground voxels of the mask cases and write it into the fingerprint before
planning. Sampling and statistics are stock nnU-Net's (``DatasetFingerprintExtractor``): a budget
of 10e7 foreground voxels in total, split evenly over the cases that contribute (here the mask
cases), drawn with replacement by a generator seeded anew for every case; percentiles, mean, std,
min and max of all samples together.

The manifest is copied to ``nnUNet_preprocessed/DatasetXXX/supervision.json`` (one level above the
configuration folders, where extra files do not disturb nnU-Net's dataset-class inference) and a
mask-aware ``splits_final.json`` is written if none exists.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_mixsup.fileio import atomic_write_json
from nnunet_mixsup.manifest import MANIFEST_NAME
from nnunet_mixsup.prepare import (
    prepare_dataset,
    preprocessed_dataset_folder,
    raw_dataset_folder,
)
from nnunet_mixsup.splits import mixsup_splits

FOREGROUND_VOXELS_FOR_INTENSITY_STATS = 10e7
"""Stock nnU-Net's ``num_foreground_voxels_for_intensitystats``: foreground samples for the whole dataset."""


def foreground_samples_per_case(n_cases: int) -> int:
    """Foreground voxels sampled per case when ``n_cases`` cases contribute (stock: budget // cases)."""
    return int(FOREGROUND_VOXELS_FOR_INTENSITY_STATS // max(1, int(n_cases)))


def mask_only_intensity_properties(raw_folder: Path, mask_ids: Sequence[str], num_channels: int,
                                   foreground_labels: Sequence[int], samples_per_case: int | None = None,
                                   seed: int = 1234) -> dict:
    """nnU-Net's per-channel foreground intensity statistics, from labelled foreground of mask cases only.

    Sampled as ``DatasetFingerprintExtractor.collect_foreground_intensities`` does: per case, after
    nnU-Net's crop to the non-zero region, ``samples_per_case`` voxels (default
    :func:`foreground_samples_per_case` of the mask cases) drawn with replacement from the voxels of
    ``foreground_labels``, channel after channel, by ``RandomState(seed)`` created for that case.
    On a dataset of mask cases only this gives stock nnU-Net's numbers exactly. Returns
    ``{"0": {"mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5"}, ...}``.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    dj = json.loads((raw_folder / "dataset.json").read_text())
    fe = dj["file_ending"]
    first = raw_folder / "imagesTr" / f"{mask_ids[0]}_0000{fe}"
    rw = determine_reader_writer_from_dataset_json(dj, str(first))()
    if samples_per_case is None:
        samples_per_case = foreground_samples_per_case(len(mask_ids))
    per_channel: list[list[np.ndarray]] = [[] for _ in range(num_channels)]
    fg = np.array(list(foreground_labels))
    for cid in tqdm(mask_ids, desc="Foreground intensities (mask cases)"):
        imgs, _ = rw.read_images([str(raw_folder / "imagesTr" / f"{cid}_{c:04d}{fe}") for c in range(num_channels)])
        seg, _ = rw.read_seg(str(raw_folder / "labelsTr" / f"{cid}{fe}"))
        imgs, seg, _ = crop_to_nonzero(imgs, seg)
        m = np.isin(seg[0], fg)
        rs = np.random.RandomState(seed)
        for c in range(num_channels):
            vox = imgs[c][m]
            if len(vox):
                per_channel[c].append(rs.choice(vox, samples_per_case, replace=True))
    out = {}
    for c in range(num_channels):
        if not per_channel[c]:
            raise RuntimeError("no labelled foreground voxel in any mask case: cannot compute intensity statistics")
        v = np.concatenate(per_channel[c])
        p005, med, p995 = np.percentile(v, (0.5, 50.0, 99.5))
        out[str(c)] = {"mean": float(np.mean(v)), "median": float(med), "std": float(np.std(v)),
                       "min": float(np.min(v)), "max": float(np.max(v)),
                       "percentile_99_5": float(p995), "percentile_00_5": float(p005)}
    return out


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = ("2d", "3d_fullres", "3d_lowres"),
                        num_processes: int = 2, planner: str = "ExperimentPlanner",
                        gpu_memory_target: float | None = None, plans_name: str | None = None,
                        verify_dataset_integrity: bool = False, no_pp: bool = False,
                        verbose: bool = False) -> str:
    """Run prepare, fingerprint (+ mask-only intensity fix), planning and preprocessing; return plans name."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    res = prepare_dataset(dataset_id)
    raw = raw_dataset_folder(dataset_id)
    pp = preprocessed_dataset_folder(dataset_id)
    dj = json.loads((raw / "dataset.json").read_text())
    fg = sorted(v for k, v in dj["labels"].items() if k not in ("background", "ignore"))
    num_channels = len(dj.get("channel_names", dj.get("modality")))

    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=verify_dataset_integrity,
                         clean=True, verbose=verbose)
    fp_file = pp / "dataset_fingerprint.json"
    fp = json.loads(fp_file.read_text())
    fp["foreground_intensity_properties_per_channel"] = mask_only_intensity_properties(
        raw, res.manifest.of_type("mask"), num_channels, fg)
    fp["nnunet_mixsup"] = {"foreground_intensities_from": "labelled foreground of mask cases only",
                           "num_mask_cases": len(res.manifest.of_type("mask"))}
    atomic_write_json(fp_file, fp)

    # nnU-Net's planner calls torch.set_num_threads(get_allowed_n_proc_DA()), which fails for
    # nnUNet_n_proc_DA=0 (a legal setting for training): plan with at least one thread
    saved = os.environ.get("nnUNet_n_proc_DA")
    if saved is not None and saved.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        plans_identifier = plan_experiments([dataset_id], planner, gpu_memory_target, "DefaultPreprocessor", None,
                                            plans_name)
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    if plans_identifier is None:
        plans_identifier = plans_name or "nnUNetPlans"
    if not no_pp:
        plans = json.loads((pp / f"{plans_identifier}.json").read_text())
        configs = [c for c in configurations if c in plans["configurations"]]
        preprocess([dataset_id], plans_identifier, configurations=configs, num_processes=[num_processes] * len(configs),
                   verbose=verbose)
    atomic_write_json(pp / MANIFEST_NAME, res.manifest.to_json())
    splits = pp / "splits_final.json"
    if not splits.is_file():
        m = res.manifest
        atomic_write_json(splits, mixsup_splits(m.of_type("mask"), sorted(set(m.cases) - set(m.of_type("mask")))))
    return plans_identifier
