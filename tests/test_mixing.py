"""Student views (nnunet_mixsup.mixing): CutMix hand values, grid alignment, exactness at coarse scales; intensity perturbation."""
from __future__ import annotations

import pytest
import torch
from torch.nn.functional import interpolate

from nnunet_mixsup.mixing import _gaussian_blur, cutmix_pairs, mix, perturb_intensity


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_whole_patch_swaps_the_two_candidates_hand_values():
    x = torch.arange(3 * 16, dtype=torch.float32).view(3, 1, 4, 4)
    partner, cut = cutmix_pairs(torch.tensor([True, False, True]), (4, 4), (2, 2), area=(1.0, 1.0), generator=_gen())
    assert partner.tolist() == [2, 1, 0]
    assert cut[0].all() and cut[2].all() and not cut[1].any()
    y = mix(x, partner, cut)
    assert torch.equal(y[0], x[2]) and torch.equal(y[1], x[1]) and torch.equal(y[2], x[0])


def test_rectangle_size_and_grid_alignment_2d():
    cand = torch.ones(4, dtype=torch.bool)
    for seed in range(20):
        partner, cut = cutmix_pairs(cand, (8, 8), (2, 2), area=(0.25, 0.25), generator=_gen(seed))
        for i in range(4):
            assert partner[i] != i and cand[partner[i]]
            rows, cols = torch.nonzero(cut[i, 0], as_tuple=True)
            # share 0.25 -> side 0.5 of 4 cells = 2 cells = 4 voxels per axis, starting on an even voxel
            assert cut[i].sum() == 16 and rows.min() % 2 == 0 and cols.min() % 2 == 0
            assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3


def test_only_candidates_mix_and_donate():
    cand = torch.tensor([False, True, False, True, True, False])
    for seed in range(20):
        partner, cut = cutmix_pairs(cand, (8, 6), (2, 2), generator=_gen(seed))
        for i in range(6):
            if cand[i]:
                assert partner[i] != i and cand[partner[i]] and cut[i].any()
            else:
                assert partner[i] == i and not cut[i].any()


@pytest.mark.parametrize("cand,prob", [([True, False, False], 1.0), ([False, False], 1.0), ([True, True], 0.0)])
def test_nothing_mixed_without_two_candidates_or_with_prob_zero(cand, prob):
    x = torch.randn(len(cand), 2, 4, 4)
    partner, cut = cutmix_pairs(torch.tensor(cand), (4, 4), (2, 2), prob=prob, generator=_gen())
    assert not cut.any() and torch.equal(mix(x, partner, cut), x)


def test_prob_mixes_about_that_share():
    cand = torch.ones(8, dtype=torch.bool)
    mixed = sum(int(cutmix_pairs(cand, (8, 8), (2, 2), prob=0.5, generator=_gen(s))[1].flatten(1).any(1).sum())
                for s in range(50))
    assert 120 < mixed < 280  # 200 expected of 400


@pytest.mark.parametrize("spatial,cell", [((16, 24), (8, 8)), ((4, 16, 12), (1, 4, 4)), ((8, 8, 8), (4, 2, 2))])
def test_mixing_commutes_with_nnunet_target_downsampling(spatial, cell):
    """mix(downsample(t)) == downsample(mix(t)) for nnU-Net's nearest-exact target downsampling (2D, 3D, anisotropic)."""
    g = _gen(3)
    seg = torch.randint(0, 4, (5, 1, *spatial), generator=g).float()
    cand = torch.tensor([True, True, False, True, True])
    for seed in range(10):
        partner, cut = cutmix_pairs(cand, spatial, cell, generator=_gen(seed))
        for factor in (1, 2):
            shape = [s // (c if factor == 2 else 1) for s, c in zip(spatial, cell)]
            down = interpolate(seg, shape, mode="nearest-exact")
            assert torch.equal(mix(down, partner, cut), interpolate(mix(seg, partner, cut), shape, mode="nearest-exact"))


def test_mix_keeps_dtype_and_takes_partner_values_inside_the_rectangle():
    seg = torch.randint(0, 3, (3, 1, 6, 6), dtype=torch.int16)
    partner, cut = cutmix_pairs(torch.ones(3, dtype=torch.bool), (6, 6), (3, 3), generator=_gen(1))
    y = mix(seg, partner, cut)
    assert y.dtype == torch.int16
    for i in range(3):
        assert torch.equal(y[i][cut[i]], seg[partner[i]][cut[i]]) and torch.equal(y[i][~cut[i]], seg[i][~cut[i]])


def test_bad_arguments_are_refused():
    c = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="divide"):
        cutmix_pairs(c, (10, 8), (4, 4))
    with pytest.raises(ValueError, match="2 or 3"):
        cutmix_pairs(c, (8,), (2,))
    with pytest.raises(ValueError, match="area"):
        cutmix_pairs(c, (8, 8), (2, 2), area=(0.6, 0.3))
    with pytest.raises(ValueError, match="bool"):
        cutmix_pairs(torch.ones(2), (8, 8), (2, 2))


