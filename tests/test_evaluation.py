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
    EvaluationError,
    compute_case_metrics,
    evaluate_folders,
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
# Two 3x3x3 cubes, the prediction shifted by one voxel along axis 0 (z).
# Surfaces: 26 voxels each (all but the centre). Ref -> pred distances: the 9 voxels of the ref's
# first layer are one z-step (= spacing[0]) from pred's first layer; the ref's last layer centre
# is one in-plane step (1 mm) from the nearest pred surface voxel (pred's centre is not surface);
# the other 16 are on pred's surface (0). Pred -> ref symmetric. Pooled: 18 x sz, 2 x 1.0, 32 x 0.
REF3 = cube((8, 8, 8), (2, 2, 2))
PRED3 = cube((8, 8, 8), (3, 2, 2))


def test_cubes_offset_along_z_anisotropic():
    m = compute_case_metrics(REF3, PRED3, [1], spacing=(2.0, 1.0, 1.0), nsd_tolerance_mm=1.5)[1]
    assert m["dice"] == pytest.approx(2 * 18 / 54)
    # 95th percentile of 52 pooled values lies at index 48.45, inside the 18 values of 2.0 mm
    assert m["hd95"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(34 / 52)  # only the 0 and 1.0 mm distances are <= 1.5
    assert (m["n_ref"], m["n_pred"]) == (27, 27)


def test_cubes_offset_nsd_tolerance_below_and_above_offset():
    def nsd(tol):
        return compute_case_metrics(REF3, PRED3, [1], (2.0, 1.0, 1.0), nsd_tolerance_mm=tol)[1]["nsd"]

    assert nsd(0.5) == pytest.approx(32 / 52)
    assert nsd(1.0) == pytest.approx(34 / 52)  # distances equal to the tolerance count
    assert nsd(1.99) == pytest.approx(34 / 52)
    assert nsd(2.0) == pytest.approx(1.0)
    assert nsd(2.5) == pytest.approx(1.0)


def test_offset_along_fine_axis_gives_fine_distance():
    pred = cube((8, 8, 8), (2, 2, 3))  # shifted along x (spacing 1 mm) instead of z (2 mm)
    m = compute_case_metrics(REF3, pred, [1], spacing=(2.0, 1.0, 1.0))[1]
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["hd95"] == pytest.approx(1.0)
    assert m["nsd"] == pytest.approx(1.0)


def test_2d_hd95_interpolated_percentile_anisotropic():
    # ref: one row of 20 pixels; pred: the same row plus three pixels two rows above.
    ref = np.zeros((8, 20), dtype=np.uint8)
    ref[5, :] = 1
    pred = ref.copy()
    pred[3, 0:3] = 1
    # every pixel is a surface pixel. ref->pred: 20 x 0; pred->ref: 20 x 0 and 3 x (2 rows * 2 mm).
    # 43 pooled values, 95th percentile at index 39.9: 0 + 0.9 * (4 - 0) = 3.6 mm.
    m = compute_case_metrics(ref, pred, [1], spacing=(2.0, 0.5), nsd_tolerance_mm=3.0)[1]
    assert m["dice"] == pytest.approx(40 / 43)
    assert m["hd95"] == pytest.approx(3.6)
    assert m["nsd"] == pytest.approx(40 / 43)
    assert compute_case_metrics(ref, pred, [1], (2.0, 0.5), nsd_tolerance_mm=4.0)[1]["nsd"] == 1.0
    # spacing is used in array-axis order: swapping it changes the result
    assert compute_case_metrics(ref, pred, [1], (0.5, 2.0))[1]["hd95"] == pytest.approx(0.9)


def _brute_force(ref, pred, spacing, tol):
    st = ndimage.generate_binary_structure(ref.ndim, 1)
    sr = ref & ~ndimage.binary_erosion(ref, st, border_value=0)
    sp = pred & ~ndimage.binary_erosion(pred, st, border_value=0)
    cr = np.argwhere(sr) * np.asarray(spacing)
    cp = np.argwhere(sp) * np.asarray(spacing)
    d = cdist(cr, cp)
    pooled = np.concatenate([d.min(axis=1), d.min(axis=0)])
    return np.percentile(pooled, 95), np.mean(pooled <= tol)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.5, 0.8, 1.1)
    ref = ndimage.binary_opening(rng.random((7, 12, 10)) > 0.45)
    pred = ndimage.binary_opening(rng.random((7, 12, 10)) > 0.5)
    ref[0, 0, :] = True  # touches the image border
    assert ref.any() and pred.any()
    m = compute_case_metrics(ref.astype(np.uint8), pred.astype(np.uint8) * 2, [1, 2], spacing, 1.5)
    hd95, nsd = _brute_force(ref, pred, spacing, 1.5)
    both = compute_case_metrics(ref.astype(np.uint8), pred.astype(np.uint8), [1], spacing, 1.5)[1]
    assert both["hd95"] == pytest.approx(hd95)
    assert both["nsd"] == pytest.approx(nsd)
    # label 1 has no prediction, label 2 no reference
    assert math.isnan(m[1]["hd95"]) and math.isnan(m[2]["hd95"])


