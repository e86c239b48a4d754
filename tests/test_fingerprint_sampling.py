"""The mask-only intensity fingerprint samples foreground voxels exactly as stock nnU-Net does."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk


def _all_mask_dataset(raw, dataset_id: int = 971, n_cases: int = 3):
    """Two channels, labels 0..2, every case fully labelled (so stock nnU-Net's ``seg > 0`` = our foreground)."""
    folder = raw / f"Dataset{dataset_id}_FingerprintSampling"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(n_cases):
        shape = (6 + i, 10, 9)
        seg = np.zeros(shape, np.uint8)
        seg[1:5, 2:8, 2:6] = 1
        seg[2:4, 3:5, 3:5] = 2
        for c in range(2):
            img = (rng.normal(100 * (c + 1), 20, shape) + 1000).astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(img), str(folder / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "A", "1": "B"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return folder


def test_samples_per_case_is_stock_budget_over_cases(fresh_dirs):
    """Pinned against the installed nnU-Net: 10e7 foreground voxels in total, split evenly over the cases."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    from nnunet_mixsup.preprocess import foreground_samples_per_case

    _all_mask_dataset(fresh_dirs["nnUNet_raw"])
    stock = DatasetFingerprintExtractor(971, 1).num_foreground_voxels_for_intensitystats
    assert stock == 10e7
    for n in (1, 3, 7, 1000, 10 ** 8):
        assert foreground_samples_per_case(n) == int(stock // n)


def test_statistics_equal_stock_fingerprint_on_an_all_mask_dataset(fresh_dirs, monkeypatch):
    """Same voxels, same seeds, same statistics: on a dataset of mask cases only (no ignore label) the
    mask-only statistics are stock nnU-Net's, bit for bit. The total budget is made small for speed,
    in both."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    import nnunet_mixsup.preprocess as P

    folder = _all_mask_dataset(fresh_dirs["nnUNet_raw"])
    fe = DatasetFingerprintExtractor(971, 1)
    fe.show_progress_bar = False
    fe.num_foreground_voxels_for_intensitystats = 3000
    stock = fe.run(overwrite_existing=True)["foreground_intensity_properties_per_channel"]
    monkeypatch.setattr(P, "FOREGROUND_VOXELS_FOR_INTENSITY_STATS", 3000, raising=False)
    ours = P.mask_only_intensity_properties(folder, ["case_000", "case_001", "case_002"], 2, [1, 2])
    assert {str(c): v for c, v in stock.items()} == ours
