"""Manifest validation and ``prepare``: every documented error, all at once, nothing written on error."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.lab.synthetic import make_synthetic_dataset
from nnunet_mixsup.manifest import ManifestError, load_manifest
from nnunet_mixsup.prepare import GENERATED_RECORD, prepare_dataset


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def ds(fresh_dirs) -> Path:
    return make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 961, counts={"mask": 2, "box": 1, "tags": 1, "none": 1},
                                  n_test=0, seed=3)


def write_manifest(folder: Path, cases: dict | str) -> None:
    text = cases if isinstance(cases, str) else json.dumps({"version": 1, "cases": cases})
    (folder / "supervision.json").write_text(text)


def problems_of(folder: Path) -> list[str]:
    before = tree_digest(folder)
    with pytest.raises(ManifestError) as e:
        prepare_dataset(folder)
    assert tree_digest(folder) == before, "prepare wrote something although validation failed"
    return e.value.problems


def test_valid_manifest_prepares_and_is_idempotent(ds):
    res = prepare_dataset(ds)
    assert res.ignore_label == 3
    assert sorted(res.written) == ["case_002.nii.gz", "case_003.nii.gz", "case_004.nii.gz"]
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == 3
    assert (ds / "dataset.json.mixsup-orig").is_file()
    box_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "case_002.nii.gz")))
    hidden = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr_dense_hidden" / "case_002.nii.gz")))
    assert np.all(box_lab[hidden > 0] == 3), "every object voxel must be inside a box (ignore)"
    assert set(np.unique(box_lab)) == {0, 3}
    none_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "case_004.nii.gz")))
    assert np.all(none_lab == 3)
    ref = sitk.ReadImage(str(ds / "imagesTr" / "case_002_0000.nii.gz"))
    lab = sitk.ReadImage(str(ds / "labelsTr" / "case_002.nii.gz"))
    assert lab.GetSpacing() == ref.GetSpacing() and lab.GetOrigin() == ref.GetOrigin()
    masks_before = {n: (ds / "labelsTr" / n).read_bytes() for n in ("case_000.nii.gz", "case_001.nii.gz")}
    snapshot = tree_digest(ds)
    res2 = prepare_dataset(ds)
    assert res2.written == [] and len(res2.unchanged) == 3
    assert tree_digest(ds) == snapshot
    assert {n: (ds / "labelsTr" / n).read_bytes() for n in masks_before} == masks_before


def test_every_error_reported_at_once(ds):
    (ds / "labelsTr" / "case_001.nii.gz").unlink()  # a mask case without label file
    (ds / "imagesTr" / "case_003_0000.nii.gz").rename(ds / "imagesTr" / "gone_0001.nii.gz")
    write_manifest(ds, {
        "case_000": {"type": "box", "boxes": [{"label": 7, "min": [0, 0, 0], "max": [2, 2, 2]}]},
        "case_001": {"type": "mask"},
        "case_002": {"type": "box", "boxes": [
            {"label": 1, "min": [5, 5, 5], "max": [3, 9, 9]},
            {"label": 1, "min": [5, 5, 5], "max": [5, 9, 9]},
            {"label": 1, "min": [0, 0, 0], "max": [21, 9, 9]},
            {"label": 2, "min": [0, 0], "max": [2, 2]}]},
        "case_003": {"type": "tags", "present": [1]},
        "case_999": {"type": "none"},
        "case_004": {"type": "weird"},
    })
    p = "\n".join(problems_of(ds))
    assert "case 'case_000'" in p and "[7] are not foreground labels" in p
    assert "case 'case_000'" in p and "was not written by nnunet-mixsup" in p  # a user's mask would be overwritten
    assert "case 'case_001': type 'mask' but no label file" in p
    assert "inverted" in p and "empty box" in p
    assert "outside the image on axis/axes [0]" in p
    assert "wrong dimensionality" in p
    assert "case 'case_003': unknown case" in p
    assert "case 'case_999': unknown case" in p
    assert "case 'case_004': 'type' must be one of" in p


def test_malformed_json_and_duplicates(ds):
    write_manifest(ds, '{"version": 1, "cases": {"case_002": {"type": "none"},')
    assert "malformed JSON at line 1" in problems_of(ds)[0]
    write_manifest(ds, '{"version": 1, "cases": {"case_002": {"type": "none"}, "case_002": {"type": "mask"}}}')
    assert any("case 'case_002': duplicate entry" in p for p in problems_of(ds))


def test_path_escape_and_no_mask_case(ds):
    write_manifest(ds, {"../evil": {"type": "none"}})
    assert any("invalid case id" in p for p in problems_of(ds))
    for n in ("case_000.nii.gz", "case_001.nii.gz"):
        (ds / "labelsTr" / n).unlink()
    write_manifest(ds, {f"case_{i:03d}": {"type": "none"} for i in range(5)})
    assert any("no 'mask' case" in p for p in problems_of(ds))


def test_load_manifest_structural_errors(tmp_path):
    f = tmp_path / "supervision.json"
    f.write_text(json.dumps({"version": 2, "cases": {"a": {"type": "box", "boxes": []},
                                                      "b": {"type": "tags", "present": [1, 1]},
                                                      "c": {"type": "mask", "extra": 1}}}))
    with pytest.raises(ManifestError) as e:
        load_manifest(f)
    text = str(e.value)
    assert "'version' must be 1" in text and "non-empty 'boxes'" in text
    assert "more than once" in text and "unknown keys" in text


def test_user_label_file_of_generated_case_is_protected(ds):
    prepare_dataset(ds)
    # the user replaces a generated label map by a real mask but forgets to update the manifest
    lab = ds / "labelsTr" / "case_004.nii.gz"
    img = sitk.ReadImage(str(lab))
    arr = sitk.GetArrayFromImage(img)
    arr[:] = 1
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, str(lab), True)
    assert any("case_004" in p and "not written by nnunet-mixsup" in p for p in problems_of(ds))
    assert (ds / GENERATED_RECORD).is_file()


def test_mask_geometry_and_label_values_checked(ds):
    lab = ds / "labelsTr" / "case_000.nii.gz"
    img = sitk.ReadImage(str(lab))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 9
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    bad.SetSpacing((9.0, 1.0, 1.0))
    sitk.WriteImage(bad, str(lab), True)
    p = "\n".join(problems_of(ds))
    assert "case 'case_000': label spacing" in p
    assert "case 'case_000': label values [9]" in p
