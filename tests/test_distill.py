"""Teacher-student trainers: real train steps, exact checkpoint round trip, stock-loadable export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import batches, make_trainer

from nnunet_mixsup.losses import pseudo_label_map
from nnunet_mixsup.manifest import TYPE_CODES

DISTILL = ["MixSupTrainer", "MixSupTrainer_MeanTeacher", "MixSupTrainer_DualBranch", "MixSupTrainer_DMD"]
_trainer = make_trainer
_batches = batches


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_training_state(tr, tr2):
    """Network, every extra module and the SGD momentum of ``tr2`` (reloaded) equal those of ``tr``."""
    for a, b in [(tr.network, tr2.network)] + [(tr.extra_modules[k], tr2.extra_modules[k]) for k in tr.extra_modules]:
        sa, sb = _state(a), _state(b)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), type(tr).__name__
    oa, ob = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["momentum_buffer"], ob["state"][k]["momentum_buffer"])


@pytest.mark.parametrize("cls_name", DISTILL)
@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_train_steps_finite_all_terms_logged(cls_name, which, config, request):
    tr = _trainer(cls_name, request.getfixturevalue(which), config)
    tr.current_epoch = 10 ** 6  # ramp-ups at full weight
    for b in _batches(tr, 2):
        out = tr.train_step(b)
        assert np.isfinite(out["loss"])
        for k in tr.loss_term_names:
            assert np.isfinite(out[f"loss_{k}"]), k


@pytest.mark.parametrize("cls_name", DISTILL)
def test_checkpoint_resumes_exactly(cls_name, planned_2d, tmp_path):
    tr = _trainer(cls_name, planned_2d, "2d")
    for b in _batches(tr, 2):
        tr.train_step(b)
    assert tr.extra_modules
    f = str(tmp_path / "checkpoint_latest.pth")
    tr.save_checkpoint(f)
    ckpt = torch.load(f, map_location="cpu", weights_only=False)
    assert set(ckpt["mixsup_state"]) == set(tr.extra_modules)

    tr2 = _trainer(cls_name, planned_2d, "2d")
    tr2.load_checkpoint(f)
    _assert_same_training_state(tr, tr2)
    oa, ob = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    trainable_extra = any(p.requires_grad for m in tr.extra_modules.values() for p in m.parameters())
    assert len(oa["param_groups"]) == len(ob["param_groups"]) == 1 + trainable_extra
    # the same batch gives the same loss afterwards: nothing was lost
    tr.current_epoch += 1  # nnU-Net saves at the end of an epoch and stores current_epoch + 1
    assert tr2.current_epoch == tr.current_epoch
    b = _batches(tr, 1)[0]
    torch.manual_seed(0)
    l1 = tr.train_step(b)["loss"]
    torch.manual_seed(0)
    l2 = tr2.train_step(b)["loss"]
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_resume_without_extra_state_is_a_clear_error(planned_2d, tmp_path):
    base = _trainer("MixSupTrainer", planned_2d, "2d")
    f = str(tmp_path / "plain.pth")
    base.save_checkpoint(f)
    tr = _trainer("MixSupTrainer_DMD", planned_2d, "2d")
    with pytest.raises(Exception, match="cannot resume exactly|size mismatch|param"):
        tr.load_checkpoint(f)


@pytest.mark.parametrize("cls_name", DISTILL)
def test_export_is_one_stock_network(cls_name, planned_3d):
    tr = _trainer(cls_name, planned_3d, "3d_fullres")
    net = type(tr).build_network_architecture(tr.plans_manager, tr.configuration_manager, tr.num_input_channels,
                                              tr.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    net.load_state_dict(tr.network.state_dict())  # strict: same keys, same shapes
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tr.network.parameters())


def test_mean_teacher_is_ema_of_student_and_gets_no_gradient(planned_2d):
    tr = _trainer("MixSupTrainer_MeanTeacher", planned_2d, "2d", ema_decay=0.5)
    teacher = tr.extra_modules["teacher"]
    t0 = {k: v.clone() for k, v in teacher.named_parameters()}
    tr.train_step(_batches(tr, 1)[0])
    s1 = dict(tr.network.named_parameters())
    for k, v in teacher.named_parameters():
        assert v.grad is None and not v.requires_grad
        assert torch.allclose(v, 0.5 * t0[k] + 0.5 * s1[k].detach(), atol=1e-6)


def _spy_teacher(monkeypatch) -> list:
    """Record every call of the EMA teacher's pseudo labelling (inputs and result)."""
    import nnunet_mixsup.trainers.mixsup as M

    calls: list = []
    real = M.teacher_pseudo_labels

    def spy(teacher, data, seg0, allowed0, rows, *a, **k):
        out = real(teacher, data, seg0, allowed0, rows, *a, **k)
        calls.append({"data": data.clone(), "rows": rows.clone(), "allowed0": allowed0.clone(),
                      "seg0": seg0.clone(), "pseudo": out.clone()})
        return out

    monkeypatch.setattr(M, "teacher_pseudo_labels", spy)
    return calls


