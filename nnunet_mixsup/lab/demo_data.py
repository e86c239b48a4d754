"""``nnunet-mixsup demo-data``: a small real-anatomy dataset built offline from the MNI152 template.

Source: the ICBM 2009a nonlinear symmetric MNI152 template (T1 and grey/white matter probability
maps, 1 mm) that ships inside the nilearn wheel (``nilearn/datasets/data``); nothing is downloaded.
Template copyright (C) 1993–2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University; see Fonov et al., NeuroImage 54 (2011) 313–327 and
NeuroImage 47 (2009) S102. Use it for demonstrations only.

Each case is the template randomly deformed – a random affine (rotation up to ±10° about every
axis, per-axis scale 0.85–1.15, translation up to ±10 mm) composed with a smooth random elastic
displacement (cubic interpolation of a coarse random grid, amplitude 2–6 mm per case) – and sampled
on a fixed 180 × 216 × 180 mm field of view at ``spacing_mm`` isotropic (45 × 54 × 45 voxels at
4 mm). Before sampling, the 1 mm maps are smoothed (Gaussian, sigma = 0.4 × spacing) so that a
voxel represents its neighbourhood like a real low-resolution acquisition rather than an aliased
point sample. The image then gets a random gamma (0.6–1.6), a smooth multiplicative bias field
(about ±25 %), Rician noise (3–8 % of the white-matter intensity), a random blur and a random global
scale: a threshold that works on one case does not work on the next.

Labels (and why). The labels are the argmax, per output voxel, of four smoothed probability maps
(background, WM, GM, lateral ventricles), so they are consistent with the image's partial volume:

- 1 = white matter (template WM probability),
- 2 = grey matter (template GM probability: cortex, deep grey nuclei, cerebellar cortex),
- 3 = lateral ventricles: CSF (GM + WM < 0.2) inside the closed, hole-filled brain, restricted to
  the large connected components above the brain's centre – the bodies of the two lateral
  ventricles (about 5 ml each in the template); a morphological opening first cuts off the thin
  CSF of sulci and fissures that touches them.

Why these: WM and GM are large, survive 4 mm (and 8 mm) and are separated mostly by intensity –
but with the random gamma and bias field the WM/GM intensity boundary moves across the image, and
cortex at 4 mm is a thin, partial-volumed ribbon whose extent must be learned from shape. The
ventricles are the interesting class: they have exactly the intensity of the sulcal and basal CSF
and of the extra-cerebral space, which stay background, so only their location and shape (two
symmetric crescents deep in the white matter) identify them, and they are small (about 130–320 voxels at
4 mm) – a class where a few training cases are clearly not enough. Subcortical structures were
not used: at 4 mm they are a handful of voxels with almost no contrast in this template.

Deterministic for a seed; each case has its own random stream (``(seed, split, index)``), so the
first training cases are identical whatever ``n_train``. About 0.2 s per case at 4 mm after a
one-off template preparation of about 1–2 s. Writing is atomic (temporary sibling folder renamed
at the end); an existing dataset is only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mixsup.fileio import atomic_write_json, staged_folder
from nnunet_mixsup.raw_datasets import check_dataset_name, check_target_id, raw_root, validate_dataset_id

LABELS = {"background": 0, "white_matter": 1, "grey_matter": 2, "lateral_ventricles": 3}
FOV_MM = (180.0, 216.0, 180.0)  # ITK order (x, y, z) = (left-right, posterior-anterior, inferior-superior)
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def template_folder() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 template files."""
    try:
        import nilearn
    except ImportError:
        raise RuntimeError("the demo dataset is built from the MNI152 template shipped with nilearn, which is not "
                           "installed: pip install nilearn") from None
    folder = Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"
    missing = [_TEMPLATE.format(k) for k in ("t1", "gm", "wm") if not (folder / _TEMPLATE.format(k)).is_file()]
    if missing:
        raise RuntimeError(f"the installed nilearn lacks the MNI152 template file(s) {missing} in {folder}; "
                           f"reinstall it: pip install --force-reinstall nilearn")
    return folder