# ----------------------------------------------------------------------------------------------
# conventions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, spacing", [((6, 6), (1.0, 1.0)), ((4, 6, 6), (3.0, 1.0, 1.0))])
def test_empty_conventions_2d_and_3d(shape, spacing):
    empty = np.zeros(shape, dtype=np.uint8)
    some = np.zeros(shape, dtype=np.uint8)
    some[(1,) * len(shape)] = 1
    both = compute_case_metrics(empty, empty, [1], spacing)[1]
    assert both == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "n_ref": 0, "n_pred": 0}
    for ref, pred in ((empty, some), (some, empty)):
        m = compute_case_metrics(ref, pred, [1], spacing)[1]
        assert m["dice"] == 0.0 and m["nsd"] == 0.0 and math.isnan(m["hd95"])
        assert (m["n_ref"], m["n_pred"]) == (int(ref.sum()), int(pred.sum()))
    same = compute_case_metrics(some, some, [1], spacing)[1]
    assert (same["dice"], same["hd95"], same["nsd"]) == (1.0, 0.0, 1.0)


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
    assert m[2]["dice"] == 0.0 and math.isnan(m[2]["hd95"])
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
    assert s[1]["hd95"] == {"mean": pytest.approx(2.0), "sd": s[1]["hd95"]["sd"], "n": 1, "n_nan": 1}
    assert math.isnan(s[1]["hd95"]["sd"])
    assert s[2]["dice"]["n"] == 2 and s[2]["hd95"]["n_nan"] == 1
    assert s["mean"]["dice"]["mean"] == pytest.approx((s[1]["dice"]["mean"] + s[2]["dice"]["mean"]) / 2)
    assert s["mean"]["dice"]["n"] == 2

    out = tmp_path / "out"
    write_results(res, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics_per_case.csv", "summary.csv", "summary.json"]
    with open(out / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "label", "dice", "hd95", "nsd", "n_ref", "n_pred"]
    assert len(rows) == 4
    row_b1 = next(r for r in rows if r["case"] == "case_b" and r["label"] == "1")
    assert row_b1["hd95"] == "nan" and float(row_b1["dice"]) == 0.0 and row_b1["n_ref"] == "27"
    with open(out / "summary.csv", newline="") as f:
        srows = list(csv.DictReader(f))
    assert [r["label"] for r in srows] == ["1", "2", "mean"]
    assert float(srows[0]["dice_mean"]) == pytest.approx(1 / 3)
    text = (out / "summary.json").read_text()
    assert "NaN" not in text
    js = json.loads(text)
    assert js["per_case"][1]["metrics"]["1"]["hd95"] is None
    assert js["summary"]["1"]["hd95"]["sd"] is None
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
