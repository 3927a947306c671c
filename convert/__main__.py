"""`python -m convert` in the repository: `python -m ella_jax.convert` (`ella-jax-convert`)."""

import runpy

runpy.run_module("ella_jax.convert", run_name="__main__", alter_sys=True)
