"""``nnunet-mixsup demo-data --dataset inia19``: a benchmark whose weak labels carry information.

Source: the INIA19 rhesus macaque T1 template and its NeuroMaps label volume (0.5 mm, 725 labels,
left / right pairs stored as ``v`` and ``1000 + v``), as shipped by Debian's ``mricron-data``
package in ``/usr/share/mricron/templates`` (``inia19-t1-brain.nii.gz``,
``inia19-NeuroMaps.nii.gz``); nothing is downloaded. Rohlfing et al., "The INIA19 template and
NeuroMaps atlas for primate brain image parcellation and spatial normalization", Frontiers in
Neuroinformatics 6 (2012) 27. Use it for benchmarks and demonstrations only. Another folder holding
the two files can be given with the environment variable ``NNUNET_MIXSUP_INIA19_DIR``.

Why another dataset: on the MNI152 demo (:mod:`nnunet_mixsup.lab.demo_data`) every class is in every
image and the white- and grey-matter boxes span the brain, so boxes and tags constrain almost
nothing a mask-only model does not already know. Here they say something:

- six compact structures of a few thousand template voxels each (``STRUCTURES``; which ones and
  why: ``docs/inia19.md``); a box holds its structure at a fill of about 0.1-0.3, so a box fixes
  location and extent of a small, low-contrast target;
- every training case has a partial field of view: a random slab along one random axis (20-50 %
  of the brain's extent along it), so classes are absent from some training images and tags say
  which; test cases keep the whole brain.

Left and right (``v`` and ``1000 + v``) are merged into one class: nnU-Net mirrors images along
every axis in training and at test time, and the template is nearly symmetric, so laterality could
not be learned from the image; one class with two components (two boxes) keeps the task about
localisation. Per side only the largest connected component of the atlas label is kept (a few
labels have stray fragments of one or two voxels).

Each case is the template randomly deformed - a random affine (rotation up to +-10 deg about every
axis, per-axis scale 0.85-1.15, translation up to +-5 mm) composed with a smooth random elastic
displacement (cubic interpolation of a coarse random grid, 1-3 mm per case) - sampled at
``spacing_mm`` isotropic (default 1.25 mm) on a fixed 76 x 96 x 72 mm field of view (x, y, z)
centred on the brain; the 0.5 mm maps are smoothed first (Gaussian, sigma = 0.4 x spacing) like a
low-resolution acquisition. Labels are the argmax of the smoothed background / class maps.
Appearance: a random contrast stretch about the median brain intensity (0.7-1.4), gamma (0.6-1.6),
a smooth multiplicative bias field (about +-25 %), a random blur, Rician noise (3-8 % of the
bright-tissue level) and a random global scale. Training cases are then cropped to their slab
(origin moved with it); the crop is recorded in ``generation.json`` next to ``dataset.json``,
with the classes present per case.

Deterministic for a seed; each case has its own random stream ``(seed, split, index)``, so the
first cases are the same whatever ``n_train``. Writing is atomic (temporary sibling folder renamed
at the end); an existing dataset is only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mixsup.fileio import atomic_write_json, staged_folder
from nnunet_mixsup.lab.demo_data import _mr_appearance, _rotation, _smooth_field, _to_images
from nnunet_mixsup.raw_datasets import check_dataset_name, check_target_id, raw_root, validate_dataset_id

DEBIAN_FOLDER = Path("/usr/share/mricron/templates")
T1_FILE, ATLAS_FILE = "inia19-t1-brain.nii.gz", "inia19-NeuroMaps.nii.gz"
ENV_FOLDER = "NNUNET_MIXSUP_INIA19_DIR"
DEFAULT_ID, DEFAULT_SPACING = 992, 1.25
#: (class name, NeuroMaps value v of one side; the other side is 1000 + v). Names say where the
#: structure is, not what the atlas calls it (the package ships no label names); see docs/inia19.md
STRUCTURES: tuple[tuple[str, int], ...] = (
    ("nm98_deep_lateral", 98),  # deep grey lateral to the internal capsule, mid-height
    ("nm497_deep_medial", 497),  # paired deep grey at the midline (both sides touch), mid-height
    ("nm7_medial_temporal", 7),  # long, thin, along the floor of the temporal lobe
    ("nm153_lateral_sulcus", 153),  # cortex in the depth of the lateral sulcus
    ("nm244_cerebellar", 244),  # posterior-inferior part of the cerebellum
    ("nm65_medial_superior", 65),  # medial wall above the corpus callosum, posterior half (both sides touch)
)
FOV_MM = (76.0, 96.0, 72.0)  # ITK order (x, y, z) = (right-left, posterior-anterior, inferior-superior)
SLAB_FRACTION = (0.20, 0.50)  # partial field of view: share of the brain's extent along the slab axis
_SRC_SPACING = 0.5


def labels() -> dict[str, int]:
    """dataset.json ``labels``: background 0, then the structures in ``STRUCTURES`` order."""
    return {"background": 0, **{name: i for i, (name, _) in enumerate(STRUCTURES, 1)}}


def _install_debian_package() -> str:
    """``apt-get install -y mricron-data`` (after ``apt-get update`` if the first try fails); the log tail."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for cmds in ([["apt-get", "install", "-y", "mricron-data"]],
                 [["apt-get", "update"], ["apt-get", "install", "-y", "mricron-data"]]):
        ok = True
        for cmd in cmds:
            print(f"[inia19] running {' '.join(cmd)}", file=sys.stderr, flush=True)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"{' '.join(cmd)}: {e}"
            log = (p.stdout + p.stderr)[-1500:]
            if p.returncode != 0:
                ok = False
                break
        if ok:
            return ""
    return log


