"""Training the ELLA connector: `python -m train.main --config configs/X.py --workdir DIR`."""
