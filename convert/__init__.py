"""Checkpoint conversion between PyTorch safetensors layouts and ella-jax parameter trees.

`python -m convert --help` for the command line.
"""