# ----------------------------------------------------------------------------- perturb_intensity


@pytest.mark.parametrize("shape", [(3, 2, 12, 10), (3, 1, 6, 8, 10)])
def test_perturb_intensity_changes_selected_rows_only(shape):
    x = torch.randn(shape)
    rows = torch.tensor([True, False, True])
    y = perturb_intensity(x, rows, prob=1.0, generator=_gen(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[1], x[1])  # bit for bit
    assert not torch.allclose(y[0], x[0]) and not torch.allclose(y[2], x[2])
    assert torch.isfinite(y).all()
    assert torch.equal(perturb_intensity(x, torch.zeros(3, dtype=torch.bool)), x)


def test_perturb_intensity_is_the_identity_with_degenerate_ranges():
    x = torch.randn(2, 1, 8, 8)
    y = perturb_intensity(x, torch.ones(2, dtype=torch.bool), prob=1.0, brightness=(1, 1), contrast=(1, 1),
                          gamma=(1, 1), blur_sigma=(0.5, 0.5), noise_std=(0, 0), generator=_gen())
    # only the blur (probability 1/2 per sample) can act; blurred rows are smoother, unblurred ones equal
    for i in range(2):
        if not torch.allclose(y[i], x[i]):
            assert y[i].diff(dim=-1).abs().mean() < x[i].diff(dim=-1).abs().mean()


def test_perturb_intensity_hand_values_brightness_and_contrast():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2)
    one = torch.ones(1, dtype=torch.bool)
    kw = {"prob": 1.0, "gamma": (1, 1), "noise_std": (0, 0), "blur_sigma": (1e-3, 1e-3)}
    y = perturb_intensity(x, one, brightness=(2, 2), contrast=(1, 1), **kw)
    assert torch.allclose(y, 2 * x, atol=1e-5)  # brightness only: x * 2 (blur at sigma 1e-3 is the identity)
    y = perturb_intensity(x, one, brightness=(1, 1), contrast=(0.5, 0.5), **kw)
    assert torch.allclose(y, (x - 1.5) * 0.5 + 1.5, atol=1e-5)  # around the mean 1.5


def test_perturb_intensity_gamma_keeps_mean_and_sd_and_order():
    x = torch.randn(1, 1, 16, 16)
    y = perturb_intensity(x, torch.ones(1, dtype=torch.bool), prob=1.0, brightness=(1, 1), contrast=(1, 1),
                          gamma=(2, 2), noise_std=(0, 0), blur_sigma=(1e-3, 1e-3))
    assert torch.allclose(y.mean(), x.mean(), atol=1e-5) and torch.allclose(y.std(), x.std(), atol=1e-5)
    assert torch.equal(y.flatten().argsort(), x.flatten().argsort())  # monotone: voxel order kept
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("nd", [2, 3])
def test_gaussian_blur_hand_values_and_constants(nd):
    const = torch.full((2, 1) + (7,) * nd, 3.0)
    assert torch.allclose(_gaussian_blur(const, torch.tensor([0.5, 1.0])), const)
    impulse = torch.zeros((1, 1) + (7,) * nd)
    impulse[(0, 0) + (3,) * nd] = 1.0
    out = _gaussian_blur(impulse, torch.tensor([1.0]))
    assert torch.allclose(out.sum(), torch.tensor(1.0), atol=1e-5)  # mass kept away from the border
    w = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    w = w / w.sum()  # radius ceil(3 sigma) = 3: the 1D kernel, applied per axis
    assert torch.allclose(out[(0, 0) + (3,) * nd], w[3] ** nd, atol=1e-6)
    assert torch.allclose(out[(0, 0) + (3,) * (nd - 1) + (4,)], w[3] ** (nd - 1) * w[4], atol=1e-6)


def test_perturb_intensity_rejects_bad_shapes():
    with pytest.raises(ValueError, match="spatial axes"):
        perturb_intensity(torch.zeros(2, 8), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        perturb_intensity(torch.zeros(2, 1, 4, 4), torch.ones(3, dtype=torch.bool))
