"""The JAX schedulers against diffusers' PyTorch schedulers, step by step.

A fake model (0.1 * model input + fixed random noise per step) drives both samplers from the same
initial noise; every intermediate sample must agree to 1e-5 relative, the timesteps exactly
(to float32 rounding for Euler's fractional Karras timesteps). Ours runs as a jitted `lax.scan`,
the way the sampler uses it.
"""

import functools
import inspect
import json
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import REFERENCE, relative_error

from ella_jax import schedulers
from ella_jax.schedulers import SchedulerConfig

diffusers.utils.logging.set_verbosity_error()
# diffusers' own np.array(torch tensor) calls warn under numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD_CONFIG = json.loads((REFERENCE / "sd" / "scheduler" / "scheduler_config.json").read_text())
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-5
CLASSES = {
    "dpmsolver": diffusers.DPMSolverMultistepScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
}


@functools.partial(jax.jit, static_argnames="prediction_type")
def _sample_jax(schedule, noise, step_noise, prediction_type):
    """All samples x[1..N] of the fake-model sampling loop, as a scan over the steps."""

    def body(carry, inputs):
        x, previous_x0 = carry
        i, eps = inputs
        output = 0.1 * schedulers.scale_model_input(schedule, i, x) + eps
        x, x0 = schedulers.step(schedule, i, x, output, previous_x0, prediction_type)
        return (x, x0), x

    x = schedulers.initial_latents(schedule, noise)
    steps = jnp.arange(schedule.timesteps.shape[0])
    _, xs = jax.lax.scan(body, (x, jnp.zeros_like(x)), (steps, step_noise))
    return xs


def _sample_torch(scheduler, noise, step_noise):
    """The same loop with a diffusers scheduler, as StableDiffusionPipeline runs it."""
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    xs = []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        output = 0.1 * model_input + torch.from_numpy(step_noise[i])
        x = scheduler.step(output, t, x).prev_sample
        xs.append(x.numpy())
    return np.stack(xs)


def compare(raw: dict, kind: str | None, steps: int, tolerance: float = TOLERANCE) -> float:
    """Runs both samplers; returns the worst per-step relative error after checking timesteps."""
    config = SchedulerConfig.from_dict(raw, kind=kind)
    reference = CLASSES[config.kind].from_config(raw)
    reference.set_timesteps(steps)
    schedule = schedulers.make_schedule(config, steps)

    expected_t = reference.timesteps.numpy()
    ours_t = np.asarray(schedule.timesteps)
    assert ours_t.shape == expected_t.shape
    if np.issubdtype(expected_t.dtype, np.integer):
        np.testing.assert_array_equal(ours_t.astype(np.int64), expected_t)
        assert np.all(ours_t == np.round(ours_t))
    else:
        np.testing.assert_allclose(ours_t, expected_t, rtol=1e-6, atol=0)
    assert float(schedule.init_noise_sigma) == pytest.approx(
        float(reference.init_noise_sigma), rel=1e-6
    )

    rng = np.random.default_rng(steps)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    step_noise = rng.standard_normal((len(expected_t), *SHAPE)).astype(np.float32)
    expected = _sample_torch(reference, noise, step_noise)
    ours = np.asarray(_sample_jax(schedule, noise, step_noise, config.prediction_type))
    assert np.all(np.isfinite(ours)) and np.all(np.isfinite(expected))
    errors = np.array([relative_error(ours[i], expected[i]) for i in range(len(expected))])
    worst = float(errors.max())
    assert worst < tolerance, errors
    return worst


def _with(**overrides) -> dict:
    return {**SD_CONFIG, **overrides}


ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}

