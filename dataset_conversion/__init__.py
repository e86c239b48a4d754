"""Converters from public dataset releases to nnU-Net raw datasets with a supervision manifest."""
