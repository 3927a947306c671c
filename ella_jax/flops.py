"""Model FLOPs and the chips' peak rates, for throughput as model FLOPs utilisation (MFU).

The FLOPs are XLA's count of a function traced with the `reference` kernels (full-score XLA
attention, `nn.Conv`; `ella_jax.kernels`): the plain formulation, counted in full. The kernels
that run are not: XLA counts a loop's body once (the blocked attention) and nothing inside a
custom call (cuDNN's flash attention), and rematerialisation adds work that is not the model's.
"""

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.kernels import use_kernels

# Dense bfloat16 peak TFLOP/s per chip (per JAX device), from the vendors' data sheets; the first
# name contained in `device.device_kind` wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def model_flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's FLOP count of `fn(*args)` with the reference kernels. args may be abstract
    (`jax.ShapeDtypeStruct`); `fn` is traced and lowered, never compiled or run."""
    with use_kernels("reference"):
        # A fresh function: jax.jit(fn) would reuse a trace of `fn` made with other kernels.
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def peak_flops_per_second(device: jax.Device, dtype: DTypeLike = jnp.bfloat16) -> float | None:
    """The device's dense bfloat16 peak from `PEAK_BF16_TFLOPS` (None for a chip not listed);
    on a CPU, the measured rate of a large matmul in `dtype`."""
    if device.platform == "cpu":
        return measured_matmul_rate(jnp.dtype(dtype).name)
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device.device_kind:
            return tflops * 1e12
    return None


@functools.cache
def measured_matmul_rate(dtype: str, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a (size, size) @ (size, size) matmul on the default device, the median of
    `repeats` after a warm-up."""
    x = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)


def utilisation(
    flops: float, seconds: float, devices: int, peak: float | None
) -> dict[str, float | None]:
    """{"tflops_per_device", "mfu"} of `flops` done in `seconds` over `devices` devices of
    peak rate `peak` FLOP/s (mfu None when the peak is unknown)."""
    per_device = flops / max(seconds, 1e-12) / devices
    return {"tflops_per_device": per_device / 1e12, "mfu": per_device / peak if peak else None}
