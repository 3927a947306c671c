"""Model FLOPs and the chips' peak rates, for throughput as model FLOPs utilisation (MFU).

The FLOPs are those of the matmuls and convolutions (2 per multiply-add, the convention of MFU),
counted on the function's jaxpr traced with the `reference` kernels (`ella_jax.kernels`:
full-score XLA attention, `nn.Conv`): the model as written, forward and backward, every loop
iteration counted. The kernels that run are not what is counted: cuDNN's flash attention is one
opaque call, and rematerialisation adds work that is not the model's. Counting on the jaxpr needs
no compiler: `Lowered.cost_analysis()` is unavailable on GPUs and TPUs (their PJRT C API), and
XLA's own count takes a loop's body once.
"""

import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from jax.typing import DTypeLike

from ella_jax.kernels import use_kernels

# Dense bfloat16 peak TFLOP/s per chip (per JAX device), from the vendors' data sheets; the first
# name contained in `device.device_kind` wins (so the longer names come first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def model_flops(fn: Callable[..., Any], *args: Any) -> float:
    """Matmul and convolution FLOPs of `fn(*args)` with the reference kernels; args may be
    abstract (`jax.ShapeDtypeStruct`). Traced only: nothing is compiled or run."""
    with use_kernels("reference"):
        # A fresh function: tracing `fn` itself could reuse a trace made with other kernels.
        traced = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    return float(_jaxpr_flops(traced.jaxpr))


def _jaxpr_flops(jaxpr: jax_core.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
            )
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            per_output = math.prod(kernel) // out_features  # (kernel window) x (inputs / group)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        inner = [_jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params)]
        if name == "cond":  # one branch runs
            total += max(inner, default=0)
        else:  # a while loop's body counts once: its trip count is not known
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def _sub_jaxprs(params: dict[str, Any]) -> list[jax_core.Jaxpr]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jax_core.Jaxpr):
                found.append(item)
    return found


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