def template_files(install: bool = True) -> tuple[Path, Path]:
    """Paths of the INIA19 T1 template and NeuroMaps label volume.

    Looks in ``$NNUNET_MIXSUP_INIA19_DIR`` (if set), then in Debian's ``mricron-data`` folder. When
    they are missing and ``install`` is true, running as root on a system with ``apt-get``, the
    package is installed; otherwise a ``RuntimeError`` says how to get the files.
    """
    folders = ([Path(os.environ[ENV_FOLDER])] if os.environ.get(ENV_FOLDER) else []) + [DEBIAN_FOLDER]

    def found() -> tuple[Path, Path] | None:
        for f in folders:
            if (f / T1_FILE).is_file() and (f / ATLAS_FILE).is_file():
                return f / T1_FILE, f / ATLAS_FILE
        return None

    hit = found()
    tail = ""
    if hit is None and install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        tail = _install_debian_package()
        hit = found()
    if hit is None:
        where = " or ".join(str(f) for f in folders)
        raise RuntimeError(
            f"the INIA19 template files {T1_FILE} and {ATLAS_FILE} were not found in {where}. They come with "
            f"Debian's / Ubuntu's package mricron-data: sudo apt-get install mricron-data (or put both files in a "
            f"folder and set {ENV_FOLDER} to it)" + (f"\napt-get said: {tail.strip()}" if tail.strip() else ""))
    return hit


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask, np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


