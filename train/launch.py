"""`python -m train.launch` in the repository: `ella_jax.train.launch` (`ella-jax-launch`)."""

import runpy

runpy.run_module("ella_jax.train.launch", run_name="__main__", alter_sys=True)
