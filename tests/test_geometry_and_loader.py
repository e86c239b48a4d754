"""Box mapping raw -> preprocessed (anisotropic, cropped, transposed) and the mixed-supervision loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_mixsup.geometry import box_to_preprocessed
from nnunet_mixsup.lab.synthetic import boxes_from_label
from nnunet_mixsup.manifest import Box, CaseSupervision


def _managers(info, config):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(info["pp"] / f"{info['plans']}.json"))
    dj = load_json(str(info["pp"] / "dataset.json"))
    return pm, pm.get_configuration(config), dj


def _preprocess_dense(info, config, cid):
    """Run nnU-Net's own preprocessing on a case with its hidden dense label."""
    pm, cm, dj = _managers(info, config)
    pre = cm.preprocessor_class(verbose=False)
    img = [str(info["raw"] / "imagesTr" / f"{cid}_0000.nii.gz")]
    lab_dir = "labelsTr" if (info["raw"] / "labelsTr_dense_hidden" / f"{cid}.nii.gz").exists() is False \
        else "labelsTr_dense_hidden"
    data, seg, props = pre.run_case(img, str(info["raw"] / lab_dir / f"{cid}.nii.gz"), pm, cm, dj)
    return pm, data, seg, props


@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_boxes_cover_the_object_after_preprocessing(which, config, request):
    info = request.getfixturevalue(which)
    sup = json.loads((info["raw"] / "supervision.json").read_text())["cases"]
    box_cases = [c for c, s in sup.items() if s["type"] == "box"]
    assert box_cases
    if which == "planned_3d":
        pm, *_ = _managers(info, config)
        assert list(pm.transpose_forward) != [0, 1, 2], "the 3D test data must be transposed by the planner"
    for cid in box_cases:
        pm, data, seg, props = _preprocess_dense(info, config, cid)
        assert tuple(props["shape_after_cropping_and_before_resampling"]) != tuple(props["shape_before_cropping"]), \
            "the test data must be cropped"
        for b in sup[cid]["boxes"]:
            box = Box(b["label"], tuple(b["min"]), tuple(b["max"]))
            lo, hi = box_to_preprocessed(box, props, pm.transpose_forward, data.shape[1:])
            obj = seg[0] == b["label"]
            inside = np.zeros_like(obj)
            inside[tuple(slice(a, z) for a, z in zip(lo, hi))] = True
            assert obj.sum() > 0
            assert np.all(inside[obj]), f"{cid}: mapped box misses object voxels"
            # and it is tight: at most one voxel of slack per side beyond the object's own bbox
            idx = np.argwhere(obj)
            assert np.all(lo >= idx.min(0) - 1) and np.all(hi <= idx.max(0) + 2), (lo, hi, idx.min(0), idx.max(0))


def test_box_mapping_hand_computed():
    """Transpose (2,0,1), crop offset, and a 2x upsampling on the first axis, by hand."""
    props = {"bbox_used_for_cropping": [[1, 9], [2, 12], [0, 20]],
             "shape_after_cropping_and_before_resampling": [8, 10, 20]}
    # raw ITK (x, y, z) -> numpy (z, y, x) = ([3, 4, 5], [6, 8, 9]) -> transposed (x, z, y) = ([5, 3, 4], [9, 6, 8])
    box = Box(1, (5, 4, 3), (9, 8, 6))
    lo, hi = box_to_preprocessed(box, props, (2, 0, 1), (16, 10, 20))
    # crop: x 5-1=4..9-1=8 (x2 -> 8..16), z 3-2=1..6-2=4, y 4..8
    assert lo.tolist() == [8, 1, 4] and hi.tolist() == [16, 4, 8]
    assert box_to_preprocessed(Box(1, (0, 0, 0), (1, 1, 1)), props, (2, 0, 1), (16, 10, 20)) is None


def _loader(info, config, supervision, transforms=None, batch_size=4, strong_fraction=0.5):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_mixsup.data import MixSupDataLoader

    pm, cm, dj = _managers(info, config)
    folder = str(info["pp"] / cm.data_identifier)
    ds = infer_dataset_class(folder)(folder)
    lm = pm.get_label_manager(dj)
    return MixSupDataLoader(ds, batch_size, cm.patch_size, cm.patch_size, lm, supervision=supervision,
                            transpose_forward=pm.transpose_forward, strong_fraction=strong_fraction,
                            oversample_foreground_percent=0.33, transforms=transforms), cm, lm


def _supervision(info):
    from nnunet_mixsup.manifest import parse_manifest

    problems = []
    man = parse_manifest(json.loads((info["pp"] / "supervision.json").read_text()), problems)
    assert not problems
    return man.cases


