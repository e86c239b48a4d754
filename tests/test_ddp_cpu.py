"""DDP behaviour of the mixed-supervision loss, on CPU with the gloo backend (two processes).

nnU-Net's trainer forces CUDA as soon as ``torch.distributed`` is initialised, so the trainer itself
cannot run under DDP here. What can go wrong in *our* code under DDP is tested with the real pieces
instead: ``MixSupTrainerBase.supervised_loss`` with nnU-Net's own ``DC_and_CE_loss(ddp=True)``
(whose batch Dice all-gathers across ranks) and ``DeepSupervisionWrapper``, a network and an extra
module each wrapped in ``DistributedDataParallel`` exactly as ``MixSupTrainerBase.initialize`` does.

The case that matters: the ranks' batches differ in composition, and one rank has no mask sample
at all. If that rank skipped the mask term, the other rank would wait forever in nnU-Net's Dice
all-gather (a hang); the loss keeps the term with an all-ignore target instead. The test checks
that both ranks finish, the losses are finite, and DDP leaves identical gradients on both ranks.
"""
from __future__ import annotations

import datetime
import os
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

IGNORE = 3  # labels 0..2, ignore label 3


class TinyDSNet(nn.Module):
    """Two outputs (full and half resolution), like a 2-stage deep-supervision network."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.full = nn.Conv2d(4, 3, 1)
        self.coarse = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        return [self.full(h), self.coarse(nn.functional.avg_pool2d(h, 2))]


def _fake_trainer():
    """The attributes ``supervised_loss`` reads, without building an nnU-Net trainer (which needs CUDA under DDP)."""
    from nnunet_mixsup.losses import KnownVoxelCrossEntropyLoss
    from nnunet_mixsup.trainers import MixSupTrainerBase

    t = MixSupTrainerBase.__new__(MixSupTrainerBase)
    t.label_manager = types.SimpleNamespace(ignore_label=IGNORE)
    t.is_ddp = True
    t.compiles_network = False
    t.weak_supervised_weight = 1.0
    t.weak_ce = KnownVoxelCrossEntropyLoss(IGNORE)
    return t


def _worker(rank: int, world: int, init_file: str, out_dir: str, batch_dice: bool = True) -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_mixsup.manifest import TYPE_CODES

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # a rank may import for minutes on a loaded machine
    try:
        trainer = _fake_trainer()
        ds_weights = trainer.deep_supervision_weights(2)
        loss = DeepSupervisionWrapper(
            DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": True}, {}, weight_ce=1,
                           weight_dice=1, ignore_label=IGNORE, dice_class=MemoryEfficientSoftDiceLoss), ds_weights)
        net = DDP(TinyDSNet(0))                    # nnU-Net wraps self.network like this (CPU: no device_ids)
        extra = DDP(TinyDSNet(1))                  # MixSupTrainerBase wraps each trainable extra module

        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(2, 1, 8, 8, generator=g)
        full = torch.randint(0, 3, (2, 1, 8, 8), generator=g)
        # rank 0: one mask and one box sample; rank 1: two box samples (no mask sample at all)
        codes = [TYPE_CODES["mask"], TYPE_CODES["box"]] if rank == 0 else [TYPE_CODES["box"]] * 2
        sup_type = torch.tensor(codes)
        weak = sup_type != TYPE_CODES["mask"]
        # weak samples only know some background voxels; everything else is ignore
        known_bg = torch.rand(2, 1, 8, 8, generator=g) < 0.3
        seg_full = torch.where(weak.view(-1, 1, 1, 1), torch.where(known_bg, 0, IGNORE), full)
        target = [seg_full, seg_full[:, :, ::2, ::2]]
        batch = {"sup_type": sup_type}

        total = (trainer.supervised_loss(loss, net(x), target, batch)
                 + trainer.supervised_loss(loss, extra(x), target, batch))
        total.backward()
        grads = torch.cat([p.grad.flatten() for m in (net, extra) for p in m.parameters()])
        gathered = [torch.zeros_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        torch.save({"loss": total.detach(), "grads": gathered}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("batch_dice", [True, False])
def test_supervised_loss_under_ddp_with_a_rank_without_mask_samples(tmp_path, batch_dice):
    """Batch Dice all-gathers (every rank masks and calls it); per-sample Dice slices rows (no collective)."""
    world = 2
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), batch_dice), nprocs=world,
                             join=False, start_method="spawn")
    deadline = 600.0  # beyond the ranks' own 300 s collective timeout: only a true hang gets here
    t0 = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - t0 > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP ranks did not finish: a collective is not run by every rank (hang)")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in results:
        assert torch.isfinite(r["loss"])
        assert all(torch.isfinite(g).all() for g in r["grads"])
    g0, g1 = results[0]["grads"]
    assert g0.abs().sum() > 0
    torch.testing.assert_close(g0, g1)  # DDP all-reduced: both ranks hold the same gradient
    assert results[0]["loss"] != results[1]["loss"]  # the ranks really saw different batches
