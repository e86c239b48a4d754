"""``nnunet-mixsup weak-label-audit``: weak-label maps in raw numpy order, the constrained arg-max, hand values.
The run on a trained benchmark work directory is part of tests/test_benchmark.py's end-to-end test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_mixsup.cli import main
from nnunet_mixsup.evaluation import compute_case_metrics
from nnunet_mixsup.lab.audit import AuditError, allowed_classes, audit_case, dice, summary_markdown
from nnunet_mixsup.manifest import Box, CaseSupervision


def test_allowed_classes_box_in_itk_order_3d():
    # ITK index (x, y, z): x in [1, 3), y in [0, 2), z in [2, 3) -> numpy [z, y, x]
    sup = CaseSupervision("c", "box", boxes=(Box(2, (1, 0, 2), (3, 2, 3)),))
    a = allowed_classes(sup, (4, 3, 5), 3)
    assert a.shape == (3, 4, 3, 5) and a[0].all()
    assert not a[1].any()  # class 1 has no box: absent
    expected = np.zeros((4, 3, 5), bool)
    expected[2:3, 0:2, 1:3] = True
    assert np.array_equal(a[2], expected)


def test_allowed_classes_tags_none_and_2d_boxes():
    assert np.array_equal(allowed_classes(CaseSupervision("c", "tags", present=(2,)), (2, 2), 3)[:, 0, 0],
                          [True, False, True])
    assert allowed_classes(CaseSupervision("c", "none"), (2, 2), 3).all()
    two = allowed_classes(CaseSupervision("c", "box", boxes=(Box(1, (0, 1), (2, 2)), Box(1, (3, 0), (4, 1)))),
                          (2, 4), 2)
    assert np.array_equal(two[1], [[False, False, False, True], [True, True, False, False]])  # union of the boxes


def test_dice_hand_values_and_empty_convention():
    p, r = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
    assert dice(p, r, 1) == pytest.approx(2 / 3)
    assert dice(p, r, 2) == 1.0  # in neither map: a correct "absent", as in `nnunet-mixsup evaluate`
    assert dice(np.array([0, 0, 0, 2]), r, 2) == 0.0 and dice(p, np.array([0, 0, 0, 0]), 1) == 0.0


def test_dice_convention_is_the_evaluations():
    """The audit's Dice and `evaluate`'s Dice agree, classes absent from one or both maps included."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, size=(5, 6, 7))  # class 3 in neither map, 4 only in the prediction
    pred = rng.integers(0, 3, size=(5, 6, 7))
    pred[0, 0, :3] = 4
    ours = compute_case_metrics(ref, pred, [1, 2, 3, 4], (1.0, 1.0, 1.0))
    for c in (1, 2, 3, 4):
        assert dice(pred, ref, c) == pytest.approx(ours[c]["dice"])
    assert dice(pred, ref, 3) == 1.0 and dice(pred, ref, 4) == 0.0


def test_audit_case_class_absent_everywhere_scores_one_and_enters_the_mean():
    probs = np.array([[0.9, 0.2], [0.1, 0.8], [0.0, 0.0]])  # class 2 never predicted
    ref = np.array([0, 1])
    r = audit_case(probs, np.ones((3, 2), bool), ref, [1, 2])
    assert r["free"] == {1: 1.0, 2: 1.0}
    rows = [{"run": "lower", "type": "box", "view": v, "dice_1": 0.5, "dice_2": math.nan, "dice_mean": 0.5,
             "changed": 0.0} for v in ("free", "constrained")]
    assert "| nan |" in summary_markdown(rows)  # a NaN is shown, not silently skipped


def test_audit_case_constraint_removes_a_false_positive():
    # 1D "image" of 4 voxels, classes 0..2; class 2 predicted at voxel 3, but its box covers voxels 0-1 only
    probs = np.array([[0.2, 0.7, 0.2, 0.3],
                      [0.1, 0.2, 0.7, 0.1],
                      [0.7, 0.1, 0.1, 0.6]])
    ref = np.array([2, 0, 1, 1])
    allowed = np.ones((3, 4), bool)
    allowed[2, 2:] = False
    r = audit_case(probs, allowed, ref, [1, 2])
    # free: [2, 0, 1, 2] -> class 1: 2*1/(1+2), class 2: 2*1/(2+1)
    assert r["free"] == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}
    # constrained: voxel 3 falls back to its best allowed class 0 -> [2, 0, 1, 0]
    assert r["constrained"] == {1: pytest.approx(2 / 3), 2: pytest.approx(1.0)}
    assert r["changed"] == 0.25
    with pytest.raises(AuditError, match="shapes differ"):
        audit_case(probs, allowed[:, :3], ref, [1, 2])


def test_summary_markdown_reports_the_constraint_gain():
    rows = []
    for view, d in (("free", 0.5), ("constrained", 0.6)):
        rows.append({"run": "lower", "type": "box", "view": view, "dice_1": d, "dice_mean": d, "changed": 0.01})
    text = summary_markdown(rows)
    assert "| lower | all | 1 | constrained | 0.600 | 0.600 | +10.00 | 1.000 % |" in text
    assert "| lower | box | 1 | free | 0.500 | 0.500 |  |  |" in text


def test_cli_refuses_a_folder_that_is_not_a_benchmark(tmp_path, capsys):
    assert main(["weak-label-audit", "--workdir", str(tmp_path)]) == 1
    assert "not a benchmark result folder" in capsys.readouterr().err