@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_loader_batch_layout_and_composition(which, config, request):
    info = request.getfixturevalue(which)
    sup = _supervision(info)
    dl, cm, lm = _loader(info, config, sup, batch_size=4, strong_fraction=0.5)
    k = len(lm.foreground_labels)
    for _ in range(3):
        b = dl.generate_train_batch()
        assert b["data"].shape == (4, 1, *cm.patch_size)
        assert b["target"].shape == (4, 1 + k, *cm.patch_size)
        types = [sup[key].type for key in b["keys"]]
        assert sum(t == "mask" for t in types) == 2, "strong_fraction=0.5 of 4 must give 2 mask samples"
        codes = {"mask": 0, "box": 1, "tags": 2, "none": 3}
        assert b["sup_type"].tolist() == [codes[t] for t in types]
        for j, key in enumerate(b["keys"]):
            s = sup[key]
            allowed = b["target"][j, 1:]
            if s.type == "tags":
                for ci, c in enumerate(lm.foreground_labels):
                    assert b["tags"][j, ci] == float(c in s.present)
                    if c not in s.present:
                        assert allowed[ci].max() == 0
            if s.type == "mask":
                assert b["tags"][j].sum() >= 1
            if s.type == "box":
                # outside every box the derived label map is background, inside it is ignore
                lab = b["target"][j, 0]
                inside_any = allowed.amax(0) > 0
                assert torch.all(lab[~inside_any] != lm.ignore_label)


@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_boxes_follow_spatial_augmentation(which, config, request):
    """Pretend mask cases are box cases: after rotation/scaling/elastic/mirroring each object voxel
    (channel 0, the real mask) must still lie inside the augmented box channel of its class."""
    import SimpleITK as sitk
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    info = request.getfixturevalue(which)
    sup = {}
    for cid, s in _supervision(info).items():
        if s.type == "mask":
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(info["raw"] / "labelsTr" / f"{cid}.nii.gz")))
            boxes = boxes_from_label(seg, [1, 2])
            sup[cid] = CaseSupervision(cid, "box", tuple(Box(b["label"], tuple(b["min"]), tuple(b["max"]))
                                                         for b in boxes))
        else:
            sup[cid] = s
    _, cm, _ = _managers(info, config)
    patch = cm.patch_size
    tr = ComposeTransforms([
        SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=1.0,
                         p_rotation=1.0, rotation=(-0.5, 0.5), p_scaling=1.0, scaling=(0.7, 1.4),
                         border_mode_seg="constant", padding_value_seg=-1),
        MirrorTransform(allowed_axes=tuple(range(len(patch)))),
        RemoveLabelTansform(-1, 0),
    ])
    masked = [c for c, s in sup.items() if s.type == "box"]
    dl, cm, lm = _loader(info, config, {c: sup[c] for c in sup}, transforms=tr, batch_size=4, strong_fraction=0.0)
    dl.weak_ids = masked
    dl.mask_ids = []
    covered = total = 0
    for _ in range(4):
        b = dl.generate_train_batch()
        for j in range(4):
            for ci, c in enumerate(lm.foreground_labels):
                obj = b["target"][j, 0] == c
                total += int(obj.sum())
                covered += int((b["target"][j, 1 + ci][obj] > 0).sum())
    assert total > 0
    assert covered / total > 0.99, f"only {covered}/{total} object voxels inside their augmented boxes"


def test_oversampling_applies_within_each_group(planned_3d):
    dl, _, _ = _loader(planned_3d, "3d_fullres", _supervision(planned_3d), batch_size=6, strong_fraction=0.5)
    keys = dl.get_indices()
    force = dl.oversample_per_group(keys)
    mask = [f for k, f in zip(keys, force) if dl.supervision[k].type == "mask"]
    weak = [f for k, f in zip(keys, force) if dl.supervision[k].type != "mask"]
    # nnU-Net with 3 samples and 0.33 forces round(3 * 0.67) = 2 random, 1 foreground – in each group
    assert sum(mask) == 1 and sum(weak) == 1


def test_mask_only_warmup_counts_batches_over_all_workers(planned_2d):
    """The first ``mask_only_batches`` batches (all workers together) hold mask cases only, then mixed."""
    sup = _supervision(planned_2d)
    dl, _, _ = _loader(planned_2d, "2d", sup, batch_size=4, strong_fraction=0.5)
    dl.mask_only_batches, dl.n_workers = 6, 2  # this worker makes every 2nd batch: its first 3 are warm-up
    kinds = [[sup[k].type for k in dl.get_indices()] for _ in range(6)]
    assert all(t == "mask" for batch in kinds[:3] for t in batch)
    assert all(sum(t == "mask" for t in batch) == 2 for batch in kinds[3:])
    assert dl.batches_drawn == 6
    dl.mask_only_batches, dl.mask_ids = 100, []  # no mask case at all: no warm-up, never an empty draw
    assert not dl.in_mask_only_warmup() and len(dl.get_indices()) == 4


