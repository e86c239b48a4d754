"""Trainer variants run real train steps on the synthetic data (in-process, tiny network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import batches, make_trainer


@pytest.mark.parametrize("cls_name", ["MixSupTrainer", "MixSupTrainer_MLDS"])
@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_train_steps_finite_and_all_terms_logged(cls_name, which, config, request):
    info = request.getfixturevalue(which)
    tr = make_trainer(cls_name, info, config)
    dl_tr, dl_val = tr.get_dataloaders()
    try:
        outs = [tr.train_step(next(dl_tr)) for _ in range(2)]
    finally:
        for d in (dl_tr, dl_val):
            if hasattr(d, "_finish"):
                d._finish()
    for o in outs:
        assert np.isfinite(o["loss"])
        for k in tr.loss_term_names:
            assert np.isfinite(o[f"loss_{k}"]), k
    # the validation split only holds mask cases
    sup = tr.load_supervision()
    _, val = tr.do_split()
    assert val and all(sup[k].type == "mask" for k in val)


def test_mlds_variant_trains_on_mask_cases_only(planned_3d):
    tr = make_trainer("MixSupTrainer_MLDS", planned_3d, "3d_fullres")
    ds_tr, _ = tr.get_tr_and_val_datasets()
    sup = tr.load_supervision()
    assert ds_tr.identifiers and all(sup[k].type == "mask" for k in ds_tr.identifiers)


def test_exported_weights_load_into_stock_inference_network(planned_3d):
    """Inference cost equals stock nnU-Net: the network is nnU-Net's own, DS off."""
    tr = make_trainer("MixSupTrainer", planned_3d, "3d_fullres")
    net = type(tr).build_network_architecture(tr.plans_manager, tr.configuration_manager, tr.num_input_channels,
                                              tr.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    net.load_state_dict(tr.network.state_dict())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tr.network.parameters())


def test_boxes_inside_patch():
    from nnunet_mixsup.trainers.mixsup import boxes_inside_patch

    m = torch.zeros(2, 2, 6, 6)
    m[0, 0, 2:4, 2:4] = 1   # inside
    m[0, 1, 0:3, 2:4] = 1   # touches the border
    assert boxes_inside_patch(m).tolist() == [[True, False], [False, False]]


