"""`python -m train.main` in the repository: `ella_jax.train.main` (installed: `ella-jax-train`)."""

import runpy

runpy.run_module("ella_jax.train.main", run_name="__main__", alter_sys=True)
