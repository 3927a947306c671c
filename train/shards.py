"""`python -m train.shards` in the repository: `ella_jax.train.shards` (`ella-jax-shards`)."""

import runpy

runpy.run_module("ella_jax.train.shards", run_name="__main__", alter_sys=True)
