"""Installation script of nnunet-mixsup.

The thin trainer modules in ``trainers/`` (the folder users put in ``nnUNet_extTrainer``) are
installed as the sub-package ``nnunet_mixsup.ext_trainers`` so that ``nnunet-mixsup trainers-path``
finds them for editable and regular installs alike.
"""
from pathlib import Path

from setuptools import setup

setup(
    name="nnunet-mixsup",
    version="0.1.0",
    description="Mixed-supervision (mask / box / image-tag / unlabelled) training for nnU-Net v2",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["nnunet_mixsup", "nnunet_mixsup.trainers", "nnunet_mixsup.lab", "nnunet_mixsup.lab.benchmark",
              "nnunet_mixsup.lab.ext_trainers", "nnunet_mixsup.ext_trainers", "dataset_conversion"],
    package_dir={"nnunet_mixsup.ext_trainers": "trainers"},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1.2",
        "batchgeneratorsv2>=0.3.2",
        "SimpleITK",
        "numpy",
        "scipy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "ruff", "hypothesis", "h5py"],
        "demo": ["nilearn", "matplotlib"],
        "convert": ["h5py"],
    },
    entry_points={"console_scripts": ["nnunet-mixsup=nnunet_mixsup.cli:main"]},
)
