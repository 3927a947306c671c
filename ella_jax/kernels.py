"""Which kernels the models trace: the one switch, `ELLA_JAX_KERNELS=auto|cpu|accelerator`.

- `cpu`: the kernels tuned for XLA:CPU: the blocked attention (`attention.blocked_attention`)
  and the UNet's 3x3 convolutions as one matmul over patches (`resnet.PatchConv`).
- `accelerator`: what runs on GPUs and TPUs: `jax.nn.dot_product_attention` (cuDNN flash
  attention on NVIDIA GPUs where its limits hold, XLA's implementation elsewhere for short
  sequences), the memory-bounded blocked attention for long ones, and `nn.Conv`. On a CPU it
  runs the same code with XLA standing in for cuDNN: the tests use it, and so can a user
  debugging a GPU run on a laptop.
- `auto` (the default): `cpu` on the CPU backend, `accelerator` on any other.

The choice is made when a model is traced, so a function jitted under one setting keeps it.
`use_kernels` overrides the variable within a block; its `reference` path (full-score XLA
attention, `nn.Conv`) is the plain formulation whose FLOPs XLA counts in full (`ella_jax.flops`).
`compiling_for` traces for another platform than the one here (an ahead-of-time compile for TPU
chips this host does not have): `auto` and the kernels' device checks then see that platform.
"""

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Literal, get_args

import jax

ENV_VAR = "ELLA_JAX_KERNELS"
KernelPath = Literal["cpu", "accelerator", "reference"]
_SETTINGS = ("auto", "cpu", "accelerator")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels", default=None)
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


def kernel_path() -> KernelPath:
    """The kernel family to trace now: `use_kernels`' if inside one, else ELLA_JAX_KERNELS's."""
    forced = _override.get()
    if forced is not None:
        return forced
    setting = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if setting not in _SETTINGS:
        raise ValueError(f"{ENV_VAR}={setting!r}: use one of {', '.join(_SETTINGS)}")
    if setting == "auto":
        return "cpu" if target_platform() == "cpu" else "accelerator"
    return setting


def target_platform() -> str:
    """The platform models are traced for: `compiling_for`'s, else the default backend's."""
    return _target.get() or jax.default_backend()


def compiling_for_another_platform() -> bool:
    """Whether a `compiling_for` block names the platform (its devices are not here)."""
    return _target.get() is not None


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Within the block, models trace for `platform` ("cpu", "gpu", "tpu") whatever devices
    this host has: for compiling ahead of time (`ella_jax.train.aot`)."""
    token = _target.set(platform)
    try:
        yield
    finally:
        _target.reset(token)


@contextlib.contextmanager
def use_kernels(path: KernelPath) -> Iterator[None]:
    """Within the block, models trace `path`'s kernels whatever ELLA_JAX_KERNELS says."""
    if path not in get_args(KernelPath):
        raise ValueError(f"kernel path {path!r}: use one of {', '.join(get_args(KernelPath))}")
    token = _override.set(path)
    try:
        yield
    finally:
        _override.reset(token)
