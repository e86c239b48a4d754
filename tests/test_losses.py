"""Tests of :mod:`nnunet_mixsup.losses` (tiny tensors, CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunet_mixsup.losses import (
    BoxFillLoss,
    BoxPresenceLoss,
    BoxProjectionLoss,
    CertainNegativeLoss,
    EntropyLoss,
    KLDistillationLoss,
    MultiLabelDeepSupervisionLoss,
    SoftDiceAgreementLoss,
    constrain_pseudo_labels,
    ema_update,
    labels_to_pos_known,
    multilabel_pooled_targets,
)

IGN = 255


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _logits(b: int, c: int, *spatial: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, *spatial, generator=g) * scale).requires_grad_(True)


def _grad(loss_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), (torch.zeros_like(x) if g is None else g)


def _ref_log1m_softmax(z: torch.Tensor) -> torch.Tensor:
    """float64 brute force: log(1 - p_c) = logsumexp_{j != c} z_j - logsumexp_j z_j."""
    z = z.double()
    c = z.shape[1]
    eye = torch.eye(c, dtype=torch.bool).view(1, c, c, *([1] * (z.ndim - 2)))
    others = z.unsqueeze(1).masked_fill(eye, float("-inf"))  # (B, c, j, *s)
    return torch.logsumexp(others, dim=2) - torch.logsumexp(z, dim=1, keepdim=True)


# ========================================================================== CertainNegativeLoss
def test_certain_negative_hand_value():
    # voxel 0: z = (0, 0, 0)    -> p_1 = 1/3, -log(1 - 1/3) = log(3/2) = 0.405465
    # voxel 1: z = (0, ln3, 0)  -> p_1 = 3/5, -log(2/5)     = log(5/2) = 0.916291
    # class 2 allowed everywhere, class 1 forbidden at both voxels -> mean of the two = 0.660878
    z = torch.stack([_t(0, 0), _t(0, math.log(3)), _t(0, 0)]).view(1, 3, 2, 1)
    allowed = torch.stack([_t(0, 0), _t(1, 1)]).view(1, 2, 2, 1)
    loss = CertainNegativeLoss()(z, allowed)
    assert loss.item() == pytest.approx((math.log(1.5) + math.log(2.5)) / 2, rel=1e-6)
    assert CertainNegativeLoss("sum")(z, allowed).item() == pytest.approx(math.log(1.5) + math.log(2.5), rel=1e-6)
    m = CertainNegativeLoss("none")(z, allowed)
    assert m.shape == (1, 2, 2, 1)
    assert m[0, 1].abs().sum() == 0  # allowed entries are 0 in the map


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 2)])
def test_certain_negative_matches_float64_reference(spatial):
    # both branches (arg-max class forbidden or not), large margins included
    z = _logits(2, 4, *spatial, scale=30.0, seed=1).detach()
    allowed = (torch.rand(2, 3, *spatial, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    neg = torch.cat([torch.zeros_like(allowed[:, :1]), 1 - allowed], 1).bool()
    ref = -_ref_log1m_softmax(z)[neg].mean()
    assert CertainNegativeLoss()(z, allowed).double().item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)


def test_certain_negative_gradient_sign_and_zero_for_perfect():
    z = _t(0.5, 1.0, -0.3).view(1, 3, 1, 1)
    allowed = _t(0, 1).view(1, 2, 1, 1)  # class 1 forbidden
    _, g = _grad(lambda x: CertainNegativeLoss()(x, allowed), z)
    # descent (-g) lowers the forbidden logit and raises the others
    assert g[0, 1, 0, 0] > 0 and g[0, 0, 0, 0] < 0 and g[0, 2, 0, 0] < 0
    # confident background -> ~0 loss
    perfect = _t(20.0, -20.0, 0.0).view(1, 3, 1, 1)
    assert CertainNegativeLoss()(perfect, allowed).item() < 1e-8


def test_certain_negative_extreme_logits():
    # z = (0, 1e4, 0), class 1 forbidden: -log(1 - p_1) = 1e4 - log 2 (naive log(1 - p) = inf)
    z = _t(0.0, 1e4, 0.0).view(1, 3, 1, 1)
    allowed = _t(0, 1).view(1, 2, 1, 1)
    loss, g = _grad(lambda x: CertainNegativeLoss()(x, allowed), z)
    assert loss.item() == pytest.approx(1e4 - math.log(2), rel=1e-6)
    assert torch.isfinite(g).all() and g[0, 1] > 0


def test_certain_negative_masked_voxels_and_samples_contribute_nothing():
    z = _logits(2, 3, 4, 4, seed=3).detach()
    allowed = torch.ones(2, 2, 4, 4)
    allowed[0, 0, :2] = 0  # negatives only in sample 0, rows 0-1
    allowed[1, 1] = 0  # sample 1 has negatives but is deselected
    sm = torch.tensor([True, False])
    fn = lambda x: CertainNegativeLoss()(x, allowed, sample_mask=sm)
    l1, g1 = _grad(fn, z)
    z2 = z.clone()
    z2[0, :, 2:] = 100 * torch.randn(3, 2, 4)  # voxels without negatives
    z2[1] = -50.0  # deselected sample
    l2, g2 = _grad(fn, z2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6)
    assert torch.allclose(g1[0, :, :2], g2[0, :, :2])
    assert g2[0, :, 2:].abs().max() == 0 and g2[1].abs().max() == 0
    # mixed batch == the supervised sample alone
    alone = CertainNegativeLoss()(z[:1], allowed[:1])
    assert l1.item() == pytest.approx(alone.item(), rel=1e-6)


def test_certain_negative_empty_mask_is_zero_with_zero_grad():
    z = _logits(2, 3, 2, 2, 2, seed=4)
    loss = CertainNegativeLoss()(z, torch.ones(2, 2, 2, 2, 2))
    loss.backward()
    assert loss.item() == 0 and z.grad.abs().max() == 0
    z.grad = None
    loss = CertainNegativeLoss()(z, torch.zeros(2, 2, 2, 2, 2), sample_mask=torch.zeros(2))
    loss.backward()
    assert loss.item() == 0 and z.grad.abs().max() == 0


def test_certain_negative_shape_check():
    with pytest.raises(ValueError):
        CertainNegativeLoss()(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError):
        CertainNegativeLoss(reduction="avg")


# ========================================================== multi-label deep-supervision targets
def _pooling_case():
    """3D (B=1, C=3, X=2, Y=2, Z=8), ignore = 255 ("I"). Slice x=0 (rows y, columns z):

        y=0:  1 1 | 0 0 | 0 I | I 2        blocks (kernel (1, 2, 2)):  A | B | C | D
        y=1:  0 0 | 0 0 | 0 I | I I

    slice x=1 is all background. allowed (class 1, class 2) at the ignore voxels: in C class 1 is
    forbidden (0) and class 2 allowed; in D both are allowed.
    """
    t = torch.zeros(1, 1, 2, 2, 8)
    t[0, 0, 0] = torch.tensor([[1, 1, 0, 0, 0, IGN, IGN, 2], [0, 0, 0, 0, 0, IGN, IGN, IGN]], dtype=torch.float32)
    allowed = torch.ones(1, 2, 2, 2, 8)
    allowed[0, 0, 0, :, 5] = 0  # class 1 certainly absent at the ignore voxels of block C
    return t, allowed


def test_labels_to_pos_known():
    t, allowed = _pooling_case()
    pos, known = labels_to_pos_known(t, allowed, 3, IGN)
    assert pos.shape == known.shape == (1, 3, 2, 2, 8)
    # labelled voxel (0, 0, 0) has label 1: one-hot, known for every class
    assert pos[0, :, 0, 0, 0].tolist() == [0, 1, 0] and known[0, :, 0, 0, 0].tolist() == [1, 1, 1]
    # ignore voxel in C: only class 1 (allowed == 0) is known (negative)
    assert pos[0, :, 0, 0, 5].tolist() == [0, 0, 0] and known[0, :, 0, 0, 5].tolist() == [0, 1, 0]
    # ignore voxel in D: nothing known
    assert known[0, :, 0, 1, 7].tolist() == [0, 0, 0]
    # without allowed / without ignore_index
    _, k2 = labels_to_pos_known(t, None, 3, IGN)
    assert k2[0, :, 0, 0, 5].tolist() == [0, 0, 0]
    p3, k3 = labels_to_pos_known(torch.zeros(1, 1, 2, 2, dtype=torch.long), None, 2, None)
    assert p3[:, 0].min() == 1 and k3.min() == 1


def test_pooled_targets_anisotropic_hand_checked():
    t, allowed = _pooling_case()
    pos, known = labels_to_pos_known(t, allowed, 3, IGN)
    tgt, kn = multilabel_pooled_targets(pos, known, (1, 2, 2))
    assert tgt.shape == kn.shape == (1, 3, 2, 1, 4)  # x is not pooled
    # block:                       A  B  C  D
    # class 0 (bg): any bg voxel -> 1  1  1  0 ; D has no bg voxel and ignore voxels -> unknown
    # class 1: A contains a 1    -> 1  0  0  0 ; B all labelled, no 1 -> known negative;
    #          C: labelled voxels + ignore voxels with class 1 forbidden -> known negative; D unknown
    # class 2: D contains a 2    -> 0  0  0  1 ; A, B all labelled -> negative; C ignore, allowed -> unknown
    assert tgt[0, :, 0, 0].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    assert kn[0, :, 0, 0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    # slice x=1 (all labelled background): bg positive, the rest known negatives
    assert tgt[0, :, 1, 0].tolist() == [[1] * 4, [0] * 4, [0] * 4]
    assert kn[0, :, 1].min() == 1


def test_pooled_targets_non_divisible_2d_and_3d():
    # 3x3 map, kernel 2 -> 2x2 with partial border blocks; I = ignore (class 1 allowed there)
    #   0 0 | 1          blocks: TL = {0,0,0,I}  TR = {1,0}
    #   0 I | 0                  BL = {1,0}      BR = {0}
    #   ----+--
    #   1 0 | 0
    t = torch.tensor([[0, 0, 1], [0, IGN, 0], [1, 0, 0]], dtype=torch.float32).view(1, 1, 3, 3)
    pos, known = labels_to_pos_known(t, torch.ones(1, 1, 3, 3), 2, IGN)
    tgt, kn = multilabel_pooled_targets(pos, known, (2, 2))
    assert tgt.shape == (1, 2, 2, 2)
    assert tgt[0, 0].tolist() == [[1, 1], [1, 1]] and kn[0, 0].tolist() == [[1, 1], [1, 1]]
    # class 1: TL has no 1 and an unknown voxel -> unknown; TR, BL positive; BR known negative
    assert tgt[0, 1].tolist() == [[0, 1], [1, 0]] and kn[0, 1].tolist() == [[0, 1], [1, 1]]
    # the same in 3D with kernel (1, 2, 2)
    tgt3, kn3 = multilabel_pooled_targets(pos.unsqueeze(2), known.unsqueeze(2), (1, 2, 2))
    assert tgt3.shape == (1, 2, 1, 2, 2)
    assert torch.equal(tgt3[:, :, 0], tgt) and torch.equal(kn3[:, :, 0], kn)
    # kernel 1 is the identity
    t1, k1 = multilabel_pooled_targets(pos, known, 1)
    assert torch.equal(t1, pos) and torch.equal(k1, known)


def test_pooled_targets_stepwise_equals_direct():
    g = torch.Generator().manual_seed(5)
    lab = torch.randint(0, 3, (2, 1, 5, 7, 6), generator=g).float()
    lab[torch.rand(lab.shape, generator=g) < 0.3] = IGN
    allowed = (torch.rand(2, 2, 5, 7, 6, generator=g) > 0.3).float()
    pos, known = labels_to_pos_known(lab, allowed, 3, IGN)
    t1, k1 = multilabel_pooled_targets(pos, known, (1, 2, 2))
    t2, k2 = multilabel_pooled_targets(t1, k1, (2, 2, 2))
    td, kd = multilabel_pooled_targets(pos, known, (2, 4, 4))
    assert torch.equal(t2, td) and torch.equal(k2, kd)
    assert td.shape == (2, 3, 3, 2, 2)
    assert (kd >= td).all()  # positive implies known


# ========================================================== MultiLabelDeepSupervisionLoss
def _ml_case():
    # scale 0 (1, 2, 1, 2):  class 0: z = (0, 2),  t = (1, 0), known = (1, 1)
    #                        class 1: z = (5, -1), t = (0, 1), known = (0, 1)
    # BCE: softplus(-0) = log 2 = 0.693147, softplus(2) = 2.126928, softplus(1) = 1.313262
    #      mean over the 3 known entries = 4.133337 / 3 = 1.377779
    z0 = torch.stack([_t(0, 2), _t(5, -1)]).view(1, 2, 1, 2)
    t0 = torch.stack([_t(1, 0), _t(0, 1)]).view(1, 2, 1, 2)
    k0 = torch.stack([_t(1, 1), _t(0, 1)]).view(1, 2, 1, 2)
    # scale 1 (1, 2, 1, 1): z = (0, 0), t = (1, 0), all known -> log 2
    z1 = torch.zeros(1, 2, 1, 1)
    t1 = _t(1, 0).view(1, 2, 1, 1)
    k1 = torch.ones(1, 2, 1, 1)
    return [z0, z1], [(t0, k0), (t1, k1)]


def test_ml_ds_hand_value_and_weights():
    zs, tg = _ml_case()
    s0 = (math.log(2) + math.log1p(math.exp(2)) + math.log1p(math.exp(1))) / 3
    assert MultiLabelDeepSupervisionLoss()(zs[:1], tg[:1]).item() == pytest.approx(s0, rel=1e-6)
    assert MultiLabelDeepSupervisionLoss()(zs[0], tg[0]).item() == pytest.approx(s0, rel=1e-6)
    # weights (1, 3) -> (0.25, 0.75): 0.25 * 1.377779 + 0.75 * 0.693147 = 0.864305
    loss = MultiLabelDeepSupervisionLoss(weights=(1, 3))(zs, tg)
    assert loss.item() == pytest.approx(0.25 * s0 + 0.75 * math.log(2), rel=1e-6)
    # default: equal weights
    assert MultiLabelDeepSupervisionLoss()(zs, tg).item() == pytest.approx(0.5 * s0 + 0.5 * math.log(2), rel=1e-6)


def test_ml_ds_zero_weight_scale_skipped():
    zs, tg = _ml_case()
    bad = torch.full_like(zs[1], float("nan"))
    loss = MultiLabelDeepSupervisionLoss(weights=(1, 0))(zs[:1] + [bad], tg)
    ref = MultiLabelDeepSupervisionLoss()(zs[:1], tg[:1])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError):
        MultiLabelDeepSupervisionLoss(weights=(0, 0))


def test_ml_ds_unknown_entries_contribute_nothing_and_gradient_sign():
    zs, tg = _ml_case()
    fn = lambda x: MultiLabelDeepSupervisionLoss()([x], tg[:1])
    l1, g1 = _grad(fn, zs[0])
    z2 = zs[0].clone()
    z2[0, 1, 0, 0] = -1e4  # the unknown entry
    l2, g2 = _grad(fn, z2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6) and torch.equal(g1, g2)
    assert g1[0, 1, 0, 0] == 0
    assert g1[0, 0, 0, 0] < 0  # positive target: descent raises the logit
    assert g1[0, 0, 0, 1] > 0  # negative target: descent lowers it


@pytest.mark.parametrize("dice", [False, True])
def test_ml_ds_perfect_extreme_and_empty(dice):
    zs, tg = _ml_case()
    t0, k0 = tg[0]
    perfect = (2 * t0 - 1) * 1e4
    loss = MultiLabelDeepSupervisionLoss(use_soft_dice=dice)([perfect], [(t0, k0)])
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    wrong, g = _grad(lambda x: MultiLabelDeepSupervisionLoss(use_soft_dice=dice)([x], [(t0, k0)]), -perfect)
    assert torch.isfinite(wrong) and torch.isfinite(g).all() and wrong.item() > 1e3
    empty, g = _grad(lambda x: MultiLabelDeepSupervisionLoss(use_soft_dice=dice)([x], [(t0, torch.zeros_like(k0))]),
                     zs[0])
    assert empty.item() == 0 and g.abs().max() == 0


def test_ml_ds_soft_dice_hand_value():
    # z = 0 everywhere -> p = 0.5; BCE = log 2 for every known entry. Batch Dice per class (smooth 0):
    # class 0: known (1, 1), t = (1, 0): 2 * 0.5 / (p 1.0 + t 1) = 0.5
    # class 1: known (0, 1), t = (0, 1): 2 * 0.5 / (p 0.5 + t 1) = 2/3
    # dice term = 1 - (0.5 + 2/3) / 2 = 5/12
    _, tg = _ml_case()
    z = torch.zeros(1, 2, 1, 2)
    base = MultiLabelDeepSupervisionLoss()([z], tg[:1]).item()
    with_dice = MultiLabelDeepSupervisionLoss(use_soft_dice=True, smooth=0.0)([z], tg[:1]).item()
    assert base == pytest.approx(math.log(2), rel=1e-6)
    assert with_dice - base == pytest.approx(5 / 12, rel=1e-6)
    # a class without any known positive is not averaged: class 1 target -> 0 => dice term = 1 - 0.5
    t0, k0 = tg[0]
    t_neg = t0.clone()
    t_neg[:, 1] = 0
    d = MultiLabelDeepSupervisionLoss(use_soft_dice=True, smooth=0.0)([z], [(t_neg, k0)]).item()
    assert d - math.log(2) == pytest.approx(0.5, rel=1e-6)


def test_ml_ds_mixed_batch():
    zs, tg = _ml_case()
    t0, k0 = tg[0]
    z = torch.cat([zs[0], 7 * torch.randn(1, 2, 1, 2)])
    t = torch.cat([t0, torch.ones_like(t0)])
    k = torch.cat([k0, torch.zeros_like(k0)])  # unlabelled second sample
    both = MultiLabelDeepSupervisionLoss()([z], [(t, k)])
    alone = MultiLabelDeepSupervisionLoss()([zs[0]], [(t0, k0)])
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)


# =================================================================== BoxProjectionLoss
def test_box_projection_hand_value_2d():
    # C = 2, all logits 0 -> p_1 = 0.5 on a 2x3 grid; box = row 0, columns 0-1:
    #   box = [[1, 1, 0], [0, 0, 0]]
    # profile over x (max over y): box (1, 0), pred (.5, .5): 2*0.5 / (0.5 + 1)   = 2/3 -> 1/3
    # profile over y (max over x): box (1, 1, 0), pred (.5,.5,.5): 2*1 / (0.75 + 2) = 8/11 -> 3/11
    # mean over axes: (1/3 + 3/11) / 2 = 10/33
    z = torch.zeros(1, 2, 2, 3)
    box = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.float32).view(1, 1, 2, 3)
    assert BoxProjectionLoss(smooth=0.0)(z, box).item() == pytest.approx(10 / 33, rel=1e-6)


def _ball_case(n: int = 9, r: float = 3.0):
    ax = torch.arange(n, dtype=torch.float32) - n // 2
    d2 = ax.view(-1, 1, 1) ** 2 + ax.view(1, -1, 1) ** 2 + ax.view(1, 1, -1) ** 2
    ball = (d2 <= r * r).float()
    box = torch.zeros(n, n, n)
    lo, hi = n // 2 - int(r), n // 2 + int(r) + 1
    box[lo:hi, lo:hi, lo:hi] = 1
    z = torch.stack([torch.zeros(n, n, n), 40 * ball - 20]).unsqueeze(0)  # p_1 ~ ball
    return z, box.view(1, 1, n, n, n), ball


def test_box_projection_3d_tight_ball_is_minimal():
    z, box, _ = _ball_case()
    # the ball touches every slice of its bounding cube -> profile loss ~ 0
    assert BoxProjectionLoss()(z, box).item() < 1e-6
    # the 2D shadows of a ball are discs, not the cube's squares -> "shadow" penalises it
    assert BoxProjectionLoss(projection="shadow")(z, box).item() > 0.05
    # a prediction filling only half the box is penalised, and descent improves it
    half = z.clone()
    half[:, 1] = 3 * z[:, 1].sign()  # p_1 = 0.95 / 0.05: not saturated
    half[:, 1, 4:] = -3
    loss, g = _grad(lambda x: BoxProjectionLoss()(x, box), half)
    assert loss.item() > 0.1
    assert BoxProjectionLoss()(half - 0.5 * g / g.abs().max(), box).item() < loss.item()


def test_box_projection_validity_and_mixed_batch():
    z, box, _ = _ball_case(n=7, r=2.0)
    z = torch.cat([z, torch.randn_like(z)])  # sample 1 without boxes
    box = torch.cat([box, torch.zeros_like(box)])
    fn = lambda x: BoxProjectionLoss()(x, box)
    l1, _ = _grad(fn, z)
    z2 = z.clone()
    z2[1] = 1e4 * torch.randn_like(z2[1])
    l2, g2 = _grad(fn, z2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6) and g2[1].abs().max() == 0
    assert l1.item() == pytest.approx(BoxProjectionLoss()(z[:1], box[:1]).item(), rel=1e-6)
    # no valid pair -> 0 with zero grad
    l0, g0 = _grad(lambda x: BoxProjectionLoss()(x, box, valid=torch.zeros(2, 1, dtype=torch.bool)), z)
    assert l0.item() == 0 and g0.abs().max() == 0


# ===================================================================== BoxPresenceLoss
def test_box_presence_hand_values_gradient_and_masking_2d():
    # C = 3; class 1 (channel 0 of the box mask) has a box over the first two voxels of a 1x3 row
    # voxel 0: logits (0, 0, 0)      -> p_1 = 1/3
    # voxel 1: logits (0, ln 3, 0)   -> p_1 = 3/5   (the best voxel in the box)
    # voxel 2: logits (0, 10, 0)     -> outside the box: must not count although p_1 ~ 1
    # loss = -log(3/5) = 0.510826; class 2 has no box -> not a pair
    z = torch.stack([_t(0, 0, 0), _t(0, math.log(3), 10), _t(0, 0, 0)]).view(1, 3, 1, 3)
    box = torch.zeros(1, 2, 1, 3)
    box[0, 0, 0, :2] = 1
    loss, g = _grad(lambda x: BoxPresenceLoss()(x, box), z)
    assert loss.item() == pytest.approx(-math.log(3 / 5), rel=1e-6)
    # gradient only at the arg-max voxel in the box, raising class 1 there (descent: g < 0)
    assert g[0, 1, 0, 1] < 0 and g[0, :, 0, 0].abs().max() == 0 and g[0, :, 0, 2].abs().max() == 0
    # an object present in the box -> ~0; a box pair excluded by ``valid`` -> exactly 0, no gradient
    z_ok = z.clone()
    z_ok[0, 1, 0, 0] = 30
    assert BoxPresenceLoss()(z_ok, box).item() < 1e-6
    l0, g0 = _grad(lambda x: BoxPresenceLoss()(x, box, valid=torch.zeros(1, 2, dtype=torch.bool)), z)
    assert l0.item() == 0 and g0.abs().max() == 0


def test_box_presence_3d_mixed_batch_mean_over_pairs():
    # sample 0: class 1 box with best p_1 = 1/2 (logits (0, 0)); sample 1: no box -> ignored.
    z = torch.zeros(2, 2, 2, 2, 2)
    z[1] = 1e4 * torch.randn(2, 2, 2, 2)
    box = torch.zeros(2, 1, 2, 2, 2)
    box[0, 0, 0] = 1
    loss, g = _grad(lambda x: BoxPresenceLoss()(x, box), z)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert g[1].abs().max() == 0
    with pytest.raises(ValueError, match="box_masks"):
        BoxPresenceLoss()(z, box[:, :, :1])


# ========================================================================= BoxFillLoss
def test_box_fill_hand_values_and_gradient_2d():
    # C = 2, one 1x4 row; class 1's box covers voxels 0-1. Logits (0, ln(1/9)) -> p_1 = 0.1 in the box
    # (voxels outside: p_1 ~ 1, must not count). fill = 0.1; bounds (0.2, 0.6): ((0.2 - 0.1) / 0.2)^2 = 0.25
    z = torch.zeros(1, 2, 1, 4)
    z[0, 1, 0, :2] = math.log(1 / 9)
    z[0, 1, 0, 2:] = 20.0
    box = torch.zeros(1, 1, 1, 4)
    box[0, 0, 0, :2] = 1
    loss, g = _grad(lambda x: BoxFillLoss(0.2, 0.6)(x, box), z)
    assert loss.item() == pytest.approx(0.25, rel=1e-5)
    # d loss / d p_1(x) = -2 (0.2 - 0.1) / 0.2^2 / 2 voxels = -2.5; d p_1 / d z_1 = p (1 - p) = 0.09
    assert g[0, 1, 0, 0].item() == pytest.approx(-2.5 * 0.09, rel=1e-4)
    assert g[0, 0, 0, 0].item() == pytest.approx(2.5 * 0.09, rel=1e-4)
    assert g[0, :, 0, 2:].abs().max() == 0  # outside the box: no gradient
    # inside the bounds: exactly 0; above the upper bound: ((0.9 - 0.6) / 0.4)^2
    z_in = torch.zeros(1, 2, 1, 4)
    assert BoxFillLoss(0.2, 0.6)(z_in, box).item() == 0
    z_hi = torch.zeros(1, 2, 1, 4)
    z_hi[0, 1] = math.log(9)
    assert BoxFillLoss(0.2, 0.6)(z_hi, box).item() == pytest.approx((0.3 / 0.4) ** 2, rel=1e-5)
    assert BoxFillLoss(0.2, 1.0)(z_hi, box).item() == 0  # upper side off
    with pytest.raises(ValueError, match="lower"):
        BoxFillLoss(0.6, 0.2)


def test_box_fill_pools_over_the_batch_per_class_3d():
    # class 1: sample 0 box of 2 voxels with p_1 = 0, sample 1 box of 2 voxels with p_1 = 1/2:
    # pooled fill = (0 + 1) / 4 = 0.25 -> inside (0.2, 0.6) -> 0 although sample 0 alone is empty.
    # class 2: one box of 2 voxels in sample 0 with p_2 = 0 -> (0.2 / 0.2)^2 = 1. Mean over classes = 0.5.
    z = torch.zeros(2, 3, 2, 1, 1)
    z[0, 0] = 50.0  # sample 0: background certain
    z[1, 2] = -50.0  # sample 1: p_0 = p_1 = 1/2
    box = torch.zeros(2, 2, 2, 1, 1)
    box[:, 0] = 1
    box[0, 1] = 1
    loss, _ = _grad(lambda x: BoxFillLoss(0.2, 0.6)(x, box), z)
    assert loss.item() == pytest.approx(0.5, rel=1e-5)
    # ``valid`` drops sample 1's class-1 pair: class 1 pooled fill 0 -> 1, mean 1
    valid = torch.tensor([[True, True], [False, True]])
    assert BoxFillLoss(0.2, 0.6)(z, box, valid).item() == pytest.approx(1.0, rel=1e-5)
    # no valid pair: exactly 0, no gradient
    l0, g0 = _grad(lambda x: BoxFillLoss()(x, box, torch.zeros(2, 2, dtype=torch.bool)), z)
    assert l0.item() == 0 and g0.abs().max() == 0


# ======================================================================= EntropyLoss
def test_entropy_hand_values():
    # p = (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335; / ln 2 = 0.811278
    z = _t(0.0, math.log(3)).view(1, 2, 1, 1)
    assert EntropyLoss()(z).item() == pytest.approx(0.811278, rel=1e-5)
    assert EntropyLoss()(torch.zeros(2, 4, 3, 3, 3)).item() == pytest.approx(1.0, rel=1e-6)  # uniform
    onehot = torch.tensor([1e4, -1e4, -1e4]).view(1, 3, 1, 1)
    loss, g = _grad(EntropyLoss(), onehot)
    assert loss.item() == 0 and torch.isfinite(g).all()
    r = EntropyLoss()(_logits(2, 3, 4, 4, scale=5.0)).item()
    assert 0 <= r <= 1


def test_entropy_gradient_sign_and_masks():
    z = _t(1.0, 0.0).view(1, 2, 1, 1)
    _, g = _grad(EntropyLoss(), z)
    assert g[0, 0] < 0 < g[0, 1]  # descent sharpens towards the leading class
    x = _logits(2, 3, 4, 4, seed=6).detach()
    vm = torch.zeros(2, 1, 4, 4)
    vm[:, :, :2] = 1
    sm = torch.tensor([1.0, 0.0])
    fn = lambda y: EntropyLoss()(y, sample_mask=sm, voxel_mask=vm)
    l1, g1 = _grad(fn, x)
    x2 = x.clone()
    x2[:, :, 2:] = 30 * torch.randn(2, 3, 2, 4)
    x2[1] = 0
    l2, g2 = _grad(fn, x2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6) and torch.allclose(g1, g2)
    assert g1[:, :, 2:].abs().max() == 0 and g1[1].abs().max() == 0
    assert l1.item() == pytest.approx(EntropyLoss()(x[:1, :, :2]).item(), rel=1e-6)


# =================================================================== KLDistillationLoss
def test_kl_hand_values():
    # teacher z = (0, 0) -> (0.5, 0.5); student z = (0, ln3) -> (0.25, 0.75)
    # T = 1: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) = 0.143841
    s = _t(0.0, math.log(3)).view(1, 2, 1, 1)
    t = torch.zeros(1, 2, 1, 1)
    assert KLDistillationLoss()(s, t).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # T = 2: student (0, ln3/2) -> a = 1/(1+sqrt3) = 0.366025, b = 0.633975
    #   KL = 0.5 ln(0.5/a) + 0.5 ln(0.5/b) = 0.037252, times T^2 = 4 -> 0.149009
    a = 1 / (1 + math.sqrt(3))
    ref = 4 * (0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / (1 - a)))
    assert KLDistillationLoss(2.0)(s, t).item() == pytest.approx(ref, rel=1e-5)


def test_kl_teacher_detached_zero_at_agreement_and_gradient_sign():
    s = _logits(2, 3, 3, 3, seed=7)
    t = _logits(2, 3, 3, 3, seed=8)
    loss = KLDistillationLoss(2.0)(s, t)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert KLDistillationLoss(2.0)(t.detach(), t.detach()).item() == pytest.approx(0.0, abs=1e-6)
    # teacher prefers class 1, student uniform -> descent raises the student's class-1 logit
    _, g = _grad(lambda x: KLDistillationLoss()(x, _t(0.0, 3.0).view(1, 2, 1, 1)), torch.zeros(1, 2, 1, 1))
    assert g[0, 1] < 0 < g[0, 0]


def test_kl_masks_and_inf_teacher():
    s = _logits(2, 3, 4, 4, seed=9).detach()
    t = _logits(2, 3, 4, 4, seed=10).detach()
    vm = torch.zeros(2, 1, 4, 4)
    vm[:, :, 1:3, 1:3] = 1
    sm = torch.tensor([False, True])
    fn = lambda x: KLDistillationLoss()(x, t, sample_mask=sm, voxel_mask=vm)
    l1, g1 = _grad(fn, s)
    s2 = s.clone()
    s2[0] = 1e4
    s2[1, :, 0] = -1e4
    l2, g2 = _grad(fn, s2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6) and torch.allclose(g1, g2)
    assert g1[0].abs().max() == 0 and g1[1, :, 0].abs().max() == 0
    # teacher log-probs with -inf (constrained pseudo-labels) stay finite
    probs = constrain_pseudo_labels(torch.softmax(t, 1), torch.zeros(2, 2, 4, 4))  # all mass on bg
    loss, g = _grad(lambda x: KLDistillationLoss()(x, probs.log()), s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    ref = -torch.log_softmax(s, 1)[:, 0].mean()  # KL to a one-hot background = -log p_s(bg)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ================================================================ SoftDiceAgreementLoss
def test_soft_dice_agreement_hand_value_symmetric_both_grads():
    # T = 1, one sample, C = 2, 2 voxels. a: logits 0 -> p = 0.5 everywhere.
    # b: voxel 0 z = (0, ln3) -> (0.25, 0.75); voxel 1 z = (ln3, 0) -> (0.75, 0.25)
    # class 0: p = (.5, .5), q = (.25, .75): 2<p,q> = 1, |p|^2 + |q|^2 = 0.5 + 0.625 -> Dice 8/9
    # class 1: the mirror image -> 8/9.  Loss = 1 - 8/9 = 1/9
    a = torch.zeros(1, 2, 2, 1, requires_grad=True)
    b = torch.stack([_t(0, math.log(3)), _t(math.log(3), 0)]).view(1, 2, 2, 1).requires_grad_(True)
    fn = SoftDiceAgreementLoss(temperature=1.0, smooth=0.0)
    loss = fn(a, b)
    assert loss.item() == pytest.approx(1 / 9, rel=1e-5)
    assert fn(b, a).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert a.grad.abs().max() > 0 and b.grad.abs().max() > 0


def test_soft_dice_agreement_zero_at_agreement_masks_and_extremes():
    x = _logits(2, 3, 3, 3, 3, seed=11).detach()
    assert SoftDiceAgreementLoss()(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = _logits(2, 3, 3, 3, 3, seed=12).detach()
    sm = torch.tensor([1.0, 0.0])
    vm = torch.zeros(2, 1, 3, 3, 3)
    vm[:, :, :2] = 1
    fn = lambda v: SoftDiceAgreementLoss()(v, y, sample_mask=sm, voxel_mask=vm)
    l1, g1 = _grad(fn, x)
    x2 = x.clone()
    x2[:, :, 2] = 1e4
    x2[1] = -3.0
    l2, g2 = _grad(fn, x2)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6) and torch.allclose(g1, g2)
    assert g1[:, :, 2].abs().max() == 0 and g1[1].abs().max() == 0
    big = 1e4 * torch.sign(torch.randn(2, 3, 3, 3, 3))
    loss, g = _grad(lambda v: SoftDiceAgreementLoss()(v, -big), big)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    l0, g0 = _grad(lambda v: SoftDiceAgreementLoss()(v, y, sample_mask=torch.zeros(2)), x)
    assert l0.item() == 0 and g0.abs().max() == 0


# ============================================================================== ema_update
def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))


def test_ema_update_hand_checked():
    teacher, student = _net(), _net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        student[1].running_mean.fill_(5.0)
        student[1].num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2 for every parameter
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.2)) and p.grad is None
    for p in student.parameters():
        assert torch.equal(p, torch.full_like(p, 3.0))  # student untouched
    assert teacher[1].running_mean.item() == 5.0 and teacher[1].num_batches_tracked.item() == 7
    ema_update(teacher, student, 1.0)
    assert torch.allclose(teacher[0].weight, torch.tensor(1.2))
    ema_update(teacher, student, 0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(1, 1), _net(), 0.9)
    with pytest.raises(ValueError):
        ema_update(teacher, student, 1.5)


# ===================================================================== constrain_pseudo_labels
def test_constrain_pseudo_labels():
    # (0.2, 0.5, 0.3), class 1 forbidden -> (0.2, 0, 0.3) / 0.5 = (0.4, 0, 0.6)
    # (0, 0.6, 0.4), both forbidden      -> nothing left -> background gets 1
    # (0.1, 0.3, 0.6), both allowed      -> unchanged
    probs = torch.stack([_t(0.2, 0.5, 0.3), _t(0, 0.6, 0.4), _t(0.1, 0.3, 0.6)], dim=1).view(1, 3, 3, 1)
    allowed = torch.stack([_t(0, 1), _t(0, 0), _t(1, 1)], dim=1).view(1, 2, 3, 1)
    out = constrain_pseudo_labels(probs, allowed)
    exp = torch.stack([_t(0.4, 0, 0.6), _t(1, 0, 0), _t(0.1, 0.3, 0.6)], dim=1).view(1, 3, 3, 1)
    assert torch.allclose(out, exp, atol=1e-6)
    p3 = torch.softmax(_logits(2, 4, 3, 3, 3, seed=13), 1)
    a3 = (torch.rand(2, 3, 3, 3, 3) > 0.5).float()
    o3 = constrain_pseudo_labels(p3, a3)
    assert torch.isfinite(o3).all() and torch.allclose(o3.sum(1), torch.ones(2, 3, 3, 3))
    assert (o3[:, 1:][a3 == 0] == 0).all()


# ========================================================== extremes / empty masks, all losses
def _all_losses(spatial: tuple[int, ...]):
    b, c = 2, 3
    allowed = torch.ones(b, c - 1, *spatial)
    allowed[0, 0] = 0
    box = torch.zeros(b, c - 1, *spatial)
    box[(0, 0, *[slice(0, 2)] * len(spatial))] = 1
    pos = torch.zeros(b, c, *spatial)
    pos[:, 0] = 1
    known = torch.ones(b, c, *spatial)
    other = _logits(b, c, *spatial, seed=21).detach()
    return {
        "negative": (lambda z: CertainNegativeLoss()(z, allowed),
                     lambda z: CertainNegativeLoss()(z, torch.ones_like(allowed))),
        "ml_ds": (lambda z: MultiLabelDeepSupervisionLoss(use_soft_dice=True)([z], [(pos, known)]),
                  lambda z: MultiLabelDeepSupervisionLoss(use_soft_dice=True)([z], [(pos, 0 * known)])),
        "box": (lambda z: BoxProjectionLoss()(z, box), lambda z: BoxProjectionLoss()(z, 0 * box)),
        "box_presence": (lambda z: BoxPresenceLoss()(z, box), lambda z: BoxPresenceLoss()(z, 0 * box)),
        "box_fill": (lambda z: BoxFillLoss()(z, box), lambda z: BoxFillLoss()(z, 0 * box)),
        "entropy": (lambda z: EntropyLoss()(z), lambda z: EntropyLoss()(z, voxel_mask=torch.zeros(b, 1, *spatial))),
        "kl": (lambda z: KLDistillationLoss(2.0)(z, other), lambda z: KLDistillationLoss()(z, other, sample_mask=torch.zeros(b))),
        "dice_agree": (lambda z: SoftDiceAgreementLoss()(z, other),
                       lambda z: SoftDiceAgreementLoss()(z, other, sample_mask=torch.zeros(b))),
    }


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 2)])
@pytest.mark.parametrize("name", ["negative", "ml_ds", "box", "box_presence", "box_fill", "entropy", "kl",
                                  "dice_agree"])
def test_extreme_logits_and_empty_masks(name, spatial):
    fn, empty_fn = _all_losses(spatial)[name]
    g = torch.Generator().manual_seed(14)
    big = 1e4 * torch.sign(torch.randn(2, 3, *spatial, generator=g))
    for z in (big, -big, torch.full_like(big, 1e4)):
        loss, grad = _grad(fn, z)
        assert loss.dtype == torch.float32 and loss.ndim == 0
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
    loss, grad = _grad(empty_fn, big)
    assert loss.item() == 0 and grad.abs().max() == 0


@pytest.mark.parametrize("name", ["negative", "ml_ds", "box", "box_presence", "box_fill", "entropy", "kl",
                                  "dice_agree"])
def test_autocast_bf16_matches_fp32(name):
    spatial = (4, 4, 4)
    fn, _ = _all_losses(spatial)[name]
    conv = nn.Conv3d(2, 3, 1)
    x = torch.randn(2, 2, *spatial, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        ref32 = fn(conv(x) * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = conv(x) * 3
        assert z.dtype == torch.bfloat16  # autocast is really active
        out = fn(z)
    assert out.dtype == torch.float32
    # internal maths in fp32: identical to fp32 maths on the bf16-rounded logits ...
    assert out.item() == pytest.approx(fn(z.float()).item(), rel=1e-5, abs=1e-6)
    # ... and close to the full fp32 pipeline (bf16 logits carry ~3 significant digits)
    assert out.item() == pytest.approx(ref32.item(), rel=3e-2, abs=3e-3)
