"""Training the ELLA connector (or a SUR-adapter): `python -m train.main --config configs/X.py
--workdir DIR` in the repository, `ella-jax-train` anywhere."""