@functools.lru_cache(maxsize=4)
def _prepared_template(spacing_mm: float) -> dict[str, Any]:
    """Smoothed T1 and class probability maps (numpy order, 1 mm voxels), cropped, plus geometry."""
    folder = template_folder()
    ref = sitk.ReadImage(str(folder / _TEMPLATE.format("t1")))
    if any(abs(s - 1.0) > 1e-3 for s in ref.GetSpacing()):
        raise RuntimeError(f"unexpected template spacing {ref.GetSpacing()} (expected 1 mm)")
    t1, gm, wm = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / _TEMPLATE.format(k)))).astype(np.float32) / 255
                  for k in ("t1", "gm", "wm"))
    # crop to the head plus a margin (faster morphology and smoothing)
    nzs = np.nonzero(t1 > 0.02)
    lo = [max(0, int(a.min()) - 12) for a in nzs]
    hi = [min(s, int(a.max()) + 13) for a, s in zip(nzs, t1.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, gm, wm = t1[crop], gm[crop], wm[crop]
    tissue = np.clip(gm + wm, 0.0, 1.0)
    brain = tissue > 0.5
    # lateral ventricles: CSF inside the closed, hole-filled brain; an opening cuts the thin sulcal and
    # fissural CSF off; of the large pieces, those above the brain centre are the two ventricle bodies
    hull = ndimage.binary_fill_holes(ndimage.binary_closing(brain, structure=np.ones((3, 3, 3), bool),
                                                            iterations=4))
    csf = hull & (tissue < 0.2)
    ball = ndimage.generate_binary_structure(3, 1)
    core = ndimage.binary_opening(csf, ball, iterations=2)
    comp, n = ndimage.label(core)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    nz = np.nonzero(brain.any(axis=(1, 2)))[0]
    z_centre = 0.5 * (nz[0] + nz[-1])
    keep = [i for i in range(1, n + 1) if sizes[i] >= 2000]
    centres = ndimage.center_of_mass(core, comp, keep)
    keep = [i for i, c in zip(keep, centres) if c[0] > z_centre + 5]  # numpy axis 0 = z (inferior -> superior)
    if not keep:
        raise RuntimeError("could not find the lateral ventricles in the template")
    vent = ndimage.binary_dilation(np.isin(comp, keep), ball, iterations=2, mask=csf)
    p_wm = wm
    p_gm = gm
    p_vent = np.where(vent, 1.0 - tissue, 0.0).astype(np.float32)
    p_bg = np.clip(1.0 - p_wm - p_gm - p_vent, 0.0, 1.0)
    sigma = 0.4 * float(spacing_mm)
    maps = np.stack([ndimage.gaussian_filter(m, sigma, mode="constant") for m in (p_bg, p_wm, p_gm, p_vent)])
    t1s = ndimage.gaussian_filter(t1, sigma, mode="constant")
    bz = np.nonzero(brain.any(axis=(1, 2)))[0]
    by = np.nonzero(brain.any(axis=(0, 2)))[0]
    bx = np.nonzero(brain.any(axis=(0, 1)))[0]
    centre = np.array([0.5 * (a[0] + a[-1]) for a in (bz, by, bx)])  # numpy order, cropped voxel coords
    wm_level = float(np.median(t1[wm > 0.9]))
    return {"t1": t1s, "maps": maps, "centre": centre, "offset": np.array(lo, float), "ref": ref,
            "wm_level": wm_level}


def _rotation(angles: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for ax, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != ax]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], grid: tuple[int, ...], amp: float) -> np.ndarray:
    """A smooth random field on ``shape``: cubic interpolation of a coarse N(0, amp) grid."""
    coarse = rng.normal(0.0, amp, size=grid)
    return ndimage.zoom(coarse, [s / g for s, g in zip(shape, grid)], order=3, mode="nearest",
                        grid_mode=True)[tuple(slice(0, s) for s in shape)]