def test_pack_targets_hand_values_and_round_trip():
    from nnunet_mixsup.data import pack_allowed, pack_targets, unpack_allowed, unpack_targets

    allowed = np.array([[[1, 0], [1, 1]], [[0, 0], [1, 0]], [[1, 1], [1, 0]]], dtype=np.int16)  # K = 3, 2x2
    codes = pack_allowed(allowed)
    assert codes.dtype == np.int16 and codes[0].tolist() == [[1 + 4, 4], [1 + 2 + 4, 1]]  # bit k = class k
    seg = np.array([[[2, 0], [4, -1]]], dtype=np.int16)  # 4 = ignore label, -1 = outside nnU-Net's crop
    joint = pack_targets(seg, codes, 3)
    assert np.array_equal(joint, pack_targets(seg, codes * (seg != -1), 3))  # label -1: nothing allowed anyway
    constant = pack_allowed(np.array([1, 0, 1], dtype=np.int16).reshape(3, 1, 1))  # (1, 1, 1): broadcast
    assert pack_targets(seg, constant, 3).tolist() == [[[2 * 8 + 5, 5], [4 * 8 + 5, -1]]]
    constant20 = pack_allowed(np.ones((20, 1, 1), dtype=np.int16))  # two 15-bit code channels
    assert pack_targets(np.zeros((1, 2, 2), np.int16), constant20, 20).shape == (1, 2, 2)  # 1 << 20 <= 2^24
    assert pack_targets(np.full((1, 2, 2), 21, np.int16), constant20, 20).shape == (3, 2, 2)  # 22 << 20 > 2^24
    assert joint.dtype == np.int32 and joint.tolist() == [[[2 * 8 + 5, 4], [4 * 8 + 7, -1]]]  # label << K | code
    back = unpack_targets(torch.from_numpy(joint), 3)
    assert back.dtype == torch.int16 and back.shape == (4, 2, 2)
    assert back[0].tolist() == [[2, 0], [4, -1]]
    assert torch.equal(back[1:], torch.from_numpy(allowed * (seg != -1)))
    # nnU-Net's RemoveLabelTansform turns padding (-1) into 0: background, nothing allowed
    assert unpack_targets(torch.zeros((1, 1), dtype=torch.int32), 3)[:, 0].tolist() == [0, 0, 0, 0]
    # many classes: label map + 15-bit code channels, every code a non-negative int16
    rng = np.random.default_rng(0)
    many = (rng.random((20, 3, 4)) < 0.5).astype(np.int16)
    codes = pack_allowed(many)
    assert codes.shape == (2, 3, 4) and codes.min() >= 0
    assert torch.equal(unpack_allowed(torch.from_numpy(codes), 20), torch.from_numpy(many))
    seg = rng.integers(0, 22, (1, 3, 4)).astype(np.int16)
    back = unpack_targets(torch.from_numpy(pack_targets(seg, codes, 20)), 20)
    assert torch.equal(back[0], torch.from_numpy(seg[0])) and torch.equal(back[1:], torch.from_numpy(many))
    # 19 classes still share one channel, exactly (largest value (20 << 19) | (2^19 - 1) < 2^24)
    seg = np.full((1, 2), 20, dtype=np.int16)
    top = pack_targets(seg, pack_allowed(np.ones((19, 2), dtype=np.int16)), 19)
    assert top.shape == (1, 2) and int(top.max()) == (20 << 19) + 2 ** 19 - 1 < 2 ** 24
    assert unpack_targets(torch.from_numpy(top), 19)[:, 0].tolist() == [20] + [1] * 19


def test_packed_mask_sample_resamples_exactly_like_stock():
    """A mask sample's packed channel (constant code) goes through nnU-Net's spatial augmentation to
    exactly the label map stock nnU-Net gets with the same random parameters."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnunet_mixsup.data import pack_allowed, pack_targets, unpack_targets

    rng = np.random.default_rng(1)
    seg = np.zeros((1, 30, 40, 36), dtype=np.int16)
    seg[0, 5:25, 8:32, 6:30] = 1
    seg[0, 10:20, 14:26, 12:24] = 2
    seg[0, 12:16, 16:22, 14:20] = 3
    seg[0, :3] = -1
    seg[0][rng.random(seg.shape[1:]) < 0.02] = 2  # speckle: many label boundaries
    codes = pack_allowed(np.ones((3, 1, 1, 1), dtype=np.int16)) * (seg != -1)
    joint = torch.from_numpy(pack_targets(seg, codes, 3))
    st = SpatialTransform((24, 32, 28), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                          p_rotation=1, rotation=(-0.5, 0.5), p_scaling=1, scaling=(0.7, 1.4),
                          bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1)
    image = torch.zeros((1, *seg.shape[1:]))
    for i in range(3):
        torch.manual_seed(i)
        np.random.seed(i)
        params = st.get_parameters(image=image)
        stock = st._apply_to_segmentation(torch.from_numpy(seg), **params)
        ours = unpack_targets(st._apply_to_segmentation(joint, **params), 3)
        assert torch.equal(ours[0], stock[0])
        assert torch.equal(ours[1:].bool(), (stock[0] != -1).expand(3, *stock.shape[1:]))
