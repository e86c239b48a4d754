"""Tests of nnunet_mixsup.evaluation: hand-checked metric values, conventions, folders, CLI."""
from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from nnunet_mixsup.evaluation import (
    METRICS_VERSION,
    EvaluationError,
    compute_case_metrics,
    evaluate_folders,
    format_summary,
    labels_from_dataset_json,
    register_cli,
    write_results,
)


def cube(shape, start, size=3, value=1):
    a = np.zeros(shape, dtype=np.uint8)
    a[tuple(slice(s, s + size) for s in start)] = value
    return a


# ----------------------------------------------------------------------------------------------
# hand-checked values
# ----------------------------------------------------------------------------------------------
# Two 3x3x3 cubes, the prediction shifted by one voxel along axis 0 (z), spacing (2, 1, 1).
# Surfaces: 26 voxels each (all but the centre). Ref -> pred distances: the 9 voxels of the ref's
# first layer are one z-step (2 mm) from pred's first layer; the ref's last layer centre is one
# in-plane step (1 mm) from the nearest pred surface voxel (pred's centre is not surface); the
# other 16 are on pred's surface (0). Pred -> ref is the mirror image.
# Face areas: z-faces 1 x 1 = 1 mm^2, y- and x-faces 2 x 1 = 2 mm^2. Boundary area per voxel of a
# 3x3 layer: corner 2 + 2, edge 2, centre 0; plus 1 for the z-face of the first and last layer.
# First layer 4*5 + 4*3 + 1 = 33 (all at 2 mm), middle layer 4*4 + 4*2 = 24 (0 mm), last layer 33
# (its centre, area 1, at 1 mm, the rest at 0 mm): 90 mm^2 per cube, the cube's surface area.
REF3 = cube((8, 8, 8), (2, 2, 2))
PRED3 = cube((8, 8, 8), (3, 2, 2))


def test_cubes_offset_along_z_anisotropic():
    m = compute_case_metrics(REF3, PRED3, [1], spacing=(2.0, 1.0, 1.0), nsd_tolerance_mm=1.5)[1]
    assert m["dice"] == pytest.approx(2 * 18 / 54)
    # each direction: 26 values (16 x 0, 1 x 1.0, 9 x 2.0); the 95th percentile at index 23.75 is 2.0
    assert m["hd95"] == pytest.approx(2.0)
    # area within 1.5 mm: 24 + 33 per cube, of 90 (count-based it would be 34 / 52 voxels)
    assert m["nsd"] == pytest.approx(2 * 57 / 180)
    assert (m["n_ref"], m["n_pred"]) == (27, 27)


def test_cubes_offset_nsd_tolerance_below_and_above_offset():
    def nsd(tol):
        return compute_case_metrics(REF3, PRED3, [1], (2.0, 1.0, 1.0), nsd_tolerance_mm=tol)[1]["nsd"]

    assert nsd(0.5) == pytest.approx(2 * 56 / 180)  # without the last layer's centres (1 mm^2 each)
    assert nsd(1.0) == pytest.approx(2 * 57 / 180)  # distances equal to the tolerance count
    assert nsd(1.99) == pytest.approx(2 * 57 / 180)
    assert nsd(2.0) == pytest.approx(1.0)
    assert nsd(2.5) == pytest.approx(1.0)


def test_offset_along_fine_axis_gives_fine_distance():
    pred = cube((8, 8, 8), (2, 2, 3))  # shifted along x (spacing 1 mm) instead of z (2 mm)
    m = compute_case_metrics(REF3, pred, [1], spacing=(2.0, 1.0, 1.0))[1]
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["hd95"] == pytest.approx(1.0)
    assert m["nsd"] == pytest.approx(1.0)


