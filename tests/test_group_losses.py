"""nnU-Net's loss on a subset of the batch rows equals nnU-Net's loss on that sub-batch (value and gradient).

With per-sample Dice (``batch_dice=False``, nnU-Net's 3d_fullres without 3d_lowres) an all-ignore
sample scores Dice 1 and enters the mean over samples; masking the other rows with the ignore label
(the approach before :func:`loss_on_rows`) halved the mask samples' Dice gradient in a 1 + 1 batch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_mixsup.trainers.mixsup import loss_on_rows

IGNORE = 4  # 4 classes (0..3) + ignore label


def _nnunet_loss(batch_dice: bool, n_scales: int) -> torch.nn.Module:
    """nnU-Net 2.8.1's loss exactly as ``nnUNetTrainer._build_loss`` builds it (ignore label, single process)."""
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=IGNORE, dice_class=MemoryEfficientSoftDiceLoss)
    if n_scales == 1:
        return loss
    w = np.array([1 / (2 ** i) for i in range(n_scales)])
    w[-1] = 0
    return DeepSupervisionWrapper(loss, w / w.sum())


def _batch(dim: int, b: int, seed: int, pools: list[tuple[int, ...]]):
    """Outputs and targets over deep-supervision scales; ``pools``: cumulative pooling per scale (anisotropic)."""
    g = torch.Generator().manual_seed(seed)
    full = (8, 12, 16)[-dim:]
    outs, tgts = [], []
    for p in pools:
        shape = [s // k for s, k in zip(full, p)]
        outs.append(torch.randn(b, 4, *shape, generator=g, requires_grad=True))
        t = torch.randint(0, 4, (b, 1, *shape), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.2] = IGNORE  # partly unknown, as in derived label maps
        tgts.append(t)
    return outs, tgts


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("dim,pools", [
    (2, [(1, 1), (2, 2), (4, 4)]),
    (3, [(1, 1, 1), (1, 2, 2), (2, 4, 4)]),  # anisotropic pooling, as nnU-Net plans for thick slices
])
@pytest.mark.parametrize("rows", [[True, False], [True, False, True, False], [False, True, True]])
def test_loss_on_rows_equals_the_sub_batch_value_and_gradient(batch_dice, dim, pools, rows):
    rows = torch.tensor(rows)
    loss = _nnunet_loss(batch_dice, len(pools))
    outs, tgts = _batch(dim, len(rows), 0, pools)
    got = loss_on_rows(loss, outs, tgts, rows, IGNORE)
    got.backward()
    grads = [torch.zeros_like(o) if o.grad is None else o.grad.clone() for o in outs]
    sub_outs = [o.detach()[rows].clone().requires_grad_(True) for o in outs]
    want = loss(sub_outs, [t[rows] for t in tgts])
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    for scale, (g, s) in enumerate(zip(grads, sub_outs)):  # every scale, including the unweighted lowest
        sg = torch.zeros_like(s) if s.grad is None else s.grad  # weight 0 (lowest scale): no gradient
        torch.testing.assert_close(g[rows], sg, rtol=1e-5, atol=1e-7, msg=f"scale {scale}")
        assert float(g[~rows].abs().max()) == 0.0  # the other rows get no gradient from this term


@pytest.mark.parametrize("batch_dice", [True, False])
def test_loss_on_rows_single_output_and_no_selected_row(batch_dice):
    loss = _nnunet_loss(batch_dice, 1)
    outs, tgts = _batch(3, 3, 1, [(1, 1, 1)])
    rows = torch.tensor([False, True, False])
    got = loss_on_rows(loss, outs[0], tgts[0], rows, IGNORE)
    assert float(got.detach()) == pytest.approx(float(loss(outs[0][rows], tgts[0][rows]).detach()), rel=1e-5)
    none = loss_on_rows(loss, outs[0], tgts[0], torch.zeros(3, dtype=torch.bool), IGNORE)
    none.backward()  # connected to the graph (DDP), constant
    assert float(outs[0].grad.abs().max()) == 0.0


def test_masking_with_the_ignore_label_is_wrong_for_per_sample_dice():
    """The reproduction behind the fix: a 1 mask + 1 all-ignore batch halves the Dice gradient."""
    loss = _nnunet_loss(False, 1)
    outs, tgts = _batch(3, 2, 2, [(1, 1, 1)])
    rows = torch.tensor([True, False])
    masked = torch.where(rows.view(-1, 1, 1, 1, 1), tgts[0], torch.full_like(tgts[0], IGNORE))
    old = loss(outs[0], masked)
    new = loss_on_rows(loss, outs[0], tgts[0], rows, IGNORE)
    assert float(old) != pytest.approx(float(new), rel=1e-3)
    dice_only = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                               weight_ce=0, weight_dice=1, ignore_label=IGNORE, dice_class=MemoryEfficientSoftDiceLoss)
    g_old = torch.autograd.grad(dice_only(outs[0], masked), outs[0])[0][0]
    g_new = torch.autograd.grad(loss_on_rows(dice_only, outs[0], tgts[0], rows, IGNORE), outs[0])[0][0]
    assert float(g_old.norm() / g_new.norm()) == pytest.approx(0.5, rel=1e-4)
