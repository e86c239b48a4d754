"""CutMix between samples of a batch, for consistency training: plain torch, nothing of nnU-Net.

Self-training on the same view the teacher sees teaches the student little beyond the teacher's
own output. CutMix (French et al., BMVC 2020, "Semi-supervised semantic segmentation needs strong,
varied perturbations") gives the student a different view instead: a rectangle of one image
pasted into another. The teacher labels the unmixed images and the student must reproduce
those labels in the new context, rectangle by rectangle.

Exactness at every deep-supervision scale: the rectangles are aligned to a grid of ``cell``
voxels per axis (the network's total downsampling), so a target downsampled by nearest-neighbour
sampling and then mixed equals the mixed full-resolution target downsampled - which lets the
loader's ready-made coarse targets be mixed with :func:`mix` directly.

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
