"""import-boxes / import-tags: round trips from every source format, a rotated ROI by hand, refusals.

The test writers below put boxes into Slicer markups, CSV and label images with SimpleITK's own
index <-> physical point transforms, independently of the importer's matrix code. Images have
anisotropic spacing and non-identity direction matrices (oblique and axis-permuting), in 2D and 3D.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.importers import enclosing_box, import_boxes, import_tags
from nnunet_mixsup.manifest import ManifestError

LABELS = {"background": 0, "liver": 1, "tumour": 2}
SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/" \
         "markups-schema-v1.0.3.json#"


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


#: per dimension: case -> (size, spacing, origin, direction, boxes as (label, min, max)); "m0" is the mask case
CASES = {
    3: {
        "m0": ((10, 9, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), []),
        "obl": ((24, 20, 12), (0.8, 1.3, 2.5), (-12.5, 30.2, 7.0),
                tuple(_rotation([1, 2, 3], 0.6).ravel()),
                [(1, (3, 4, 2), (11, 9, 6)), (2, (15, 12, 7), (19, 18, 11)), (1, (0, 0, 0), (2, 3, 1))]),
        "perm": ((18, 22, 10), (1.5, 0.6, 3.0), (4.0, -8.0, 11.0),
                 (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
                 [(2, (2, 3, 1), (7, 15, 4)), (1, (10, 5, 5), (18, 22, 10))]),
    },
    2: {
        "m0": ((10, 9), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), []),
        "rot2": ((30, 25), (0.7, 1.9), (3.0, -4.0),
                 (math.cos(0.5), -math.sin(0.5), math.sin(0.5), math.cos(0.5)),
                 [(1, (4, 3), (12, 9)), (2, (20, 15), (29, 25))]),
        "flip2": ((26, 21), (1.2, 0.4), (-7.0, 2.5), (-1.0, 0.0, 0.0, 1.0),
                  [(2, (0, 0), (5, 6)), (1, (9, 10), (20, 16))]),
    },
}


def _image(size, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ones(tuple(size)[::-1], np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _make_dataset(root: Path, dim: int, dataset_id: int = 601) -> Path:
    folder = root / f"Dataset{dataset_id}_Import{dim}D"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for cid, (size, spacing, origin, direction, _) in CASES[dim].items():
        img = _image(size, spacing, origin, direction)
        sitk.WriteImage(img, str(folder / "imagesTr" / f"{cid}_0000.nii.gz"))
        if cid == "m0":
            lab = sitk.GetImageFromArray(np.zeros(tuple(size)[::-1], np.uint8))
            lab.CopyInformation(img)
            sitk.WriteImage(lab, str(folder / "labelsTr" / "m0.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                     "numTraining": len(CASES[dim]), "file_ending": ".nii.gz"}))
    return folder


def _expected(dim: int, cases=None) -> dict:
    return {cid: {"type": "box", "boxes": [{"label": lb, "min": list(mn), "max": list(mx)} for lb, mn, mx in boxes]}
            for cid, (*_, boxes) in CASES[dim].items() if boxes and (cases is None or cid in cases)}


def _sorted_manifest(man: dict) -> dict:
    return {cid: {**e, "boxes": sorted(e["boxes"], key=lambda b: (b["label"], b["min"], b["max"]))}
            for cid, e in man["cases"].items()}


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _phys(img: sitk.Image, index) -> list[float]:
    return list(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))


# ---------------------------------------------------------------------------------------------------------
# writers (published formats), built on SimpleITK's transforms
# ---------------------------------------------------------------------------------------------------------
def _roi(img: sitk.Image, mn, mx, name: str, cs: str) -> dict:
    """A Slicer ROI exactly covering the voxels [mn, mx), its axes along the image axes."""
    d = img.GetDimension()
    centre = _phys(img, [(a + b - 1) / 2 for a, b in zip(mn, mx)])
    size = [(b - a) * s for a, b, s in zip(mn, mx, img.GetSpacing())]
    direction = np.asarray(img.GetDirection()).reshape(d, d)
    if d == 2:  # a 2D image in Slicer: the z = 0 plane, one voxel thick
        centre, size = [*centre, 0.0], [*size, 1.0]
        direction = np.block([[direction, np.zeros((2, 1))], [np.zeros((1, 2)), np.ones((1, 1))]])
    orientation = direction.ravel()
    if cs == "RAS":
        centre = [-centre[0], -centre[1], centre[2]]
        orientation = np.concatenate([-orientation[:6], orientation[6:]])
    return {"type": "ROI", "coordinateSystem": cs, "coordinateUnits": "mm", "locked": False,
            "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d", "lastUsedControlPointNumber": 0,
            "name": name, "roiType": "Box", "center": centre, "orientation": [float(v) for v in orientation],
            "size": size, "insideOut": False, "controlPoints": [], "measurements": [],
            "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0]}}


def _write_markups(path: Path, rois: list[dict]) -> None:
    path.write_text(json.dumps({"@schema": SCHEMA, "markups": rois}, indent=4))


def _world_corners(img: sitk.Image, mn, mx, at_centres: bool, cs: str) -> tuple[list[float], list[float]]:
    """Two opposite world corners of the box [mn, mx): the outer voxel faces, or the first / last voxel centres."""
    shift = 0.0 if at_centres else -0.5
    a = _phys(img, [v + shift for v in mn])
    b = _phys(img, [v - 1 - shift for v in mx])
    if cs == "RAS":
        a[:2], b[:2] = [-a[0], -a[1]], [-b[0], -b[1]]
    return a, b


def _sitk_enclosing(img: sitk.Image, corners: list[list[float]]) -> tuple[list[int], list[int]]:
    """Voxels overlapping the world cuboid spanned by two LPS points, cut to the image (SimpleITK's transform)."""
    lo, hi = np.minimum(*corners), np.maximum(*corners)
    idx = np.array([img.TransformPhysicalPointToContinuousIndex(list(map(float, p)))
                    for p in itertools.product(*zip(lo, hi))])
    mn = np.floor(idx.min(0) + 0.5 + 1e-3).astype(int)
    mx = np.ceil(idx.max(0) + 0.5 - 1e-3).astype(int)
    return np.maximum(mn, 0).tolist(), np.minimum(mx, img.GetSize()).tolist()


def _read_case_image(folder: Path, cid: str) -> sitk.Image:
    return sitk.ReadImage(str(folder / "imagesTr" / f"{cid}_0000.nii.gz"))


# ---------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("cs", ["LPS", "RAS"])
def test_markups_round_trip(tmp_path, dim, cs):
    folder = _make_dataset(tmp_path, dim)
    rois_dir = tmp_path / "rois"
    for i, (cid, (*_, boxes)) in enumerate(CASES[dim].items()):
        if not boxes:
            continue
        img = _read_case_image(folder, cid)
        names = {1: "Liver", 2: "tumour-2"}
        rois = [_roi(img, mn, mx, names[lb], cs) for lb, mn, mx in boxes]
        if i % 2:  # one file per ROI in a folder named after the case (as Slicer saves them)
            (rois_dir / cid).mkdir(parents=True)
            for j, r in enumerate(rois):
                _write_markups(rois_dir / cid / f"R_{j}.mrk.json", [r])
        else:  # all ROIs of the case in one file named CASE_<anything>.mrk.json
            rois_dir.mkdir(exist_ok=True)
            _write_markups(rois_dir / f"{cid}_rois.mrk.json", rois)
    res = import_boxes(folder, markups=[rois_dir], show_progress=False)
    assert res.written and sorted(res.added) == sorted(_expected(dim))
    man = json.loads((folder / "supervision.json").read_text())
    assert _sorted_manifest(man) == _sorted_manifest({"cases": _expected(dim)})
    from nnunet_mixsup.prepare import prepare_dataset

    prepare_dataset(folder, show_progress=False)  # the result passes prepare


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("units,at_centres", [("lps", False), ("ras", False), ("lps", True), ("ras", True)])
def test_world_csv_round_trip(tmp_path, dim, units, at_centres):
    """Axis-permuting directions: exact round trip; oblique: the enclosing box of the world-aligned cuboid."""
    folder = _make_dataset(tmp_path, dim)
    rows = ["case,label,x0,y0" + (",z0" if dim == 3 else "") + ",x1,y1" + (",z1" if dim == 3 else "")]
    expected = {}
    for cid, (*_, boxes) in CASES[dim].items():
        if not boxes:
            continue
        img = _read_case_image(folder, cid)
        oblique = cid in ("obl", "rot2")
        exp = []
        for lb, mn, mx in boxes:
            a, b = _world_corners(img, mn, mx, at_centres, units.upper())
            rows.append(",".join([cid, ["", "liver", "2"][lb], *map(repr, a), *map(repr, b)]))
            if oblique:
                lps = [a, b] if units == "lps" else [[-a[0], -a[1], *a[2:]], [-b[0], -b[1], *b[2:]]]
                emn, emx = _sitk_enclosing(img, lps)
                assert all(e <= m for e, m in zip(emn, mn)) and all(e >= m for e, m in zip(emx, mx))
                exp.append({"label": lb, "min": emn, "max": emx})
            else:
                exp.append({"label": lb, "min": list(mn), "max": list(mx)})
        expected[cid] = {"type": "box", "boxes": exp}
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    import_boxes(folder, csv_files=[tmp_path / "boxes.csv"], units=units, show_progress=False)
    man = json.loads((folder / "supervision.json").read_text())
    assert _sorted_manifest(man) == _sorted_manifest({"cases": expected})


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("inclusive", [False, True])
def test_voxel_csv_round_trip(tmp_path, dim, inclusive):
    folder = _make_dataset(tmp_path, dim)
    rows = ["# boxes drawn by hand", ""]
    for cid, (*_, boxes) in CASES[dim].items():
        for lb, mn, mx in boxes:
            last = [v - 1 for v in mx] if inclusive else list(mx)
            rows.append(";".join([cid, str(lb), *map(str, mn), *map(str, last)]))
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    import_boxes(folder, csv_files=[tmp_path / "boxes.csv"], units="voxel", inclusive_max=inclusive,
                 show_progress=False)
    man = json.loads((folder / "supervision.json").read_text())
    assert _sorted_manifest(man) == _sorted_manifest({"cases": _expected(dim)})


@pytest.mark.parametrize("dim", [2, 3])
def test_label_image_round_trip(tmp_path, dim):
    """One box per connected component and class; a cropped label image on a shifted grid maps through world."""
    folder = _make_dataset(tmp_path, dim)
    paint = tmp_path / "painted"
    paint.mkdir()
    for k, (cid, (size, *_rest, boxes)) in enumerate(CASES[dim].items()):
        if not boxes:
            continue
        img = _read_case_image(folder, cid)
        arr = np.zeros(tuple(size)[::-1], np.uint8)
        for lb, mn, mx in boxes:
            arr[tuple(slice(a, b) for a, b in zip(mn[::-1], mx[::-1]))] = lb
        if k == 1:  # the first box case: painted on a larger grid (2 voxels more on every side, another origin)
            arr = np.pad(arr, 2)
            lab = sitk.GetImageFromArray(arr)
            lab.SetSpacing(img.GetSpacing())
            lab.SetDirection(img.GetDirection())
            lab.SetOrigin(_phys(img, [-2] * dim))
        else:
            lab = sitk.GetImageFromArray(arr)
            lab.CopyInformation(img)
        sitk.WriteImage(lab, str(paint / f"{cid}-seg.nii.gz"))
    res = import_boxes(folder, label_images=[paint], show_progress=False)
    assert any("on another grid" in n for n in res.notes)
    man = json.loads((folder / "supervision.json").read_text())
    assert _sorted_manifest(man) == _sorted_manifest({"cases": _expected(dim)})


def test_rotated_roi_gives_its_enclosing_box_by_hand(tmp_path):
    """ROI 4 x 2 x 1 mm rotated 45 degrees about z, centre (10, 10, 5) mm, image spacing (2, 1, 1), identity direction.

    Its corners reach +-(2 cos 45 + 1 sin 45) = +-2.1213 mm in x and y and +-0.5 mm in z around the centre:
    x in [7.879, 12.121] mm = continuous index [3.939, 6.061] -> voxels 4..6 -> [4, 7);
    y in [7.879, 12.121] = index [7.879, 12.121] -> voxels 8..12 -> [8, 13);
    z in [4.5, 5.5] = index [4.5, 5.5]: voxel 5 only (4 and 6 just touch the faces) -> [5, 6).
    """
    folder = _make_dataset(tmp_path, 3)
    img = _image((12, 20, 10), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    sitk.WriteImage(img, str(folder / "imagesTr" / "rot_0000.nii.gz"))
    c = s = math.sqrt(0.5)
    roi = {"type": "ROI", "coordinateSystem": "LPS", "name": "liver", "center": [10.0, 10.0, 5.0],
           "size": [4.0, 2.0, 1.0], "orientation": [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]}
    _write_markups(tmp_path / "rot.mrk.json", [roi])
    ras = {**roi, "coordinateSystem": "RAS", "center": [-10.0, -10.0, 5.0],
           "orientation": [-c, s, 0.0, -s, -c, 0.0, 0.0, 0.0, 1.0]}
    _write_markups(tmp_path / "rot_ras.mrk.json", [ras])
    res = import_boxes(folder, markups=[tmp_path / "rot.mrk.json"], partial=True, dry_run=True, show_progress=False)
    assert res.manifest.cases["rot"].boxes[0].min == (4, 8, 5) and res.manifest.cases["rot"].boxes[0].max == (7, 13, 6)
    res = import_boxes(folder, markups=[tmp_path / "rot_ras.mrk.json"], partial=True, dry_run=True,
                       show_progress=False)
    assert res.manifest.cases["rot"].boxes[0].min == (4, 8, 5) and res.manifest.cases["rot"].boxes[0].max == (7, 13, 6)
    assert not (folder / "supervision.json").exists()  # dry run


def test_enclosing_box_voxel_centre_convention():
    # faces of voxels 2..4 and centres of voxels 2..4 both give [2, 5); a point gives its voxel
    assert [v.tolist() for v in enclosing_box(np.array([[1.5], [4.5]]))] == [[2], [5]]
    assert [v.tolist() for v in enclosing_box(np.array([[2.0], [4.0]]))] == [[2], [5]]
    assert [v.tolist() for v in enclosing_box(np.array([[3.2]]))] == [[3], [4]]
    assert [v.tolist() for v in enclosing_box(np.array([[1.49], [4.51]]))] == [[1], [6]]  # overlaps count


# ---------------------------------------------------------------------------------------------------------
# merging and tags
# ---------------------------------------------------------------------------------------------------------
def test_existing_entries_kept_unless_replace(tmp_path):
    folder = _make_dataset(tmp_path, 2)
    old = {"version": 1, "cases": {"rot2": {"type": "tags", "present": [1]}}}
    (folder / "supervision.json").write_text(json.dumps(old))
    csv = tmp_path / "b.csv"
    csv.write_text("rot2,1,4,3,12,9\nflip2,tumour,0,0,5,6\n")
    res = import_boxes(folder, csv_files=[csv], units="voxel", show_progress=False)
    assert res.kept == ["rot2"] and res.added == ["flip2"]
    man = json.loads((folder / "supervision.json").read_text())["cases"]
    assert man["rot2"] == {"type": "tags", "present": [1]}
    assert man["flip2"] == {"type": "box", "boxes": [{"label": 2, "min": [0, 0], "max": [5, 6]}]}
    res = import_boxes(folder, csv_files=[csv], units="voxel", replace=True, show_progress=False)
    assert res.replaced == ["flip2", "rot2"]
    assert json.loads((folder / "supervision.json").read_text())["cases"]["rot2"]["type"] == "box"


def test_import_tags_list_and_spreadsheet(tmp_path):
    folder = _make_dataset(tmp_path, 3)
    (tmp_path / "t.csv").write_text('case,present\nobl,"liver;Tumour"\n')
    (tmp_path / "sheet.csv").write_text("\ufeffcase;liver;tumour\nperm;x;\n")
    res = import_tags(folder, [tmp_path / "t.csv", tmp_path / "sheet.csv"], show_progress=False)
    assert res.added == ["obl", "perm"]
    man = json.loads((folder / "supervision.json").read_text())["cases"]
    assert man == {"obl": {"type": "tags", "present": [1, 2]}, "perm": {"type": "tags", "present": [1]}}
    (tmp_path / "t2.csv").write_text("perm,2,1\nobl\n")
    import_tags(folder, [tmp_path / "t2.csv"], replace=True, show_progress=False)
    man = json.loads((folder / "supervision.json").read_text())["cases"]
    assert man == {"obl": {"type": "tags", "present": []}, "perm": {"type": "tags", "present": [1, 2]}}


def test_partial_import_then_rest(tmp_path):
    folder = _make_dataset(tmp_path, 3)
    (tmp_path / "b.csv").write_text("obl,1,3,4,2,11,9,6\n")
    with pytest.raises(ManifestError, match="1 training case.s. would have no supervision.*perm.*--partial"):
        import_boxes(folder, csv_files=[tmp_path / "b.csv"], units="voxel", show_progress=False)
    res = import_boxes(folder, csv_files=[tmp_path / "b.csv"], units="voxel", partial=True, show_progress=False)
    assert any("no supervision yet" in n and "perm" in n for n in res.notes)
    (tmp_path / "t.csv").write_text("perm,liver\n")
    import_tags(folder, [tmp_path / "t.csv"], show_progress=False)
    from nnunet_mixsup.prepare import prepare_dataset

    prepare_dataset(folder, show_progress=False)


# ---------------------------------------------------------------------------------------------------------
# refusals: every problem at once, each naming file and line or case; the folder unchanged byte for byte
# ---------------------------------------------------------------------------------------------------------
BAD_ROWS = {
    "case without image": ("nope,1,0,0,0,2,2,2", r"bad\.csv:{line}: case 'nope' has no image imagesTr/nope_0000"),
    "label not in dataset.json": ("obl,spleen,0,0,0,2,2,2",
                                  r"bad\.csv:{line}: case 'obl': label 'spleen' is not a foreground label"),
    "box outside its image": ("obl,1,20,0,0,25,2,2",
                              r"bad\.csv:{line}: case 'obl': box outside the image on axis/axes \[0\]"),
    "row does not parse": ("perm,1,a,0,0,2,2,2", r"bad\.csv:{line}: the corners must be numbers"),
    "wrong number of cells": ("perm,1,0,0,2,2,2", r"bad\.csv:{line}: expected 'case, label, x0, y0\[, z0\], x1"),
    "background is no class": ("perm,background,0,0,0,2,2,2", r"bad\.csv:{line}: case 'perm': label 'background'"),
}


def _refused(folder: Path, match: list[str], **kwargs) -> None:
    before = _tree_hashes(folder)
    with pytest.raises(ManifestError) as err:
        import_boxes(folder, show_progress=False, **kwargs)
    text = str(err.value)
    assert "nothing written" in text
    for m in match:
        assert __import__("re").search(m, text), f"{m!r} not in\n{text}"
    assert _tree_hashes(folder) == before


@pytest.mark.parametrize("what", sorted(BAD_ROWS))
def test_each_bad_row_is_refused(tmp_path, what):
    folder = _make_dataset(tmp_path, 3)
    (folder / "supervision.json").write_text(json.dumps({"version": 1, "cases": {"obl": {"type": "none"}}}))
    row, msg = BAD_ROWS[what]
    (tmp_path / "bad.csv").write_text(f"case,label,x0,y0,z0,x1,y1,z1\nperm,2,2,3,1,7,15,4\n{row}\n")
    _refused(folder, [msg.format(line=3)], csv_files=[tmp_path / "bad.csv"], units="voxel", replace=True)


def test_all_problems_reported_at_once(tmp_path):
    folder = _make_dataset(tmp_path, 3)
    (folder / "supervision.json").write_text(json.dumps({"version": 1, "cases": {"obl": {"type": "none"}}}))
    rows = [r for r, _ in BAD_ROWS.values()]
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "other.csv").write_text("obl,1,0,0,0,2,2,2\n")
    msgs = [m.format(line=i + 1) for i, (_, m) in enumerate(BAD_ROWS.values())]
    msgs.append(r"case 'obl' is given twice: in \S*bad\.csv and in \S*other\.csv")
    _refused(folder, msgs, csv_files=[tmp_path / "bad.csv", tmp_path / "other.csv"], units="voxel")


def test_world_box_outside_and_markups_problems(tmp_path):
    folder = _make_dataset(tmp_path, 3)
    img = _read_case_image(folder, "perm")
    far = _phys(img, [100, 100, 100])
    (tmp_path / "w.csv").write_text(f"perm,1,{far[0]},{far[1]},{far[2]},{far[0] + 1},{far[1] + 1},{far[2] + 1}\n")
    good = _roi(_read_case_image(folder, "obl"), (3, 4, 2), (11, 9, 6), "liver", "LPS")
    (tmp_path / "m").mkdir()
    _write_markups(tmp_path / "m" / "obl.mrk.json", [good, {**good, "name": "R"},
                                                    {"type": "Fiducial", "controlPoints": []}])
    _write_markups(tmp_path / "m" / "perm_1.mrk.json", [{**good, "coordinateSystem": "XYZ"}])
    (tmp_path / "m" / "ghost.mrk.json").write_text("{}")
    (tmp_path / "m" / "obl_broken.mrk.json").write_text("{not json")
    _refused(folder, [r"w\.csv:1: case 'perm': box outside the image",
                      r"obl\.mrk\.json: markup 1 \('R'\): case 'obl': no class for this ROI",
                      r"obl\.mrk\.json: markup 2: not an ROI \(type 'Fiducial'\)",
                      r"perm_1\.mrk\.json: markup 0 \('liver'\): 'coordinateSystem' must be 'LPS' or 'RAS'",
                      r"ghost\.mrk\.json: case 'ghost' \(from the file name\) has no image",
                      r"obl_broken\.mrk\.json: cannot read markups JSON",
                      r"case 'perm' is given twice: in markups file \S*perm_1\.mrk\.json and in \S*w\.csv"],
             csv_files=[tmp_path / "w.csv"], units="lps", markups=[tmp_path / "m"])


def test_label_image_problems(tmp_path):
    folder = _make_dataset(tmp_path, 2)
    img = _read_case_image(folder, "rot2")
    arr = np.zeros((25, 30), np.uint8)
    arr[2:4, 2:4] = 7
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(tmp_path / "rot2.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "flip2.nii.gz"))  # on the wrong grid and without a valid value
    empty = sitk.GetImageFromArray(np.zeros((21, 26), np.uint8))
    empty.CopyInformation(_read_case_image(folder, "flip2"))
    (tmp_path / "more").mkdir()
    sitk.WriteImage(empty, str(tmp_path / "more" / "flip2.nii.gz"))
    _refused(folder, [r"rot2\.nii\.gz: case 'rot2': value 7 is not in dataset.json's foreground labels",
                      r"case 'flip2' is given twice: in \S*flip2\.nii\.gz and in \S*more/flip2\.nii\.gz"],
             label_images=[tmp_path / "rot2.nii.gz", tmp_path / "flip2.nii.gz", tmp_path / "more"])
    _refused(folder, [r"flip2\.nii\.gz: case 'flip2': no labelled voxel"],
             label_images=[tmp_path / "more" / "flip2.nii.gz"], partial=True)


def test_tags_problems(tmp_path):
    folder = _make_dataset(tmp_path, 3)
    (folder / "supervision.json").write_text(json.dumps({"version": 1, "cases": {"perm": {"type": "none"}}}))
    (tmp_path / "t.csv").write_text("case,classes\nobl,liver\nnope,liver\nperm,spleen\nobl,tumour\n")
    (tmp_path / "sheet.csv").write_text("case,liver,tumour\nm0,maybe,1\n")
    before = _tree_hashes(folder)
    with pytest.raises(ManifestError) as err:
        import_tags(folder, [tmp_path / "t.csv", tmp_path / "sheet.csv"], replace=True, show_progress=False)
    text = str(err.value)
    for m in ["t.csv:3: case 'nope' has no image", "t.csv:4: case 'perm': class 'spleen' is not a foreground",
              "case 'obl' is given twice: in ", "t.csv:2 and in ", "t.csv:5",
              "sheet.csv:2: case 'm0': cannot read 'maybe' in column 'liver'"]:
        assert m in text, (m, text)
    assert _tree_hashes(folder) == before


def test_result_is_validated_like_prepare(tmp_path):
    """A box case whose label file is a user's mask: the manifest validation refuses it, nothing written."""
    folder = _make_dataset(tmp_path, 2)
    (tmp_path / "b.csv").write_text("m0,1,0,0,2,2\nrot2,1,4,3,12,9\nflip2,2,0,0,5,6\n")
    _refused(folder, [r"case 'm0': type 'box' but labelsTr/m0\.nii\.gz exists"], csv_files=[tmp_path / "b.csv"],
             units="voxel")


def test_cli(tmp_path, capsys):
    from nnunet_mixsup.cli import main

    folder = _make_dataset(tmp_path, 2)
    (tmp_path / "b.csv").write_text("rot2,1,4,3,12,9\nflip2,2,0,0,5,6\n")
    assert main(["import-boxes", "-d", str(folder), "--csv", str(tmp_path / "b.csv")]) == 1
    assert "need --units" in capsys.readouterr().err
    assert main(["import-boxes", "-d", str(folder), "--csv", str(tmp_path / "b.csv"), "--units", "voxel"]) == 0
    assert "2 case(s) added" in capsys.readouterr().out
    (tmp_path / "t.csv").write_text("rot2,nothing\n")
    before = _tree_hashes(folder)
    assert main(["import-tags", "-d", str(folder), "--csv", str(tmp_path / "t.csv"), "--replace"]) == 1
    err = capsys.readouterr().err
    assert "import-tags: error:" in err and "t.csv:1: case 'rot2': class 'nothing'" in err and "Traceback" not in err
    assert _tree_hashes(folder) == before


def test_label_flag_label_map_and_case_flag(tmp_path):
    folder = _make_dataset(tmp_path, 3)
    obl, perm = _read_case_image(folder, "obl"), _read_case_image(folder, "perm")
    _write_markups(tmp_path / "a.mrk.json", [_roi(obl, (3, 4, 2), (11, 9, 6), "R", "LPS"),
                                            _roi(obl, (15, 12, 7), (19, 18, 11), "T_1", "RAS")])
    (tmp_path / "map.json").write_text(json.dumps({"R": "liver", "t": 2, "5": "tumour"}))
    res = import_boxes(folder, markups=[tmp_path / "a.mrk.json"], label_map=tmp_path / "map.json", case="obl",
                       partial=True, dry_run=True, show_progress=False)
    assert [(b.label, b.min, b.max) for b in res.manifest.cases["obl"].boxes] == \
        [(1, (3, 4, 2), (11, 9, 6)), (2, (15, 12, 7), (19, 18, 11))]
    res = import_boxes(folder, markups=[tmp_path / "a.mrk.json"], label="tumour", case="obl", partial=True,
                       dry_run=True, show_progress=False)
    assert [b.label for b in res.manifest.cases["obl"].boxes] == [2, 2]
    arr = np.zeros((10, 22, 18), np.uint8)
    arr[1:4, 3:15, 2:7] = 5
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(perm)
    sitk.WriteImage(lab, str(tmp_path / "painting.nii.gz"))
    res = import_boxes(folder, label_images=[tmp_path / "painting.nii.gz"], label_map=tmp_path / "map.json",
                       case="perm", partial=True, dry_run=True, show_progress=False)
    assert [(b.label, b.min, b.max) for b in res.manifest.cases["perm"].boxes] == [(2, (2, 3, 1), (7, 15, 4))]
    (tmp_path / "badmap.csv").write_text("R,spleen\n")
    _refused(folder, [r"badmap\.csv: 'R' maps to 'spleen', which is not a foreground label",
                      r"--label 'kidney' is not a foreground label", r"--case: case 'nope' has no image"],
             markups=[tmp_path / "a.mrk.json"], label_map=tmp_path / "badmap.csv", label="kidney", case="nope")