def test_2d_hd95_directed_percentile_anisotropic():
    # ref: one row of 20 pixels; pred: the same row plus three pixels two rows above.
    ref = np.zeros((8, 20), dtype=np.uint8)
    ref[5, :] = 1
    pred = ref.copy()
    pred[3, 0:3] = 1
    # every pixel is a surface pixel. ref->pred: 20 x 0; pred->ref: 20 x 0 and 3 x (2 rows * 2 mm).
    # pred->ref: 23 values, the 95th percentile at index 20.9 lies in the 4 mm values -> 4.0.
    # (The pooled 43 values would give index 39.9: 0.9 * 4 = 3.6 mm.)
    m = compute_case_metrics(ref, pred, [1], spacing=(2.0, 0.5), nsd_tolerance_mm=3.0)[1]
    assert m["dice"] == pytest.approx(40 / 43)
    assert m["hd95"] == pytest.approx(4.0)
    # boundary lengths: a row pixel has two 0.5 mm edges (y-faces), the row ends two 2 mm edges
    # (x-faces): the row 20 * 1 + 2 * 2 = 24 mm, the 3-pixel blob 3 * 1 + 2 * 2 = 7 mm (at 4 mm).
    assert m["nsd"] == pytest.approx(48 / 55)  # count-based: 40 / 43
    assert compute_case_metrics(ref, pred, [1], (2.0, 0.5), nsd_tolerance_mm=4.0)[1]["nsd"] == 1.0
    # spacing is used in array-axis order: swapping it changes the result
    assert compute_case_metrics(ref, pred, [1], (0.5, 2.0))[1]["hd95"] == pytest.approx(1.0)


def test_hd95_false_blob_far_from_a_square():
    """A far false-positive blob that is under 5 % of the pooled surface but over 5 % of one direction.

    Reference: a 40 x 40 square (rows and columns 10..49), 156 surface pixels. Prediction: the
    same square plus a 4 x 6 blob (rows 20..23, columns 129..134) whose 16 surface pixels lie
    80 (4x), 81, 82, 83, 84 (2x each) and 85 (4x) pixels right of the square's last column (the
    nearest square surface pixel is in the same row). ref -> pred: 156 x 0. pred -> ref:
    156 x 0 and those 16 values; 172 values, index 0.95 * 171 = 162.45 = blob values 6 and 7,
    both 82 -> HD95 82 px. Pooled (the old definition): 328 values, index 310.65 among the
    312 zeros -> 0, i.e. the blob would be invisible.
    """
    ref = np.zeros((64, 160), dtype=np.uint8)
    ref[10:50, 10:50] = 1
    pred = ref.copy()
    pred[20:24, 129:135] = 1
    assert compute_case_metrics(ref, pred, [1], (1.0, 1.0))[1]["hd95"] == pytest.approx(82.0)
    assert compute_case_metrics(pred, ref, [1], (1.0, 1.0))[1]["hd95"] == pytest.approx(82.0)  # symmetric
    assert compute_case_metrics(ref, pred, [1], (1.0, 0.5))[1]["hd95"] == pytest.approx(41.0)  # columns 0.5 mm
    assert compute_case_metrics(ref, pred, [1], (3.0, 0.5))[1]["hd95"] == pytest.approx(41.0)  # rows don't matter


# ----------------------------------------------------------------------------------------------
# independent brute-force implementation: surface voxels by erosion, boundary faces enumerated
# one by one, all pairwise distances with cdist
# ----------------------------------------------------------------------------------------------
def _boundary_faces(mask, spacing):
    """(voxel indices, face areas) of every face between a mask voxel and a non-mask voxel / the outside."""
    padded = np.pad(mask, 1)  # the outside of the image is background
    voxels, areas = [], []
    for axis in range(mask.ndim):
        area = float(np.prod([s for i, s in enumerate(spacing) if i != axis]))
        for step in (-1, 1):
            neighbour = np.roll(padded, step, axis=axis)  # wraps around into the all-False padding only
            for idx in np.argwhere(padded & ~neighbour):
                voxels.append(tuple(int(i) - 1 for i in idx))
                areas.append(area)
    return voxels, np.asarray(areas)


def _brute_force(ref, pred, spacing, tol):
    """(HD95, area-weighted NSD, count-based NSD) from scratch."""
    st = ndimage.generate_binary_structure(ref.ndim, 1)
    sr = np.argwhere(ref & ~ndimage.binary_erosion(ref, st, border_value=0))
    sp = np.argwhere(pred & ~ndimage.binary_erosion(pred, st, border_value=0))
    d = cdist(sr * np.asarray(spacing), sp * np.asarray(spacing))
    d_ref, d_pred = d.min(axis=1), d.min(axis=0)  # each surface voxel to the other surface
    hd95 = max(np.percentile(d_ref, 95), np.percentile(d_pred, 95))
    matched = area = 0.0
    for surf, dist, mask in ((sr, d_ref, ref), (sp, d_pred, pred)):
        lookup = {tuple(int(i) for i in v): x for v, x in zip(surf, dist)}
        voxels, areas = _boundary_faces(mask, spacing)
        assert set(voxels) == set(lookup)  # the voxels with a boundary face are the surface voxels
        face_dist = np.array([lookup[v] for v in voxels])
        matched += areas[face_dist <= tol].sum()
        area += areas.sum()
    count_nsd = (np.sum(d_ref <= tol) + np.sum(d_pred <= tol)) / (d_ref.size + d_pred.size)
    return hd95, matched / area, count_nsd