# (id, config, kind, step counts)
CASES = [
    # SD 1.5 / ELLA default: DPM-Solver++ 2M, linspace, lower_order_final, final sigma 0.
    ("dpm-default", SD_CONFIG, None, (1, 2, 3, 8, 20, 50)),
    ("dpm-leading", _with(timestep_spacing="leading"), None, (3, 8, 20)),
    ("dpm-trailing", _with(timestep_spacing="trailing"), None, (3, 8, 20)),
    ("dpm-order1", _with(solver_order=1), None, (8, 20)),
    ("dpm-heun", _with(solver_type="heun"), None, (3, 8, 20)),
    ("dpm-karras", _with(use_karras_sigmas=True), None, (8, 20, 50)),
    # A nonzero final sigma makes the last step second order from 15 steps on.
    ("dpm-sigma-min", _with(final_sigmas_type="sigma_min"), None, (3, 8, 14, 15, 20)),
    (
        "dpm-sigma-min-no-lof",
        _with(final_sigmas_type="sigma_min", lower_order_final=False),
        None,
        (3, 8),
    ),
    ("dpm-euler-at-final", _with(final_sigmas_type="sigma_min", euler_at_final=True), None, (20,)),
    # Karras sigmas end at sigma_min, so with a sigma_min final sigma the last step has length
    # 0 (first order below 15 steps; second order, a no-op, from 15 on).
    (
        "dpm-karras-sigma-min",
        _with(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        None,
        (8, 20),
    ),
    (
        "dpm-karras-heun-sigma-min",
        _with(use_karras_sigmas=True, solver_type="heun", final_sigmas_type="sigma_min"),
        None,
        (8,),
    ),
    ("dpm-v", _with(prediction_type="v_prediction"), None, (3, 8, 20)),
    ("dpm-sample", _with(prediction_type="sample"), None, (8,)),
    ("dpm-lambda-clipped", _with(lambda_min_clipped=-2.5), None, (8, 20)),
    ("dpm-zero-snr", _with(timestep_spacing="trailing", **ZERO_SNR), None, (8, 20)),
    # DDIM from SD's DPM config: linspace, set_alpha_to_one False (from the file).
    ("ddim-from-dpm", SD_CONFIG, "ddim", (3, 8, 20, 50)),
    ("ddim-alpha-one", _with(set_alpha_to_one=True), "ddim", (8, 20)),
    ("ddim-leading", _with(timestep_spacing="leading"), "ddim", (8, 20)),
    (
        "ddim-leading-alpha-one",
        _with(timestep_spacing="leading", set_alpha_to_one=True),
        "ddim",
        (8,),
    ),
    ("ddim-trailing", _with(timestep_spacing="trailing"), "ddim", (8, 20)),
    ("ddim-v", _with(prediction_type="v_prediction"), "ddim", (8, 20)),
    ("ddim-zero-snr", _with(timestep_spacing="trailing", **ZERO_SNR), "ddim", (8,)),
    ("euler", SD_CONFIG, "euler", (3, 8, 20, 50)),
    ("euler-v", _with(prediction_type="v_prediction"), "euler", (8, 20)),
    ("euler-leading", _with(timestep_spacing="leading"), "euler", (8, 20)),
    (
        "euler-leading-v",
        _with(timestep_spacing="leading", prediction_type="v_prediction"),
        "euler",
        (8,),
    ),
    ("euler-trailing", _with(timestep_spacing="trailing"), "euler", (8,)),
    ("euler-karras", _with(use_karras_sigmas=True), "euler", (8, 20)),
    ("euler-sigma-min", _with(final_sigmas_type="sigma_min"), "euler", (8,)),
    ("euler-zero-snr", _with(timestep_spacing="trailing", **ZERO_SNR), "euler", (8,)),
]


# At zero terminal SNR Euler starts at sigma = 4096 and diffusers' float32 x + (x - x0) / s * ds
# cancels ~4096 down to ~40, losing ~2e-5 relative; ours is within 1e-6 of the same formula in
# float64 (test_euler_zero_snr_against_float64).
LOOSE = {"euler-zero-snr": 5e-5}


@pytest.mark.parametrize(
    ("raw", "kind", "steps", "tolerance"),
    [
        pytest.param(raw, kind, n, LOOSE.get(name, TOLERANCE), id=f"{name}-{n}")
        for name, raw, kind, counts in CASES
        for n in counts
    ],
)
def test_sampling_matches_diffusers(raw, kind, steps, tolerance):
    compare(raw, kind, steps, tolerance)


def test_euler_zero_snr_against_float64():
    """diffusers' Euler formulas in float64 on its own sigmas, v-prediction, zero terminal SNR."""
    raw = _with(timestep_spacing="trailing", **ZERO_SNR)
    reference = diffusers.EulerDiscreteScheduler.from_config(raw)
    reference.set_timesteps(8)
    schedule = schedulers.make_schedule(SchedulerConfig.from_dict(raw, kind="euler"), 8)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    step_noise = rng.standard_normal((8, *SHAPE)).astype(np.float32)
    ours = np.asarray(_sample_jax(schedule, noise, step_noise, "v_prediction"))

    s = reference.sigmas.numpy().astype(np.float64)
    x = noise.astype(np.float64) * float(reference.init_noise_sigma)
    for i in range(8):
        output = 0.1 * x / np.sqrt(s[i] ** 2 + 1) + step_noise[i]
        x0 = output * (-s[i] / np.sqrt(s[i] ** 2 + 1)) + x / (s[i] ** 2 + 1)
        x = x + (x - x0) / s[i] * (s[i + 1] - s[i])
        assert relative_error(ours[i], x) < 2e-6


def test_zero_length_last_step():
    """Karras + heun + sigma_min final from 15 steps: the last step repeats sigma_min. diffusers
    computes 0/0 there (NaN); ours takes the h -> 0 limit, the identity. Earlier steps match."""
    raw = _with(use_karras_sigmas=True, solver_type="heun", final_sigmas_type="sigma_min")
    reference = diffusers.DPMSolverMultistepScheduler.from_config(raw)
    reference.set_timesteps(20)
    assert reference.sigmas[-1] == reference.sigmas[-2]
    schedule = schedulers.make_schedule(SchedulerConfig.from_dict(raw), 20)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    step_noise = rng.standard_normal((20, *SHAPE)).astype(np.float32)
    expected = _sample_torch(reference, noise, step_noise)
    ours = np.asarray(_sample_jax(schedule, noise, step_noise, "epsilon"))
    assert np.all(np.isnan(expected[-1]))
    for i in range(19):
        assert relative_error(ours[i], expected[i]) < TOLERANCE
    np.testing.assert_array_equal(ours[-1], ours[-2])


def test_euler_class_config():
    """An EulerDiscreteScheduler config (its own _class_name), with Karras bounds."""
    raw = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "use_karras_sigmas": True,
        "sigma_min": 0.1,
        "sigma_max": 10.0,
    }
    assert SchedulerConfig.from_dict(raw).kind == "euler"
    compare(raw, None, 10)


