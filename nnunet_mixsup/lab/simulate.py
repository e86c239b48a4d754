"""``nnunet-mixsup simulate``: a mixed-supervision dataset derived from a fully labelled one.

Takes a dense nnU-Net raw dataset (every training case has a mask) and writes a NEW raw dataset
``DatasetTTT_<SourceName>MixSup`` in which only some training cases keep their mask; the others get
boxes, image-level tags or nothing, as described by a ``supervision.json`` (see
:mod:`nnunet_mixsup.manifest`). The source dataset is never modified.

Layout of the new dataset::

    DatasetTTT_Name/
      dataset.json              copied from the source (numTraining unchanged: every case still trains)
      supervision.json          one entry per training case
      simulation.json           how it was made: source, arguments, seed, case order and assignment
      imagesTr/, imagesTs/      hard links to the source images (copies where linking is impossible)
      labelsTr/                 the masks of the ``mask`` cases ONLY
      labelsTr_dense_hidden/    the dense labels of all other training cases – for evaluation and
                                analysis ONLY; nothing in training reads this folder. Do not move
                                these files into labelsTr (that would leak the labels you simulated away)
      labelsTs/                 copied from the source's labelsTs, if it has one

How cases are assigned (deterministic for a seed and nested across budgets): the sorted training
case ids are permuted once with ``numpy.random.default_rng(seed)``; the first ``n_mask`` cases of
that order are ``mask`` cases, the next ``n_box`` ``box``, then ``tags``, the rest ``none``. The
same seed with a larger mask budget therefore keeps every mask case of the smaller budget.

Counts: each of ``masks``, ``boxes``, ``tags``, ``unlabeled`` is either a fraction (a ``float`` in
[0, 1]) or a number of cases (an ``int``). ``unlabeled=None`` takes the remainder. When all values
are fractions, they are rounded cumulatively (boundaries ``round(N * (f_mask + ...))``), so the
counts always add up to at most N and fractions summing to 1 cover every case exactly. At least
one ``mask`` case is required.

Weak labels from the dense label map (in the label image's own voxel grid):

- ``box``: one box per connected component (full 26-/8-connectivity) of every foreground class,
  ``min`` inclusive, ``max`` exclusive, in ITK index order (x, y, z). Optionally enlarged by
  ``box_margin_mm`` on every side and each face moved by a random offset uniform in
  ``[-box_jitter_mm, +box_jitter_mm]``; millimetres are converted per axis with the image spacing
  (rounded half up to whole voxels). Boxes are clipped to the image and always keep at least one
  voxel of overlap with their component. A box case without any foreground is written as
  ``{"type": "tags", "present": []}`` (the same information; the manifest has no empty box case).
  The jitter random stream depends only on the seed and the case, not on the budget.
- ``tags``: the foreground classes present.

Writing is atomic: everything goes into a hidden temporary sibling folder that is renamed at the
end, so an interrupted or failed run leaves no (half-written) target dataset. An existing target is
only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mixsup.fileio import atomic_write_json, link_or_copy, round_half_up, staged_folder
from nnunet_mixsup.raw_datasets import (
    check_dataset_name,
    check_target_id,
    package_version,
    raw_root,
    validate_dataset_id,
)

HIDDEN_LABELS_DIR = "labelsTr_dense_hidden"
SIMULATION_RECORD = "simulation.json"
TYPES = ("mask", "box", "tags", "none")
#: an amount of cases: a fraction (``float``) or a number of cases (``int``)
Amount = int | float
_HIDDEN_README = (
    "Dense labels of the weak (box / tags / none) training cases of this simulated mixed-supervision\n"
    "dataset. For evaluation and analysis ONLY: nothing in training reads this folder. Do not move these\n"
    "files into labelsTr – that would leak the labels that were simulated away.\n"
)


# ----------------------------------------------------------------------------------------------------------
# counts and assignment
# ----------------------------------------------------------------------------------------------------------
def _check_amount(name: str, v: Any, n: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a fraction (float) or a number of cases (int), got {v!r}")
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v) or v < 0 or v > 1 + 1e-9:
            raise ValueError(f"{name}={v!r}: a fraction must lie in [0, 1] (give an int for a number of cases)")
    elif v < 0:
        raise ValueError(f"{name}={v!r}: a number of cases cannot be negative")


def resolve_counts(n_cases: int, masks: Amount, boxes: Amount = 0.0, tags: Amount = 0.0,
                   unlabeled: Amount | None = None) -> dict[str, int]:
    """Numbers of ``mask``/``box``/``tags``/``none`` cases out of ``n_cases`` (see module docstring)."""
    given = {"mask": masks, "box": boxes, "tags": tags}
    if unlabeled is not None:
        given["none"] = unlabeled
    for k, v in given.items():
        _check_amount({"mask": "masks", "box": "boxes", "none": "unlabeled"}.get(k, k), v, n_cases)
    if all(isinstance(v, (float, np.floating)) for v in given.values()):
        total = float(sum(given.values()))
        if total > 1 + 1e-6:
            raise ValueError(f"the fractions add up to {total:g} > 1")
        counts, cum, prev = {}, 0.0, 0
        for k, v in given.items():
            cum = min(1.0, cum + float(v))
            b = round_half_up(n_cases * cum)
            counts[k] = b - prev
            prev = b
    else:
        counts = {k: (round_half_up(n_cases * float(v)) if isinstance(v, (float, np.floating)) else int(v))
                  for k, v in given.items()}
    used = sum(counts.values())
    if used > n_cases:
        raise ValueError(f"the requested amounts {counts} add up to {used} cases, but the dataset has only "
                         f"{n_cases} training cases")
    if unlabeled is None:
        counts["none"] = n_cases - used
    elif used != n_cases:
        raise ValueError(f"the requested amounts {counts} cover {used} of {n_cases} training cases; make them "
                         f"add up to all cases or leave 'unlabeled' unset to give it the remainder")
    if counts["mask"] < 1:
        raise ValueError(f"at least one 'mask' case is needed, but masks={masks!r} of {n_cases} training cases "
                         f"gives {counts['mask']}; use a larger fraction or a count (an int)")
    return {t: counts[t] for t in TYPES}


def case_order(case_ids: Sequence[str], seed: int) -> list[str]:
    """The seeded permutation of the sorted case ids from which every budget takes its cases."""
    ids = sorted(case_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in perm]


def assign_cases(case_ids: Sequence[str], counts: dict[str, int], seed: int) -> dict[str, str]:
    """case id -> supervision type: mask cases first in the seeded order, then box, tags, none."""
    order = case_order(case_ids, seed)
    if sum(counts.values()) != len(order):
        raise ValueError(f"counts {counts} do not add up to {len(order)} cases")
    types = [t for t in TYPES for _ in range(counts[t])]
    return dict(zip(order, types))


# ----------------------------------------------------------------------------------------------------------
# weak labels from a dense label map
# ----------------------------------------------------------------------------------------------------------
def mm_to_voxels(mm: float, spacing: float) -> int:
    """Whole voxels for a length in mm (rounded half up, sign kept)."""
    v = round_half_up(abs(mm) / spacing)
    return v if mm >= 0 else -v


def boxes_from_label(seg: np.ndarray, labels: Sequence[int], spacing_itk: Sequence[float] | None = None,
                     margin_mm: float = 0.0, jitter_mm: float = 0.0,
                     rng: np.random.Generator | None = None) -> list[dict]:
    """One box per connected component (full connectivity) of each class in ``labels``.

    ``seg`` is the numpy array as returned by ``sitk.GetArrayFromImage`` (axes (z, y, x) or (y, x)).
    Returned boxes are manifest entries ``{"label", "min", "max"}`` in ITK index order (x, y[, z]),
    ``min`` inclusive, ``max`` exclusive, clipped to the image. ``spacing_itk`` (ITK order) converts
    ``margin_mm`` / ``jitter_mm`` to voxels per axis.
    """
    nd = seg.ndim
    size_itk = seg.shape[::-1]
    spacing_itk = tuple(spacing_itk) if spacing_itk is not None else (1.0,) * nd
    if len(spacing_itk) != nd:
        raise ValueError(f"spacing {spacing_itk} does not match a {nd}D label map")
    margin = [mm_to_voxels(margin_mm, s) for s in spacing_itk]
    if jitter_mm and rng is None:
        raise ValueError("box jitter needs a random generator")
    out = []
    for c in labels:
        comp, _ = ndimage.label(seg == c, structure=np.ones((3,) * nd, dtype=bool))
        for sl in ndimage.find_objects(comp):
            if sl is None:
                continue
            cmin = [s.start for s in sl][::-1]
            cmax = [s.stop for s in sl][::-1]
            mn = [a - m for a, m in zip(cmin, margin)]
            mx = [b + m for b, m in zip(cmax, margin)]
            if jitter_mm:
                for a in range(nd):
                    mn[a] += mm_to_voxels(float(rng.uniform(-jitter_mm, jitter_mm)), spacing_itk[a])
                    mx[a] += mm_to_voxels(float(rng.uniform(-jitter_mm, jitter_mm)), spacing_itk[a])
            for a in range(nd):
                mn[a] = min(max(mn[a], 0), cmax[a] - 1)  # in the image, overlapping the component
                mx[a] = max(min(mx[a], size_itk[a]), cmin[a] + 1)
                if mx[a] <= mn[a]:
                    mx[a] = mn[a] + 1
            out.append({"label": int(c), "min": [int(v) for v in mn], "max": [int(v) for v in mx]})
    return out


def _present_labels(seg: np.ndarray, valid_fg: set[int], ignore: int | None, where: str) -> list[int]:
    vals = np.unique(seg)
    if not np.all(vals == np.round(vals)):
        raise ValueError(f"{where}: label map has non-integer values")
    vals = {int(v) for v in vals} - {0} - ({ignore} if ignore is not None else set())
    bad = sorted(vals - valid_fg)
    if bad:
        raise ValueError(f"{where}: label values {bad} are not foreground labels of dataset.json {sorted(valid_fg)}")
    return sorted(vals)


# ----------------------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------------------
def _target_folder_name(target_id: int, source_name: str, target_name: str | None) -> str:
    prefix = f"Dataset{target_id:03d}_"
    if target_name is None:
        base = source_name[len("DatasetXXX_"):] if re.match(r"^Dataset\d{3}_", source_name) else source_name
        name = f"{base}MixSup"
    elif target_name.startswith(prefix):
        name = target_name[len(prefix):]
    else:
        name = target_name
    return prefix + check_dataset_name(name)


def _source_folder(source_id: int | str) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    root = raw_root()
    try:
        name = maybe_convert_to_dataset_name(source_id)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(f"source dataset {source_id!r} not found in nnUNet_raw={root}: "
                           f"{str(e).splitlines()[0]}") from None
    folder = root / name
    if not folder.is_dir():
        raise RuntimeError(f"source dataset folder {folder} does not exist (nnUNet_raw={root})")
    return folder


def simulate_dataset(source_id: int | str, target_id: int, masks: Amount, boxes: Amount = 0.0,
                     tags: Amount = 0.0, unlabeled: Amount | None = None, seed: int = 0,
                     box_margin_mm: float = 0.0, box_jitter_mm: float = 0.0, target_name: str | None = None,
                     overwrite: bool = False, show_progress: bool = True) -> Path:
    """Write the mixed-supervision dataset ``DatasetTTT_<SourceName>MixSup`` into nnUNet_raw; return its folder.

    See the module docstring for the counts, the assignment, the weak labels and the layout.
    """
    from tqdm import tqdm

    from nnunet_mixsup.manifest import (
        MANIFEST_NAME,
        ManifestError,
        parse_manifest,
        read_raw_dataset,
        validate_against_dataset,
    )

    target_id = validate_dataset_id(target_id)
    if box_margin_mm < 0 or box_jitter_mm < 0:
        raise ValueError("box_margin_mm and box_jitter_mm must be >= 0")
    src = _source_folder(source_id)
    src_id = int(src.name[7:10])
    if src_id == target_id:
        raise ValueError(f"the target id must differ from the source id ({target_id})")
    ds = read_raw_dataset(src)
    if not ds.case_ids:
        raise RuntimeError(f"source dataset {src} has no training images in imagesTr")
    src_manifest = src / MANIFEST_NAME
    if src_manifest.is_file():
        try:
            entries = json.loads(src_manifest.read_text(encoding="utf-8")).get("cases", {})
        except (OSError, ValueError, RecursionError, AttributeError) as e:
            raise RuntimeError(f"cannot read {src_manifest}: {e}") from None
        if not isinstance(entries, dict):
            raise RuntimeError(f"cannot read {src_manifest}: 'cases' is not an object")
        weak = sorted(c for c, e in entries.items() if isinstance(e, dict) and e.get("type") != "mask")
        if weak:
            raise RuntimeError(f"the source dataset must be fully labelled, but its {MANIFEST_NAME} marks "
                               f"{len(weak)} case(s) as weak (e.g. {weak[0]!r})")
    missing = [c for c in ds.case_ids if not ds.label_file(c).is_file()]
    if missing:
        raise RuntimeError(f"the source dataset must be fully labelled; {len(missing)} training case(s) have no "
                           f"labelsTr file, e.g. {missing[0]!r}")
    missing = [f.name for c in ds.case_ids for f in ds.image_files(c) if not f.is_file()]
    if missing:
        raise RuntimeError(f"source image file(s) missing: {missing[:5]}")

    counts = resolve_counts(len(ds.case_ids), masks, boxes, tags, unlabeled)
    order = case_order(ds.case_ids, seed)
    assignment = assign_cases(ds.case_ids, counts, seed)
    index_of = {c: i for i, c in enumerate(sorted(ds.case_ids))}

    root = raw_root()
    folder_name = _target_folder_name(target_id, src.name, target_name)
    target = root / folder_name
    check_target_id(target_id, folder_name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; refusing to overwrite it (use overwrite=True / "
                              f"--overwrite to replace it)")
    if overwrite and target.exists():
        from nnunetv2.paths import nnUNet_preprocessed

        pp = nnUNet_preprocessed.get()
        if pp and (Path(pp) / folder_name).exists():
            warnings.warn(f"replacing {folder_name}: its preprocessed data in {pp} is now stale; re-run "
                          f"plan_and_preprocess", stacklevel=2)

    fe = ds.file_ending
    valid_fg = set(ds.foreground_labels)
    cases: dict[str, dict] = {}
    written_as: dict[str, str] = {}
    with staged_folder(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", HIDDEN_LABELS_DIR, "imagesTs"):
            (tmp / sub).mkdir()
        (tmp / HIDDEN_LABELS_DIR / "README.txt").write_text(_HIDDEN_README, encoding="utf-8")
        for cid in tqdm(order, desc="simulating weak labels", unit="case", disable=not show_progress,
                        file=sys.stderr):
            t = assignment[cid]
            for f in ds.image_files(cid):
                link_or_copy(f, tmp / "imagesTr" / f.name)
            lab_file = ds.label_file(cid)
            shutil.copy2(lab_file, tmp / ("labelsTr" if t == "mask" else HIDDEN_LABELS_DIR) / lab_file.name)
            entry = _case_entry(cid, t, lab_file, valid_fg, ds.ignore_label, seed, index_of[cid],
                                box_margin_mm, box_jitter_mm)
            cases[cid] = entry
            written_as[cid] = entry["type"]
        ts = src / "imagesTs"
        if ts.is_dir():
            for f in sorted(ts.iterdir()):
                if f.is_file() and f.name.endswith(fe):
                    link_or_copy(f, tmp / "imagesTs" / f.name)
        lts = src / "labelsTs"
        if lts.is_dir():
            (tmp / "labelsTs").mkdir()
            for f in sorted(lts.iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / "labelsTs" / f.name)
        shutil.copy2(src / "dataset.json", tmp / "dataset.json")
        manifest = {"version": 1, "cases": {c: cases[c] for c in sorted(cases)}}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        record = {
            "version": 1,
            "tool": "nnunet-mixsup simulate",
            "package_version": package_version(),
            "source": {"id": src_id, "name": src.name},
            "target": {"id": target_id, "name": folder_name},
            "arguments": {"masks": masks, "boxes": boxes, "tags": tags, "unlabeled": unlabeled, "seed": seed,
                          "box_margin_mm": box_margin_mm, "box_jitter_mm": box_jitter_mm,
                          "target_name": target_name},
            "counts": counts,
            "order": order,
            "assignment": {c: assignment[c] for c in sorted(assignment)},
            "written_as": {c: written_as[c] for c in sorted(written_as) if written_as[c] != assignment[c]},
            "hidden_labels": f"{HIDDEN_LABELS_DIR}/ holds the dense labels of the non-mask training cases, for "
                             "evaluation and analysis only; training never reads it",
        }
        atomic_write_json(tmp / SIMULATION_RECORD, record)
        # self-check: the result must be a valid mixed-supervision dataset
        problems: list[str] = []
        man = parse_manifest(manifest, problems)
        if problems:
            raise ManifestError(problems, "simulated " + MANIFEST_NAME)
        validate_against_dataset(man, read_raw_dataset(tmp), check_label_files=False)
    return target


def _case_entry(cid: str, t: str, lab_file: Path, valid_fg: set[int], ignore: int | None, seed: int, index: int,
                margin_mm: float, jitter_mm: float) -> dict:
    """The manifest entry of one training case."""
    if t in ("mask", "none"):
        return {"type": t}
    img = sitk.ReadImage(str(lab_file))
    seg = sitk.GetArrayViewFromImage(img)
    present = _present_labels(seg, valid_fg, ignore, f"case {cid!r}")
    if t == "tags":
        return {"type": "tags", "present": present}
    # own stream per case: the same case gets the same boxes whatever the budget
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 2, index])
    boxes = boxes_from_label(seg, present, img.GetSpacing(), margin_mm, jitter_mm, rng)
    if not boxes:
        return {"type": "tags", "present": []}
    return {"type": "box", "boxes": boxes}


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------
def fraction_or_count(text: str) -> float | int:
    """CLI amount: a value containing '.' (or 'e') or below 1 is a fraction, otherwise a count."""
    s = text.strip()
    try:
        if "." in s or "e" in s.lower():
            v: float | int = float(s)
        else:
            v = int(s)
            if v < 1:
                v = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (e.g. 0.1) nor a count (e.g. 3)") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return v


def _cmd_simulate(args: argparse.Namespace) -> int:
    target = simulate_dataset(args.d, args.new_id, masks=args.masks, boxes=args.boxes, tags=args.tags,
                              unlabeled=args.unlabeled, seed=args.seed, box_margin_mm=args.box_margin_mm,
                              box_jitter_mm=args.box_jitter_mm, target_name=args.name, overwrite=args.overwrite)
    rec = json.loads((target / SIMULATION_RECORD).read_text(encoding="utf-8"))
    print(f"wrote {target}: " + ", ".join(f"{n} {t}" for t, n in rec["counts"].items()))
    print(f"dense labels of the weak cases (evaluation only): {target / HIDDEN_LABELS_DIR}")
    return 0


def register_cli(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "simulate", help="derive a mixed-supervision dataset (masks / boxes / tags / unlabelled) from a dense one",
        description="Write a NEW raw dataset in which only some training cases keep their mask and the others get "
                    "boxes (from connected components), image-level tags or nothing, plus supervision.json. "
                    "Amounts: a value containing '.' or below 1 is a fraction, otherwise a number of cases. "
                    "The dense labels of the weak cases go to labelsTr_dense_hidden/ (evaluation only).")
    s.add_argument("-d", required=True, help="source dataset id or name (fully labelled)")
    s.add_argument("--new-id", type=int, required=True, help="id of the dataset to write")
    s.add_argument("--name", default=None, help="name of the new dataset (default: <SourceName>MixSup)")
    s.add_argument("--masks", type=fraction_or_count, required=True, help="cases keeping their mask")
    s.add_argument("--boxes", type=fraction_or_count, default=0.0, help="box cases")
    s.add_argument("--tags", type=fraction_or_count, default=0.0, help="image-level tag cases")
    s.add_argument("--unlabeled", type=fraction_or_count, default=None,
                   help="unlabelled cases (default: the remainder)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--box-margin-mm", type=float, default=0.0, help="enlarge every box by this margin (mm)")
    s.add_argument("--box-jitter-mm", type=float, default=0.0,
                   help="move every box face by a random offset in [-J, J] mm")
    s.add_argument("--overwrite", action="store_true", help="replace an existing target dataset")
    s.set_defaults(func=_cmd_simulate)
