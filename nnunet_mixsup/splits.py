"""Cross-validation splits for mixed supervision.

Validation can only score cases with a full mask, so validation folds are made of mask cases only
and every weak case is in every fold's training set. The file has nnU-Net's ``splits_final.json``
format, so stock tools (``nnUNetv2_find_best_configuration``, ensembling) read it unchanged.
"""
from __future__ import annotations

from nnunetv2.utilities.crossval_split import generate_crossval_split


def mixsup_splits(mask_ids: list[str], weak_ids: list[str], n_splits: int = 5,
                  seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net-style k-fold split over the mask cases; weak cases always train.

    With fewer mask cases than ``n_splits`` there is one fold per mask case; a single mask case
    gives one fold that validates on its own training case (nnU-Net warns about the overlap).
    """
    mask_ids, weak_ids = sorted(mask_ids), sorted(weak_ids)
    if not mask_ids:
        raise ValueError("cannot build validation folds: the dataset has no mask case")
    if len(mask_ids) == 1:
        return [{"train": mask_ids + weak_ids, "val": list(mask_ids)}]
    folds = generate_crossval_split(mask_ids, seed=seed, n_splits=min(n_splits, len(mask_ids)))
    return [{"train": sorted(f["train"]) + weak_ids, "val": sorted(f["val"])} for f in folds]
