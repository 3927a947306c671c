"""The VAE against diffusers: the fixture's decoded image, the encoder, another config; on both
kernel paths (`ella_jax.kernels`)."""

import jax
import numpy as np
import pytest
from conftest import REFERENCE, randomized, relative_error

from ella_jax.weights.diffusers import load_vae

IO = np.load(REFERENCE / "pipeline_io.npz")
VAE_FOLDER = REFERENCE / "sd" / "vae"
nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731


@pytest.fixture(scope="module")
def vae():
    return load_vae(VAE_FOLDER)


# bfloat16 weights and arithmetic: 8 significant bits, 2e-3 a rounding; the decoded image is
# off by a few roundings (measured 6.3e-3 on the cpu kernels, 6.4e-3 on the accelerator's).
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_fixture_decode_matches_reference(kernels, dtype, tolerance):
    model, params = load_vae(VAE_FOLDER, dtype)
    latents = nhwc(IO["latents_fixed"]) / model.config.scaling_factor
    image = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, latents)
    assert image.shape == (2, 16, 16, 3) and image.dtype == dtype
    assert relative_error(np.clip(image, -1, 1), nhwc(IO["image_fixed"])) < tolerance


def diffusers_moments(reference, image_nchw):
    import torch

    with torch.no_grad():
        distribution = reference.encode(torch.from_numpy(image_nchw)).latent_dist
    return distribution.mean.numpy(), distribution.logvar.numpy()


def test_encoder_matches_diffusers(kernels, vae):
    from diffusers import AutoencoderKL

    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    expected_mean, expected_logvar = diffusers_moments(
        AutoencoderKL.from_pretrained(VAE_FOLDER), image
    )
    model, params = vae
    mean, logvar = model.apply({"params": params}, nhwc(image), method="encode")
    assert mean.shape == (2, 8, 8, 4)
    assert relative_error(mean, nhwc(expected_mean)) < 1e-4
    assert relative_error(logvar, nhwc(expected_logvar)) < 1e-4


def test_config_without_quant_convs_or_attention_matches_diffusers(kernels, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = randomized(
        AutoencoderKL(
            block_out_channels=[16, 32, 32],
            layers_per_block=2,
            norm_num_groups=8,
            latent_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
    )
    reference.save_pretrained(tmp_path)
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    expected_mean, _ = diffusers_moments(reference, image)
    with torch.no_grad():
        expected_image = reference.decode(torch.from_numpy(expected_mean)).sample.numpy()

    model, params = load_vae(tmp_path)
    mean, _ = model.apply({"params": params}, nhwc(image), method="encode")
    decoded = model.apply({"params": params}, nhwc(expected_mean), method="decode")
    assert relative_error(mean, nhwc(expected_mean)) < 1e-4
    assert relative_error(decoded, nhwc(expected_image)) < 1e-4


def test_unsupported_block_type_names_the_field(tmp_path):
    import json
    import shutil

    from ella_jax.weights.tensors import CheckpointError

    shutil.copytree(VAE_FOLDER, tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["up_block_types"] = ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="up_block_types has 'AttnUpDecoderBlock2D'"):
        load_vae(tmp_path / "vae")
