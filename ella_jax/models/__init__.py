"""Flax Linen modules: the ELLA connector and the frozen backbones it conditions."""
