"""The folder to put in ``nnUNet_extTrainer`` (``export nnUNet_extTrainer=$(nnunet-mixsup trainers-path)``).

nnU-Net imports the modules of this folder as plain top-level modules and removes them from
``sys.modules`` afterwards, so a class *defined* here could not be pickled by nnU-Net's
data-augmentation workers. The modules therefore only re-export classes defined in
:mod:`nnunet_mixsup.trainers`.
"""
