"""Boxes land on their object whatever image reader nnU-Net is configured with.

The manifest gives boxes as voxel indices of the raw image in ITK index order. nnU-Net's readers
do not all return that array: the reorienting ones permute and flip its axes, depending on each
image's direction. Each test writes images with non-identity directions, reads them with the
reader exactly as nnU-Net's preprocessing does (transpose, crop to the non-zero region) and checks
that the mapped box is exactly the object's bounding box in the array nnU-Net trains on.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mixsup.geometry import box_to_preprocessed
from nnunet_mixsup.manifest import Box

NIFTI_READERS = ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient"]


def _rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted_flipped": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "oblique_permuted": _rotation_z(25) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float),
}

SIZE_ITK = (9, 11, 13)  # distinct sizes: a wrong permutation cannot go unnoticed
OBJECT_ITK = ((1, 6, 2), (4, 10, 6))  # [min, max) in ITK index order, off-centre on every axis


def _write_case(folder, direction: np.ndarray, suffix: str = ".nii.gz") -> tuple:
    """An image (non-zero in an off-centre region, so the crop does something) and its label."""
    shape_np = SIZE_ITK[::-1]
    rng = np.random.default_rng(0)
    img = np.zeros(shape_np, np.float32)
    img[1:12, :, 1:8] = 1 + rng.random((11, 11, 7), dtype=np.float32)
    seg = np.zeros(shape_np, np.uint8)
    (x0, y0, z0), (x1, y1, z1) = OBJECT_ITK
    seg[z0:z1, y0:y1, x0:x1] = 1
    files = []
    for arr, name in ((img, f"case_0000{suffix}"), (seg, f"case{suffix}")):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.8, 1.0, 2.5))
        im.SetOrigin((3.0, -7.0, 11.0))
        im.SetDirection(tuple(float(v) for v in direction.ravel()))
        sitk.WriteImage(im, str(folder / name), True)
        files.append(str(folder / name))
    return files[0], files[1]


def _read_and_preprocess(reader_name: str, image: str, label: str, transpose_forward):
    """nnU-Net's reading, transposing and cropping (``DefaultPreprocessor.run_case_npy`` up to resampling)."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rw = recursive_find_reader_writer_by_name(reader_name)()
    data, props = rw.read_images([image])
    seg, _ = rw.read_seg(label)
    tf = [0, *[i + 1 for i in transpose_forward]]
    data, seg = data.transpose(tf), seg.transpose(tf)
    props["shape_before_cropping"] = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data, seg)
    props["bbox_used_for_cropping"] = bbox
    props["shape_after_cropping_and_before_resampling"] = data.shape[1:]
    return data, seg, props


def _assert_box_is_object_bbox(box: Box, data, seg, props, transpose_forward):
    obj = np.argwhere(seg[0] == box.label)
    assert len(obj), "the object must survive reading and cropping"
    lo, hi = box_to_preprocessed(box, props, transpose_forward, data.shape[1:])
    assert lo.tolist() == obj.min(0).tolist() and hi.tolist() == (obj.max(0) + 1).tolist(), \
        f"mapped box {lo.tolist()}..{hi.tolist()} is not the object {obj.min(0).tolist()}..{(obj.max(0) + 1).tolist()}"


@pytest.mark.parametrize("reader", NIFTI_READERS)
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1)])
def test_box_lands_on_the_object_for_nifti_readers(tmp_path, reader, direction, transpose_forward):
    image, label = _write_case(tmp_path, DIRECTIONS[direction])
    data, seg, props = _read_and_preprocess(reader, image, label, transpose_forward)
    _assert_box_is_object_bbox(Box(1, *OBJECT_ITK), data, seg, props, transpose_forward)