def test_non_finite_loss_is_skipped_then_stops(planned_3d):
    tr = make_trainer("MixSupTrainer", planned_3d, "3d_fullres")
    tr.max_consecutive_bad_steps = 2
    dl_tr, dl_val = tr.get_dataloaders()
    try:
        batch = next(dl_tr)
    finally:
        for d in (dl_tr, dl_val):
            if hasattr(d, "_finish"):
                d._finish()
    before = [p.detach().clone() for p in tr.network.parameters()]
    bad = dict(batch)
    bad["data"] = batch["data"].clone()
    bad["data"][0, 0, 0, 0, 0] = float("nan")
    out = tr.train_step(bad)
    assert np.isnan(out["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, tr.network.parameters())), "a bad step changed weights"
    with pytest.raises(RuntimeError, match="consecutive non-finite losses"):
        tr.train_step(bad)
    tr.consecutive_bad_steps = 0
    assert np.isfinite(tr.train_step(batch)["loss"])


@pytest.mark.parametrize("which,config,batch_dice", [("planned_2d", "2d", True), ("planned_3d", "3d_fullres", False)])
def test_supervised_loss_is_nnunet_loss_per_group(which, config, batch_dice, request):
    """Mask part: nnU-Net's loss on the mask samples alone (batch and per-sample Dice, every scale);
    weak part: CE over their known voxels."""
    from nnunet_mixsup.manifest import TYPE_CODES

    tr = make_trainer("MixSupTrainer", request.getfixturevalue(which), config)
    assert tr.configuration_manager.batch_dice == batch_dice  # the fixture's plans cover both Dice kinds
    torch.manual_seed(0)
    ign = tr.label_manager.ignore_label
    c = tr.label_manager.num_segmentation_heads
    spatial = (8, 8) if config == "2d" else (4, 8, 8)
    scales = [spatial, tuple(max(1, s // 2) for s in spatial)]
    outs = [torch.randn(4, c, *s, requires_grad=True) for s in scales]
    segs = [torch.randint(0, c, (4, 1, *s)) for s in scales]
    for seg in segs:
        seg[2:, :, :1] = ign  # weak samples: partly unknown
    batch = {"sup_type": torch.tensor([TYPE_CODES["mask"], TYPE_CODES["mask"], TYPE_CODES["box"], TYPE_CODES["none"]])}
    ds = tr.loss  # nnU-Net's deep-supervision wrapper around Dice + CE, as the trainer built it
    weights = tr.deep_supervision_weights(2)
    ds.weight_factors = weights
    got = tr.supervised_loss(ds, outs, segs, batch)
    sub = ds([o[:2] for o in outs], [s[:2] for s in segs])
    weak = 0
    for w, o, seg in zip(weights, outs, segs):
        known = seg[2:] != ign
        ce = torch.nn.functional.cross_entropy(o[2:], torch.where(known, seg[2:], 0)[:, 0], reduction="none")
        weak = weak + (w * ce[known[:, 0]].mean() if w > 0 else 0)
    assert float(got) == pytest.approx(float(sub + tr.weak_supervised_weight * weak), rel=1e-5)
    g_got = torch.autograd.grad(tr.supervised_loss(ds, outs, segs, batch) - tr.weak_supervised_weight * weak,
                                outs[0])[0]
    g_sub = torch.autograd.grad(sub, outs[0])[0]
    torch.testing.assert_close(g_got[:2], g_sub[:2], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("pseudo_dice", [True, False])
@pytest.mark.parametrize("which,config", [("planned_2d", "2d"), ("planned_3d", "3d_fullres")])
def test_pseudo_label_term_is_nnunet_loss_on_the_selected_samples(which, config, pseudo_dice, request, monkeypatch):
    """The self-training term: nnU-Net's loss on the pseudo-labelled samples as a sub-batch, or CE over their labels."""
    import nnunet_mixsup.trainers.mixsup as M
    from nnunet_mixsup.lab.bench_speed import at_full_schedule
    from nnunet_mixsup.manifest import TYPE_CODES

    tr = make_trainer("MixSupTrainer", request.getfixturevalue(which), config)
    tr.pseudo_dice = pseudo_dice
    at_full_schedule(tr)  # self-training started, full ramp
    b = next(b for b in batches(tr, 8) if (b["sup_type"] == TYPE_CODES["mask"]).any()
             and (b["sup_type"] != TYPE_CODES["mask"]).any())
    seg = [t[:, :1] for t in b["target"]]
    allowed = [t[:, 1:] for t in b["target"]]
    g = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, tr.label_manager.num_segmentation_heads, seg[0].shape, generator=g).to(seg[0].dtype)
    fixed[torch.rand(seg[0].shape, generator=g) < 0.3] = tr.label_manager.ignore_label  # unconfident voxels
    monkeypatch.setattr(M, "teacher_pseudo_labels", lambda *a, **k: fixed)
    outs = []
    real = tr.network.forward
    monkeypatch.setattr(tr.network, "forward", lambda x: outs.append(real(x)) or outs[-1])
    terms = tr.forward_and_loss(b["data"], seg, allowed, b)
    logits = M.as_list(outs[0])[0]
    sel = b["sup_type"] != TYPE_CODES["mask"]
    if pseudo_dice:
        want = tr.pseudo_ramp() * tr.pseudo_weight * tr.fullres_loss(logits[sel], fixed[sel])
    else:  # mean CE over the labelled voxels of the selected samples, by hand
        lab = fixed[sel][:, 0].long()
        known = lab != tr.label_manager.ignore_label
        ce = torch.nn.functional.cross_entropy(logits[sel], torch.where(known, lab, 0), reduction="none")
        want = tr.pseudo_ramp() * tr.pseudo_weight * ce[known].mean()
    assert float(terms["pseudo"]) == pytest.approx(float(want), rel=1e-5)
    g_term = torch.autograd.grad(terms["pseudo"], logits, retain_graph=True)[0]
    g_sub = torch.autograd.grad(want, logits)[0]
    torch.testing.assert_close(g_term, g_sub, rtol=1e-4, atol=1e-7)


def test_box_term_auto_uses_presence_for_slices_of_volumes(planned_3d, planned_2d, monkeypatch):
    tr3 = make_trainer("MixSupTrainer_MeanTeacher", planned_3d, "3d_fullres")
    assert tr3.training_data_is_volumetric() and tr3.resolved_box_term() == "tightness"  # 3D patches
    tr2 = make_trainer("MixSupTrainer_MeanTeacher", planned_2d, "2d")
    assert not tr2.training_data_is_volumetric() and tr2.resolved_box_term() == "tightness"  # true 2D images
    # a 2D configuration on volumetric data sees cross-sections of 3D boxes -> presence
    tr2v = make_trainer("MixSupTrainer_MeanTeacher", planned_2d, "2d")
    monkeypatch.setattr(tr2v, "training_data_is_volumetric", lambda: True)
    assert tr2v.resolved_box_term() == "presence"
    tr2v.box_term = "tightness"
    tr2v._box_term_resolved = None
    assert tr2v.resolved_box_term() == "tightness"
    tr2v.box_term, tr2v._box_term_resolved = "sideways", None
    with pytest.raises(ValueError, match="box_term"):
        tr2v.resolved_box_term()
    # the presence term runs in a real train step
    tr2v.box_term, tr2v._box_term_resolved = "presence", None
    dl_tr, dl_val = tr2v.get_dataloaders()
    try:
        out = tr2v.train_step(next(dl_tr))
    finally:
        for d in (dl_tr, dl_val):
            if hasattr(d, "_finish"):
                d._finish()
    assert np.isfinite(out["loss"]) and np.isfinite(out["loss_box"])


@pytest.mark.parametrize("which,config", [("planned_2d", "2d"), ("planned_3d", "3d_fullres")])
def test_box_fill_term_only_for_classes_the_teacher_does_not_label(which, config, request, monkeypatch):
    from nnunet_mixsup.losses import BoxFillLoss

    tr = make_trainer("MixSupTrainer_BoxFill", request.getfixturevalue(which), config, box_fill_bounds=(0.3, 0.9))
    assert isinstance(tr.box_fill_loss, BoxFillLoss) and tr.box_fill_loss.lower == 0.3  # bounds reach the loss
    batch = batches(tr, 1)[0]
    data = batch["data"]
    target = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
    seg, allowed = [t[:, :1] for t in target], [t[:, 1:] for t in target]
    with torch.no_grad():
        terms = tr.forward_and_loss(data, seg, allowed, batch)
        assert "fill" in terms and torch.isfinite(terms["fill"])  # weak-label phase: every class is unsure
        k = len(tr.label_manager.foreground_labels)
        monkeypatch.setattr(type(tr), "ready_classes", lambda self: [True] * k)
        assert "fill" not in tr.forward_and_loss(data, seg, allowed, batch)


def test_weak_labels_per_class_leave_unlearned_classes_to_the_masks(planned_2d, monkeypatch):
    tr = make_trainer("MixSupTrainer_WeakPerClass", planned_2d, "2d")
    k = len(tr.label_manager.foreground_labels)
    log = tr.logger.local_logger.my_fantastic_logging
    log["dice_per_class_or_region"] = [[0.1] * k, [0.3] + [0.1] * (k - 1), [float("nan")] * k]
    tr.current_epoch = 1
    assert tr.weak_label_classes() == [False] * k  # epoch 1 sees only epoch 0's Dice
    tr.current_epoch = 3
    assert tr.weak_label_classes() == [True] + [False] * (k - 1)  # class 1 reached 0.2 at epoch 1; NaN never
    assert tr.weak_label_start_epochs() == [2] + [None] * (k - 1)
    tr.num_epochs = 10
    report = tr.weak_label_report()
    names = tr.class_names()
    assert f"{names[0]} from epoch 2" in report and f"{names[1]} never (best 0.10)" in report
    tr.weak_labels_min_dice = None
    assert tr.weak_label_classes() == [True] * k and tr.weak_label_report() == ""
    # every class unlearned: the weak samples add nothing, the step is nnU-Net's loss on the mask samples
    tr.weak_labels_min_dice = 0.2
    log["dice_per_class_or_region"] = []
    tr.current_epoch = 0
    batch = batches(tr, 1)[0]
    target = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
    seg, allowed = [t[:, :1] for t in target], [t[:, 1:] for t in target]
    is_mask = batch["sup_type"] == 0
    assert bool(is_mask.any()) and bool((~is_mask).any())
    with torch.no_grad():
        terms = tr.forward_and_loss(batch["data"], seg, allowed, batch)
        mask_only = tr.rows_loss(tr.loss, list(tr.network(batch["data"])), seg, is_mask)
    assert terms["negatives"].item() == 0 and terms["mlds"].item() == 0
    assert terms["supervised"].item() == pytest.approx(mask_only.item(), rel=1e-5, abs=1e-6)


def test_env_budget_and_torch_threads(monkeypatch):
    from types import SimpleNamespace

    from nnunet_mixsup.trainers.mixsup import apply_env_budget

    before = torch.get_num_threads()
    t = SimpleNamespace(device=torch.device("cpu"), num_epochs=1000, num_iterations_per_epoch=250,
                        num_val_iterations_per_epoch=50)
    apply_env_budget(t)  # nothing set: nnU-Net's schedule, torch untouched
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (1000, 250, 50)
    assert torch.get_num_threads() == before
    monkeypatch.setenv("nnUNet_mixsup_epochs", "7")
    monkeypatch.setenv("nnUNet_mixsup_val_iterations", "3")
    monkeypatch.setenv("nnUNet_mixsup_torch_threads", "1")
    try:
        apply_env_budget(t)
        assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (7, 250, 3)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        apply_env_budget(SimpleNamespace(device=torch.device("cuda"), num_epochs=1, num_iterations_per_epoch=1,
                                         num_val_iterations_per_epoch=1))
        assert torch.get_num_threads() == before  # a GPU training keeps nnU-Net's own thread setting
    finally:
        torch.set_num_threads(before)


def test_default_turns_a_class_weak_labels_on_when_the_teacher_labels_it(planned_2d):
    tr = make_trainer("MixSupTrainer", planned_2d, "2d")
    assert tr.weak_labels_with_teacher
    assert tr.weak_kinds_present_from_start() == () and tr.mask_only_batches_left() > 0  # mask-only warm-up
    assert tr.extra_weak_samples() == 0 and not tr.in_weak_label_phase()
    k = len(tr.label_manager.foreground_labels)
    tr.num_epochs = 10  # pseudo labels from epoch 4 (earliest 0.4), per class at validation Dice >= 0.5
    log = tr.logger.local_logger.my_fantastic_logging
    log["dice_per_class_or_region"] = [[0.6] + [0.3] * (k - 1)] * 6
    tr.current_epoch = 3
    assert tr.weak_label_classes() == [False] * k  # before the teacher starts: the masks alone
    tr.current_epoch = 5
    assert tr.weak_label_classes() == tr.ready_classes() == [True] + [False] * (k - 1)
    assert tr.weak_label_start_epochs() == [4] + [None] * (k - 1)
    tr.current_epoch = 4
    tr.on_epoch_start()  # the log names the class that joins now, and the rule
    tr.current_epoch = 10
    report = tr.weak_label_report()
    names = tr.class_names()
    assert f"{names[0]} from epoch 4" in report and f"{names[1]} never (best 0.30)" in report
    assert "with its pseudo labels" in report
    log_text = Path(tr.log_file).read_text()
    assert f"epoch 4: the weak labels now speak for {names[0]} (with its pseudo labels" in log_text
    # the epoch self-training starts gets one line naming the classes and that their weak labels join
    tr._loaders_self_training, tr.current_epoch = False, 4
    tr.get_dataloaders = lambda: (None, None)
    tr.on_epoch_start()
    lines = [ln for ln in Path(tr.log_file).read_text().splitlines() if "epoch 4:" in ln]
    assert len(lines) == 2 and "self-training starts; the teacher labels " + names[0] in lines[1]
    assert f"; the weak labels now speak for {names[0]} (with its pseudo labels" in lines[1]
    assert tr.mask_only_batches_left() == 0 and tr.extra_weak_samples() > 0  # weak samples on top from the start
    final = tr.schedule_report()
    assert "the first 4 epochs used the mask cases only" in final
    assert f"never labelled {', '.join(names[1:])}" in final and "learned from the mask cases only" in final
    assert "collapsed" not in final
    log["dice_per_class_or_region"] = log["dice_per_class_or_region"] + [[0.0] * k] * 5  # forgot class 1
    assert f"collapsed after these classes were learned: {names[0]} (best 0.60 at epoch 0, last 0.00)" \
        in tr.schedule_report()


@pytest.mark.parametrize("nd", [2, 3])
def test_open_empty_boxes_takes_back_background_only_where_the_teacher_found_nothing(nd):
    from nnunet_mixsup.trainers.mixsup import open_empty_boxes

    ign, s = 9, (6,) * nd
    seg0 = torch.zeros(3, 1, *s, dtype=torch.long)
    allowed = torch.zeros(3, 2, *s)
    box = (slice(None), slice(1, 4)) + (slice(2, 5),) * (nd - 1)  # class 1's box in every sample
    for b in range(3):
        allowed[b][(0,) + box[1:]] = 1
        seg0[b][(0,) + box[1:]] = ign  # unknown inside the box, known background outside
    labels = seg0.clone()
    labels[labels == ign] = 0  # the teacher says background everywhere in the boxes ...
    labels[1][(0, 2) + (3,) * (nd - 1)] = 1  # ... except one voxel of class 1 in sample 1
    labels[2][(0, 1) + (2,) * (nd - 1)] = 2  # sample 2: class 2 inside class 1's box, no class 1
    present = torch.tensor([[True, False], [True, False], [True, False]])
    out = open_empty_boxes(labels, seg0, allowed, present, ign)
    inside = allowed[:, :1] > 0
    assert (out[0][inside[0]] == ign).all()  # nothing of class 1 found: the whole box is open again
    assert torch.equal(out[1], labels[1])  # found: the teacher's background there stays
    assert out[2][(0, 1) + (2,) * (nd - 1)] == 2 and (out[2][inside[2] & (labels[2] == 0)] == ign).all()
    assert torch.equal(out[~inside], labels[~inside])  # known background outside the boxes stays
    assert torch.equal(open_empty_boxes(labels, seg0, allowed, present & False, ign), labels)
    known = seg0.clone()
    known[0][(0,) + box[1:]] = 0  # a real label inside the box is never touched
    assert torch.equal(open_empty_boxes(labels, known, allowed, present, ign)[0], labels[0])


@pytest.mark.parametrize("on", [False, True])
def test_open_empty_boxes_reaches_the_pseudo_term(on, planned_2d, monkeypatch):
    """With ``open_empty_boxes`` the pseudo term sees a box the teacher left empty as unknown."""
    import nnunet_mixsup.trainers.mixsup as M
    from nnunet_mixsup.lab.bench_speed import at_full_schedule
    from nnunet_mixsup.manifest import TYPE_CODES

    tr = make_trainer("MixSupTrainer", planned_2d, "2d")
    tr.open_empty_boxes = on
    at_full_schedule(tr)
    b = next(b for b in batches(tr, 8) if (b["sup_type"] == TYPE_CODES["box"]).any())
    row = int((b["sup_type"] == TYPE_CODES["box"]).nonzero()[0])
    ign = tr.label_manager.ignore_label
    seg = [t[:, :1].clone() for t in b["target"]]
    allowed = [t[:, 1:].clone() for t in b["target"]]
    k = 0
    h, w = seg[0].shape[2:]
    for lvl, (sg, al) in enumerate(zip(seg, allowed)):  # one box of class 1, inside the patch
        f = 2 ** lvl
        al[row] = 0
        al[row, k, h // f // 4: h // f // 2 + 1, w // f // 4: w // f // 2 + 1] = 1
        sg[row] = 0
        sg[row, 0][al[row, k] > 0] = ign
    monkeypatch.setattr(M, "teacher_pseudo_labels",
                        lambda *a, **kw: torch.where(seg[0] == ign, torch.zeros_like(seg[0]), seg[0]))
    seen = []
    real = tr.pseudo_term
    monkeypatch.setattr(tr, "pseudo_term", lambda lg, ps, sel: seen.append(ps) or real(lg, ps, sel))
    tr.forward_and_loss(b["data"], seg, allowed, b)
    box = allowed[0][row, k] > 0
    assert bool(box.any())
    assert (seen[0][row, 0][box] == (ign if on else 0)).all()