def _close(tr) -> None:
    for d in (tr.dataloader_train, tr.dataloader_val):
        if hasattr(d, "_finish"):
            d._finish()


def test_default_warms_up_on_masks_then_weak_labels_join_with_the_teacher_per_class(planned_2d, monkeypatch):
    tr = _trainer("MixSupTrainer", planned_2d, "2d")
    tr.num_epochs = 10
    calls = _spy_teacher(monkeypatch)
    b = tr.batch_size
    log = tr.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"]
    n = len(tr.label_manager.foreground_labels)
    tr.current_epoch = 0
    assert tr.train_batch_size() == b and tr.loader_weak_kinds() is None
    tr.on_train_start()  # before the teacher: nnU-Net on the mask cases, weak labels cannot speak yet
    try:
        early = [next(tr.dataloader_train) for _ in range(6)]
        assert all(x["sup_type"].tolist() == [TYPE_CODES["mask"]] * b for x in early)
        out = tr.train_step(early[0])
        assert np.isfinite(out["loss"]) and out["loss"] == out["loss_supervised"] and not calls
        log[:] = [[0.9] * (n - 1) + [0.1]] * 4  # the last class is not segmented yet
        tr.current_epoch = 4
        tr.on_epoch_start()  # the teacher starts: the loaders are rebuilt with every weak kind on top
        assert tr.weak_label_classes() == tr.ready_classes() == [True] * (n - 1) + [False]
        mixed = [next(tr.dataloader_train) for _ in range(40)]
        assert all(len(m["sup_type"]) > b for m in mixed)
        m = next(m for m in mixed if (m["sup_type"] == TYPE_CODES["box"]).any())
        out = tr.train_step(m)
        assert out["loss_pseudo"] != 0.0 and out["loss_negatives"] > 0 and len(calls) == 1
        report = tr.schedule_report()
        assert "weak cases used from epoch 4" in report and "the first 4 epochs used the mask cases only" in report
        assert "learned from the mask cases only" in report and "never (best 0.10)" in report
    finally:
        _close(tr)