def test_box_lands_on_the_object_for_tiff3d(tmp_path):
    """Tiff3DIO (tifffile) reads pages as the first axis: the array SimpleITK returns."""
    import tifffile

    image, label = _write_case(tmp_path, np.eye(3))
    for src, dst in ((image, "case_0000.tif"), (label, "case.tif")):
        tifffile.imwrite(tmp_path / dst, sitk.GetArrayFromImage(sitk.ReadImage(src)))
    (tmp_path / "case.json").write_text(json.dumps({"spacing": [2.5, 1.0, 0.8]}))
    h = sitk.ImageFileReader()
    h.SetFileName(str(tmp_path / "case_0000.tif"))
    h.ReadImageInformation()
    assert tuple(h.GetSize()) == SIZE_ITK, "ITK index order of the tif must be (x, y, page)"
    for tf in [(0, 1, 2), (1, 2, 0)]:
        data, seg, props = _read_and_preprocess("Tiff3DIO", str(tmp_path / "case_0000.tif"),
                                                str(tmp_path / "case.tif"), tf)
        _assert_box_is_object_bbox(Box(1, *OBJECT_ITK), data, seg, props, tf)


def test_box_lands_on_the_object_for_natural_2d_images(tmp_path):
    """NaturalImage2DIO (png) returns (1, 1, rows, columns): ITK's (x, y) = (column, row)."""
    img = np.zeros((17, 23), np.uint8)
    img[2:15, 1:20] = 100
    seg = np.zeros((17, 23), np.uint8)
    seg[3:7, 12:18] = 1  # rows 3..6, columns 12..17
    sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "case_0000.png"))
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(tmp_path / "case.png"))
    box = Box(1, (12, 3), (18, 7))
    data, seg_r, props = _read_and_preprocess("NaturalImage2DIO", str(tmp_path / "case_0000.png"),
                                              str(tmp_path / "case.png"), (0, 1, 2))
    _assert_box_is_object_bbox(box, data, seg_r, props, (0, 1, 2))


def test_every_reader_nnunet_ships_is_mapped():
    """A reader added to nnunetv2.imageio by a later nnU-Net must be looked at before it is trusted."""
    import importlib
    import inspect
    import pkgutil

    import nnunetv2.imageio as io
    from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    from nnunet_mixsup.geometry import MAPPED_READERS

    shipped = set()
    for m in pkgutil.iter_modules(io.__path__):
        mod = importlib.import_module(f"nnunetv2.imageio.{m.name}")
        shipped |= {n for n, c in inspect.getmembers(mod, inspect.isclass)
                    if issubclass(c, BaseReaderWriter) and c is not BaseReaderWriter and c.__module__ == mod.__name__}
    assert {c.__name__ for c in LIST_OF_IO_CLASSES} <= shipped
    assert shipped == set(MAPPED_READERS), f"readers without a known axis mapping: {shipped ^ set(MAPPED_READERS)}"


@pytest.mark.parametrize("reader", NIFTI_READERS)
def test_nnunet_preprocessing_with_each_reader(planned_3d, reader):
    """nnU-Net's own preprocessor (transposed, cropped, anisotropic resampling) with the reader set in
    the plans: every object voxel lies in its mapped box, which is tight up to one voxel per side.
    The synthetic images have ITK's identity direction (LPS), which both reorienting readers flip."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    info = planned_3d
    plans = load_json(str(info["pp"] / f"{info['plans']}.json"))
    plans["image_reader_writer"] = reader
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    dj = load_json(str(info["pp"] / "dataset.json"))
    sup = json.loads((info["raw"] / "supervision.json").read_text())["cases"]
    box_cases = [c for c, s in sup.items() if s["type"] == "box"]
    assert box_cases
    for cid in box_cases:
        data, seg, props = cm.preprocessor_class(verbose=False).run_case(
            [str(info["raw"] / "imagesTr" / f"{cid}_0000.nii.gz")],
            str(info["raw"] / "labelsTr_dense_hidden" / f"{cid}.nii.gz"), pm, cm, dj)
        for b in sup[cid]["boxes"]:
            lo, hi = box_to_preprocessed(Box(b["label"], tuple(b["min"]), tuple(b["max"])), props,
                                         pm.transpose_forward, data.shape[1:])
            obj = np.argwhere(seg[0] == b["label"])
            assert len(obj)
            assert np.all(obj >= lo) and np.all(obj < hi), f"{reader}, {cid}: mapped box misses object voxels"
            assert np.all(lo >= obj.min(0) - 1) and np.all(hi <= obj.max(0) + 2), (lo, hi, obj.min(0), obj.max(0))


# ---------------------------------------------------------------------------------------------- prepare
def _tree_digest(folder) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _set_reader(folder, name) -> None:
    dj = json.loads((folder / "dataset.json").read_text())
    dj["overwrite_image_reader_writer"] = name
    (folder / "dataset.json").write_text(json.dumps(dj))


def _problems(folder) -> list[str]:
    from nnunet_mixsup.manifest import ManifestError
    from nnunet_mixsup.prepare import prepare_dataset

    before = _tree_digest(folder)
    with pytest.raises(ManifestError) as e:
        prepare_dataset(folder, show_progress=False)
    assert _tree_digest(folder) == before, "prepare wrote something although it refused the dataset"
    assert not [p for p in folder.parent.iterdir() if ".mixsup-prepare-" in p.name], "staging folder left behind"
    return e.value.problems


@pytest.fixture()
def box_ds(fresh_dirs):
    from nnunet_mixsup.lab.synthetic import make_synthetic_dataset

    folder = make_synthetic_dataset(fresh_dirs["nnUNet_raw"], 963, counts={"mask": 2, "box": 1, "tags": 1},
                                    n_test=0, seed=4)
    assert json.loads((folder / "supervision.json").read_text())["cases"]["case_002"]["type"] == "box"
    return folder


@pytest.mark.parametrize("reader", [*NIFTI_READERS, "NoSuchReader", "None"])
def test_prepare_accepts_nnunets_readers(box_ds, reader):
    """nnU-Net's own readers, and a name nnU-Net cannot find (it then picks its reader by file ending)."""
    from nnunet_mixsup.prepare import prepare_dataset

    _set_reader(box_ds, reader)
    assert "case_002.nii.gz" in prepare_dataset(box_ds, show_progress=False).written


