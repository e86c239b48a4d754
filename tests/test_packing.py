"""Packed targets survive nnU-Net's float32 resampling exactly, for every label range and class count.

nnU-Net's spatial augmentation handles a segmentation channel as float32 values, which hold every
integer of magnitude up to 2^24 and nothing beyond exactly. Labels are int16 in nnU-Net's
preprocessed data (at most 32767), the ignore label is the highest label.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnunet_mixsup.data import pack_allowed, pack_targets, unpack_targets

NNUNET_MAX_LABEL = np.iinfo(np.int16).max  # preprocessed segmentations are int16


def _through_float32(packed: np.ndarray) -> torch.Tensor:
    """What nnU-Net's transforms do to the values: float32 and back to an integer tensor."""
    return torch.from_numpy(packed.astype(np.float32)).round().to(torch.int64)


def _round_trip(seg: np.ndarray, allowed: np.ndarray, k: int, **kw) -> torch.Tensor:
    return unpack_targets(_through_float32(pack_targets(seg, pack_allowed(allowed), k, **kw)), k)


def test_ignore_label_255_with_17_classes_is_exact():
    """The value from the issue: label 255, all 17 bits but the second set (33423365 in the joint channel)."""
    k = 17
    seg = np.array([[[255, 0]]], dtype=np.int16)
    allowed = np.zeros((k, 1, 2), dtype=np.int16)
    allowed[[0, 2], 0, 0] = 1
    allowed[:, 0, 1] = 1
    back = _round_trip(seg, allowed, k)
    assert back[0].tolist() == [[255, 0]]
    assert torch.equal(back[1:], torch.from_numpy(allowed))


def test_max_label_given_by_the_loader_is_an_upper_bound():
    """Labels present fit one joint channel, the max label passed (32767 << 10 > 2^24) does not: the
    separate layout is used, and unpacks to the same targets."""
    k = 10
    seg = np.array([[[1, 0, -1]]], dtype=np.int16)
    allowed = np.ones((k, 1, 3), dtype=np.int16)
    assert pack_targets(seg, pack_allowed(allowed), k).shape[0] == 1  # fits: one joint channel
    wide = pack_targets(seg, pack_allowed(allowed), k, max_label=NNUNET_MAX_LABEL)
    assert wide.shape[0] == 2  # label map + one code channel
    back = unpack_targets(_through_float32(wide), k)
    assert back[0].tolist() == [[1, 0, -1]]
    assert back[1:, 0].tolist() == [[1, 1, 0]] * k  # nothing allowed where the label is -1


@st.composite
def _targets(draw):
    k = draw(st.integers(1, 48))
    top = draw(st.sampled_from([k, k + 1, 255, 256, 1000, 32766, NNUNET_MAX_LABEL])
               | st.integers(k, NNUNET_MAX_LABEL))  # the ignore label (or the largest label) is >= K
    shape = draw(st.sampled_from([(1, 3), (2, 2), (1, 2, 3)]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    labels = np.array([-1, 0, top, *rng.integers(0, top + 1, 4)])
    seg = rng.choice(labels, (1, *shape)).astype(np.int16)
    allowed = rng.integers(0, 2, (k, *shape)).astype(np.int16)
    allowed[:, 0] = 1  # every bit set somewhere: the largest codes occur
    seg.flat[0] = top
    pass_max = draw(st.booleans())
    return seg, allowed, k, (top if pass_max else None)


@settings(max_examples=300, deadline=None)
@given(_targets())
def test_pack_float32_unpack_is_identity(case):
    seg, allowed, k, max_label = case
    back = _round_trip(seg, allowed, k, **({} if max_label is None else {"max_label": max_label}))
    assert back.shape == (1 + k, *seg.shape[1:])
    assert torch.equal(back[0], torch.from_numpy(seg[0]))
    expected = allowed * (seg != -1)  # where the label is -1 nothing is allowed
    assert torch.equal(back[1:], torch.from_numpy(expected))