def test_weak_labels_from_the_first_epoch_then_pseudo_labels_per_class(planned_2d, monkeypatch):
    assert _trainer("MixSupTrainer", planned_2d, "2d").box_weight == 0  # no box term by default
    tr = _trainer("MixSupTrainer", planned_2d, "2d", box_weight=0.5, weak_labels_with_teacher=False)
    tr.num_epochs = 10
    calls = _spy_teacher(monkeypatch)
    b = tr.batch_size
    extra = max(1, round(tr.weak_batch_extra * b))
    log = tr.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"]
    n = len(tr.label_manager.foreground_labels)
    tr.current_epoch = 0
    assert tr.self_training_start() is None and tr.pseudo_ramp() == 0.0 and tr.in_weak_label_phase()
    assert tr.mask_only_batches_left() == 0 and tr.train_batch_size() == b + extra
    assert tr.loader_weak_kinds() == ("box", "tags")
    tr.on_train_start()  # weak-label phase: the plans' batch of mask samples + box / tag samples on top
    try:
        early = [next(tr.dataloader_train) for _ in range(12)]
        for x in early:
            kinds = x["sup_type"].tolist()
            assert len(kinds) == b + extra and kinds.count(TYPE_CODES["mask"]) == b
            assert TYPE_CODES["none"] not in kinds  # unlabelled cases wait for the pseudo labels
        x = next(x for x in early if (x["sup_type"] == TYPE_CODES["box"]).any())
        out = tr.train_step(x)
        assert np.isfinite(out["loss"]) and out["loss_pseudo"] == 0.0 and not calls  # no teacher yet
        assert out["loss_negatives"] > 0 and out["loss_box"] > 0 and out["loss_mlds"] > 0
        log[:] = [[0.9] * (n - 1) + [0.1]] * 4  # the last class is not segmented yet
        tr.current_epoch = 4  # earliest 0.4 of 10 epochs: the pseudo labels start, per class
        assert tr.self_training_start() == 4 and tr.ready_classes() == [True] * (n - 1) + [False]
        tr.on_epoch_start()  # rebuilds the loaders: unlabelled cases join
        assert tr.loader_weak_kinds() is None
        mixed = [next(tr.dataloader_train) for _ in range(40)]  # one weak sample per batch of the tiny plans
        assert any((m["sup_type"] == TYPE_CODES["none"]).any() for m in mixed)
        m = next(m for m in mixed if (m["sup_type"] == TYPE_CODES["box"]).any())
        out = tr.train_step(m)
        assert out["loss_pseudo"] != 0.0 and np.isfinite(out["loss_box"]) and len(calls) == 1
        report = tr.schedule_report()
        assert "box and tags cases used for their own labels from epoch 0" in report
        assert "pseudo labels from epoch 4" in report and "never labelled" in report
    finally:
        _close(tr)
    c = calls[0]
    sup = m["sup_type"].to(c["rows"].device)
    assert torch.equal(c["rows"], sup != TYPE_CODES["mask"])
    ignore = tr.label_manager.ignore_label
    known = c["seg0"] != ignore
    assert torch.equal(c["pseudo"][known], c["seg0"][known])  # real labels are never overwritten
    for k in range(c["allowed0"].shape[1]):  # a pseudo label never contradicts a box or a tag
        assert not ((c["pseudo"][:, 0] == k + 1) & (c["allowed0"][:, k] == 0)).any()
    assert torch.equal(c["pseudo"][~c["rows"]], c["seg0"][~c["rows"]])
    open_last = (c["allowed0"][:, -1:] > 0) & (c["seg0"] == ignore)
    assert (c["pseudo"][open_last] == ignore).all()  # the class the teacher misses stays open


def test_mixsup_without_weak_kinds_from_start_warms_up_on_masks_until_every_class_is_found(planned_2d, monkeypatch):
    from nnunet_mixsup.trainers import SelfTrainingSchedule

    tr = _trainer("MixSupTrainer", planned_2d, "2d", weak_kinds_from_start=(), weak_batch_extra=0.0,
                  schedule=SelfTrainingSchedule(earliest=0.4, min_dice=0.5, rampup=0.2))
    tr.num_epochs = 10
    calls = _spy_teacher(monkeypatch)
    log = tr.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"]
    n = len(tr.label_manager.foreground_labels)
    log[:] = [[0.9] * (n - 1) + [0.0]] * 5  # epochs 0-4: the last (small) class not found yet
    tr.current_epoch = 5
    assert tr.self_training_start() is None and tr.pseudo_ramp() == 0.0
    assert tr.mask_only_batches_left() > 10 ** 9
    assert "never used" in tr.schedule_report()
    tr.on_train_start()  # builds the loaders: warm-up batches, stock nnU-Net on the mask cases
    try:
        b = next(tr.dataloader_train)
        assert (b["sup_type"] == TYPE_CODES["mask"]).all()
        out = tr.train_step(b)
        assert out["loss_pseudo"] == 0.0 and not calls  # no teacher pass in the warm-up
        log.append([0.9] * n)  # epoch 5: every class found -> start at epoch 6 (after earliest 0.4)
        tr.current_epoch = 6
        assert tr.self_training_start() == 6 and tr.pseudo_ramp() == pytest.approx(0.5)  # over 0.2 * 10 epochs
        tr.on_epoch_start()  # rebuilds the loaders with mixed batches
        mixed = [next(tr.dataloader_train) for _ in range(3)]
        assert any((m["sup_type"] != TYPE_CODES["mask"]).any() for m in mixed)
        m = next(m for m in mixed if (m["sup_type"] != TYPE_CODES["mask"]).any())
        out = tr.train_step(m)
        assert out["loss_pseudo"] != 0.0 and len(calls) == 1
        assert "from epoch 6" in tr.schedule_report()
    finally:
        _close(tr)
    log[:] = [[0.9] * n] * 3  # ready from epoch 0 on: still not before the earliest start (epoch 4)
    tr.current_epoch = 3
    assert tr.self_training_start() is None
    tr.current_epoch = 9  # as after --c: the start is recomputed from the restored log
    assert tr.self_training_start() is None  # the log ends at epoch 2, so epochs 4.. were never ready
    log[:] = [[0.9] * n] * 9
    assert tr.self_training_start() == 4 and tr.mask_only_batches_left() == 0