def _random_shape(rng, shape, threshold):
    smooth = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return smooth > np.quantile(smooth, threshold)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape, spacing", [((40, 36), (0.7, 1.9)), ((9, 16, 14), (2.5, 0.8, 1.1))])
def test_matches_brute_force_on_random_shapes(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    ref = _random_shape(rng, shape, 0.6)
    pred = _random_shape(rng, shape, 0.65)
    ref[(0,) * len(shape)] = True  # touches the image border
    for tol in (1.0, 2.0, 3.5):
        m = compute_case_metrics(ref.astype(np.uint8), pred.astype(np.uint8), [1], spacing, tol)[1]
        hd95, nsd, _ = _brute_force(ref, pred, spacing, tol)
        assert m["hd95"] == pytest.approx(hd95, rel=1e-9)
        assert m["nsd"] == pytest.approx(nsd, rel=1e-9)


def test_area_weighted_and_count_based_nsd_differ_on_anisotropic_spacing():
    """Why NSD is area-weighted: counting voxels over-weights the boundary facing the coarse axis.

    A 20 x 20 slab 3 voxels thick along the 3 mm axis, predicted one voxel too thick: most of the
    top face (0.5 x 0.5 mm^2 per voxel, many voxels) is 3 mm off, the sides (3 x 0.5 mm^2 per
    voxel, few voxels) are right. At 2 mm tolerance area-weighted NSD is 0.802, count-based 0.726.
    """
    ref = np.zeros((8, 24, 24), dtype=bool)
    ref[1:4, 2:22, 2:22] = True
    pred = ref.copy()
    pred[4, 2:22, 2:22] = True
    spacing = (3.0, 0.5, 0.5)
    m = compute_case_metrics(ref.astype(np.uint8), pred.astype(np.uint8), [1], spacing, 2.0)[1]
    _, area_nsd, count_nsd = _brute_force(ref, pred, spacing, 2.0)
    assert m["nsd"] == pytest.approx(area_nsd, rel=1e-9)
    assert area_nsd == pytest.approx(0.8024, abs=1e-4) and count_nsd == pytest.approx(0.7265, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# conventions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, spacing, diagonal", [((6, 6), (1.0, 1.0), math.sqrt(72)),
                                                     ((4, 6, 6), (3.0, 1.0, 0.5), math.sqrt(144 + 36 + 9))])
def test_empty_conventions_2d_and_3d(shape, spacing, diagonal):
    empty = np.zeros(shape, dtype=np.uint8)
    some = np.zeros(shape, dtype=np.uint8)
    some[(1,) * len(shape)] = 1
    both = compute_case_metrics(empty, empty, [1], spacing)[1]
    assert both == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "n_ref": 0, "n_pred": 0}
    # exactly one empty: HD95 is the diagonal of the image's extent (shape * spacing), never NaN
    for ref, pred in ((empty, some), (some, empty)):
        m = compute_case_metrics(ref, pred, [1], spacing)[1]
        assert (m["dice"], m["nsd"]) == (0.0, 0.0)
        assert m["hd95"] == pytest.approx(diagonal)
        assert (m["n_ref"], m["n_pred"]) == (int(ref.sum()), int(pred.sum()))
    same = compute_case_metrics(some, some, [1], spacing)[1]
    assert (same["dice"], same["hd95"], same["nsd"]) == (1.0, 0.0, 1.0)


def test_missed_class_penalty_exceeds_any_real_distance():
    # the farthest possible pair of one-voxel masks, in opposite corners, scores below the penalty
    ref = np.zeros((5, 7, 9), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, 0] = 1
    pred[-1, -1, -1] = 1
    spacing = (2.0, 1.0, 0.5)
    far = compute_case_metrics(ref, pred, [1], spacing)[1]["hd95"]
    assert far == pytest.approx(math.sqrt(8.0**2 + 6.0**2 + 4.0**2))
    missed = compute_case_metrics(ref, np.zeros_like(ref), [1], spacing)[1]["hd95"]
    assert missed == pytest.approx(math.sqrt(10.0**2 + 7.0**2 + 4.5**2)) and missed > far


