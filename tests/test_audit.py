"""``nnunet-mixsup weak-label-audit``: weak-label maps in raw numpy order, the constrained arg-max, hand values.
The run on a trained benchmark work directory is part of tests/test_benchmark.py's end-to-end test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_mixsup.audit import AuditError, allowed_classes, audit_case, dice, summary_markdown
from nnunet_mixsup.cli import main
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
    assert math.isnan(dice(p, r, 2))  # in neither map


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