def test_schedule_report_names_the_classes_that_kept_the_weak_cases_out():
    from nnunet_mixsup.trainers import SelfTrainingSchedule

    s = SelfTrainingSchedule(earliest=0.4, min_dice=0.5, rampup=0.2)
    hist = [[0.8, 0.1], [0.9, 0.3]] * 5
    msg = s.report(hist, 9, 10, ["amygdala", "putamen"])
    assert "never used" in msg and "putamen (best 0.30)" in msg and "amygdala" not in msg
    hist[5] = [0.9, 0.6]  # epoch 5 ready -> start at 6
    assert s.start_epoch(hist, 9, 10) == 6
    assert "from epoch 6" in s.report(hist, 9, 10, ["amygdala", "putamen"])
    assert s.ramp(hist, 6, 10) == pytest.approx(0.5) and s.ramp(hist, 7, 10) == 1.0
    assert s.ready([float("nan"), 0.5]) and not s.ready([0.49, 0.9])


def test_mixsup_warm_up_loss_is_nnunets_own(planned_2d):
    from nnunet_mixsup.trainers.mixsup import as_list

    tr = _trainer("MixSupTrainer", planned_2d, "2d", weak_kinds_from_start=())
    b = _batches(tr, 1)[0]  # no validation Dice logged yet: warm-up, mask samples only
    assert (b["sup_type"] == TYPE_CODES["mask"]).all()
    seg = [t[:, :1] for t in b["target"]]
    allowed = [t[:, 1:] for t in b["target"]]
    torch.manual_seed(0)
    with torch.no_grad():
        terms = tr.forward_and_loss(b["data"], seg, allowed, b)
        output = as_list(tr.network(b["data"]))
        assert len(output) > 1 and set(terms) == {"supervised"}  # no other term is computed
        assert torch.allclose(terms["supervised"], tr.loss(output, seg))  # nnU-Net's deep-supervised Dice + CE


@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_cutmix_student_sees_mixed_weak_samples_teacher_the_unmixed_batch(which, config, request, monkeypatch):
    # tiny plans have batch 2: strong_fraction 0.3 gives batches of two weak samples and mixed ones
    tr = _trainer("MixSupTrainer_StrongView", request.getfixturevalue(which), config, cutmix_prob=1.0,
                  strong_view_prob=0.0, strong_fraction=0.3)
    tr.num_epochs = 10
    n = len(tr.label_manager.foreground_labels)
    tr.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"][:] = [[0.9] * n] * 6
    tr.current_epoch = 6  # self-training started at epoch 4 (pseudo_start 0.4), full ramp
    assert tr.pseudo_ramp() == 1.0
    batches = [b for b in _batches(tr, 12) if int((b["sup_type"] != TYPE_CODES["mask"]).sum()) >= 2]
    assert batches, "no batch with two weak samples"
    b = batches[0]
    seen = []
    real_forward = tr.network.forward
    monkeypatch.setattr(tr.network, "forward", lambda x: (seen.append(x.clone()), real_forward(x))[1])
    calls = _spy_teacher(monkeypatch)
    torch.manual_seed(0)
    out = tr.train_step(b)
    assert np.isfinite(out["loss"]) and out["loss_pseudo"] != 0.0
    data = b["data"]
    assert torch.equal(calls[0]["data"], data)
    student = seen[0]
    weak = (b["sup_type"] != TYPE_CODES["mask"]).tolist()
    for i, w in enumerate(weak):
        if not w:
            assert torch.equal(student[i], data[i])  # mask samples are never mixed
            continue
        changed = (student[i] != data[i]).any(0)
        assert changed.any()  # cutmix_prob 1: every weak sample got a rectangle of another weak sample
        donors = [j for j, wj in enumerate(weak) if wj and j != i]
        assert any(torch.equal(student[i][:, changed], data[j][:, changed]) for j in donors)
    tr.current_epoch = 2  # warm-up: the unmixed MixSupTrainer path
    seen.clear()
    tr.train_step(b)
    assert torch.equal(seen[0], data)