@functools.lru_cache(maxsize=1)
def _source_volumes() -> dict[str, Any]:
    """The template (cropped to the brain plus a margin) and the per-class masks, at 0.5 mm, numpy order."""
    t1_path, atlas_path = template_files()
    ref = sitk.ReadImage(str(t1_path))
    atlas_img = sitk.ReadImage(str(atlas_path))
    if any(abs(s - _SRC_SPACING) > 1e-3 for s in ref.GetSpacing()) or ref.GetSize() != atlas_img.GetSize():
        raise RuntimeError(f"unexpected INIA19 geometry: T1 {ref.GetSize()} at {ref.GetSpacing()} mm, NeuroMaps "
                           f"{atlas_img.GetSize()} (expected both at 0.5 mm, same grid)")
    t1 = sitk.GetArrayFromImage(ref).astype(np.float32)
    atlas = sitk.GetArrayFromImage(atlas_img).astype(np.int32)
    brain = t1 > 0
    nz = np.nonzero(brain)
    lo = [max(0, int(a.min()) - 8) for a in nz]
    hi = [min(s, int(a.max()) + 9) for a, s in zip(nz, t1.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, atlas, brain = t1[crop], atlas[crop], brain[crop]
    masks = []
    for name, v in STRUCTURES:
        sides = [_largest_component(atlas == w) for w in (v, 1000 + v)]
        if not all(s.any() for s in sides):
            raise RuntimeError(f"NeuroMaps label {v} / {1000 + v} ({name}) is missing from {atlas_path}")
        masks.append(sides[0] | sides[1])
    ext = [np.nonzero(brain.any(axis=tuple(k for k in range(3) if k != ax)))[0] for ax in range(3)]
    centre = np.array([0.5 * (e[0] + e[-1]) for e in ext])  # numpy order, cropped voxel coordinates
    return {"t1": t1, "masks": masks, "brain": brain, "ref": ref, "offset": np.array(lo, float), "centre": centre,
            "level": float(np.percentile(t1[brain], 90))}


@functools.lru_cache(maxsize=2)
def _prepared(spacing_mm: float) -> dict[str, Any]:
    """Source volumes smoothed for ``spacing_mm``: T1, brain and class probability maps (background first)."""
    src = _source_volumes()
    sigma = 0.4 * float(spacing_mm) / _SRC_SPACING
    fg = [ndimage.gaussian_filter(m.astype(np.float32), sigma, mode="constant") for m in src["masks"]]
    bg = np.clip(1.0 - np.sum(fg, axis=0), 0.0, 1.0)
    return {**src, "maps": np.stack([bg, *fg]),
            "t1s": ndimage.gaussian_filter(src["t1"], sigma, mode="constant"),
            "brains": ndimage.gaussian_filter(src["brain"].astype(np.float32), sigma, mode="constant")}


def make_case(rng: np.random.Generator, spacing_mm: float = DEFAULT_SPACING,
              partial_fov: bool = False) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """One randomly deformed template case: (image, label, info) with the same geometry.

    ``partial_fov``: crop to a random slab along one random axis (training cases). ``info`` holds
    the full-FOV shape, the slab (numpy axis, first and last+1 voxel, or None) and the classes present.
    """
    tp = _prepared(float(spacing_mm))
    s = float(spacing_mm)
    shape = tuple(round(f / s) for f in FOV_MM[::-1])  # numpy order (z, y, x)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n in shape], indexing="ij"))  # mm
    rot = _rotation(np.deg2rad(rng.uniform(-10, 10, size=3)))
    scale = np.diag(1.0 / rng.uniform(0.85, 1.15, size=3))  # output -> template: inverse scale
    shift = rng.uniform(-5, 5, size=3)
    amp = rng.uniform(1.0, 3.0)
    disp = np.stack([_smooth_field(rng, shape, (4, 5, 4), amp) for _ in range(3)])
    pts_mm = np.einsum("ij,j...->i...", rot @ scale, grid) + disp + shift[:, None, None, None]
    pts = pts_mm / _SRC_SPACING + tp["centre"][:, None, None, None]  # template voxel coordinates (cropped)
    maps = np.stack([ndimage.map_coordinates(m, pts, order=1, mode="constant", cval=0.0) for m in tp["maps"]])
    maps[0][maps.sum(axis=0) < 1e-3] = 1.0  # outside the template: background
    seg = np.argmax(maps, axis=0).astype(np.uint8)
    brain = ndimage.map_coordinates(tp["brains"], pts, order=1, mode="constant", cval=0.0) > 0.5
    img = ndimage.map_coordinates(tp["t1s"], pts, order=1, mode="constant", cval=0.0) / tp["level"]
    # appearance: contrast about the median brain intensity, gamma, bias field, blur, Rician noise, global scale
    med = float(np.median(img[brain])) if brain.any() else 0.5
    img = np.clip(med + rng.uniform(0.7, 1.4) * (img - med), 0.0, None) * (img > 0)
    img = _mr_appearance(rng, img)
    first = np.zeros(3)  # output voxel index (numpy order) of the first kept voxel
    slab = None
    if partial_fov:
        axis = int(rng.integers(3))
        occupied = np.nonzero(brain.any(axis=tuple(k for k in range(3) if k != axis)))[0]
        b0, b1 = (int(occupied[0]), int(occupied[-1]) + 1) if occupied.size else (0, shape[axis])
        width = max(1, round(rng.uniform(*SLAB_FRACTION) * (b1 - b0)))
        start = int(rng.integers(b0, b1 - width + 1))
        sl = [slice(None)] * 3
        sl[axis] = slice(start, start + width)
        img, seg = img[tuple(sl)], seg[tuple(sl)]
        first[axis] = start
        slab = [axis, start, start + width]
    # geometry: axes aligned with the template's, origin at the first kept voxel
    first_tpl = tp["offset"] + tp["centre"] + (grid[:, 0, 0, 0] + first * s) / _SRC_SPACING
    origin = tp["ref"].TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in first_tpl[::-1]))
    image, label = _to_images((img, seg), s, tp["ref"].GetDirection(), origin)
    present = sorted(int(v) for v in np.unique(seg) if v > 0)
    return image, label, {"full_shape": list(shape), "slab": slab, "present": present}