def test_prepare_refuses_a_reader_it_cannot_map(box_ds, monkeypatch):
    """A reader class that nnU-Net would find in nnunetv2.imageio but that is not one of its own."""
    from nnunetv2.imageio import reader_writer_registry
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_mixsup.prepare import prepare_dataset

    class MyTransposingIO(SimpleITKIO):
        pass

    real = reader_writer_registry.recursive_find_reader_writer_by_name
    monkeypatch.setattr(reader_writer_registry, "recursive_find_reader_writer_by_name",
                        lambda name: MyTransposingIO if name == "MyTransposingIO" else real(name))
    _set_reader(box_ds, "MyTransposingIO")
    p = "\n".join(_problems(box_ds))
    assert "MyTransposingIO" in p and "1 box case(s)" in p and "cannot be mapped" in p
    _set_reader(box_ds, 7)
    assert "must be a reader class name (a string), got 7" in "\n".join(_problems(box_ds))
    # no box case: the derived maps are constant, any reader reads them alike
    _set_reader(box_ds, "MyTransposingIO")
    (box_ds / "supervision.json").write_text(json.dumps({"version": 1, "cases": {
        "case_002": {"type": "tags", "present": [1]}, "case_003": {"type": "tags", "present": []}}}))
    assert prepare_dataset(box_ds, show_progress=False).written


def test_prepare_refuses_nifti_headers_that_nibabel_and_itk_read_differently(box_ds):
    """sform and qform disagree: ITK takes the qform, nibabel the sform. NibabelIOWithReorient would
    reorient the image by its sform and the derived label map (written by SimpleITK) by the qform."""
    import nibabel

    from nnunet_mixsup.prepare import prepare_dataset

    path = box_ds / "imagesTr" / "case_002_0000.nii.gz"
    img = nibabel.load(str(path))
    data, qform = np.asanyarray(img.dataobj), img.get_qform()
    out = nibabel.Nifti1Image(data, None, header=img.header)
    out.set_qform(qform, code=1)
    out.set_sform(qform @ np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]]), code=2)
    nibabel.save(out, str(path))
    _set_reader(box_ds, "NibabelIOWithReorient")
    p = "\n".join(_problems(box_ds))
    assert "case 'case_002': NibabelIOWithReorient" in p and "sform and qform disagree" in p
    _set_reader(box_ds, "NibabelIO")  # no reorientation: image and label keep ITK's index order alike
    assert "case_002.nii.gz" in prepare_dataset(box_ds, show_progress=False).written
