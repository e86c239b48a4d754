"""Student views for consistency training - CutMix and intensity perturbation: plain torch, nothing of nnU-Net.

Self-training on the same view the teacher sees teaches the student little beyond the teacher's
own output. CutMix (French et al., BMVC 2020, "Semi-supervised semantic segmentation needs strong,
varied perturbations") gives the student a different view instead: a rectangle of one image
pasted into another. The teacher labels the unmixed images and the student must reproduce
those labels in the new context, rectangle by rectangle.

Exactness at every deep-supervision scale: the rectangles are aligned to a grid of ``cell``
voxels per axis (the network's total downsampling), so a target downsampled by nearest-neighbour
sampling and then mixed equals the mixed full-resolution target downsampled - which lets the
loader's ready-made coarse targets be mixed with :func:`mix` directly.

:func:`perturb_intensity` is the other half of a strong view (FixMatch / UniMatch style): random
brightness, contrast, gamma, blur and noise on chosen rows only. It moves no voxel, so labels,
pseudo labels and every coarse target stay valid unchanged.

Shapes: ``(B, C, *spatial)`` with 2 or 3 spatial axes throughout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cutmix_pairs(candidates: torch.Tensor, spatial: Sequence[int], cell: Sequence[int],
                 area: tuple[float, float] = (0.25, 0.5), prob: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random partners and grid-aligned rectangles for CutMix among the ``candidates`` of a batch.

    Each candidate is mixed with probability ``prob``; a mixed sample gets a partner drawn from
    the other candidates (never itself) and a rectangle whose share of the patch is drawn
    uniformly from ``area`` (side fractions ``share ** (1 / ndim)`` per axis, rounded to whole
    cells, at least one cell, at a random cell-aligned position). Samples that are not mixed keep
    themselves as partner and an empty rectangle, so :func:`mix` leaves them unchanged. With
    fewer than two candidates nothing is mixed.

    Args:
        candidates: (B,) bool; the samples that may be mixed and may donate rectangles.
        spatial: the full-resolution spatial shape of the batch.
        cell: grid cell per axis in voxels; every entry must divide the matching ``spatial`` entry.
        area: (min, max) share of the patch covered by a rectangle, 0 < min <= max <= 1.
        prob: probability that a candidate is mixed.
        generator: optional random generator (on the CPU).

    Returns:
        partner: (B,) long, the sample each row takes its rectangle from (itself if not mixed).
        cut: (B, 1, *spatial) bool, True inside the rectangle.
    """
    if len(spatial) != len(cell) or len(spatial) not in (2, 3):
        raise ValueError(f"spatial {tuple(spatial)} and cell {tuple(cell)} must both have 2 or 3 axes")
    if any(c < 1 or s % c for s, c in zip(spatial, cell)):
        raise ValueError(f"every cell size {tuple(cell)} must divide the patch size {tuple(spatial)}")
    if not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"area must satisfy 0 < min <= max <= 1, got {area}")
    if candidates.ndim != 1 or candidates.dtype != torch.bool:
        raise ValueError("candidates must be a (B,) bool tensor")
    dev = candidates.device
    b = candidates.shape[0]
    partner = torch.arange(b, device=dev)
    cut = torch.zeros((b, 1, *spatial), dtype=torch.bool, device=dev)
    pool = torch.nonzero(candidates.cpu()).flatten()
    if pool.numel() < 2:
        return partner, cut
    cells = [s // c for s, c in zip(spatial, cell)]
    for i in pool.tolist():
        if prob < 1 and torch.rand((), generator=generator).item() >= prob:
            continue
        others = pool[pool != i]
        partner[i] = int(others[torch.randint(len(others), (), generator=generator)])
        share = area[0] + (area[1] - area[0]) * torch.rand((), generator=generator).item()
        side = share ** (1.0 / len(spatial))
        region = []
        for n, c in zip(cells, cell):
            length = min(n, max(1, round(side * n)))
            start = int(torch.randint(n - length + 1, (), generator=generator))
            region.append(slice(start * c, (start + length) * c))
        cut[(i, 0, *region)] = True
    return partner, cut


def mix(x: torch.Tensor, partner: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """``x`` with each row's rectangle taken from its partner: ``where(cut, x[partner], x)``.

    Args:
        x: (B, C, *s) tensor at full resolution or at any grid-aligned coarser scale.
        partner: (B,) long from :func:`cutmix_pairs`.
        cut: (B, 1, *S) bool at full resolution; resized to ``x``'s spatial shape by nearest
            sampling (exact for rectangles aligned to the downsampling grid).

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    if cut.shape[2:] != x.shape[2:]:
        cut = F.interpolate(cut.float(), size=tuple(x.shape[2:]), mode="nearest") > 0.5
    return torch.where(cut, x[partner], x)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, *s) with one sigma (voxels) per sample; 'replicate' borders."""
    nd = x.ndim - 2
    radius = max(1, int(torch.ceil(3 * sigma.max()).item()))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None].to(x.dtype)) ** 2)  # (N, K)
    kernel = kernel / kernel.sum(1, keepdim=True)
    n, c = x.shape[:2]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = x.reshape(1, n * c, *x.shape[2:])
    weight = kernel.repeat_interleave(c, 0)  # (N*C, K): each sample's kernel for each of its channels
    for axis in range(nd):
        shape = [n * c, 1] + [1] * nd
        shape[2 + axis] = weight.shape[1]
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), weight.reshape(shape), groups=n * c)
    return out.reshape(x.shape)


