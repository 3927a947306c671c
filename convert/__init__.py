"""The repository's short command name, `python -m convert`, for `ella_jax.convert` (installed
anywhere as `ella-jax-convert`). Not installed: a package named `convert` would collide."""
