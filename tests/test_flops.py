"""Model FLOPs (counted in full whatever kernels would run) and the chips' peak rates."""

import types

import jax
import jax.numpy as jnp
import pytest

from ella_jax.flops import model_flops, peak_flops_per_second, utilisation
from ella_jax.models.attention import dot_product_attention


def test_attention_is_counted_in_full(kernels):
    """4 B H T S D for the two matmuls (+ the softmax's few per score): on both kernel paths,
    though the blocked attention that would run counts one block of 128 or 512 queries."""
    batch, length, heads, dim = 2, 1100, 2, 64
    q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32)
    flops = model_flops(lambda q, k, v: dot_product_attention(q, k, v), q, q, q)
    matmuls = 4 * batch * heads * length * length * dim
    assert matmuls <= flops < 1.1 * matmuls


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v4", 275),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_by_device_kind(kind, tflops):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind)
    peak = peak_flops_per_second(device)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_cpu_peak_is_measured_and_mfu_follows():
    peak = peak_flops_per_second(jax.devices("cpu")[0], "float32")
    assert 1e8 < peak < 1e13  # a matmul rate a CPU can have
    rates = utilisation(flops=4e12, seconds=2.0, devices=2, peak=2e12)
    assert rates == {"tflops_per_device": 1.0, "mfu": 0.5}
    assert utilisation(1.0, 1.0, 1, None)["mfu"] is None
