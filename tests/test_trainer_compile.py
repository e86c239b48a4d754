"""Which trainers let nnU-Net torch.compile the network, and why the others do not."""
from __future__ import annotations

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_mixsup.trainers as T
from nnunet_mixsup.lab import experiment_trainers as X

# True: nnU-Net's own rule (CUDA, not Windows, nnUNet_compile) decides, as for stock nnUNetTrainer.
# False: a forward hook reads a submodule's output (torch.compile does not reliably call hooks on
# compiled submodules): MeanTeacher's pseudo-label head taps the last decoder stage, DualBranch's
# teacher decoder taps the encoder's skips.
EXPECTED = {
    "MixSupTrainer": True,
    "MixSupTrainer_MLDS": True,
    "MixSupTrainer_DMD": True,
    "MixSupTrainer_MeanTeacher": False,
    "MixSupTrainer_DualBranch": False,
    "MixSupTrainer_StrongView": True,
    "MixSupTrainer_StrongViewAddWeak": True,
    "MixSupTrainer_MaskOnly2x": True,
    "MixSupTrainer_MaskFirst": True,
    "MixSupTrainer_WarmupFirst": True,
    "MixSupTrainer_BoxTerm": True,
    "MixSupTrainer_BoxFill": True,
    "MixSupTrainer_BoxPositives": True,
    "MixSupTrainer_WeakPerClass": True,
    "MixSupTrainer_WeakFromStart": True,
    "MixSupTrainer_PseudoCE": True,
    "MixSupTrainer_OpenEmptyBoxes": True,
}


@pytest.mark.parametrize("name,compiles", sorted(EXPECTED.items()))
@pytest.mark.parametrize("stock", [True, False])
def test_compile_follows_stock_unless_a_hook_needs_it_off(name, compiles, stock, monkeypatch):
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: stock)
    cls = getattr(T, name, None) or getattr(X, name)
    trainer = cls.__new__(cls)  # the decision needs no initialised trainer
    assert trainer._do_i_compile() is (stock and compiles)


def test_every_public_and_experiment_trainer_is_listed():
    public = {n for n in T.PUBLIC_TRAINERS if n.startswith("MixSup")}
    experiments = {n for n, v in vars(X).items() if isinstance(v, type) and issubclass(v, T.MixSupTrainerBase)}
    assert public | experiments == set(EXPECTED)
