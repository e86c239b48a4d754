"""Trainer variants run real train steps on the synthetic data (in-process, tiny network)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_mixsup.plans import shrink_configuration


def _trainer(cls_name, info, config):
    import nnunet_mixsup.trainer as T
    import nnunet_mixsup.trainer_distill as TD

    plans = load_json(str(info["pp"] / f"{info['plans']}.json"))
    plans["configurations"][config] = shrink_configuration(plans["configurations"][config], 32, base_features=4)
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training puts this into the plans
    dj = load_json(str(info["pp"] / "dataset.json"))
    tr = (getattr(TD, cls_name, None) or getattr(T, cls_name))(plans, config, 0, dj, device=torch.device("cpu"))
    tr.num_iterations_per_epoch = 2
    tr.num_val_iterations_per_epoch = 1
    tr.initialize()
    return tr


@pytest.mark.parametrize("cls_name", ["MixSupTrainer", "MixSupTrainer_Negatives", "MixSupTrainer_MLDS",
                                      "MixSupTrainer_WeakOnly"])
@pytest.mark.parametrize("which,config", [("planned_3d", "3d_fullres"), ("planned_2d", "2d")])
def test_train_steps_finite_and_all_terms_logged(cls_name, which, config, request):
    info = request.getfixturevalue(which)
    tr = _trainer(cls_name, info, config)
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
    tr = _trainer("MixSupTrainer_MLDS", planned_3d, "3d_fullres")
    ds_tr, _ = tr.get_tr_and_val_datasets()
    sup = tr.load_supervision()
    assert ds_tr.identifiers and all(sup[k].type == "mask" for k in ds_tr.identifiers)


def test_exported_weights_load_into_stock_inference_network(planned_3d):
    """Inference cost equals stock nnU-Net: the network is nnU-Net's own, DS off."""
    tr = _trainer("MixSupTrainer_WeakOnly", planned_3d, "3d_fullres")
    net = type(tr).build_network_architecture(tr.plans_manager, tr.configuration_manager, tr.num_input_channels,
                                              tr.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    net.load_state_dict(tr.network.state_dict())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tr.network.parameters())


def test_boxes_inside_patch():
    from nnunet_mixsup.trainer import boxes_inside_patch

    m = torch.zeros(2, 2, 6, 6)
    m[0, 0, 2:4, 2:4] = 1   # inside
    m[0, 1, 0:3, 2:4] = 1   # touches the border
    assert boxes_inside_patch(m).tolist() == [[True, False], [False, False]]


def test_manifest_sidecar_required_with_ignore_label(planned_3d, tmp_path):
    info = dict(planned_3d)
    assert json.loads((info["pp"] / "dataset.json").read_text())["labels"]["ignore"] == 3


def test_non_finite_loss_is_skipped_then_stops(planned_3d):
    tr = _trainer("MixSupTrainer", planned_3d, "3d_fullres")
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


def test_supervised_loss_is_nnunet_loss_per_group(planned_2d):
    """Mask part: nnU-Net's loss on the mask samples alone; weak part: CE over their known voxels."""
    from nnunet_mixsup.manifest import TYPE_CODES

    tr = _trainer("MixSupTrainer", planned_2d, "2d")
    torch.manual_seed(0)
    ign = tr.label_manager.ignore_label
    c = tr.label_manager.num_segmentation_heads
    out = torch.randn(4, c, 8, 8)
    seg = torch.randint(0, c, (4, 1, 8, 8))
    seg[2:, :, :4] = ign  # weak samples: partly unknown
    batch = {"sup_type": torch.tensor([TYPE_CODES["mask"], TYPE_CODES["mask"], TYPE_CODES["box"], TYPE_CODES["none"]])}
    loss = tr.loss.loss  # nnU-Net's Dice + CE (inside the deep-supervision wrapper)
    got = tr.supervised_loss(loss, out, seg, batch)
    known = seg[2:] != ign
    ce = torch.nn.functional.cross_entropy(out[2:], torch.where(known, seg[2:], 0)[:, 0], reduction="none")
    want = loss(out[:2], seg[:2]) + tr.weak_supervised_weight * ce[known[:, 0]].mean()
    assert torch.allclose(got, want, atol=1e-5)
    tr.separate_group_losses = False
    assert torch.allclose(tr.supervised_loss(loss, out, seg, batch), loss(out, seg))


def test_box_term_auto_uses_presence_for_slices_of_volumes(planned_3d, planned_2d, monkeypatch):
    tr3 = _trainer("MixSupTrainer", planned_3d, "3d_fullres")
    assert tr3.training_data_is_volumetric() and tr3.resolved_box_term() == "tightness"  # 3D patches
    tr2 = _trainer("MixSupTrainer", planned_2d, "2d")
    assert not tr2.training_data_is_volumetric() and tr2.resolved_box_term() == "tightness"  # true 2D images
    # a 2D configuration on volumetric data sees cross-sections of 3D boxes -> presence
    tr2v = _trainer("MixSupTrainer", planned_2d, "2d")
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