def make_inia19_dataset(dataset_id: int = DEFAULT_ID, n_train: int = 20, n_test: int = 10,
                        spacing_mm: float = DEFAULT_SPACING, seed: int = 0, name: str = "MixSupINIA19",
                        overwrite: bool = False, show_progress: bool = True) -> Path:
    """Write the dense INIA19 benchmark dataset ``nnUNet_raw/Dataset{id}_{name}``; return its folder.

    Training cases ``inia_000 ...`` (imagesTr, labelsTr; partial field of view), test cases
    ``inia_test_000 ...`` (imagesTs, labelsTs; whole brain), dataset.json, generation.json (per
    case: slab and classes present). See the module docstring for what the cases are.
    """
    from tqdm import tqdm

    dataset_id = validate_dataset_id(dataset_id)
    if n_train < 1 or n_test < 0:
        raise ValueError("n_train must be >= 1 and n_test >= 0")
    if not 0.5 <= float(spacing_mm) <= 6.0:
        raise ValueError(f"spacing_mm must lie in [0.5, 6] mm, got {spacing_mm}")
    check_dataset_name(name)
    template_files()  # clear error (or the install) before anything else
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    target = raw_root() / folder_name
    check_target_id(dataset_id, folder_name)
    jobs = [("Tr", i, f"inia_{i:03d}") for i in range(n_train)] + \
           [("Ts", j, f"inia_test_{j:03d}") for j in range(n_test)]
    record: dict[str, Any] = {}
    with staged_folder(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for split, i, cid in tqdm(jobs, desc="inia19 cases", unit="case", disable=not show_progress,
                                  file=sys.stderr):
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0 if split == "Tr" else 1, i])
            img, seg, info = make_case(rng, spacing_mm, partial_fov=split == "Tr")
            sitk.WriteImage(img, str(tmp / f"images{split}" / f"{cid}_0000.nii.gz"), True)
            sitk.WriteImage(seg, str(tmp / f"labels{split}" / f"{cid}.nii.gz"), True)
            record[cid] = info
        lab = labels()
        atomic_write_json(tmp / "dataset.json", {
            "channel_names": {"0": "T1"},
            "labels": lab,
            "numTraining": n_train,
            "file_ending": ".nii.gz",
            "name": name,
            "description": f"nnunet-mixsup benchmark: randomly deformed INIA19 macaque template, {spacing_mm:g} mm, "
                           f"seed {seed}; labels: NeuroMaps structures (left and right merged), training cases with "
                           f"a partial field of view",
            "reference": "Rohlfing et al., Front. Neuroinform. 6 (2012) 27 (INIA19 template, NeuroMaps atlas); "
                         "files from Debian's mricron-data",
            "licence": "see the INIA19 / NeuroMaps terms; demonstration and benchmarking only",
        })
        atomic_write_json(tmp / "generation.json", {
            "version": 1, "seed": int(seed), "spacing_mm": float(spacing_mm), "fov_mm": list(FOV_MM),
            "slab_fraction": list(SLAB_FRACTION),
            "structures": {n: {"label": lab[n], "neuromaps": [v, 1000 + v]} for n, v in STRUCTURES},
            "axes": "slab axis in numpy order of the full-FOV array: 0 = z (inferior-superior), 1 = y, 2 = x",
            "cases": record})
    return target


def absence_rates(cases: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Share of the given cases (``generation.json`` entries) from which each class is absent."""
    n = max(1, len(cases))
    return {name: sum(i not in c["present"] for c in cases.values()) / n
            for i, (name, _) in enumerate(STRUCTURES, 1)}