def test_fixture_timesteps():
    """The timesteps of the reference pipeline run (8 steps of the SD 1.5 DPM config)."""
    expected = np.load(REFERENCE / "pipeline_io.npz")["timesteps"]
    schedule = schedulers.make_schedule(SchedulerConfig.from_dict(SD_CONFIG), len(expected))
    np.testing.assert_array_equal(np.asarray(schedule.timesteps).astype(np.int64), expected)


def test_sd_default_orders():
    """SD's DPM-Solver++ 2M: first and last steps first order (c = 0), the rest second order."""
    schedule = schedulers.make_schedule(SchedulerConfig.from_dict(SD_CONFIG), 8)
    c = np.asarray(schedule.c)
    assert c[0] == 0 and c[-1] == 0 and np.all(c[1:-1] != 0)
    assert float(schedule.a[-1]) == 0 and float(schedule.b[-1]) == 1  # lands on x0
    np.testing.assert_array_equal(np.asarray(schedule.input_scale), 1)


def test_ddim_from_dpm_config_follows_diffusers():
    """Fields a class does not take get its defaults, those it takes come from the file."""
    ours = SchedulerConfig.from_dict(SD_CONFIG, kind="ddim")
    reference = diffusers.DDIMScheduler.from_config(SD_CONFIG).config
    assert ours.kind == "ddim"
    for field in ("set_alpha_to_one", "timestep_spacing", "steps_offset", "prediction_type"):
        assert getattr(ours, field) == reference[field], field
    assert ours.set_alpha_to_one is False

    bare = {"_class_name": "DDIMScheduler", "clip_sample": False}
    ours = SchedulerConfig.from_dict(bare)
    reference = diffusers.DDIMScheduler.from_config(bare).config
    assert ours.set_alpha_to_one is reference["set_alpha_to_one"] is True
    assert ours.timestep_spacing == reference["timestep_spacing"] == "leading"

    # Keys saved as "defaults were used" are ignored, as diffusers does.
    marked = {**SD_CONFIG, "_use_default_values": ["set_alpha_to_one"]}
    assert SchedulerConfig.from_dict(marked, kind="ddim").set_alpha_to_one is True


@pytest.mark.parametrize("kind", ["dpmsolver", "ddim", "euler"])
def test_class_defaults_match_diffusers(kind):
    parameters = inspect.signature(CLASSES[kind].__init__).parameters
    for field, default in schedulers._CLASS_DEFAULTS[kind].items():
        expected = parameters[field].default
        if isinstance(default, float) and math.isinf(default):
            assert math.isinf(expected) and expected < 0, field
        else:
            assert default == expected, field


