"""The connector at the released size (B=2, 128 tokens): jitted JAX against PyTorch eager.

    .venv/bin/python -m bench.ella_connector [--batch 2] [--tokens 128] [--dtype float32]

Both run the same random weights on the same CPU threads; prints median milliseconds per forward
and the ratio. Needs the test extra (torch, diffusers).
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.timing import median_seconds
from bench.torch_ella import TorchELLA
from ella_jax import ELLA
from ella_jax.weights.naming import params_to_torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    model = ELLA(dtype=args.dtype)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.batch, args.tokens, model.input_dim), dtype=np.float32)
    timesteps = np.linspace(999, 1, args.batch).astype(np.float32)
    params = model.init(jax.random.key(0), features[:1, :1], timesteps[:1])["params"]
    # Non-zero adaLN weights, so every path computes something.
    params = jax.tree.map(lambda p: p + 0.01 * jnp.ones_like(p), params)

    forward = jax.jit(model.apply)
    jax_features, jax_timesteps = jnp.asarray(features), jnp.asarray(timesteps)
    compiled = forward.lower({"params": params}, jax_features, jax_timesteps).compile()
    gflop = compiled.cost_analysis()["flops"] / 1e9
    jax_ms = 1e3 * median_seconds(
        lambda: forward({"params": params}, jax_features, jax_timesteps).block_until_ready(),
        args.repeats,
    )

    reference = TorchELLA().eval().to(getattr(torch, args.dtype))
    state = {
        k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_torch(params).items()
    }
    reference.load_state_dict(state)
    torch_features = torch.from_numpy(features).to(getattr(torch, args.dtype))
    torch_timesteps = torch.from_numpy(timesteps)
    with torch.inference_mode():
        torch_ms = 1e3 * median_seconds(
            lambda: reference(torch_features, torch_timesteps), args.repeats
        )

    print(
        f"ELLA connector, released size, B={args.batch}, {args.tokens} tokens, {args.dtype}, "
        f"CPU x{os.cpu_count()} (jax {jax.__version__}, torch {torch.__version__}):\n"
        f"  JAX jit        {jax_ms:8.2f} ms\n"
        f"  PyTorch eager  {torch_ms:8.2f} ms\n"
        f"  speed-up       {torch_ms / jax_ms:8.2f}x\n"
        f"  XLA counts {gflop:.1f} GFLOP: JAX runs at {1e3 * gflop / jax_ms:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