@pytest.mark.parametrize("cls_name,weak_rows", [("MixSupTrainer_StrongViewAddWeak", True),
                                                 ("MixSupTrainer_MaskOnly2x", False)])
def test_weak_samples_on_top_of_a_full_mask_batch_after_the_start(cls_name, weak_rows, planned_2d):
    tr = _trainer(cls_name, planned_2d, "2d")
    tr.num_epochs = 10
    b = tr.batch_size
    n = len(tr.label_manager.foreground_labels)
    log = tr.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"]
    log[:] = [[0.0] * n] * 6  # warm-up: nothing found yet
    tr.current_epoch = 6
    assert tr.train_batch_size() == b
    assert all(len(x["sup_type"]) == b and (x["sup_type"] == TYPE_CODES["mask"]).all() for x in _batches(tr, 3))
    log[:] = [[0.9] * n] * 6  # started
    assert tr.train_batch_size() == 2 * b and tr.loader_strong_fraction() == 0.5
    batches = _batches(tr, 4)
    for x in batches:
        assert len(x["sup_type"]) == 2 * b and x["data"].shape[0] == 2 * b
        n_mask = int((x["sup_type"] == TYPE_CODES["mask"]).sum())
        assert n_mask == (b if weak_rows else 2 * b)  # the mask samples keep the plans' whole batch
    assert np.isfinite(tr.train_step(batches[0])["loss"])
    assert tr.trains_on_weak_cases is weak_rows
    assert len(_batches(tr, 1, val=True)[0]["data"]) == b  # validation keeps the plans' batch


@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_strong_view_student_sees_intensity_changed_weak_samples(which, config, request, monkeypatch):
    tr = _trainer("MixSupTrainer_StrongView", request.getfixturevalue(which), config, cutmix_prob=0.0,
                  strong_view_prob=1.0, strong_fraction=0.3)
    tr.num_epochs = 10
    n = len(tr.label_manager.foreground_labels)
    tr.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"][:] = [[0.9] * n] * 6
    tr.current_epoch = 6
    b = next(b for b in _batches(tr, 12) if bool((b["sup_type"] != TYPE_CODES["mask"]).any()))
    seen = []
    real_forward = tr.network.forward
    monkeypatch.setattr(tr.network, "forward", lambda x: (seen.append(x.clone()), real_forward(x))[1])
    calls = _spy_teacher(monkeypatch)
    out = tr.train_step(b)
    assert np.isfinite(out["loss"]) and out["loss_pseudo"] != 0.0
    assert torch.equal(calls[0]["data"], b["data"])  # the teacher labels the clean view
    for i, t in enumerate(b["sup_type"].tolist()):
        if t == TYPE_CODES["mask"]:
            assert torch.equal(seen[0][i], b["data"][i])
        else:
            assert not torch.allclose(seen[0][i], b["data"][i])
    tr.current_epoch = 2  # warm-up: no strong view
    seen.clear()
    tr.train_step(b)
    assert torch.equal(seen[0], b["data"])


