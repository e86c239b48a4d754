"""Folder of thin modules re-exporting :mod:`nnunet_mixsup.lab.experiment_trainers` for ``nnUNet_extTrainer``.

Only ``nnunet-mixsup benchmark`` adds it; users see the public trainers of ``trainers/`` only.
"""