@pytest.mark.parametrize(
    ("overrides", "kind", "field"),
    [
        ({"beta_schedule": "squaredcos_cap_v2"}, None, "beta_schedule"),
        ({"trained_betas": [0.1] * 1000}, None, "trained_betas"),
        ({"prediction_type": "flow_prediction"}, None, "prediction_type"),
        ({"timestep_spacing": "karras"}, None, "timestep_spacing"),
        ({"solver_order": 3}, None, "solver_order"),
        ({"algorithm_type": "sde-dpmsolver++"}, None, "algorithm_type"),
        ({"solver_type": "bogus"}, None, "solver_type"),
        ({"final_sigmas_type": "denoise_to_zero"}, None, "final_sigmas_type"),
        ({"thresholding": True}, None, "thresholding"),
        ({"variance_type": "learned_range"}, None, "variance_type"),
        ({"use_lu_lambdas": True}, None, "use_lu_lambdas"),
        ({"use_exponential_sigmas": True}, None, "use_exponential_sigmas"),
        ({"use_beta_sigmas": True}, None, "use_beta_sigmas"),
        ({"use_flow_sigmas": True}, None, "use_flow_sigmas"),
        ({"use_dynamic_shifting": True}, None, "use_dynamic_shifting"),
        ({"clip_sample": True}, "ddim", "clip_sample"),
        ({"thresholding": True}, "ddim", "thresholding"),
        ({"interpolation_type": "log_linear"}, "euler", "interpolation_type"),
        (
            {"timestep_type": "continuous", "prediction_type": "v_prediction"},
            "euler",
            "timestep_type",
        ),
        ({"use_exponential_sigmas": True}, "euler", "use_exponential_sigmas"),
        ({"_class_name": "PNDMScheduler"}, None, "_class_name"),
        ({}, "heun", "kind"),
    ],
)
def test_unsupported_values_raise(overrides, kind, field):
    raw = {**SD_CONFIG, **overrides}
    with pytest.raises(ValueError, match=f"^{field}="):
        SchedulerConfig.from_dict(raw, kind=kind)


def test_ignored_fields_do_not_raise():
    """Options of other classes are ignored (DDIM has no Karras sigmas, Euler no thresholding),
    and DDIM's own default clip_sample=True is refused when the file does not turn it off."""
    raw = {**SD_CONFIG, "use_karras_sigmas": True, "thresholding": True}
    assert SchedulerConfig.from_dict(raw, kind="euler").use_karras_sigmas
    with pytest.raises(ValueError, match=r"^thresholding="):
        SchedulerConfig.from_dict(raw, kind="ddim")
    no_clip = {k: v for k, v in SD_CONFIG.items() if k != "clip_sample"}
    with pytest.raises(ValueError, match=r"^clip_sample=True"):
        SchedulerConfig.from_dict(no_clip, kind="ddim")
    with pytest.raises(ValueError, match=r"^use_karras_sigmas="):
        SchedulerConfig(kind="ddim", use_karras_sigmas=True)


@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.make_schedule(SchedulerConfig.from_dict(SD_CONFIG), steps)


@pytest.mark.parametrize("raw", [SD_CONFIG, _with(**ZERO_SNR)], ids=["sd", "zero-snr"])
def test_training_helpers_match_ddpm(raw):
    reference = diffusers.DDPMScheduler.from_config(raw)
    acp = schedulers.alphas_cumprod(SchedulerConfig.from_dict(raw, kind="ddim"))
    np.testing.assert_allclose(acp, reference.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)

    rng = np.random.default_rng(0)
    shape = (5, 8, 8, 4)  # NHWC; the helpers broadcast over everything after the batch
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    timesteps = np.array([0, 1, 500, 998, 999])
    t = torch.from_numpy(timesteps)

    noisy = schedulers.add_noise(acp, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    assert noisy.shape == shape and noisy.dtype == jnp.float32
    assert relative_error(noisy, expected) < 1e-6

    v = schedulers.velocity(acp, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
    expected = reference.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    assert relative_error(v, expected) < 1e-6

    from diffusers.training_utils import compute_snr

    ours = np.asarray(schedulers.snr(acp, jnp.asarray(timesteps)))
    expected = compute_snr(reference, t).numpy()
    # At zero terminal SNR acp[998] ~ 2e-7 is a difference of nearly equal numbers, and torch's
    # float32 linspace betas differ from the correctly rounded ones by an ulp here and there.
    rtol = 1e-4 if raw.get("rescale_betas_zero_snr") else 1e-5
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=0)


def test_step_is_traceable_in_i():
    """`step` under jit with a traced step index equals the eager call."""
    schedule = schedulers.make_schedule(SchedulerConfig.from_dict(SD_CONFIG), 8)
    rng = np.random.default_rng(1)
    x, out, prev = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(3))
    jitted = jax.jit(schedulers.step, static_argnames="prediction_type")
    for i in (0, 3, 7):
        eager = schedulers.step(schedule, i, x, out, prev, "epsilon")
        traced = jitted(schedule, jnp.int32(i), x, out, prev, prediction_type="epsilon")
        for e, t in zip(eager, traced, strict=True):
            np.testing.assert_allclose(np.asarray(t), np.asarray(e), rtol=1e-6, atol=1e-6)