@pytest.mark.parametrize("which,config", [("planned_2d", "2d"), ("planned_3d", "3d_fullres")])
def test_teacher_runs_on_the_weak_rows_only_with_full_batch_pseudo_labels(which, config, request, monkeypatch):
    import nnunet_mixsup.trainers.mixsup as M
    from nnunet_mixsup.lab.bench_speed import at_full_schedule

    tr = _trainer("MixSupTrainer", request.getfixturevalue(which), config)
    at_full_schedule(tr)  # self-training started: mixed batches
    b = next(b for b in _batches(tr, 8) if (b["sup_type"] == TYPE_CODES["mask"]).any()
             and (b["sup_type"] != TYPE_CODES["mask"]).any())
    seg0, allowed0 = b["target"][0][:, :1], b["target"][0][:, 1:]
    weak = b["sup_type"] != TYPE_CODES["mask"]
    ignore = tr.label_manager.ignore_label
    teacher = tr.extra_modules["teacher"]
    # reference: the teacher on the whole batch, pseudo labels kept on the weak rows only
    with torch.no_grad():
        full = M.constrain_pseudo_labels(torch.softmax(M.as_list(teacher(b["data"]))[0].float(), 1),
                                         allowed0.float())
    expected = pseudo_label_map(full, seg0, ignore, tr.pseudo_threshold, weak)
    rows_seen = []
    real = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda x: rows_seen.append(x.shape[0]) or real(x))
    for subset in (True, False):  # the weak rows only / the whole batch (a single row on the CPU)
        monkeypatch.setattr(M, "batch_subset_pays", lambda n, total, device, s=subset: s)
        rows_seen.clear()
        pseudo = M.teacher_pseudo_labels(teacher, b["data"], seg0, allowed0, weak, ignore, tr.pseudo_threshold)
        assert rows_seen == [int(weak.sum()) if subset else weak.numel()] and int(weak.sum()) < weak.numel()
        assert (pseudo[weak] != ignore).sum() > (seg0[weak] != ignore).sum()  # something was filled in
        mismatch = (pseudo != expected).float().mean().item()
        assert mismatch < 1e-4, mismatch  # equal up to float ties at the threshold
        assert torch.equal(pseudo[~weak], seg0[~weak])
    # a batch without weak rows: no teacher pass, the real labels unchanged
    rows_seen.clear()
    none = torch.zeros_like(weak)
    assert torch.equal(M.teacher_pseudo_labels(teacher, b["data"], seg0, allowed0, none, ignore, 0.8), seg0)
    assert not rows_seen


def test_batch_subset_pays():
    from nnunet_mixsup.trainers.mixsup import batch_subset_pays

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch_subset_pays(1, 2, cuda) and batch_subset_pays(3, 12, cpu) and batch_subset_pays(6, 12, cuda)
    assert not batch_subset_pays(1, 2, cpu)  # one row: torch's slow native CPU convolution
    assert not batch_subset_pays(2, 2, cuda) and not batch_subset_pays(12, 12, cpu)  # nothing saved


