"""ella-jax: ELLA, the LLM adapter for diffusion models, in JAX/Flax (and SUR-adapter beside it)."""

from typing import Any

from ella_jax.models.ella import ELLA
from ella_jax.models.sur_adapter import SURAdapter
from ella_jax.weights.ella import load_ella
from ella_jax.weights.sur import load_sur_adapter
from ella_jax.weights.tensors import CheckpointError

__all__ = [
    "ELLA",
    "CheckpointError",
    "ELLAPipeline",
    "SURAdapter",
    "load_ella",
    "load_sur_adapter",
]


def __getattr__(name: str) -> Any:
    # The pipeline pulls in every backbone and the tokenizers: imported on first use only.
    if name == "ELLAPipeline":
        from ella_jax.pipeline import ELLAPipeline

        return ELLAPipeline
    raise AttributeError(f"module 'ella_jax' has no attribute {name!r}")
