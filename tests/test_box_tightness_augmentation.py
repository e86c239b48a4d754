"""Box tightness under nnU-Net's spatial augmentation: a perfect prediction is never penalised.

Boxes are rasterised before augmentation and rotate with the image; a rotated box bounds the
object but is not its tight axis-aligned box, so the tightness term must skip rotated samples
(``batch["axes_kept"]``) while certain negatives outside the (rotated) box stay certain.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_mixsup.data import (
    AXES_KEPT_KEY,
    AxesRecordingSpatialTransform,
    keeps_axes,
    pack_allowed,
    pack_targets,
    record_spatial_axes,
    unpack_targets,
)
from nnunet_mixsup.losses import BoxProjectionLoss
from nnunet_mixsup.trainers.mixsup import boxes_inside_patch

K = 2  # foreground classes; class 1 is the object, class 2 has no box (absent)


def _object_and_box(dim: int, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """An ellipse / ellipsoid (class 1) off-centre in the patch, its packed target with the tight box as allowed map."""
    grid = np.meshgrid(*[np.arange(size)] * dim, indexing="ij")
    centre = [size / 2 + 1.5, size / 2 - 2.0, size / 2][:dim]
    radii = [9.0, 6.0, 7.5][:dim]
    obj = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    seg = obj.astype(np.int16)[None]
    lo = np.argwhere(obj).min(0)
    hi = np.argwhere(obj).max(0) + 1
    allowed = np.zeros((K, *obj.shape), dtype=np.int16)
    allowed[0][tuple(slice(a, z) for a, z in zip(lo, hi))] = 1  # the tight box of class 1; class 2 absent
    packed = pack_targets(seg, pack_allowed(allowed), K)
    image = torch.from_numpy(obj.astype(np.float32))[None]
    return image, torch.from_numpy(packed)


def _perfect_logits(label: torch.Tensor) -> torch.Tensor:
    """(1, 1 + K, *s) logits whose softmax is (nearly) the one-hot of ``label`` (1, *s)."""
    onehot = torch.nn.functional.one_hot(label[0].long().clamp_min(0), 1 + K).movedim(-1, 0).float()
    return (20.0 * onehot)[None]


def _tightness(out: dict) -> tuple[float, bool, torch.Tensor, torch.Tensor]:
    seg = out["segmentation"]
    seg = seg[0] if isinstance(seg, list) else seg
    unpacked = unpack_targets(seg, K)
    label, allowed = unpacked[:1], unpacked[1:][None]
    logits = _perfect_logits(label)
    kept = bool(out[AXES_KEPT_KEY])
    valid = boxes_inside_patch(allowed) & torch.tensor([[kept] * K])
    return float(BoxProjectionLoss()(logits, allowed, valid)), kept, label, allowed[0]


def _spatial(dim: int, **kw) -> AxesRecordingSpatialTransform:
    args = {"patch_size": (40,) * dim, "patch_center_dist_from_border": 0, "random_crop": False,
            "p_elastic_deform": 0, "p_rotation": 0, "rotation": 0.0, "p_scaling": 0, "scaling": 1.0,
            "p_synchronize_scaling_across_axes": 1, "bg_style_seg_sampling": False, "border_mode_seg": "constant",
            "padding_value_seg": -1}
    args.update(kw)
    return AxesRecordingSpatialTransform(**args)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("degrees", [0, 10, 30, 45, 90])
def test_rotated_boxes_are_not_used_for_tightness(dim, degrees):
    image, packed = _object_and_box(dim)
    t = _spatial(dim, p_rotation=1, rotation=float(np.deg2rad(degrees)))
    out = t(image=image.clone(), segmentation=packed.clone())
    loss, kept, label, allowed = _tightness(out)
    assert kept == (degrees % 90 == 0)
    assert loss < 0.03, (degrees, loss)
    # certain negatives stay certain: no object voxel where class 1 is not allowed
    assert not bool(((label[0] == 1) & (allowed[0] == 0)).any())
    if not kept:  # the reproduction: the rotated box's projection penalises the perfect prediction
        unpacked_all = BoxProjectionLoss()(_perfect_logits(label), allowed[None])
        assert float(unpacked_all) > 0.05


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("scale", [0.7, 1.0, 1.4])
def test_scaled_boxes_stay_tight(dim, scale):
    image, packed = _object_and_box(dim)
    out = _spatial(dim, p_scaling=1, scaling=scale)(image=image.clone(), segmentation=packed.clone())
    loss, kept, label, allowed = _tightness(out)
    assert kept
    assert loss < 0.03, (scale, loss)
    assert not bool(((label[0] == 1) & (allowed[0] == 0)).any())


@pytest.mark.parametrize("dim", [2, 3])
def test_nnunet_training_augmentation_never_penalises_a_perfect_prediction(dim):
    """nnU-Net's own training transforms (rotation, scaling, mirroring, intensity), many random draws."""
    np.random.seed(0)
    torch.manual_seed(0)
    patch = (40,) * dim
    rotation = (-np.pi, np.pi) if dim == 2 else (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    transforms = record_spatial_axes(nnUNetTrainer.get_training_transforms(
        patch, rotation, None, tuple(range(dim)), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=list(range(1, 2 ** K * 2)), regions=None, ignore_label=None))
    image, packed = _object_and_box(dim)
    n_kept = n_rotated = 0
    for _ in range(40):
        out = transforms(image=image.clone(), segmentation=packed.clone())
        loss, kept, label, allowed = _tightness(out)
        assert loss < 0.03, loss
        assert not bool(((label[0] == 1) & (allowed[0] == 0)).any())
        n_kept += kept
        n_rotated += not kept
    assert n_kept > 0 and n_rotated > 0  # both paths were exercised (nnU-Net rotates 20 % of samples)


def test_keeps_axes():
    c, s = np.cos(0.3), np.sin(0.3)
    assert keeps_axes(None)
    assert keeps_axes(np.diag([1.2, 1.2, 1.2]))
    assert keeps_axes(np.array([[0.0, -1.1], [1.1, 0.0]]))  # 90 degrees, scaled
    assert not keeps_axes(np.array([[c, -s], [s, c]]))
    assert not keeps_axes(np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]))


def test_record_spatial_axes_swaps_only_spatial_transforms():
    transforms = nnUNetTrainer.get_training_transforms(
        (40, 40), (-np.pi, np.pi), None, (0, 1), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1, 2], regions=None, ignore_label=None)
    names_before = [type(t).__name__ for t in transforms.transforms]
    record_spatial_axes(transforms)
    names_after = [type(t).__name__ for t in transforms.transforms]
    assert names_after == [n.replace("SpatialTransform", "AxesRecordingSpatialTransform") for n in names_before]
    assert names_after.count("AxesRecordingSpatialTransform") == 1