def test_ignore_label_excluded_from_both_masks():
    ref = np.zeros((10, 10), dtype=np.uint8)
    ref[2:5, 2:5] = 1
    ref[:, 8:] = 9  # ignore region
    pred = np.zeros_like(ref)
    pred[2:5, 2:5] = 1
    pred[0:3, 7:] = 1  # false positive partly inside the ignore region
    pred[6, 6] = 2
    m = compute_case_metrics(ref, pred, [1, 2], (1.0, 1.0), ignore_label=9)
    # only pred[0:3, 7] (3 pixels) stays as false positive
    assert m[1]["n_pred"] == 9 + 3 and m[1]["n_ref"] == 9
    assert m[1]["dice"] == pytest.approx(18 / 21)
    assert m[2]["dice"] == 0.0 and m[2]["hd95"] == pytest.approx(math.sqrt(200))  # hallucinated: penalty
    pred[0:3, 7] = 0
    m = compute_case_metrics(ref, pred, [1], (1.0, 1.0), ignore_label=9)[1]
    assert (m["dice"], m["hd95"], m["nsd"], m["n_pred"]) == (1.0, 0.0, 1.0, 9)
    # without ignore label the prediction inside the ignore region counts
    assert compute_case_metrics(ref, pred, [1], (1.0, 1.0))[1]["dice"] < 1.0


