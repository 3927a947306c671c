"""Attention and convolution against PyTorch's on both kernel paths (`ella_jax.kernels`), at
shapes the fixtures do not reach: long queries (blocked, the last block padded), key masks, a
T5-style position bias, float16, the backward pass; which implementation each device gets; and
no full score buffer in a UNet's backward pass at 4096 tokens."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from ella_jax.kernels import kernel_path, use_kernels
from ella_jax.models.attention import choose_attention, dot_dtype, dot_product_attention
from ella_jax.models.resnet import PatchConv, conv
from ella_jax.models.unet import UNet2DConditionModel, UNetConfig


def torch_attention(q, k, v, key_mask=None, bias=None, scale=None):
    """PyTorch's scaled_dot_product_attention on (B, T, H, D) numpy arrays; returns torch
    tensors (out, and the q, k, v leaves for gradients)."""
    import torch

    q, k, v = (
        torch.from_numpy(np.asarray(t, np.float32)).transpose(1, 2).requires_grad_()
        for t in (q, k, v)
    )
    mask = None
    if key_mask is not None:
        mask = torch.from_numpy(np.asarray(key_mask))[:, None, None]
    if bias is not None:
        bias = torch.from_numpy(np.asarray(bias, np.float32))
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2), (q, k, v)


def inputs(queries: int, keys: int = 77, heads: int = 4, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, queries, heads, dim), np.float32)
    k, v = rng.standard_normal((2, 2, keys, heads, dim), np.float32)
    key_mask = np.arange(keys)[None] < np.array([[keys], [30]])
    return q, k, v, key_mask


@pytest.mark.parametrize("queries", [1100, 512, 100])  # blocked (padded) on both paths; short
def test_attention_matches_torch(kernels, queries):
    q, k, v, key_mask = inputs(queries)
    out = jax.jit(lambda *a: dot_product_attention(*a))(q, k, v, key_mask)
    assert relative_error(out, torch_attention(q, k, v, key_mask)[0].detach().numpy()) < 1e-5
    # float16 compiles on every path: XLA:CPU has no F16_F16_F32 dot (nor have TPUs).
    half = jax.jit(lambda *a: dot_product_attention(*a))(
        *(jnp.asarray(t, jnp.float16) for t in (q, k, v))
    )
    assert half.dtype == jnp.float16
    assert relative_error(half, torch_attention(q, k, v)[0].detach().numpy()) < 5e-3


def test_bias_mask_and_gradients_match_torch(kernels):
    """T5's case (a per-query position bias, a key mask, no scaling) at a length that is
    blocked on both paths, forward and backward (the blocks are rematerialised)."""
    q, k, v, key_mask = inputs(1100, keys=1100, heads=2, dim=8)
    bias = np.random.default_rng(1).standard_normal((1, 2, 1100, 1100), np.float32)
    cotangent = np.random.default_rng(2).standard_normal(q.shape, np.float32)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, key_mask, jnp.asarray(bias), scale=1.0)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    expected, leaves = torch_attention(q, k, v, key_mask, bias, scale=1.0)
    assert relative_error(out, expected.detach().numpy()) < 1e-5
    import torch

    (expected * torch.from_numpy(cotangent)).sum().backward()
    for grad, leaf in zip(grads, leaves, strict=True):
        assert relative_error(grad, leaf.grad.transpose(1, 2).numpy()) < 1e-4


HOPPER, AMPERE, VOLTA = (9, 0), (8, 0), (7, 0)


@pytest.mark.parametrize(
    "path, platform, capability, dtype, head_dim, queries, masked, expected",
    [
        # SD 1.5 at 512 px in bfloat16: level 1 self-attention, level 3 (head dim 160) cross.
        ("accelerator", "gpu", HOPPER, "bfloat16", 40, 4096, False, "cudnn"),
        ("accelerator", "gpu", HOPPER, "bfloat16", 160, 256, False, "cudnn"),
        ("accelerator", "gpu", AMPERE, "bfloat16", 160, 256, False, "xla"),
        ("accelerator", "gpu", AMPERE, "float16", 80, 1024, False, "cudnn"),
        # float32 (or a dtype upcast to it), or a head dim cuDNN cannot take: XLA when short,
        # blocked when long.
        ("accelerator", "gpu", HOPPER, "float32", 40, 4096, False, "blocked"),
        ("accelerator", "gpu", HOPPER, "bfloat16", 512, 4096, False, "blocked"),
        ("accelerator", "gpu", HOPPER, "bfloat16", 36, 64, False, "xla"),
        # masked (ELLA over padded tokens, T5's position bias): not cuDNN.
        ("accelerator", "gpu", HOPPER, "bfloat16", 96, 64, True, "xla"),
        ("accelerator", "gpu", HOPPER, "float16", 64, 1024, True, "blocked"),
        # no flash attention before Ampere.
        ("accelerator", "gpu", VOLTA, "float16", 64, 64, False, "xla"),
        ("accelerator", "gpu", None, "bfloat16", 40, 4096, False, "blocked"),  # ROCm
        ("accelerator", "tpu", None, "bfloat16", 40, 4096, False, "blocked"),
        ("accelerator", "tpu", None, "bfloat16", 40, 1023, False, "xla"),
        ("accelerator", "cpu", None, "bfloat16", 40, 4096, False, "blocked"),
        ("cpu", "cpu", None, "float32", 40, 64, False, "blocked"),
        ("reference", "gpu", HOPPER, "bfloat16", 40, 4096, False, "xla"),
    ],
)
def test_choice_of_implementation(
    path, platform, capability, dtype, head_dim, queries, masked, expected
):
    choice = choose_attention(path, platform, capability, dtype, head_dim, queries, masked)
    assert choice == expected


def test_an_nvidia_gpu_gets_cudnn_with_its_dtypes(monkeypatch):
    """The GPU branch of `dot_product_attention`, run on the CPU: a Hopper GPU is pretended,
    and jax.nn.dot_product_attention records what it is asked for, then computes it with XLA."""
    import ella_jax.models.attention as attention

    calls = []
    xla = jax.nn.dot_product_attention

    def recording(query, key, value, *, implementation, **kw):
        calls.append((implementation, query.dtype, kw["mask"] is not None))
        return xla(query, key, value, implementation="xla", **kw)

    monkeypatch.setenv("ELLA_JAX_KERNELS", "accelerator")
    monkeypatch.setattr(attention, "_device", lambda: ("gpu", HOPPER))
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    q, k, v, key_mask = inputs(64, keys=64, dim=40)
    expected = torch_attention(q, k, v)[0].detach().numpy()
    half = [jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)]
    out = dot_product_attention(*half)
    assert calls == [("cudnn", jnp.bfloat16, False)] and out.dtype == jnp.bfloat16
    assert relative_error(out, expected) < 2e-2
    dot_product_attention(*half, key_mask=key_mask)  # masked: XLA's
    dot_product_attention(*(jnp.asarray(t, jnp.float16) for t in (q, k, v)))
    assert calls[1:] == [("xla", jnp.bfloat16, True), ("cudnn", jnp.float16, False)]
    monkeypatch.setattr(attention, "_device", lambda: ("gpu", VOLTA))
    dot_product_attention(*half)  # bfloat16 before Ampere: float32, XLA's
    assert calls[3:] == [("xla", jnp.float32, False)]


def test_dot_dtypes_compile_on_every_backend():
    assert dot_dtype(jnp.float16, "tpu", None) == jnp.float32
    assert dot_dtype(jnp.float16, "cpu", None) == jnp.float32
    assert dot_dtype(jnp.float16, "gpu", VOLTA) == jnp.float16
    assert dot_dtype(jnp.bfloat16, "gpu", VOLTA) == jnp.float32
    assert dot_dtype(jnp.bfloat16, "gpu", AMPERE) == jnp.bfloat16
    assert dot_dtype(jnp.bfloat16, "tpu", None) == jnp.bfloat16


def test_the_switch(monkeypatch):
    for setting, path in [("", "cpu"), ("auto", "cpu"), ("accelerator", "accelerator")]:
        monkeypatch.setenv("ELLA_JAX_KERNELS", setting)
        assert kernel_path() == path
        with use_kernels("reference"):
            assert kernel_path() == "reference"
        assert kernel_path() == path
    kinds = lambda: type(conv(8, 3, "c", im2col=True))  # noqa: E731
    assert kinds() is nn.Conv
    monkeypatch.setenv("ELLA_JAX_KERNELS", "cpu")
    assert kinds() is PatchConv
    monkeypatch.setenv("ELLA_JAX_KERNELS", "gpu")
    with pytest.raises(ValueError, match="ELLA_JAX_KERNELS='gpu': use one of auto, cpu"):
        kernel_path()


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (2, 0)])
def test_patch_conv_matches_torch_conv2d(stride, padding):
    import torch

    x = np.random.default_rng(1).standard_normal((2, 9, 9, 5), np.float32)
    module = PatchConv(7, 3, stride, padding)
    params = module.init(jax.random.key(0), x)["params"]
    params["bias"] = jnp.arange(7.0)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(np.asarray(params["kernel"]).transpose(3, 2, 0, 1).copy()),
        torch.from_numpy(np.array(params["bias"])),
        stride=stride,
        padding=padding,
    )
    out = module.apply({"params": params}, x)
    assert relative_error(out, expected.permute(0, 2, 3, 1).numpy()) < 1e-5


def test_unet_backward_at_4096_tokens_holds_no_full_scores():
    """A UNet forward and backward (to its context, as in training) at a 64x64 latent: SD 1.5
    at 512 px attends over 4096 tokens at its first level. Compiled, not run; channels are tiny,
    the (B, H, 4096, 4096) score buffer would not be. The reference kernels show the check
    finds such a buffer when there is one."""
    config = UNetConfig(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        heads=(2, 2),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=24,
    )
    unet = UNet2DConditionModel(config)
    latents = jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32)
    context = jax.ShapeDtypeStruct((2, 8, 24), jnp.float32)
    params = jax.eval_shape(unet.init, jax.random.key(0), latents, 1.0, context)

    def loss(context, params, latents):
        return jnp.mean(jnp.square(unet.apply(params, latents, 500.0, context)))

    score_bytes = 2 * 2 * 4096 * 4096 * 4
    full_scores = re.compile(r"f32\[2,2,4096,4096\]")
    for path, holds_scores in [("accelerator", False), ("reference", True)]:
        with use_kernels(path):
            compiled = jax.jit(jax.grad(loss)).lower(context, params, latents).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert bool(full_scores.search(compiled.as_text())) == holds_scores, path
        assert (temp > score_bytes) == holds_scores, (path, temp)
