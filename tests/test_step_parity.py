"""The train step's loss and ELLA gradients against PyTorch, on both kernel paths: the ELLA
reference (bench.torch_ella, the official checkpoint layout) conditioning diffusers' UNet, noised
by diffusers' DDPMScheduler, on the fixture models; float32 and bfloat16 compute, the UNet's
layers rematerialised or not, epsilon and v targets; the min-SNR loss weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REFERENCE, relative_error

from ella_jax import load_ella
from ella_jax.schedulers import SchedulerConfig, alphas_cumprod
from ella_jax.train.step import Models, loss_weights, make_denoising_loss
from ella_jax.weights.diffusers import load_unet
from ella_jax.weights.naming import params_to_torch
from ella_jax.weights.tensors import read_config

rng = np.random.default_rng(0)
FEATURES = rng.standard_normal((2, 20, 96)).astype(np.float32)
TOKEN_MASK = np.arange(20)[None] < np.array([[20], [7]])
LATENTS, NOISE = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)  # NCHW
TIMESTEPS = np.array([999, 17])
WEIGHT = np.array([1.0, 0.5], np.float32)
nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731


def pytorch_loss_and_gradients(prediction_type: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PyTorch's per-example losses (to the noise, or to diffusers' velocity) and the gradient of
    sum(WEIGHT * loss) for every ELLA tensor, by its official name."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from bench.torch_ella import TorchELLA
    from ella_jax.weights.tensors import read_json, read_safetensors

    unet = UNet2DConditionModel.from_pretrained(REFERENCE / "sd" / "unet").eval()
    unet.requires_grad_(False)
    ella = TorchELLA(**read_json(REFERENCE / "ella_config.json")).eval()
    tensors = read_safetensors(REFERENCE / "ella.safetensors")
    ella.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()})
    scheduler = DDPMScheduler.from_pretrained(REFERENCE / "sd" / "scheduler")
    t = torch.from_numpy(TIMESTEPS)
    noisy = scheduler.add_noise(torch.from_numpy(LATENTS), torch.from_numpy(NOISE), t)
    context = ella(torch.from_numpy(FEATURES), t.float(), torch.from_numpy(TOKEN_MASK))
    prediction = unet(noisy, t, context).sample
    target = torch.from_numpy(NOISE)
    if prediction_type == "v_prediction":
        target = scheduler.get_velocity(torch.from_numpy(LATENTS), target, t)
    per_example = torch.square(prediction - target).mean(dim=(1, 2, 3))
    (per_example * torch.from_numpy(WEIGHT)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in ella.named_parameters()}
    return per_example.detach().numpy(), grads


def jax_loss_and_gradients(
    dtype: str, remat: bool, prediction_type: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same from `train.step.make_denoising_loss`, with the kernels ELLA_JAX_KERNELS picks."""
    ella, ella_params = load_ella(
        REFERENCE / "ella.safetensors", heads=4, dtype=dtype, param_dtype=jnp.float32
    )
    unet, unet_params = load_unet(REFERENCE / "sd" / "unet", dtype)
    scheduler = read_config(
        REFERENCE / "sd" / "scheduler" / "scheduler_config.json", SchedulerConfig.from_dict
    )
    per_example_loss = make_denoising_loss(
        Models(None, None, unet.clone(remat=remat), ella),
        jnp.asarray(alphas_cumprod(scheduler)),
        prediction_type,
    )

    def weighted(params):
        losses = per_example_loss(
            params, unet_params, FEATURES, TOKEN_MASK, nhwc(LATENTS), nhwc(NOISE), TIMESTEPS
        )
        return jnp.sum(WEIGHT * losses), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(weighted, has_aux=True))(ella_params)
    return np.asarray(losses), params_to_torch(jax.device_get(grads))


_REFERENCES = {}


def reference(prediction_type: str):
    if prediction_type not in _REFERENCES:
        _REFERENCES[prediction_type] = pytorch_loss_and_gradients(prediction_type)
    return _REFERENCES[prediction_type]


# (loss, gradient) tolerances. float32: sums in another order (measured 1.8e-7 and 1.5e-6).
# bfloat16: 8 significant bits, 2e-3 a rounding. The loss averages its roundings away (measured
# 1.7e-5); each gradient tensor carries the roundings of ELLA's blocks and of the UNet forward
# and back, relative to its own largest entry (measured 0.033 on the accelerator kernels, 0.054
# on the cpu kernels).
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (1e-3, 0.1)}


@pytest.mark.parametrize(
    "kernels, dtype, remat, prediction_type",
    [  # every kernel path, remat and target once (each case is a compilation)
        ("cpu", "float32", False, "epsilon"),
        ("accelerator", "float32", True, "v_prediction"),
        ("accelerator", "bfloat16", False, "epsilon"),
    ],
)
def test_loss_and_ella_gradients_match_pytorch(monkeypatch, kernels, dtype, remat, prediction_type):
    monkeypatch.setenv("ELLA_JAX_KERNELS", kernels)
    expected_loss, expected_grads = reference(prediction_type)
    losses, grads = jax_loss_and_gradients(dtype, remat, prediction_type)
    loss_tolerance, grad_tolerance = TOLERANCES[dtype]
    assert relative_error(losses, expected_loss) < loss_tolerance
    assert sorted(grads) == sorted(expected_grads)
    errors = {name: relative_error(grads[name], expected_grads[name]) for name in grads}
    assert max(errors.values()) < grad_tolerance, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    """train.step.loss_weights against the min-SNR weights of diffusers' train_text_to_image.py
    (with diffusers.training_utils.compute_snr); an invalid image weighs 0."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler.from_pretrained(REFERENCE / "sd" / "scheduler")
    timesteps, gamma = torch.tensor([0, 17, 250, 500, 999]), 5.0
    ratio = compute_snr(scheduler, timesteps)
    expected = torch.stack([ratio, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    expected = expected / (ratio + 1 if prediction_type == "v_prediction" else ratio)
    valid = np.array([1, 1, 0, 1, 1], np.float32)
    config = read_config(
        REFERENCE / "sd" / "scheduler" / "scheduler_config.json", SchedulerConfig.from_dict
    )
    acp = jnp.asarray(alphas_cumprod(config))
    weights = loss_weights(acp, jnp.asarray(timesteps.numpy()), valid, gamma, prediction_type)
    np.testing.assert_allclose(weights, expected.numpy() * valid, rtol=1e-5)
    unweighted = loss_weights(acp, jnp.asarray(timesteps.numpy()), valid, 0.0, prediction_type)
    np.testing.assert_array_equal(unweighted, valid)