def test_dice_matches_nnunetv2():
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, size=(6, 7, 8)).astype(np.uint8)  # label 3 = ignore
    pred = rng.integers(0, 3, size=(6, 7, 8)).astype(np.uint8)
    ours = compute_case_metrics(ref, pred, [1, 2], (1.0, 1.0, 1.0), ignore_label=3)
    for lab in (1, 2):
        tp, fp, fn, _ = compute_tp_fp_fn_tn(ref == lab, pred == lab, ignore_mask=ref == 3)
        assert ours[lab]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_input_errors():
    a = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(a, np.zeros((4, 5), dtype=np.uint8), [1], (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(a, a, [1], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(a, a, [1], (1, 0))
    with pytest.raises(ValueError, match="ignore"):
        compute_case_metrics(a, a, [1, 2], (1, 1), ignore_label=2)


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------
ITK_SPACING = (0.5, 1.0, 2.0)  # x, y, z -> numpy spacing (2.0, 1.0, 0.5)


def write_img(path, arr, spacing=ITK_SPACING):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def make_folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    shape = (6, 8, 10)  # z, y, x
    ref_a = cube(shape, (1, 2, 2)) + cube(shape, (1, 2, 6), size=2, value=2)
    pred_a = cube(shape, (2, 2, 2)) + cube(shape, (1, 2, 6), size=2, value=2)
    ref_b = cube(shape, (2, 3, 3))
    pred_b = cube(shape, (2, 3, 3), value=2)  # class 1 missed, class 2 predicted but absent
    arrays = {"case_a": (ref_a, pred_a), "case_b": (ref_b, pred_b)}
    for case, (r, p) in arrays.items():
        write_img(ref_dir / f"{case}.nii.gz", r)
        write_img(pred_dir / f"{case}.nii.gz", p)
    (pred_dir / "plans.json").write_text("{}")  # other files are ignored
    return ref_dir, pred_dir, arrays


def test_evaluate_folders_round_trip(tmp_path):
    ref_dir, pred_dir, arrays = make_folders(tmp_path)
    res = evaluate_folders(ref_dir, pred_dir, [1, 2], nsd_tolerance_mm=1.0)
    assert [c["case"] for c in res["per_case"]] == ["case_a", "case_b"]
    for c in res["per_case"]:
        r, p = arrays[c["case"]]
        expected = compute_case_metrics(r, p, [1, 2], ITK_SPACING[::-1], 1.0)
        assert c["spacing"] == [2.0, 1.0, 0.5]
        for lab in (1, 2):
            for k, v in expected[lab].items():
                assert c["metrics"][lab][k] == pytest.approx(v, nan_ok=True)
    a1 = res["per_case"][0]["metrics"][1]
    assert a1["hd95"] == pytest.approx(2.0)  # z offset of one voxel = 2 mm (ITK z spacing)
    s = res["summary"]
    assert s[1]["dice"]["mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert s[1]["dice"]["sd"] == pytest.approx(np.std([2 / 3, 0.0], ddof=1))
    # case_b misses class 1 and hallucinates class 2: both enter the HD95 means with the penalty,
    # the diagonal of the 12 x 8 x 5 mm image, and are counted
    diag = math.sqrt(12.0**2 + 8.0**2 + 5.0**2)
    assert s[1]["hd95"] == {"mean": pytest.approx((2.0 + diag) / 2), "sd": pytest.approx(np.std([2.0, diag], ddof=1)),
                            "n": 2, "n_nan": 0}
    assert s[2]["hd95"]["mean"] == pytest.approx(diag / 2) and s[2]["hd95"]["n"] == 2
    assert {k: s[1][k] for k in ("n_cases", "n_missed", "n_hallucinated", "n_both_empty")} == \
        {"n_cases": 2, "n_missed": 1, "n_hallucinated": 0, "n_both_empty": 0}
    assert (s[2]["n_missed"], s[2]["n_hallucinated"]) == (0, 1)
    assert (s["mean"]["n_cases"], s["mean"]["n_missed"], s["mean"]["n_hallucinated"]) == (2, 1, 1)
    assert s["mean"]["dice"]["mean"] == pytest.approx((s[1]["dice"]["mean"] + s[2]["dice"]["mean"]) / 2)
    assert s["mean"]["dice"]["n"] == 2
    assert s["mean"]["hd95"]["mean"] == pytest.approx((2.0 + 2 * diag) / 4)

    out = tmp_path / "out"
    write_results(res, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics_per_case.csv", "summary.csv", "summary.json"]
    with open(out / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "label", "dice", "hd95", "nsd", "n_ref", "n_pred"]
    assert len(rows) == 4
    row_b1 = next(r for r in rows if r["case"] == "case_b" and r["label"] == "1")
    assert float(row_b1["hd95"]) == pytest.approx(diag) and float(row_b1["dice"]) == 0.0
    assert (row_b1["n_ref"], row_b1["n_pred"]) == ("27", "0")
    with open(out / "summary.csv", newline="") as f:
        srows = list(csv.DictReader(f))
    assert [r["label"] for r in srows] == ["1", "2", "mean"]
    assert float(srows[0]["dice_mean"]) == pytest.approx(1 / 3)
    assert [(r["n_cases"], r["n_missed"], r["n_hallucinated"]) for r in srows] == \
        [("2", "1", "0"), ("2", "0", "1"), ("2", "1", "1")]
    text = (out / "summary.json").read_text()
    assert "NaN" not in text
    js = json.loads(text)
    assert js["per_case"][1]["metrics"]["1"]["hd95"] == pytest.approx(diag)
    assert js["summary"]["1"]["n_missed"] == 1 and js["summary"]["2"]["n_hallucinated"] == 1
    assert js["summary"]["1"]["hd95"]["sd"] is not None
    assert js["settings"]["metrics_version"] == METRICS_VERSION
    table = format_summary(res, {1: "liver", 2: "tumour"})
    head, row1, row2, mean = table.splitlines()
    assert head.split()[-3:] == ["cases", "missed", "hallucinated"]
    assert row1.split()[-3:] == ["2", "1", "0"] and row2.split()[-3:] == ["2", "0", "1"]
    assert mean.split()[-3:] == ["2", "1", "1"]
    assert js["summary"]["1"]["dice"]["mean"] == pytest.approx(1 / 3)


def test_evaluate_folders_parallel_equals_sequential(tmp_path):
    ref_dir, pred_dir, _ = make_folders(tmp_path)
    seq = evaluate_folders(ref_dir, pred_dir, [1, 2])
    par = evaluate_folders(ref_dir, pred_dir, [1, 2], num_workers=2)
    assert json.dumps(par["summary"], default=str) == json.dumps(seq["summary"], default=str)


def test_geometry_mismatch_names_case(tmp_path):
    ref_dir, pred_dir, arrays = make_folders(tmp_path)
    _, p = arrays["case_b"]
    write_img(pred_dir / "case_b.nii.gz", p, spacing=(0.5, 1.0, 2.0 + 1e-4))  # within tolerance
    evaluate_folders(ref_dir, pred_dir, [1, 2])
    write_img(pred_dir / "case_b.nii.gz", p, spacing=(0.5, 1.0, 2.01))
    with pytest.raises(EvaluationError, match="case_b.*spacing"):
        evaluate_folders(ref_dir, pred_dir, [1, 2])
    write_img(pred_dir / "case_b.nii.gz", p[:, :, :-1])
    with pytest.raises(EvaluationError, match="case_b.*shape"):
        evaluate_folders(ref_dir, pred_dir, [1, 2])


def test_cli_refuses_a_prediction_with_another_origin_or_direction(tmp_path, monkeypatch, capsys):
    """Same shape and spacing but another origin / direction: not on the reference's grid, refused."""
    ref_dir, pred_dir, arrays = make_folders(tmp_path)
    _raw_dataset(tmp_path, monkeypatch, {"background": 0, "liver": 1, "tumour": 2})
    _, p = arrays["case_b"]

    def write_pred(origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
        img = sitk.GetImageFromArray(p)
        img.SetSpacing(ITK_SPACING)
        img.SetOrigin(origin)
        img.SetDirection([float(v) for v in direction])
        sitk.WriteImage(img, str(pred_dir / "case_b.nii.gz"))

    argv = ["evaluate", str(ref_dir), str(pred_dir), "-d", "123", "-o", str(tmp_path / "o")]
    write_pred(origin=(0.0, 0.0, 4.0))  # shifted by two z voxels
    assert _cli(argv) == 1
    err = capsys.readouterr().err
    assert "case_b" in err and "origin" in err and "4.0" in err
    write_pred(direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))  # x flipped
    assert _cli(argv) == 1
    err = capsys.readouterr().err
    assert "case_b" in err and "direction" in err
    write_pred(origin=(5e-4, 0.0, -5e-4))  # within the tolerance (1e-3 mm)
    assert _cli(argv) == 0


def test_missing_prediction_and_missing_reference(tmp_path):
    ref_dir, pred_dir, _ = make_folders(tmp_path)
    (pred_dir / "case_a.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="without a prediction.*case_a"):
        evaluate_folders(ref_dir, pred_dir, [1, 2])
    write_img(pred_dir / "case_a.nii.gz", np.zeros((6, 8, 10), np.uint8))
    write_img(pred_dir / "case_x.nii.gz", np.zeros((6, 8, 10), np.uint8))
    with pytest.raises(EvaluationError, match="without a reference.*case_x"):
        evaluate_folders(ref_dir, pred_dir, [1, 2])


# ----------------------------------------------------------------------------------------------
# dataset.json / CLI
# ----------------------------------------------------------------------------------------------
def test_labels_from_dataset_json():
    labels, ignore, names = labels_from_dataset_json(
        {"labels": {"background": 0, "liver": 1, "tumour": [2], "ignore": 3}}
    )
    assert (labels, ignore, names) == ([1, 2], 3, {1: "liver", 2: "tumour"})
    with pytest.raises(EvaluationError, match="region"):
        labels_from_dataset_json({"labels": {"background": 0, "whole": [1, 2], "core": 2}})


def _cli(argv):
    parser = argparse.ArgumentParser(prog="nnunet-mixsup")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _raw_dataset(tmp_path, monkeypatch, labels):
    raw = tmp_path / "raw"
    (raw / "Dataset123_Toy").mkdir(parents=True)
    ds = {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 2}
    (raw / "Dataset123_Toy" / "dataset.json").write_text(json.dumps(ds))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)


def test_cli_evaluate(tmp_path, monkeypatch, capsys):
    ref_dir, pred_dir, _ = make_folders(tmp_path)
    _raw_dataset(tmp_path, monkeypatch, {"background": 0, "liver": 1, "tumour": 2, "ignore": 4})
    rc = _cli(["evaluate", str(ref_dir), str(pred_dir), "-d", "123", "--tolerance-mm", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "liver" in out and "tumour" in out and "NSD@1mm" in out
    assert (pred_dir / "summary.json").is_file() and (pred_dir / "metrics_per_case.csv").is_file()
    js = json.loads((pred_dir / "summary.json").read_text())
    assert js["settings"]["ignore_label"] == 4 and js["settings"]["nsd_tolerance_mm"] == 1.0

    rc = _cli(["evaluate", str(ref_dir), str(pred_dir), "-d", "Dataset123_Toy", "-o", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "summary.csv").is_file()

    (pred_dir / "case_b.nii.gz").unlink()
    rc = _cli(["evaluate", str(ref_dir), str(pred_dir), "-d", "123"])
    err = capsys.readouterr().err
    assert rc == 1 and "case_b" in err


def test_cli_errors(tmp_path, monkeypatch, capsys):
    ref_dir, pred_dir, _ = make_folders(tmp_path)
    _raw_dataset(tmp_path, monkeypatch, {"background": 0, "whole": [1, 2], "core": 2})
    assert _cli(["evaluate", str(ref_dir), str(pred_dir), "-d", "123"]) == 1
    assert "region" in capsys.readouterr().err
    assert _cli(["evaluate", str(ref_dir), str(pred_dir), "-d", "999"]) == 1
    assert "999" in capsys.readouterr().err
