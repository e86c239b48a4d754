"""nnunet-mixsup show: box outlines are drawn exactly where the boxes are, raw (2D, 3D) and preprocessed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
from nnunet_mixsup.manifest import read_raw_dataset
from nnunet_mixsup.show import (
    PreprocessedSource,
    case_panels,
    class_colour,
    outline_thickness,
    raw_view,
    show_dataset,
)


def _expected_outlines(panel, view) -> np.ndarray:
    """Label of the outline drawn on top at every pixel (-1: none), from the view's boxes, in drawing order."""
    h, w = panel.rgb.shape[:2]
    z, t = panel.zoom, outline_thickness(panel.zoom)
    out = np.full((h, w), -1)
    for label, lo, hi in view.boxes:
        if not lo[panel.axis] <= panel.index < hi[panel.axis]:
            continue
        r0, r1 = lo[panel.rows_axis] * z, hi[panel.rows_axis] * z
        c0, c1 = lo[panel.cols_axis] * z, hi[panel.cols_axis] * z
        ring = np.zeros((h, w), bool)
        ring[r0:r1, c0:c1] = True
        ring[r0 + t:r1 - t, c0 + t:c1 - t] = False
        out[ring] = label
    return out


def _check_outlines(rows, view, foreground) -> None:
    for i, row in enumerate(rows):
        if view.boxes:  # each row cuts through the centre of its box
            _, lo, hi = view.boxes[i]
            for p in row:
                assert p.index == (lo[p.axis] + hi[p.axis] - 1) // 2 or view.is_2d
        for p in row:
            exp = _expected_outlines(p, view)
            assert (exp >= 0).any() or not view.boxes
            for c in foreground:
                drawn = np.all(p.rgb == np.asarray(class_colour(c, foreground), np.uint8), axis=-1)
                assert np.array_equal(drawn, exp == c), (view.case_id, p.axis, p.index, c)


@pytest.mark.parametrize("dim", [2, 3])
def test_raw_outlines_sit_on_the_boxes_and_their_objects(fresh_dirs, dim):
    folder = make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 960 + dim, dim=dim, counts={"mask": 1, "box": 3},
                                    n_test=0, seed=dim)
    ds = read_raw_dataset(folder)
    man = json.loads((folder / "supervision.json").read_text())["cases"]
    from nnunet_mixsup.manifest import load_manifest

    sups = load_manifest(folder / "supervision.json").cases
    fg = ds.foreground_labels
    for cid, entry in man.items():
        view = raw_view(ds, sups[cid], ignore=3)
        rows = case_panels(view, fg, 3)
        assert len(rows) == (1 if dim == 2 else max(1, len(entry.get("boxes", []))))
        assert len(rows[0]) == (1 if dim == 2 else 3)
        if entry["type"] != "box":
            continue
        # the view's boxes are the manifest's, reversed into numpy order (2D: a leading axis of one voxel)
        pad = [[0, 1]] if dim == 2 else []
        assert [(b, list(lo), list(hi)) for b, lo, hi in view.boxes] == \
            [(b["label"], [*(p[0] for p in pad), *b["min"][::-1]], [*(p[1] for p in pad), *b["max"][::-1]])
             for b in entry["boxes"]]
        _check_outlines(rows, view, fg)
        dense = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr_dense_hidden" / f"{cid}.nii.gz")))
        dense = dense[None] if dim == 2 else dense
        for row in rows:  # every object voxel of the slice lies inside an outline of its class
            for p in row:
                sl = np.take(dense, p.index, axis=p.axis)
                for c in fg:
                    inside = np.zeros(sl.shape, bool)
                    for label, r0, r1, c0, c1 in p.rects:
                        if label == c:
                            inside[r0:r1, c0:c1] = True
                    assert not np.any((sl == c) & ~inside), (cid, p.axis, p.index, c)
    out = fresh_dirs["nnUNet_raw"].parent / "png"
    paths = show_dataset(folder, out, show_progress=False)
    assert sorted(p.name for p in paths) == sorted(f"{c}.png" for c in man)
    sheet = show_dataset(folder, out, sheet=True, show_progress=False)
    assert [p.name for p in sheet] == ["contact_sheet.png"]
    for p in [*paths, *sheet]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preprocessed_outlines_match_mapped_boxes_and_ignore_region(planned_3d, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_mixsup.geometry import box_to_preprocessed
    from nnunet_mixsup.manifest import load_manifest

    src = PreprocessedSource.open(planned_3d["id"], "3d_fullres", planned_3d["plans"])
    assert src.transpose_forward != [0, 1, 2]
    sups = load_manifest(planned_3d["raw"] / "supervision.json").cases
    ds = read_raw_dataset(planned_3d["raw"])
    ignore = read_raw_dataset(planned_3d["raw"]).ignore_label
    box_cases = [c for c, s in sups.items() if s.type == "box"]
    assert box_cases
    for cid in box_cases:
        view = src.view(sups[cid])
        data, seg, _, props = infer_dataset_class(str(src.folder))(str(src.folder), [cid]).load_case(cid)
        assert view.image.shape == data.shape[1:] and np.array_equal(view.labels, seg[0])
        expected = [box_to_preprocessed(b, props, src.transpose_forward, data.shape[1:]) for b in sups[cid].boxes]
        assert [(lo.tolist(), hi.tolist()) for _, lo, hi in view.boxes] == \
            [(lo.tolist(), hi.tolist()) for lo, hi in expected]
        rows = case_panels(view, ds.foreground_labels, ignore)
        _check_outlines(rows, view, ds.foreground_labels)
        # the derived label map nnU-Net resampled (ignore inside the boxes) lies within the outlined boxes
        union = np.zeros(view.labels.shape, bool)
        for _, lo, hi in view.boxes:
            union[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
        assert np.any(view.labels == ignore) and not np.any((view.labels == ignore) & ~union)
    from nnunet_mixsup.cli import main

    out = tmp_path / "png"
    assert main(["show", "-d", str(planned_3d["id"]), box_cases[0], "-o", str(out), "--preprocessed", "-c",
                 "3d_fullres", "-p", planned_3d["plans"]]) == 0
    assert (out / f"{box_cases[0]}_3d_fullres.png").is_file()


def test_cli_errors(fresh_dirs, capsys):
    from nnunet_mixsup.cli import main
    make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 965, dim=2, counts={"mask": 1, "box": 1}, n_test=0)
    out = fresh_dirs["nnUNet_raw"].parent / "png"
    assert main(["show", "-d", "965", "-o", str(out), "--preprocessed"]) == 1
    assert "--preprocessed needs -c" in capsys.readouterr().err
    assert main(["show", "-d", "965", "nope", "-o", str(out)]) == 1
    assert "unknown case(s) ['nope']" in capsys.readouterr().err
    assert main(["show", "-d", "965", "-o", str(out), "--preprocessed", "-c", "2d"]) == 1
    assert "no plans file" in capsys.readouterr().err
    assert main(["show", "-d", "965", "case_001", "-o", str(out)]) == 0
    assert (out / "case_001.png").is_file()
