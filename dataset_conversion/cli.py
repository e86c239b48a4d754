"""``nnunet-mixsup convert acdc|la|retouch``: public datasets -> nnU-Net raw datasets with supervision.json.

Registered by :mod:`nnunet_mixsup.cli` through :func:`register_cli`. Errors (a broken source folder,
an existing target, ``nnUNet_raw`` unset) are printed by that command line as one message and give
exit status 1.
"""
from __future__ import annotations

from typing import Any

from dataset_conversion import acdc, la, retouch


def register_cli(subparsers: Any) -> None:
    """Add the ``convert`` command with one sub-command per dataset (each with ``--help``)."""
    p = subparsers.add_parser(
        "convert", help="convert a public dataset (ACDC, LA, RETOUCH) into an nnU-Net raw dataset",
        description="Convert a downloaded public dataset into nnUNet_raw/DatasetXXX_NAME (nnU-Net v2 layout, "
                    ".nii.gz) with a supervision.json in which every training case is a 'mask' case. Derive weak "
                    "labels from it with 'nnunet-mixsup simulate'. The source folder is checked completely before "
                    "anything is written. Nothing is downloaded.")
    sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for mod in (acdc, la, retouch):
        mod.add_parser(sub)
