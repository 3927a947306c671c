"""The repository's short command names, `python -m train.main` and its siblings, for the
training commands of `ella_jax.train` (installed anywhere as `ella-jax-train`, ...). Not
installed: a package named `train` would collide with others."""