@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_dual_branch_sliced_teacher_has_the_full_batch_gradients(which, config, request, monkeypatch):
    """The teacher decoder's backward on mask samples only changes nothing but the cost."""
    import nnunet_mixsup.trainers.teacher_student as TS

    monkeypatch.setattr(TS, "batch_subset_pays", lambda n, total, device: 0 < n < total)  # even 1 row on the CPU
    tr = _trainer("MixSupTrainer_DualBranch", request.getfixturevalue(which), config)
    tr.current_epoch = 10 ** 6  # KL and entropy at full weight
    b = next(b for b in _batches(tr, 12) if (b["sup_type"] == TYPE_CODES["mask"]).any()
             and (b["sup_type"] != TYPE_CODES["mask"]).any())
    data = b["data"].to(tr.device)
    target = [t.to(tr.device) for t in b["target"]]
    seg, allowed = [t[:, :1] for t in target], [t[:, 1:] for t in target]
    params = [p for m in (tr.network, tr.extra_modules["teacher_decoder"]) for p in m.parameters()]
    results = {}
    for sliced in (False, True):
        tr.teacher_on_mask_slice = sliced
        for p in params:
            p.grad = None
        terms = tr.forward_and_loss(data, seg, allowed, b)
        sum(terms.values()).backward()
        results[sliced] = ({k: float(v.detach()) for k, v in terms.items()},
                           [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
    (t_full, g_full), (t_sliced, g_sliced) = results[False], results[True]
    assert tr.slice_teacher(b["sup_type"] == TYPE_CODES["mask"])  # the sliced path really ran
    # both paths are nnU-Net's loss on the mask samples as a sub-batch, for batch and per-sample Dice
    # (before the fix, the full-batch term with per-sample Dice carried a constant 1 per non-mask sample)
    for k in ("kl", "entropy", "supervised", "teacher"):
        assert t_sliced[k] == pytest.approx(t_full[k], rel=1e-5, abs=1e-7), k
    scale = max(float(g.abs().max()) for g in g_full)
    for a, c in zip(g_full, g_sliced):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5 * scale)
    assert any(g.abs().sum() > 0 for g in g_sliced[-len(list(tr.extra_modules["teacher_decoder"].parameters())):])


def test_dual_branch_shares_the_encoder(planned_2d):
    tr = _trainer("MixSupTrainer_DualBranch", planned_2d, "2d")
    dec = tr.extra_modules["teacher_decoder"]
    assert not any(k.startswith("encoder.") for k in dec.state_dict())
    enc = dict(tr.network.encoder.named_parameters())
    first = next(iter(enc.values()))
    tr.train_step(_batches(tr, 1)[0])
    assert first.grad is not None


def test_dmd_networks_start_different(planned_2d):
    tr = _trainer("MixSupTrainer_DMD", planned_2d, "2d")
    a = torch.cat([p.flatten() for p in tr.network.parameters()])
    b = torch.cat([p.flatten() for p in tr.extra_modules["net2"].parameters()])
    assert a.shape == b.shape and not torch.equal(a, b)


# ------------------------------------------------------------------------------ pseudo_label_map
def test_pseudo_label_map_hand_values():
    probs = torch.tensor([[0.1, 0.8, 0.3], [0.9, 0.2, 0.7]]).reshape(1, 2, 3, 1)  # (B=1, C=2, 3, 1)
    target = torch.tensor([[[[9], [1], [9]]]])  # 9 = ignore
    out = pseudo_label_map(probs, target, ignore_index=9, threshold=0.75)
    # voxel 0: unknown, conf 0.9 (class 1) -> 1; voxel 1: known -> kept; voxel 2: conf 0.7 < 0.75 -> ignore
    assert out.flatten().tolist() == [1, 1, 9]
    assert pseudo_label_map(probs, target, 9, 0.0).flatten().tolist() == [1, 1, 1]


def test_pseudo_label_map_sample_mask_and_3d():
    probs = torch.softmax(torch.randn(2, 3, 4, 4, 4), 1)
    target = torch.full((2, 1, 4, 4, 4), 5)
    out = pseudo_label_map(probs, target, 5, 0.0, sample_mask=torch.tensor([True, False]))
    assert torch.equal(out[0, 0], probs[0].argmax(0))
    assert torch.equal(out[1], target[1])
    with pytest.raises(ValueError, match="target must have shape"):
        pseudo_label_map(probs, target[:, :, :2], 5)


@pytest.mark.parametrize("cls_name", ["MixSupTrainer", "MixSupTrainer_MeanTeacher", "MixSupTrainer_DualBranch",
                                      "MixSupTrainer_DMD"])
def test_pretrained_weights_reach_teacher_and_second_network(cls_name, planned_2d, tmp_path):
    """``nnUNetv2_train -pretrained_weights`` loads the student after initialize(); training must start from them.

    The EMA teacher starts as the loaded student; a second network / teacher decoder gets the
    pretrained weights as nnU-Net loads them (all but the output layers).
    """
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    donor = _trainer("MixSupTrainer", planned_2d, "2d")
    with torch.no_grad():
        for p in donor.network.parameters():
            p.add_(0.5)  # clearly not a fresh initialisation
    f = str(tmp_path / "pretrained.pth")
    donor.save_checkpoint(f)
    tr = _trainer(cls_name, planned_2d, "2d")
    load_pretrained_weights(tr.network, f, verbose=False)  # what run_training does after initialize()
    tr.on_train_start()
    try:
        student = tr.network.state_dict()
        if "teacher" in tr.extra_modules:
            t = tr.extra_modules["teacher"].state_dict()
            assert all(torch.equal(t[k], student[k]) for k in student)
        other = tr.extra_modules.get("net2")
        prefix = ""
        if other is None and "teacher_decoder" in tr.extra_modules:
            other, prefix = tr.extra_modules["teacher_decoder"], "decoder."
        if other is not None:
            o = other.state_dict()
            shared = [k for k in o if ".seg_layers." not in f".{k}"]
            assert shared and all(torch.equal(o[k], student[prefix + k]) for k in shared)
            assert not all(torch.equal(o[k], student[prefix + k]) for k in o if k not in shared)
    finally:
        tr.on_train_end()
