"""Weak-label simulation: counts, seeded nested assignment, no leakage, exact boxes, atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.lab import simulate as sim
from nnunet_mixsup.lab.simulate import (
    HIDDEN_LABELS_DIR,
    boxes_from_label,
    fraction_or_count,
    resolve_counts,
    simulate_dataset,
)

LABELS = {"background": 0, "a": 1, "b": 2}
# ITK order (x, y, z): asymmetric, non-cubic, anisotropic
SIZE_3D, SPACING_3D = (13, 9, 6), (0.5, 2.0, 3.0)
SIZE_2D, SPACING_2D = (11, 7), (0.7, 1.5)


def _write(arr: np.ndarray, spacing: tuple, path: Path) -> None:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    im.SetOrigin((3.0,) * arr.ndim)
    sitk.WriteImage(im, str(path), True)


def _label(rng: np.random.Generator, size_itk: tuple, i: int) -> np.ndarray:
    """Random small blobs of classes 1 and 2 (numpy axis order); case 3 has no foreground at all."""
    seg = np.zeros(size_itk[::-1], np.uint8)
    if i == 3:
        return seg
    for c in (1, 2):
        for _ in range(int(rng.integers(1, 4))):
            lo = [int(rng.integers(0, s)) for s in seg.shape]
            ext = [int(rng.integers(1, 4)) for _ in seg.shape]
            seg[tuple(slice(a, a + e) for a, e in zip(lo, ext))] = c
    return seg


def make_source(raw: Path, did: int = 500, n: int = 10, dim: int = 3, n_test: int = 2, seed: int = 0,
                labels: list[np.ndarray] | None = None) -> Path:
    size, spacing = (SIZE_3D, SPACING_3D) if dim == 3 else (SIZE_2D, SPACING_2D)
    folder = raw / f"Dataset{did:03d}_Src"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        seg = labels[i] if labels is not None else _label(rng, size, i)
        img = rng.normal(size=seg.shape).astype(np.float32) + seg
        _write(img, spacing, folder / "imagesTr" / f"c{i:02d}_0000.nii.gz")
        _write(seg, spacing, folder / "labelsTr" / f"c{i:02d}.nii.gz")
    for j in range(n_test):
        seg = _label(rng, size, j)
        _write(seg.astype(np.float32), spacing, folder / "imagesTs" / f"t{j}_0000.nii.gz")
        _write(seg, spacing, folder / "labelsTs" / f"t{j}.nii.gz")
    dj = {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": n, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def _sup(folder: Path) -> dict:
    return json.loads((folder / "supervision.json").read_text())["cases"]


def _types(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in ("mask", "box", "tags", "none")}
    for c, e in _sup(folder).items():
        out[e["type"]].append(c)
    return out


def _assigned(folder: Path) -> dict[str, int]:
    """Cases per assigned type (a box case without foreground is written as empty tags)."""
    rec = json.loads((folder / "simulation.json").read_text())
    sup = _sup(folder)
    for c, t in rec["assignment"].items():
        assert sup[c]["type"] == rec["written_as"].get(c, t)
        assert t == sup[c]["type"] or (t == "box" and sup[c] == {"type": "tags", "present": []})
    return {t: sum(v == t for v in rec["assignment"].values()) for t in ("mask", "box", "tags", "none")}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture()
def src(fresh_dirs) -> Path:
    return make_source(fresh_dirs["nnUNet_raw"], n=10)


def test_nnunet_raw_is_read_at_use_time(fresh_dirs):
    from nnunetv2.paths import nnUNet_raw

    assert os.fspath(nnUNet_raw) == str(fresh_dirs["nnUNet_raw"]) == str(sim.raw_root())


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("args, expected", [
    ((10, 0.1, 0.4, 0.2, None), (1, 4, 2, 3)),
    ((10, 0.1, 0.4, 0.2, 0.3), (1, 4, 2, 3)),
    ((7, 0.1, 0.4, 0.2, 0.3), (1, 3, 1, 2)),  # cumulative rounding: always covers every case
    ((10, 2, 3, 1, None), (2, 3, 1, 4)),
    ((10, 2, 0.5, 0, None), (2, 5, 0, 3)),  # counts and fractions mixed
    ((10, 1.0, 0.0, 0.0, None), (10, 0, 0, 0)),
])
def test_resolve_counts(args, expected):
    c = resolve_counts(*args)
    assert tuple(c[t] for t in ("mask", "box", "tags", "none")) == expected


@pytest.mark.parametrize("args", [
    (10, 0, 0.5, 0.0, None),  # no mask case
    (10, 0.0, 0.5, 0.0, None),
    (10, 0.04, 0.5, 0.0, None),  # rounds to 0 masks
    (10, 0.5, 0.4, 0.2, None),  # > 1
    (10, 5, 4, 2, None),  # > N
    (10, 0.1, 0.4, 0.2, 0.2),  # explicit unlabeled but not covering all cases
    (10, True, 0.1, 0.1, None),
    (10, -1, 0.1, 0.1, None),
    (10, 1.5, 0.0, 0.0, None),
])
def test_resolve_counts_rejects(args):
    with pytest.raises((ValueError, TypeError)):
        resolve_counts(*args)


def test_cli_amounts():
    assert fraction_or_count("3") == 3 and isinstance(fraction_or_count("3"), int)
    assert fraction_or_count("1") == 1 and isinstance(fraction_or_count("1"), int)
    assert isinstance(fraction_or_count("1.0"), float) and fraction_or_count("0.25") == 0.25
    assert isinstance(fraction_or_count("0"), float)


def test_exact_counts_in_dataset(src):
    t = simulate_dataset(500, 501, masks=0.2, boxes=3, tags=0.1, unlabeled=None, seed=0, show_progress=False)
    assert _assigned(t) == {"mask": 2, "box": 3, "tags": 1, "none": 4}
    rec = json.loads((t / "simulation.json").read_text())
    assert rec["counts"] == {"mask": 2, "box": 3, "tags": 1, "none": 4}
    assert rec["source"] == {"id": 500, "name": "Dataset500_Src"} and rec["arguments"]["seed"] == 0
    assert t.name == "Dataset501_SrcMixSup"
    assert sorted(rec["assignment"]) == sorted(_sup(t)) and len(_sup(t)) == 10


def test_at_least_one_mask_case(src, fresh_dirs):
    with pytest.raises(ValueError, match="mask"):
        simulate_dataset(500, 501, masks=0.04, boxes=0.5, tags=0.0, unlabeled=None, show_progress=False)
    assert sorted(p.name for p in fresh_dirs["nnUNet_raw"].iterdir()) == ["Dataset500_Src"]


# ---------------------------------------------------------------------------- determinism, nesting
def test_deterministic_for_a_seed(src):
    kw = {"masks": 0.3, "boxes": 0.3, "tags": 0.2, "unlabeled": None, "box_margin_mm": 1.0, "box_jitter_mm": 2.0,
          "show_progress": False}
    a = simulate_dataset(500, 501, seed=3, **kw)
    b = simulate_dataset(500, 502, seed=3, **kw)
    c = simulate_dataset(500, 503, seed=4, **kw)
    assert (a / "supervision.json").read_text() == (b / "supervision.json").read_text()
    assert (a / "supervision.json").read_text() != (c / "supervision.json").read_text()
    assert _types(a)["mask"] != _types(c)["mask"] or _types(a)["box"] != _types(c)["box"]


def test_nested_across_budgets(fresh_dirs):
    make_source(fresh_dirs["nnUNet_raw"], n=20)
    orders = []
    for seed in (0, 1):
        small = simulate_dataset(500, 510 + seed, masks=0.1, boxes=0.4, tags=0.2, unlabeled=None, seed=seed,
                                 show_progress=False)
        big = simulate_dataset(500, 520 + seed, masks=0.2, boxes=0.4, tags=0.2, unlabeled=None, seed=seed,
                               show_progress=False)
        ms, mb = set(_types(small)["mask"]), set(_types(big)["mask"])
        assert len(ms) == 2 and len(mb) == 4 and ms < mb
        rs = json.loads((small / "simulation.json").read_text())
        rb = json.loads((big / "simulation.json").read_text())
        assert rs["order"] == rb["order"]
        orders.append(rs["order"])
        # weak types follow the masks in the same order
        for rec in (rs, rb):
            types = [rec["assignment"][c] for c in rec["order"]]
            assert types == sorted(types, key=("mask", "box", "tags", "none").index)
        # a case that is a box case in both budgets gets the same boxes
        both = set(_types(small)["box"]) & set(_types(big)["box"])
        assert both
        for cid in both:
            assert _sup(small)[cid] == _sup(big)[cid]
    assert orders[0] != orders[1]


# ------------------------------------------------------------------------------------------- leakage
def test_no_label_leakage(src):
    t = simulate_dataset(500, 501, masks=0.3, boxes=0.3, tags=0.2, unlabeled=None, show_progress=False)
    types = _types(t)
    masks = {f"{c}.nii.gz" for c in types["mask"]}
    weak = {f"{c}.nii.gz" for k in ("box", "tags", "none") for c in types[k]}
    assert {p.name for p in (t / "labelsTr").iterdir()} == masks
    assert {p.name for p in (t / HIDDEN_LABELS_DIR).iterdir() if p.name.endswith(".nii.gz")} == weak
    for name in weak:
        assert np.array_equal(_read(t / HIDDEN_LABELS_DIR / name), _read(src / "labelsTr" / name))
    assert len(list((t / "imagesTr").iterdir())) == 10
    assert {p.name for p in (t / "imagesTs").iterdir()} == {p.name for p in (src / "imagesTs").iterdir()}
    assert {p.name for p in (t / "labelsTs").iterdir()} == {"t0.nii.gz", "t1.nii.gz"}
    assert json.loads((t / "dataset.json").read_text()) == json.loads((src / "dataset.json").read_text())
    # tags are exactly the classes present
    for c in types["tags"]:
        seg = _read(t / HIDDEN_LABELS_DIR / f"{c}.nii.gz")
        assert _sup(t)[c]["present"] == sorted(int(v) for v in np.unique(seg) if v > 0)


def test_result_is_accepted_by_prepare(src):
    from nnunet_mixsup.prepare import prepare_dataset

    t = simulate_dataset(500, 501, masks=0.3, boxes=0.4, tags=0.2, unlabeled=None, box_margin_mm=2.0,
                         box_jitter_mm=1.0, show_progress=False)
    res = prepare_dataset(t, show_progress=False)
    assert len(res.manifest.of_type("mask")) == 3


# --------------------------------------------------------------------------------------------- boxes
def _components_contained(seg: np.ndarray, boxes: list[dict], spacing_itk, tight: bool) -> None:
    """Every foreground voxel lies in a box of its class; boxes are in the image (ITK order)."""
    size_itk = seg.shape[::-1]
    for c in (1, 2):
        covered = np.zeros(seg.shape, bool)
        for b in (b for b in boxes if b["label"] == c):
            assert len(b["min"]) == seg.ndim
            assert all(0 <= lo < hi <= s for lo, hi, s in zip(b["min"], b["max"], size_itk)), (b, size_itk)
            sl = tuple(slice(lo, hi) for lo, hi in zip(b["min"][::-1], b["max"][::-1]))  # numpy order
            covered[sl] = True
            if tight:  # every face of a tight box touches the class
                sub = seg[sl] == c
                for ax in range(seg.ndim):
                    assert np.take(sub, 0, axis=ax).any() and np.take(sub, -1, axis=ax).any()
        assert covered[seg == c].all()


def test_boxes_exact_3d():
    seg = np.zeros(SIZE_3D[::-1], np.uint8)  # numpy (z, y, x) = (6, 9, 13)
    seg[1:3, 2:5, 4:11] = 1  # ITK x 4..10, y 2..4, z 1..2
    seg[3, 5, 11] = 1  # touches the block only diagonally (corner): same component with full connectivity
    seg[5, 8, 12] = 2  # the last voxel of the image
    seg[0, 0, 0] = 2  # the first voxel, a separate component
    boxes = boxes_from_label(seg, [1, 2], SPACING_3D)
    assert boxes == [{"label": 1, "min": [4, 2, 1], "max": [12, 6, 4]},
                     {"label": 2, "min": [0, 0, 0], "max": [1, 1, 1]},
                     {"label": 2, "min": [12, 8, 5], "max": [13, 9, 6]}]
    _components_contained(seg, boxes, SPACING_3D, tight=True)


def test_boxes_exact_2d():
    seg = np.zeros(SIZE_2D[::-1], np.uint8)  # numpy (y, x) = (7, 11)
    seg[1:3, 6:9] = 1  # ITK x 6..8, y 1..2
    seg[3, 9] = 1  # diagonal neighbour
    seg[6, 0] = 2
    boxes = boxes_from_label(seg, [1, 2], SPACING_2D)
    assert boxes == [{"label": 1, "min": [6, 1], "max": [10, 4]}, {"label": 2, "min": [0, 6], "max": [1, 7]}]


def test_margin_converted_with_spacing():
    seg = np.zeros(SIZE_3D[::-1], np.uint8)
    seg[2:4, 3:5, 5:7] = 1  # ITK min (5, 3, 2), max (7, 5, 4)
    seg[5, 8, 12] = 2  # at the far corner: the margin is clipped
    # 3 mm with spacing (0.5, 2, 3) mm -> (6, 2, 1) voxels (1.5 rounds up)
    boxes = boxes_from_label(seg, [1, 2], SPACING_3D, margin_mm=3.0)
    assert boxes[0] == {"label": 1, "min": [0, 1, 1], "max": [13, 7, 5]}
    assert boxes[1] == {"label": 2, "min": [6, 6, 4], "max": [13, 9, 6]}
    boxes = boxes_from_label(seg, [1], SPACING_3D, margin_mm=1.0)  # (2, 1, 0) voxels (0.33 rounds down)
    assert boxes[0] == {"label": 1, "min": [3, 2, 2], "max": [9, 6, 4]}


def test_jitter_within_range_and_valid():
    rng = np.random.default_rng(0)
    seg = np.zeros(SIZE_3D[::-1], np.uint8)
    seg[2:4, 3:6, 5:9] = 1
    tight = boxes_from_label(seg, [1], SPACING_3D)[0]
    seen = set()
    for _ in range(50):
        b = boxes_from_label(seg, [1], SPACING_3D, margin_mm=0.0, jitter_mm=2.0, rng=rng)[0]
        seen.add((tuple(b["min"]), tuple(b["max"])))
        lim = [sim.mm_to_voxels(2.0, s) for s in SPACING_3D]
        for a in range(3):
            assert abs(b["min"][a] - tight["min"][a]) <= lim[a] and abs(b["max"][a] - tight["max"][a]) <= lim[a]
            assert 0 <= b["min"][a] < b["max"][a] <= SIZE_3D[a]
            assert b["min"][a] < tight["max"][a] and b["max"][a] > tight["min"][a]  # overlaps the component
    assert len(seen) > 10


@pytest.mark.parametrize("dim", [3, 2])
def test_boxes_in_simulated_dataset(fresh_dirs, dim):
    make_source(fresh_dirs["nnUNet_raw"], n=10, dim=dim)
    t = simulate_dataset(500, 501, masks=1, boxes=9, tags=0, unlabeled=None, show_progress=False)
    sup = _sup(t)
    spacing = SPACING_3D if dim == 3 else SPACING_2D
    n_box, empty = 0, {}
    for cid, e in sup.items():
        if e["type"] == "mask":
            continue
        seg = _read(t / HIDDEN_LABELS_DIR / f"{cid}.nii.gz")
        assert seg.ndim == dim
        if not seg.any():  # a box case without foreground: all classes absent
            assert e == {"type": "tags", "present": []}
            empty[cid] = "tags"
            continue
        assert e["type"] == "box"
        n_box += 1
        _components_contained(seg, e["boxes"], spacing, tight=True)
        size = sitk.ReadImage(str(t / "imagesTr" / f"{cid}_0000.nii.gz")).GetSize()
        assert all(b["max"][a] <= size[a] for b in e["boxes"] for a in range(dim))
    assert n_box >= 7 and n_box + len(empty) == 9
    rec = json.loads((t / "simulation.json").read_text())
    assert rec["written_as"] == empty and all(rec["assignment"][c] == "box" for c in empty)


# ------------------------------------------------------------------------------- overwrite, atomicity
def test_refuses_to_overwrite(src):
    kw = {"masks": 0.5, "boxes": 0.5, "tags": 0.0, "unlabeled": None, "show_progress": False}
    t = simulate_dataset(500, 501, **kw)
    (t / "marker").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        simulate_dataset(500, 501, **kw)
    assert (t / "marker").exists()
    t2 = simulate_dataset(500, 501, overwrite=True, **kw)
    assert t2 == t and not (t / "marker").exists() and (t / "supervision.json").is_file()
    assert sorted(p.name for p in t.parent.iterdir()) == ["Dataset500_Src", "Dataset501_SrcMixSup"]


def test_refuses_id_used_by_another_dataset(src, fresh_dirs):
    (fresh_dirs["nnUNet_raw"] / "Dataset501_Other").mkdir()
    with pytest.raises(FileExistsError, match="Dataset501_Other"):
        simulate_dataset(500, 501, masks=0.5, boxes=0.5, tags=0.0, unlabeled=None, show_progress=False)
    with pytest.raises(ValueError, match="differ"):
        simulate_dataset(500, 500, masks=0.5, boxes=0.5, tags=0.0, unlabeled=None, show_progress=False)


def test_atomic_on_failure(src, monkeypatch):
    kw = {"masks": 0.3, "boxes": 0.4, "tags": 0.3, "unlabeled": None, "show_progress": False}
    raw = src.parent
    real = sim._case_entry
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(sim, "_case_entry", failing)
    with pytest.raises(RuntimeError, match="boom"):
        simulate_dataset(500, 501, **kw)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset500_Src"]  # no target, no temp folder
    monkeypatch.setattr(sim, "_case_entry", real)
    t = simulate_dataset(500, 501, **kw)
    before = (t / "supervision.json").read_text()
    calls.clear()
    monkeypatch.setattr(sim, "_case_entry", failing)
    with pytest.raises(RuntimeError, match="boom"):
        simulate_dataset(500, 501, overwrite=True, seed=5, **kw)
    assert (t / "supervision.json").read_text() == before  # the old dataset is untouched
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset500_Src", "Dataset501_SrcMixSup"]


def test_rejects_weak_source(src, fresh_dirs):
    t = simulate_dataset(500, 501, masks=0.5, boxes=0.5, tags=0.0, unlabeled=None, show_progress=False)
    with pytest.raises(RuntimeError, match="fully labelled"):
        simulate_dataset(t.name, 502, masks=0.5, boxes=0.5, tags=0.0, unlabeled=None, show_progress=False)


def test_cli(src, capsys):
    from nnunet_mixsup.cli import main

    rc = main(["simulate", "-d", "500", "--new-id", "505", "--masks", "2", "--boxes", "0.4", "--tags", "0.2",
               "--seed", "1", "--box-margin-mm", "1"])
    assert rc == 0
    t = src.parent / "Dataset505_SrcMixSup"
    assert _assigned(t) == {"mask": 2, "box": 4, "tags": 2, "none": 2}
    assert main(["simulate", "-d", "500", "--new-id", "505", "--masks", "2"]) == 1  # exists
    assert "overwrite" in capsys.readouterr().err
