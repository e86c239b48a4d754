"""The lab: benchmark, weak-label audit, speed measurement, demo and the trainers only experiments use.

Nothing in the library (data in, loader, losses, trainers, evaluation) imports from here.
"""
