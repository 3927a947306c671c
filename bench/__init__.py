"""Benchmarks and the PyTorch references they compare against (test-only dependencies)."""
