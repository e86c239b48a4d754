"""SelfTrainingSchedule and the teacher's pseudo labels for classes it is not trusted with (no nnU-Net dataset)."""
from __future__ import annotations

import pytest
import torch

from nnunet_mixsup.trainers.mixsup import SelfTrainingSchedule, teacher_pseudo_labels

IGN = 3


def test_all_class_start_waits_for_every_class():
    s = SelfTrainingSchedule(earliest=0.4, min_dice=0.5, rampup=0.2)
    hist = [[0.9, 0.2]] * 8 + [[0.9, 0.6]] * 2
    assert s.start_epoch(hist, 8, 10) is None
    assert s.ready_classes(hist, 8, 10, 2) == [False, False]
    assert s.start_epoch(hist, 9, 10) == 9 and s.ready_classes(hist, 9, 10, 2) == [True, True]
    # a class absent from every mask case (validation Dice always NaN) does not hold the start back,
    # but the teacher never labels it
    nan = [[0.9, float("nan")]] * 10
    assert s.start_epoch(nan, 9, 10) == 4 and s.ready_classes(nan, 9, 10, 2) == [True, False]


def test_per_class_start_at_earliest_and_classes_ready_one_by_one():
    s = SelfTrainingSchedule(earliest=0.4, min_dice=0.5, rampup=0.2, per_class=True)
    hist = [[0.9, 0.2]] * 6 + [[0.9, 0.7]] + [[0.9, 0.3]] * 3
    assert s.start_epoch(hist, 3, 10) is None and s.ready_classes(hist, 3, 10, 2) == [False, False]
    assert s.start_epoch(hist, 4, 10) == 4  # whatever the Dice says
    assert s.ready_classes(hist, 4, 10, 2) == [True, False]
    assert s.ready_classes(hist, 7, 10, 2) == [True, True]  # epoch 6 logged 0.7 for class 2
    assert s.ready_classes(hist, 9, 10, 2) == [True, True]  # and stays ready after a dip
    assert s.ramp(hist, 4, 10) == pytest.approx(0.5)
    nan = [[0.9, float("nan")]] * 10  # class 2 never in the validation patches: never trusted to the teacher
    assert s.ready_classes(nan, 9, 10, 2) == [True, False]
    msg = s.report([[0.9, 0.2]] * 10, 9, 10, ["a", "b"])
    assert "from epoch 4" in msg and "never labelled b" in msg
    assert s.ready_epochs(hist, 3, 10, 2) == [None, None]
    assert s.ready_epochs(hist, 9, 10, 2) == [4, 7]  # class 1 at the start, class 2 the epoch after its 0.7
    assert s.ready_epochs(nan, 9, 10, 2) == [4, None]


def test_ready_epochs_without_per_class_wait_for_the_start_and_a_first_score():
    s = SelfTrainingSchedule(earliest=0.4, min_dice=0.5, rampup=0.2)
    nan = float("nan")
    hist = [[0.9, nan]] * 5 + [[0.9, 0.6]] * 5  # class 2 first scored at epoch 5, start at 4
    assert s.ready_epochs(hist, 3, 10, 2) == [None, None]
    assert s.ready_epochs(hist, 5, 10, 2) == [4, None]
    assert s.ready_epochs(hist, 9, 10, 2) == [4, 6]
    assert s.ready_classes(hist, 9, 10, 2) == [True, True]


class _Const(torch.nn.Module):
    """A 'teacher' that predicts class 0 (background) everywhere with high confidence."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 0] = 10.0
        return logits


@pytest.mark.parametrize("dim", [2, 3])
def test_unsure_classes_keep_their_open_voxels_unknown(dim):
    shape = (6,) * dim
    data = torch.zeros(2, 1, *shape)
    seg0 = torch.full((2, 1, *shape), IGN)
    seg0[0, 0, 0] = 1  # a real label is kept
    allowed = torch.zeros(2, 2, *shape)
    allowed[:, 1, 2:4] = 1  # class 2 may be present in a slab (its box), class 1 nowhere
    rows = torch.tensor([True, False])
    free = teacher_pseudo_labels(_Const(), data, seg0, allowed, rows, IGN, 0.5)
    assert (free[0, 0, 1:] == 0).all()  # the confident teacher says background everywhere it is asked
    held = teacher_pseudo_labels(_Const(), data, seg0, allowed, rows, IGN, 0.5, unsure=torch.tensor([False, True]))
    assert (held[0, 0, 2:4] == IGN).all()  # inside class 2's box: stays unknown
    assert (held[0, 0, 4:] == 0).all() and (held[0, 0, 1] == 0).all()  # elsewhere: background as before
    assert (held[0, 0, 0] == 1).all()  # real labels untouched
    assert torch.equal(held[1], seg0[1])  # unselected rows untouched


class _Class2InItsBox(torch.nn.Module):
    """A 'teacher' sure of class 2 on the first half of the first axis, of background elsewhere."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 0] = 10.0
        logits[:, 2, :3] = 20.0
        return logits


