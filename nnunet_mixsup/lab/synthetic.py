"""A fast synthetic mixed-supervision dataset (2D or 3D) for tests.

Each case: a rectangular block of noisy "tissue" inside an all-zero frame (so nnU-Net's crop to
non-zero really crops, asymmetrically), a bright ellipsoid (label 1) and a small dark sphere
(label 2) at random positions, intensities with random gain/offset. The default 3D spacing is
anisotropic in x (ITK order (3, 1, 1) mm), so nnU-Net's planner transposes the axes – exactly the
situation in which a box mapping can go wrong.

The manifest covers all four supervision types; boxes and tags are derived from the true labels.
Dense labels of weak cases are written to ``labelsTr_dense_hidden/`` (never read by training).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_mixsup.lab.simulate import boxes_from_label

LABELS = {"background": 0, "blob": 1, "dot": 2}


def _case(rng: np.random.Generator, shape_np: tuple[int, ...], spacing_np: tuple[float, ...],
          with_dot: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) numpy arrays in numpy axis order."""
    nd = len(shape_np)
    img = np.zeros(shape_np, np.float32)
    seg = np.zeros(shape_np, np.uint8)
    # tissue block with an asymmetric zero frame
    lo = [int(rng.integers(1, max(2, s // 6))) for s in shape_np]
    hi = [s - int(rng.integers(0, max(1, s // 8))) for s in shape_np]
    tissue = tuple(slice(a, b) for a, b in zip(lo, hi))
    img[tissue] = rng.normal(1.0, 0.25, size=[b - a for a, b in zip(lo, hi)]).astype(np.float32)
    grid = np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape_np, spacing_np)], indexing="ij")
    extent = [(b - a) * sp for a, b, sp in zip(lo, hi, spacing_np)]

    def centre(margin_mm: float) -> list[float]:
        return [a * sp + margin_mm + rng.random() * max(1e-3, e - 2 * margin_mm)
                for a, sp, e in zip(lo, spacing_np, extent)]

    radii = [min(e / 4, rng.uniform(4.0, 8.0)) for e in extent]
    c1 = centre(max(radii))
    d1 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, c1, radii))
    blob = (d1 <= 1.0) & (img > 0)
    seg[blob] = 1
    if with_dot:
        r2 = min(min(extent) / 5, rng.uniform(2.5, 4.0))
        for _ in range(20):
            c2 = centre(r2)
            d2 = sum((g - c) ** 2 for g, c in zip(grid, c2)) ** 0.5
            dot = (d2 <= r2) & (img > 0) & (seg == 0)
            if dot.sum() >= 2 ** nd:
                break
        seg[dot] = 2
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2)
    img[seg == 1] += 1.5
    img[seg == 2] -= 0.8
    img[img != 0] = img[img != 0] * gain + offset
    img[img == 0] = 0.0
    # make sure the tissue never contains an exact zero (it would be cropped as background)
    t = img[tissue]
    t[t == 0] = 1e-3
    return img, seg


def _write(arr: np.ndarray, spacing_itk: Sequence[float], path: Path, origin: Sequence[float] | None = None) -> None:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(s) for s in spacing_itk))
    if origin is not None:
        im.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(im, str(path), True)


def make_synthetic_dataset(raw_root: str | Path, dataset_id: int = 901, name: str = "MixSupSynth", dim: int = 3,
                           counts: dict[str, int] | None = None, n_test: int = 2,
                           size_itk: Sequence[int] | None = None, spacing_itk: Sequence[float] | None = None,
                           seed: int = 0) -> Path:
    """Write ``raw_root/DatasetXXX_name`` with images, labels, dataset.json and supervision.json.

    ``counts``: cases per supervision type, default ``{'mask': 3, 'box': 2, 'tags': 2, 'none': 1}``.
    Returns the dataset folder.
    """
    counts = counts or {"mask": 3, "box": 2, "tags": 2, "none": 1}
    if dim == 3:
        size_itk = tuple(size_itk or (20, 40, 36))
        spacing_itk = tuple(spacing_itk or (3.0, 1.0, 1.0))
    else:
        size_itk = tuple(size_itk or (48, 40))
        spacing_itk = tuple(spacing_itk or (1.0, 1.0))
    shape_np, spacing_np = size_itk[::-1], spacing_itk[::-1]
    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "labelsTr_dense_hidden"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    cases: dict[str, dict] = {}
    i = 0
    for t in ("mask", "box", "tags", "none"):
        for _ in range(counts.get(t, 0)):
            cid = f"case_{i:03d}"
            i += 1
            img, seg = _case(rng, shape_np, spacing_np, with_dot=(i % 4 != 0) or t == "mask")
            _write(img, spacing_itk, folder / "imagesTr" / f"{cid}_0000.nii.gz", origin=[5.0] * dim)
            lab_dir = "labelsTr" if t == "mask" else "labelsTr_dense_hidden"
            _write(seg, spacing_itk, folder / lab_dir / f"{cid}.nii.gz", origin=[5.0] * dim)
            present = sorted(int(v) for v in np.unique(seg) if v > 0)
            if t == "box":
                cases[cid] = {"type": "box", "boxes": boxes_from_label(seg, present)}
            elif t == "tags":
                cases[cid] = {"type": "tags", "present": present}
            else:
                cases[cid] = {"type": t}
    for j in range(n_test):
        img, seg = _case(rng, shape_np, spacing_np)
        _write(img, spacing_itk, folder / "imagesTs" / f"test_{j:03d}_0000.nii.gz", origin=[5.0] * dim)
        _write(seg, spacing_itk, folder / "labelsTs" / f"test_{j:03d}.nii.gz", origin=[5.0] * dim)
    dj = {"channel_names": {"0": "MRI"}, "labels": dict(LABELS), "numTraining": i, "file_ending": ".nii.gz",
          "name": name, "description": "nnunet-mixsup synthetic test data"}
    (folder / "dataset.json").write_text(json.dumps(dj, indent=2))
    (folder / "supervision.json").write_text(json.dumps({"version": 1, "cases": cases}, indent=2))
    return folder