def _mr_appearance(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A random scanner look for an intensity image (about 1 in white matter), as float32.

    Gamma 0.6-1.6 (negative values clipped to 0 first), a smooth multiplicative bias field (about
    +-25 %), a blur of up to 0.6 voxels, Rician noise (SD 3-8 % of the white-matter level) and a
    global scale 300-1200: a threshold that works on one case does not work on the next.
    """
    shape = img.shape
    img = np.clip(img, 0.0, None) ** rng.uniform(0.6, 1.6)
    img *= np.exp(_smooth_field(rng, shape, (3, 3, 3), 0.12))
    blur = rng.uniform(0.0, 0.6)
    if blur > 0.1:
        img = ndimage.gaussian_filter(img, blur)
    sd = rng.uniform(0.03, 0.08)
    img = np.sqrt((img + rng.normal(0.0, sd, shape)) ** 2 + rng.normal(0.0, sd, shape) ** 2)
    return (img * rng.uniform(300.0, 1200.0)).astype(np.float32)


def _to_images(arrays: Sequence[np.ndarray], spacing_mm: float, direction: Sequence[float],
               origin: Sequence[float]) -> list[sitk.Image]:
    """SimpleITK images of numpy-order ``arrays`` sharing one geometry (isotropic ``spacing_mm``)."""
    out = []
    for arr in arrays:
        im = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        im.SetSpacing((spacing_mm,) * 3)
        im.SetDirection(direction)
        im.SetOrigin(origin)
        out.append(im)
    return out


def make_case(rng: np.random.Generator, spacing_mm: float = 4.0) -> tuple[sitk.Image, sitk.Image]:
    """One randomly deformed template case: (image, label) as SimpleITK images with the same geometry."""
    tp = _prepared_template(float(spacing_mm))
    s = float(spacing_mm)
    shape = tuple(round(f / s) for f in FOV_MM[::-1])  # numpy order (z, y, x)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n in shape], indexing="ij"))
    # random affine about the brain centre (template voxels are 1 mm, so voxel units are mm)
    rot = _rotation(np.deg2rad(rng.uniform(-10, 10, size=3)))
    scale = np.diag(1.0 / rng.uniform(0.85, 1.15, size=3))  # output -> template: inverse scale
    mat = rot @ scale
    shift = rng.uniform(-10, 10, size=3)
    amp = rng.uniform(2.0, 6.0)
    disp = np.stack([_smooth_field(rng, shape, (4, 5, 4), amp) for _ in range(3)])
    pts = np.einsum("ij,j...->i...", mat, grid) + disp + (tp["centre"] + shift)[:, None, None, None]
    maps = np.stack([ndimage.map_coordinates(m, pts, order=1, mode="constant", cval=0.0) for m in tp["maps"]])
    maps[0][maps.sum(axis=0) < 1e-3] = 1.0  # outside the template: background
    seg = np.argmax(maps, axis=0).astype(np.uint8)
    img = ndimage.map_coordinates(tp["t1"], pts, order=1, mode="constant", cval=0.0) / tp["wm_level"]
    img = _mr_appearance(rng, img)
    # geometry: axes aligned with the template's, origin at the first output voxel
    first = tp["offset"] + tp["centre"] + grid[:, 0, 0, 0]  # template voxel index, numpy order
    origin = tp["ref"].TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in first[::-1]))
    image, label = _to_images((img, seg), s, tp["ref"].GetDirection(), origin)
    return image, label


def make_demo_dataset(dataset_id: int = 990, n_train: int = 20, n_test: int = 10, spacing_mm: float = 4.0,
                      seed: int = 0, name: str = "MixSupBrainDemo", overwrite: bool = False,
                      show_progress: bool = True) -> Path:
    """Write the dense demo dataset ``nnUNet_raw/Dataset{id}_{name}``; return its folder.

    Training cases ``brain_000 ...`` (imagesTr, labelsTr), test cases ``brain_test_000 ...``
    (imagesTs, labelsTs), dataset.json. See the module docstring for what the cases are.
    """
    from tqdm import tqdm

    dataset_id = validate_dataset_id(dataset_id)
    if n_train < 1 or n_test < 0:
        raise ValueError("n_train must be >= 1 and n_test >= 0")
    if not 1.0 <= float(spacing_mm) <= 12.0:
        raise ValueError(f"spacing_mm must lie in [1, 12] mm, got {spacing_mm}")
    check_dataset_name(name)
    template_folder()  # clear error before anything else
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    target = raw_root() / folder_name
    check_target_id(dataset_id, folder_name)
    jobs = [("Tr", i, f"brain_{i:03d}") for i in range(n_train)] + \
           [("Ts", j, f"brain_test_{j:03d}") for j in range(n_test)]
    with staged_folder(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for split, i, cid in tqdm(jobs, desc="demo cases", unit="case", disable=not show_progress, file=sys.stderr):
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0 if split == "Tr" else 1, i])
            img, seg = make_case(rng, spacing_mm)
            sitk.WriteImage(img, str(tmp / f"images{split}" / f"{cid}_0000.nii.gz"), True)
            sitk.WriteImage(seg, str(tmp / f"labels{split}" / f"{cid}.nii.gz"), True)
        atomic_write_json(tmp / "dataset.json", {
            "channel_names": {"0": "T1"},
            "labels": dict(LABELS),
            "numTraining": n_train,
            "file_ending": ".nii.gz",
            "name": name,
            "description": f"nnunet-mixsup demo: randomly deformed MNI152 (ICBM 2009a) template, {spacing_mm:g} mm, "
                           f"seed {seed}; labels from the template's GM/WM probability maps",
            "reference": "Fonov et al., NeuroImage 54 (2011) 313-327; template (C) McConnell Brain Imaging Centre, "
                         "MNI, McGill University",
            "licence": "MNI ICBM 2009a template licence (free use with attribution); demonstration only",
        })
    return target


def _cmd_demo_data(args: argparse.Namespace) -> int:
    if getattr(args, "dataset", "mni152") == "inia19":
        from nnunet_mixsup.lab.inia19_data import DEFAULT_ID, DEFAULT_SPACING, make_inia19_dataset

        folder = make_inia19_dataset(DEFAULT_ID if args.d is None else args.d, n_train=args.train, n_test=args.test,
                                     spacing_mm=DEFAULT_SPACING if args.spacing is None else args.spacing,
                                     seed=args.seed, overwrite=args.overwrite)
    else:
        folder = make_demo_dataset(990 if args.d is None else args.d, n_train=args.train, n_test=args.test,
                                   spacing_mm=4.0 if args.spacing is None else args.spacing, seed=args.seed,
                                   overwrite=args.overwrite)
    print(f"wrote {folder}")
    return 0


def register_cli(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "demo-data", help="write the real-anatomy demo dataset (deformed MNI152 template, WM / GM / ventricles)",
        description="Write a dense nnU-Net raw dataset built offline from the MNI152 template shipped with nilearn: "
                    "randomly deformed cases with intensity variation; labels white matter, grey matter, lateral "
                    "ventricles. Needs: pip install nilearn. With --dataset inia19: the INIA19 macaque template "
                    "and six NeuroMaps structures, training cases with a partial field of view (docs/inia19.md); "
                    "needs Debian's mricron-data (installed automatically when running as root).")
    s.add_argument("--dataset", choices=("mni152", "inia19"), default="mni152",
                   help="source template (default mni152: the demo dataset; inia19: the weak-label benchmark)")
    s.add_argument("-d", type=int, default=None, help="dataset id (default 990 for mni152, 992 for inia19)")
    s.add_argument("--train", type=int, default=20, help="training cases")
    s.add_argument("--test", type=int, default=10, help="test cases")
    s.add_argument("--spacing", type=float, default=None,
                   help="isotropic voxel size in mm (default 4 for mni152, 1.25 for inia19)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    s.set_defaults(func=_cmd_demo_data)
