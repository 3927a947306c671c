"""Model weights from and to PyTorch safetensors layouts: reading, naming, validation."""
