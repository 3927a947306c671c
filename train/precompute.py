"""`python -m train.precompute` in the repository: `ella_jax.train.precompute`
(`ella-jax-precompute`)."""

import runpy

runpy.run_module("ella_jax.train.precompute", run_name="__main__", alter_sys=True)
