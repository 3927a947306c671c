"""The CPU attention and convolution paths against PyTorch's, at shapes the fixtures do not reach:
queries long enough for the blocked loop (T >= 512), key masks, float16, strided patches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from ella_jax.models.attention import dot_product_attention
from ella_jax.models.resnet import PatchConv


def torch_attention(q, k, v, key_mask=None):
    import torch

    q, k, v = (torch.from_numpy(np.asarray(t, np.float32)).transpose(1, 2) for t in (q, k, v))
    mask = None if key_mask is None else torch.from_numpy(np.asarray(key_mask))[:, None, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("queries", [512, 100])  # the blocked loop, one block
def test_attention_matches_torch(queries):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, queries, 4, 16), np.float32)
    k, v = rng.standard_normal((2, 2, 77, 4, 16), np.float32)
    key_mask = np.arange(77)[None] < np.array([[77], [30]])
    out = jax.jit(dot_product_attention)(q, k, v, key_mask)
    assert relative_error(out, torch_attention(q, k, v, key_mask)) < 1e-5
    half = jax.jit(dot_product_attention)(*(jnp.asarray(t, jnp.float16) for t in (q, k, v)))
    assert half.dtype == jnp.float16
    assert relative_error(half, torch_attention(q, k, v)) < 5e-3


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
