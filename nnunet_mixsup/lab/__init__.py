"""The lab: benchmark, weak-label audit, speed measurement, demo, dataset builders and the trainers only experiments use.

Dataset builders: ``synthetic`` (the small test dataset), ``demo_data`` and ``inia19_data`` (dense
datasets from brain templates) and ``simulate`` (a mixed-supervision dataset derived from a dense
one). Nothing in the library (data in, loader, losses, trainers, evaluation, shared helpers)
imports from here; ``nnunet_mixsup.cli`` imports both.
"""
