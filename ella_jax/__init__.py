"""ella-jax: ELLA, the LLM adapter for diffusion models, in JAX/Flax."""

from ella_jax.models.ella import ELLA
from ella_jax.weights.ella import load_ella
from ella_jax.weights.tensors import CheckpointError

__all__ = ["ELLA", "CheckpointError", "load_ella"]
