"""nnunet-mixsup: mixed-supervision 3D segmentation inside nnU-Net v2.

Where things live:

- :mod:`nnunet_mixsup.manifest` – the ``supervision.json`` format, its validation.
- :mod:`nnunet_mixsup.prepare` – writes what stock nnU-Net needs (ignore-label maps, dataset.json).
- :mod:`nnunet_mixsup.preprocess` – planning/preprocessing with mask-only intensity statistics.
- :mod:`nnunet_mixsup.geometry` – raw-space boxes to preprocessed / patch space.
- :mod:`nnunet_mixsup.data` – the mixed-supervision data loader.
- :mod:`nnunet_mixsup.losses` – plain torch loss modules.
- :mod:`nnunet_mixsup.trainers` – ``MixSupTrainer`` and its variants.
- :mod:`nnunet_mixsup.evaluation` – Dice, HD95, NSD per case and class.
- :mod:`nnunet_mixsup.lab` – benchmark, weak-label audit, speed measurement, demo and dataset builders
  (the synthetic test data among them); the library never imports it.
"""
__version__ = "0.1.0"