def perturb_intensity(x: torch.Tensor, rows: torch.Tensor, prob: float = 0.8,
                      brightness: tuple[float, float] = (0.7, 1.3), contrast: tuple[float, float] = (0.65, 1.5),
                      gamma: tuple[float, float] = (0.7, 1.5), blur_sigma: tuple[float, float] = (0.5, 1.0),
                      noise_std: tuple[float, float] = (0.0, 0.1),
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Random intensity changes of the ``rows`` of a batch: the strong view of FixMatch-style training.

    For every selected row, independently and each with probability ``prob`` (values drawn
    uniformly from the ranges, per sample and channel unless noted):

    1. brightness: ``x * m``;
    2. contrast: ``(x - mean) * c + mean`` (mean over the sample's channel);
    3. gamma: the channel mapped to [0, 1] by its min / max, raised to ``g``, mapped back, then
       shifted and scaled to its former mean and SD (as nnU-Net's gamma transform with retained
       statistics);
    4. Gaussian blur with one ``sigma`` (voxels) per sample over all spatial axes (probability
       ``prob / 2``);
    5. additive Gaussian noise with one standard deviation per sample.

    No voxel moves, so the labels of ``x`` stay valid. Rows not selected are returned unchanged
    (bit for bit).

    Args:
        x: (B, C, *spatial) float, 2 or 3 spatial axes (nnU-Net's z-scored images).
        rows: (B,) bool, the samples to perturb.
        prob: probability of each of the changes 1-3 and 5.
        brightness, contrast, gamma, blur_sigma, noise_std: (low, high) ranges.
        generator: optional random generator (on the CPU); draws are made on the CPU and moved.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be (B, C, *spatial) with 2 or 3 spatial axes, got shape {tuple(x.shape)}")
    if rows.ndim != 1 or rows.dtype != torch.bool or rows.shape[0] != x.shape[0]:
        raise ValueError("rows must be a (B,) bool tensor matching the batch")
    idx = rows.nonzero().flatten()
    if idx.numel() == 0:
        return x.clone()
    v = x[idx].float()
    n, c = v.shape[:2]
    per = (n, c) + (1,) * (v.ndim - 2)

    def draw(rng: tuple[float, float], shape: tuple[int, ...], p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Values drawn from ``rng`` (shape ``shape``) and whether the change applies (shape ``shape[:1]``)."""
        value = rng[0] + (rng[1] - rng[0]) * torch.rand(shape, generator=generator)
        return value, torch.rand(shape[:1], generator=generator) < p

    m, on = draw(brightness, (n, c), prob)
    v = v * torch.where(on[:, None], m, torch.ones_like(m)).to(v).reshape(per)
    k, on = draw(contrast, (n, c), prob)
    mean = v.mean(dim=tuple(range(2, v.ndim)), keepdim=True)
    v = (v - mean) * torch.where(on[:, None], k, torch.ones_like(k)).to(v).reshape(per) + mean
    g, on = draw(gamma, (n, c), prob)
    lo = v.amin(dim=tuple(range(2, v.ndim)), keepdim=True)
    hi = v.amax(dim=tuple(range(2, v.ndim)), keepdim=True)
    span = (hi - lo).clamp_min(1e-8)
    gam = torch.where(on[:, None], g, torch.ones_like(g)).to(v).reshape(per)
    bent = ((v - lo) / span).clamp(0, 1) ** gam * span + lo
    dims = tuple(range(2, v.ndim))  # keep mean and SD, like nnU-Net's gamma transform with retained stats
    bent = (bent - bent.mean(dims, keepdim=True)) / bent.std(dims, keepdim=True).clamp_min(1e-8) \
        * v.std(dims, keepdim=True) + v.mean(dims, keepdim=True)
    v = torch.where(gam == 1, v, bent)
    s, on = draw(blur_sigma, (n,), prob / 2)
    if on.any():
        blurred = _gaussian_blur(v, s.to(v.device))
        v = torch.where(on.to(v.device).reshape((n,) + (1,) * (v.ndim - 1)), blurred, v)
    sd, on = draw(noise_std, (n,), prob)
    sd = torch.where(on, sd, torch.zeros_like(sd)).to(v).reshape((n,) + (1,) * (v.ndim - 1))
    noise = torch.randn(v.shape, generator=generator).to(v) if generator is not None else torch.randn_like(v)
    v = v + sd * noise
    out = x.clone()
    out[idx] = v.to(x.dtype)
    return out
