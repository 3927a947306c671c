"""The connector against the official implementation's numbers (fixtures/reference/ella_io.npz),
on both kernel paths (`ella_jax.kernels`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REFERENCE, relative_error

from ella_jax import ELLA, load_ella

IO = np.load(REFERENCE / "ella_io.npz")
FLEX_MASK = np.arange(IO["features"].shape[1])[None, :] < IO["lengths"][:, None]
CASES = {
    "per_sample_timesteps": (IO["timesteps"], None, IO["out_batch"]),
    "scalar_timestep": (IO["timestep_scalar"], None, IO["out_scalar"]),
    "flexible_token_length": (IO["timesteps"], FLEX_MASK, IO["out_flex"]),
}


@pytest.fixture(scope="module")
def ella_fp32():
    return load_ella(REFERENCE / "ella.safetensors", heads=4)


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_reference(kernels, ella_fp32, case):
    model, params = ella_fp32
    timesteps, token_mask, expected = CASES[case]
    forward = jax.jit(lambda *args: model.apply({"params": params}, *args))  # traced here
    out = forward(IO["features"], timesteps, token_mask)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_float16_checkpoint_matches_reference(kernels, dtype):
    model, params = load_ella(REFERENCE / "ella_fp16.safetensors", heads=4, dtype=dtype)
    assert all(p.dtype == jnp.float16 for p in jax.tree.leaves(params))
    forward = jax.jit(lambda *args: model.apply({"params": params}, *args))
    for timesteps, token_mask, expected in CASES.values():
        out = forward(IO["features"], timesteps, token_mask)
        assert out.dtype == dtype
        # float16 weights alone cost ~1e-3; float16 / bfloat16 arithmetic ~3e-3 / ~2e-2.
        tolerance = {jnp.float32: 5e-3, jnp.float16: 1e-2, jnp.bfloat16: 5e-2}[dtype]
        assert relative_error(out, expected) < tolerance


def test_padding_is_ignored_under_the_mask(ella_fp32):
    """Padded positions change nothing when masked, whatever they hold."""
    model, params = ella_fp32
    timesteps, token_mask, expected = CASES["flexible_token_length"]
    garbage = np.where(token_mask[..., None], IO["features"], 1e3).astype(np.float32)
    out = model.apply({"params": params}, garbage, timesteps, token_mask=token_mask)
    assert relative_error(out, expected) < 1e-5


def test_features_of_another_width_are_named(ella_fp32):
    """Features of the wrong width: the widths named, not Flax's ScopeParamShapeError."""
    model, params = ella_fp32
    features = np.zeros((1, 4, model.input_dim + 32), np.float32)
    message = f"features have width {model.input_dim + 32}, the connector expects {model.input_dim}"
    with pytest.raises(ValueError, match=message):
        jax.jit(model.apply)({"params": params}, features, 999.0)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="heads=5 does not divide width=64"):
        ELLA(width=64, heads=5)


def test_released_size_matches_torch_eager(released_checkpoint):
    """The full-size connector (random float16 weights of the released layout) against the
    PyTorch eager implementation at B=2, 128 tokens, with a token mask."""
    import torch

    from bench.torch_ella import TorchELLA
    from ella_jax.weights.tensors import read_safetensors

    model, params = load_ella(released_checkpoint, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 128, 2048)).astype(np.float32)
    timesteps = np.array([999.0, 250.0], np.float32)
    token_mask = np.arange(128)[None, :] < np.array([[128], [37]])
    out = jax.jit(model.apply)({"params": params}, features, timesteps, token_mask)
    assert out.shape == (2, 64, 768)

    reference = TorchELLA().eval()
    tensors = read_safetensors(released_checkpoint)
    state = {name: torch.from_numpy(t.astype(np.float32)) for name, t in tensors.items()}
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(features), torch.from_numpy(timesteps), torch.from_numpy(token_mask)
        ).numpy()
    assert relative_error(out, expected) < 1e-4
