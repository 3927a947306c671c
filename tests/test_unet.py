"""The UNet against diffusers: the shared fixture, SD 2.x and SDXL-style configs (each with its
down- and upsampler) on both kernel paths (`ella_jax.kernels`), bad configs."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import REFERENCE, randomized, relative_error

from ella_jax.weights.diffusers import load_unet
from ella_jax.weights.tensors import CheckpointError

IO = np.load(REFERENCE / "pipeline_io.npz")
UNET_FOLDER = REFERENCE / "sd" / "unet"
nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731


# bfloat16 weights and arithmetic: 8 significant bits, 2e-3 a rounding; the tiny UNet's output
# is off by a few roundings (measured 6.7e-3 on the cpu kernels, 6.4e-3 on the accelerator's).
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_fixture_noise_prediction_matches_reference(kernels, dtype, tolerance):
    model, params = load_unet(UNET_FOLDER, dtype)
    forward = jax.jit(lambda p, x, c: model.apply({"params": p}, x, 999, c))
    out = forward(params, nhwc(IO["latents0"]), IO["ella_fixed_t999"])
    assert out.shape == (2, 8, 8, 4) and out.dtype == dtype
    assert relative_error(out, nhwc(IO["unet_out_t999"])) < tolerance


TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)
VARIANTS = {
    "sd2_linear_projection": dict(
        attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True
    ),
    "only_cross_attention": dict(
        attention_head_dim=4,
        only_cross_attention=[True, False],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    ),
    "sdxl_text_time": dict(
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        transformer_layers_per_block=[1, 2],
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        conv_in_kernel=5,
    ),
}


@functools.cache
def diffusers_variant(variant: str, folder: str) -> tuple[dict, np.ndarray]:
    """The variant's UNet built by diffusers with random weights, saved to `folder`: the inputs
    and its output (NCHW), computed once for both kernel paths."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = randomized(UNet2DConditionModel(**{**TINY, **VARIANTS[variant]}))
    reference.save_pretrained(folder)
    rng = np.random.default_rng(0)
    inputs = dict(
        latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        timesteps=np.array([999.0, 17.0], np.float32),
        context=rng.standard_normal((2, 7, 24)).astype(np.float32),
    )
    added = {}
    if variant == "sdxl_text_time":
        added = dict(
            added_text_embeds=rng.standard_normal((2, 16)).astype(np.float32),
            added_time_ids=np.array([[512, 512, 0, 0, 512, 512]] * 2, np.float32),
        )
    with torch.no_grad():
        expected = reference(
            *(torch.from_numpy(inputs[k]) for k in ("latents", "timesteps", "context")),
            added_cond_kwargs={
                "text_embeds": torch.from_numpy(added["added_text_embeds"]),
                "time_ids": torch.from_numpy(added["added_time_ids"]),
            }
            if added
            else None,
        ).sample.numpy()
    return {**inputs, **added}, expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants_match_diffusers(kernels, variant, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / f"unet_{variant}"
    inputs, expected = diffusers_variant(variant, str(folder))
    model, params = load_unet(folder)
    added = {k: inputs[k] for k in ("added_text_embeds", "added_time_ids") if k in inputs}
    forward = jax.jit(lambda p, x, t, c, a: model.apply({"params": p}, x, t, c, **a))
    out = forward(params, nhwc(inputs["latents"]), inputs["timesteps"], inputs["context"], added)
    assert relative_error(out, nhwc(expected)) < 1e-4


def bad_config(tmp_path, **changes):
    folder = tmp_path / "unet"
    shutil.copytree(UNET_FOLDER, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
        ({"attention_type": "gated"}, "attention_type='gated'"),
        (
            {"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
            "down_block_types has 'SimpleCrossAttnDownBlock2D'",
        ),
        (
            {"block_out_channels": [32, 48]},
            "'down_blocks.1.resnets.0.conv1.bias' has shape (64,), the model expects (48,)",
        ),
    ],
)
def test_bad_config_names_the_field(tmp_path, changes, message):
    with pytest.raises(CheckpointError) as error:
        load_unet(bad_config(tmp_path, **changes))
    assert message in str(error.value) and "unet" in str(error.value)


def test_remat_recomputes_each_resnet_and_transformer():
    """remat=True: in the backward pass of the loss, one rematerialised region per ResNet and
    spatial transformer of the fixture UNet (their numbers: tests/test_step_parity.py)."""
    import re

    import jax.numpy as jnp
    from flax import traverse_util

    model, params = load_unet(UNET_FOLDER)
    layer = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+")
    names = traverse_util.flatten_dict(params, sep=".")
    layers = {match.group(0) for name in names if (match := layer.match(name))}
    latents, context = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 16, 64))
    for remat, expected in [(False, 0), (True, len(layers))]:
        unet = model.clone(remat=remat)
        loss = lambda c, unet=unet: jnp.mean(unet.apply({"params": params}, latents, 999, c) ** 2)  # noqa: E731
        eqns = jax.make_jaxpr(jax.grad(loss))(context).jaxpr.eqns
        regions = sum(e.primitive.name in ("checkpoint", "remat2") for e in eqns)
        assert regions == expected, (remat, regions, sorted(layers))
