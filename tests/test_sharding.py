"""Every model's parameters laid out over a (data, fsdp) mesh of 8 fake CPU devices: the sharded
forward equals the unsharded one."""

import jax
import numpy as np
import pytest
from conftest import REFERENCE, relative_error
from jax.sharding import PartitionSpec as P

from ella_jax import load_ella
from ella_jax.sharding import make_mesh, param_shardings, param_specs, shard_batch
from ella_jax.weights.clip import load_clip_text_encoder
from ella_jax.weights.diffusers import load_unet, load_vae
from ella_jax.weights.t5 import load_t5_encoder

SD = REFERENCE / "sd"
RNG = np.random.default_rng(0)
BATCH = 8


def ella_case():
    model, params = load_ella(REFERENCE / "ella.safetensors", heads=4)
    features = RNG.standard_normal((BATCH, 11, 96)).astype(np.float32)
    mask = np.arange(11)[None] < RNG.integers(1, 12, (BATCH, 1))
    timesteps = RNG.uniform(0, 999, BATCH).astype(np.float32)
    return model, params, {}, (features, timesteps, mask)


def t5_case():
    model, params = load_t5_encoder(REFERENCE / "t5")
    ids = RNG.integers(2, 400, (BATCH, 32)).astype(np.int32)
    return model, params, {}, (ids, np.arange(32)[None] < RNG.integers(1, 33, (BATCH, 1)))


def clip_case():
    model, params = load_clip_text_encoder(SD / "text_encoder")
    return model, params, {}, (RNG.integers(0, 88, (BATCH, 77)).astype(np.int32),)


def unet_case():
    model, params = load_unet(SD / "unet")
    latents = RNG.standard_normal((BATCH, 8, 8, 4)).astype(np.float32)
    context = RNG.standard_normal((BATCH, 16, 64)).astype(np.float32)
    return model, params, {}, (latents, RNG.uniform(0, 999, BATCH).astype(np.float32), context)


def vae_case():
    model, params = load_vae(SD / "vae")
    images = RNG.uniform(-1, 1, (BATCH, 16, 16, 3)).astype(np.float32)
    return model, params, {"method": "encode"}, (images,)


@pytest.mark.parametrize("case", [ella_case, t5_case, clip_case, unet_case, vae_case])
def test_sharded_forward_equals_unsharded(case):
    model, params, kwargs, inputs = case()
    forward = lambda p, *x: model.apply({"params": p}, *x, **kwargs)  # noqa: E731
    expected = jax.jit(forward)(params, *inputs)

    mesh = make_mesh(data=2, fsdp=4)
    shardings = param_shardings(params, mesh)
    sharded_params = jax.device_put(params, shardings)
    assert any(
        len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
        for leaf in jax.tree.leaves(sharded_params)
    ), "no parameter is sharded"
    out = jax.jit(forward)(sharded_params, *shard_batch(mesh, inputs))
    for actual, reference in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        assert len(actual.sharding.device_set) == 8
        assert relative_error(actual, reference) < 1e-4  # float32 summation order only


def test_specs_of_a_few_parameters():
    """Regression guard for the layout rule: largest divisible axis over fsdp; small replicated."""
    mesh = make_mesh(data=2, fsdp=4)
    _, unet = load_unet(SD / "unet")
    specs = param_specs(unet, mesh)
    assert specs["conv_in"]["kernel"] == P()  # (3, 3, 4, 32): 1152 elements, replicated
    assert specs["down_blocks.1"]["resnets.0"]["conv1"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["time_embedding"]["linear_1"]["kernel"] == P(None, "fsdp")  # (32, 128)
    assert specs["down_blocks.0"]["resnets.0"]["conv1"]["bias"] == P()
    _, t5 = load_t5_encoder(REFERENCE / "t5")
    assert param_specs(t5, mesh)["shared"]["embedding"] == P("fsdp", None)  # (400, 96)
    rules = [(r"shared/embedding$", P(None, "fsdp"))]
    assert param_specs(t5, mesh, rules)["shared"]["embedding"] == P(None, "fsdp")


@pytest.mark.parametrize(
    "data, fsdp, message",
    [(3, -1, "data=3 x fsdp=-1 does not fit 8 devices"), (2, 2, "= 4 devices, but there are 8")],
)
def test_mesh_that_does_not_fit_is_named(data, fsdp, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(data, fsdp)


def test_the_configs_partition_rules_reach_every_tree():
    """config.mesh.rules come before the default rule in the run's program: a rule that keeps
    the UNet's kernels whole leaves them replicated while the frozen T5 and ELLA's optimizer
    state stay sharded over fsdp; a malformed rule is a ConfigError naming it."""
    from conftest import shapes_program, tiny_config

    from ella_jax.train.errors import ConfigError
    from ella_jax.train.program import partition_rules

    config = tiny_config()
    config.mesh.update(data=2, fsdp=4, rules=((r"^unet/.*kernel$", ()),))
    program = shapes_program(config)
    specs = {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf.spec
        for path, leaf in jax.tree_util.tree_leaves_with_path(program.frozen_shardings)
    }
    unet_kernels = [spec for name, spec in specs.items() if name.startswith("unet/") and
                    name.endswith("kernel")]  # fmt: skip
    assert unet_kernels and all(spec == P() for spec in unet_kernels)
    assert any("fsdp" in spec for name, spec in specs.items() if name.startswith("text/"))
    state_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(program.state.opt_state)]
    assert any("fsdp" in spec for spec in state_specs)
    config.mesh.rules = (("unet", "fsdp", None),)
    with pytest.raises(ConfigError, match=r"config.mesh.rules: \('unet', 'fsdp', None\)"):
        partition_rules(config)
