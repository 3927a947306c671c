"""Checkpoint conversion between PyTorch safetensors layouts and ella-jax parameter trees.

`python -m convert --help` in the repository, `ella-jax-convert --help` anywhere.
"""