@pytest.mark.parametrize("dim", [2, 3])
def test_unsure_class_keeps_confident_positives_inside_its_box(dim):
    shape = (6,) * dim
    data = torch.zeros(1, 1, *shape)
    seg0 = torch.full((1, 1, *shape), IGN)
    allowed = torch.zeros(1, 2, *shape)
    allowed[:, 1, 2:4] = 1  # class 2's box: rows 2-3; the teacher says class 2 on rows 0-2
    rows = torch.tensor([True])
    unsure = torch.tensor([False, True])
    held = teacher_pseudo_labels(_Class2InItsBox(), data, seg0, allowed, rows, IGN, 0.5, unsure=unsure)
    assert (held[0, 0, 2:4] == IGN).all()  # default: the whole box stays unknown
    kept = teacher_pseudo_labels(_Class2InItsBox(), data, seg0, allowed, rows, IGN, 0.5, unsure=unsure,
                                 keep_unsure_positives=True)
    assert (kept[0, 0, 2] == 2).all()  # inside the box, where the teacher says class 2: a positive
    assert (kept[0, 0, 3] == IGN).all()  # inside the box, background by the teacher: still unknown
    assert (kept[0, 0, :2] == 0).all()  # outside the box class 2 is impossible: background
    assert (kept[0, 0, 4:] == 0).all()


@pytest.mark.parametrize("dim", [2, 3])
def test_without_classes_removes_them_from_the_softmax(dim):
    from nnunet_mixsup.losses import KnownVoxelCrossEntropyLoss
    from nnunet_mixsup.trainers.mixsup import without_classes

    z = torch.randn(2, 4, *(3,) * dim, requires_grad=True)
    off = torch.tensor([False, True, False])  # class 2 out
    masked = without_classes(z, off)
    p = torch.softmax(masked.float(), 1)
    assert p[:, 2].max() == 0
    ref = torch.softmax(z[:, [0, 1, 3]].detach(), 1)  # softmax over the remaining classes
    assert torch.allclose(p[:, [0, 1, 3]], ref, atol=1e-6)
    target = torch.zeros(2, 1, *(3,) * dim)  # known background everywhere
    KnownVoxelCrossEntropyLoss(IGN)(masked, target).backward()
    assert z.grad[:, 2].abs().max() == 0 and z.grad[:, 1].abs().max() > 0
    assert without_classes(z, torch.zeros(3, dtype=torch.bool)) is z and without_classes(z, None) is z
    half = without_classes(z.detach().half(), off)
    assert torch.isfinite(half).all() and half.dtype == torch.float16


def test_first_epochs_reaching_acts_one_epoch_after_the_log_and_ignores_nan():
    from nnunet_mixsup.trainers.mixsup import first_epochs_reaching

    nan = float("nan")
    hist = [[0.1, nan, 0.0], [0.25, nan, 0.19], [0.1, nan, 0.2]]
    assert first_epochs_reaching(hist, 0.2, 3) == [2, None, 3]  # class 1 dropping again stays on
    assert first_epochs_reaching([], 0.2, 2) == [None, None]
    assert first_epochs_reaching([[0.5]], 0.2, 2) == [1, None]  # a short row (fewer classes logged)


def test_classes_lost_names_a_class_that_collapsed_after_it_was_learned():
    from nnunet_mixsup.trainers.mixsup import classes_lost

    nan = float("nan")
    hist = [[0.0, 0.0, nan]] * 3 + [[0.8, 0.3, nan]] * 5 + [[0.7, 0.3, nan]] * 2 + [[0.0, 0.3, nan]] * 5
    assert classes_lost(hist, learned=0.5) == [(0, 0.8, 3, 0.0)]  # class 1 never reached 0.5; class 2 absent
    assert classes_lost(hist[:-3], learned=0.5) == []  # last 5: 0.8 0.7 0.7 0 0 -> 0.44 >= 0.2 x 0.8
    assert classes_lost(hist, learned=0.9) == []  # never learned by that bar
    assert classes_lost([], learned=0.5) == []
