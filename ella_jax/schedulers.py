"""Diffusion schedulers as pure JAX functions over a small pytree of per-step coefficients.

Every supported sampler (DPM-Solver++ 1S/2M, DDIM with eta=0, Euler without churn) advances the
sample by a step that is linear in the current sample and the model's data predictions:

    x[i+1] = a[i] * x[i] + b[i] * x0[i] + c[i] * x0[i-1]

where x0[i] is the data prediction ("predicted original sample") at step i. So the host computes
all coefficients once per (config, number of steps) in float64 numpy, from the same float32
`alphas_cumprod` / sigma tables diffusers keeps, and the traced step (`step`, callable inside
`jax.lax.scan` with a traced step index) only indexes arrays.

Turning a raw model output into x0 uses the variance-preserving (VP) pair (alpha, sigma) of the
step, with alpha^2 + sigma^2 = 1, and the scaled model input x_in = input_scale * x:

    epsilon:       x0 = (x_in - sigma * out) / alpha
    v_prediction:  x0 = alpha * x_in - sigma * out
    sample:        x0 = out

For DPM-Solver and DDIM the sample lives in VP space (input_scale = 1). Euler keeps the sample in
variance-exploding space, x = x0 + s * eps with s = sqrt((1 - acp) / acp), and feeds the model
x / sqrt(s^2 + 1) = alpha * x0 + sigma * eps; so the same formulas apply with
input_scale = alpha = 1 / sqrt(s^2 + 1) and sigma = s * alpha.

`make_schedule` reproduces diffusers' `set_timesteps` (timesteps, sigmas, final sigma, Karras
sigmas) and the order choices of `step` for `DPMSolverMultistepScheduler`, `DDIMScheduler` and
`EulerDiscreteScheduler` (diffusers 0.42); tests/test_schedulers.py checks it step by step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

KINDS = ("dpmsolver", "ddim", "euler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_CLASS_KIND = {
    "DPMSolverMultistepScheduler": "dpmsolver",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
}
_KIND_ALIASES = {"dpm": "dpmsolver", "dpmsolver++": "dpmsolver", **_CLASS_KIND}

# The __init__ defaults of each diffusers class for the fields read here (checked against the
# installed diffusers by the tests). A config key the class does not take is ignored and the
# field gets the class default, as `SchedulerClass.from_config(config)` does.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpmsolver": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    },
    "ddim": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "euler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
}

# Options read from a config that only have one supported value: (field, is_supported).
_FIXED_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "trained_betas": lambda v: v is None,
    "thresholding": lambda v: not v,
    "clip_sample": lambda v: not v,
    "variance_type": lambda v: v is None,
    "use_exponential_sigmas": lambda v: not v,
    "use_beta_sigmas": lambda v: not v,
    "use_lu_lambdas": lambda v: not v,
    "use_flow_sigmas": lambda v: not v,
    "use_dynamic_shifting": lambda v: not v,
    "interpolation_type": lambda v: v == "linear",
}


def _unsupported(field: str, value: Any, supported: str = "") -> ValueError:
    hint = f" (supported: {supported})" if supported else ""
    return ValueError(f"{field}={value!r} is not supported{hint}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler settings that matter for sampling and training targets.

    Build it from a diffusers `scheduler_config.json` with `from_dict`, which applies the
    defaults of the diffusers class being emulated; constructing it directly uses the defaults
    below (DPMSolverMultistepScheduler's). Fields that do not apply to `kind` are ignored.
    Frozen and hashable, so it can be a static argument of a jitted function.
    """

    kind: str = "dpmsolver"  # "dpmsolver", "ddim" or "euler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" or "scaled_linear"
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" or "sample"
    timestep_spacing: str = "linspace"  # "linspace", "leading" or "trailing"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # DPM-Solver++ only.
    solver_order: int = 2  # 1 or 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"  # "midpoint" or "heun"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    # DPM-Solver++ and Euler.
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"  # "zero" or "sigma_min"
    # Euler only (bounds of the Karras sigmas; None: the schedule's own).
    sigma_min: float | None = None
    sigma_max: float | None = None
    # DDIM only: the "previous" alpha_cumprod of the last step is 1, else alphas_cumprod[0].
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        choices = {
            "kind": KINDS,
            "beta_schedule": ("linear", "scaled_linear"),
            "prediction_type": PREDICTION_TYPES,
            "timestep_spacing": ("linspace", "leading", "trailing"),
            "solver_order": (1, 2),
            "algorithm_type": ("dpmsolver++",),
            "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": ("zero", "sigma_min"),
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                raise _unsupported(field, value, ", ".join(repr(a) for a in allowed))
        if self.num_train_timesteps < 2:
            raise _unsupported("num_train_timesteps", self.num_train_timesteps, "2 or more")
        if self.use_karras_sigmas and self.kind == "ddim":
            raise _unsupported("use_karras_sigmas", self.use_karras_sigmas, "False for DDIM")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], kind: str | None = None) -> SchedulerConfig:
        """A diffusers scheduler config (the parsed `scheduler_config.json`) -> SchedulerConfig.

        `kind` ("dpmsolver", "ddim", "euler" or a diffusers class name) defaults to the one named
        by `_class_name`. As diffusers' `SchedulerClass.from_config(raw)`: keys the chosen class
        does not take, and keys listed in `_use_default_values`, are ignored and the class
        defaults apply (so DDIM built from SD 1.5's DPM config gets set_alpha_to_one=False and
        clip_sample=False from the file; from a config without them, DDIM's defaults True, and
        clip_sample=True is refused).
        Raises ValueError naming the field and value for anything not supported.
        """
        if kind is None:
            class_name = raw.get("_class_name")
            if class_name not in _CLASS_KIND:
                raise ValueError(
                    f"_class_name={class_name!r} is not supported (supported: "
                    f"{', '.join(_CLASS_KIND)}); pass kind= one of {KINDS} to use this config "
                    "with one of those"
                )
            kind = _CLASS_KIND[class_name]
        else:
            kind = _KIND_ALIASES.get(kind, kind)
            if kind not in KINDS:
                raise _unsupported("kind", kind, ", ".join(repr(k) for k in KINDS))

        ignored = set(raw.get("_use_default_values", ()))
        values = dict(_CLASS_DEFAULTS[kind])
        for key in values:
            if key in raw and key not in ignored:
                values[key] = raw[key]

        for field, is_supported in _FIXED_OPTIONS.items():
            if field in values and not is_supported(values[field]):
                raise _unsupported(field, values.pop(field))
            values.pop(field, None)
        if kind == "dpmsolver":
            # As diffusers' constructor: configs of the DEIS / UniPC families map to these.
            if values["algorithm_type"] == "deis":
                values["algorithm_type"] = "dpmsolver++"
            if values["solver_type"] in ("logrho", "bh1", "bh2"):
                values["solver_type"] = "midpoint"
        if kind == "euler":
            # "continuous" only changes the timesteps for v-prediction (0.25 * log sigma).
            timestep_type = values.pop("timestep_type")
            if timestep_type != "discrete" and values["prediction_type"] == "v_prediction":
                raise _unsupported("timestep_type", timestep_type, "'discrete' for v_prediction")
        if values["prediction_type"] == "original_sample":
            values["prediction_type"] = "sample"
        for key in ("use_karras_sigmas", "lower_order_final", "euler_at_final"):
            if key in values:
                values[key] = bool(values[key])
        if "lambda_min_clipped" in values:
            values["lambda_min_clipped"] = float(values["lambda_min_clipped"])
        return cls(kind=kind, **values)


class Schedule(NamedTuple):
    """Per-step sampling coefficients for one number of inference steps N (a pytree).

    timesteps:   (N,) float32, the timestep the model is called with at step i (integer valued
                 except for Euler's linspace and Karras schedules, which diffusers also passes as
                 fractional floats).
    input_scale: (N,) float32, the model input at step i is `input_scale[i] * x[i]`.
    alpha, sigma: (N,) float32, the VP pair turning the model output at step i into x0 (see the
                 module docstring).
    a, b, c:     (N,) float32, x[i+1] = a[i] x[i] + b[i] x0[i] + c[i] x0[i-1]; c[0] = 0.
    init_noise_sigma: () float32, initial latents are standard noise times this.
    """

    timesteps: jnp.ndarray
    input_scale: jnp.ndarray
    alpha: jnp.ndarray
    sigma: jnp.ndarray
    a: jnp.ndarray
    b: jnp.ndarray
    c: jnp.ndarray
    init_noise_sigma: jnp.ndarray


# ----------------------------------------------------------------------------- noise tables


def _betas(config: SchedulerConfig) -> np.ndarray:
    """(T,) float32 betas as diffusers builds them (torch.linspace in float32)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    else:  # "scaled_linear": linear in sqrt(beta), squared in float32
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in double and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so its last value is 0 and its first unchanged
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1)."""
    root = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    cumprod = root**2
    alphas = np.concatenate([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """(num_train_timesteps,) float32 cumulative products of (1 - beta), as the diffusers class
    of `config.kind` stores them (with rescale_betas_zero_snr, DPM-Solver and Euler replace the
    final 0 by 2**-24 so that the largest sigma is finite; DDIM and DDPM keep 0)."""
    cumprod = _cumprod_f32(np.float32(1) - _betas(config))
    if config.rescale_betas_zero_snr and config.kind in ("dpmsolver", "euler"):
        cumprod[-1] = 2.0**-24
    return cumprod


def _train_sigmas(cumprod: np.ndarray) -> np.ndarray:
    """(T,) float32 VE sigmas sqrt((1 - acp) / acp), increasing with t."""
    return np.sqrt((np.float32(1) - cumprod) / cumprod).astype(np.float32)


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """(n,) float64 sigmas evenly spaced in sigma^(1/rho) from sigma_max down to sigma_min
    (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigmas`: linear interpolation of log sigma between the two
    neighbouring training timesteps, clamped to [0, T-1] (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    table = log_train_sigmas.astype(np.float64)  # increasing in t
    low = np.clip(np.searchsorted(table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((table[low] - log_sigma) / (table[low] - table[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def _final_sigma(config: SchedulerConfig, cumprod: np.ndarray) -> float:
    if config.final_sigmas_type == "sigma_min":
        return float(_train_sigmas(cumprod[:1])[0])
    return 0.0


# ----------------------------------------------------------------------------- schedules


def _check_steps(config: SchedulerConfig, num_inference_steps: int) -> None:
    if not 1 <= num_inference_steps <= config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in "
            f"[1, num_train_timesteps={config.num_train_timesteps}]"
        )


def _dpmsolver(config: SchedulerConfig, n: int) -> dict[str, np.ndarray]:
    T = config.num_train_timesteps
    cumprod = alphas_cumprod(config)
    train_sigmas = _train_sigmas(cumprod)

    # Timesteps whose log-SNR lambda = log(alpha) - log(sigma) is below lambda_min_clipped are
    # never visited: the schedule starts at T - (number of them).
    vp_alpha = np.sqrt(cumprod)
    vp_sigma = np.sqrt(np.float32(1) - cumprod)
    lambdas = np.log(vp_alpha) - np.log(vp_sigma)
    last = T - int(np.searchsorted(lambdas[::-1], config.lambda_min_clipped, side="left"))

    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = last // (n + 1)
        timesteps = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        timesteps += config.steps_offset
    else:  # trailing
        timesteps = np.arange(last, 0, -T / n).round().astype(np.int64) - 1

    if config.use_karras_sigmas:
        sigmas = _karras(float(train_sigmas[-1]), float(train_sigmas[0]), n)
        timesteps = _sigma_to_t(sigmas, np.log(train_sigmas)).round()
    else:
        sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
    sigmas = np.append(sigmas, _final_sigma(config, cumprod)).astype(np.float32)
    n = len(timesteps)  # trailing spacing can make diffusers produce one extra step

    s = sigmas.astype(np.float64)  # (n + 1,)
    alpha = 1.0 / np.sqrt(s**2 + 1.0)
    sigma = s * alpha
    with np.errstate(divide="ignore"):
        lam = -np.log(s)  # log(alpha / sigma); +inf at a zero final sigma

    a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        # diffusers' order choice: 1 at the first step (no history), 1 at the last step when
        # the final sigma is 0, euler_at_final, or lower_order_final with fewer than 15 steps.
        last_step = i == n - 1 and (
            config.euler_at_final
            or (config.lower_order_final and n < 15)
            or config.final_sigmas_type == "zero"
        )
        order = 1 if config.solver_order == 1 or i == 0 or last_step else 2
        if s[i + 1] == 0.0:  # h = inf: the step lands on the data prediction
            assert order == 1
            a[i], b[i] = 0.0, 1.0
            continue
        h = lam[i + 1] - lam[i]
        if h == 0.0:
            # A zero-length step (Karras sigmas ending at sigma_min with final_sigmas_type
            # "sigma_min" repeat the last sigma): the identity, the h -> 0 limit of both orders.
            # diffusers divides 0 by 0 here with solver_type "heun" and returns NaN.
            a[i] = 1.0
            continue
        phi = -np.expm1(-h)  # 1 - exp(-h)
        a[i] = sigma[i + 1] / sigma[i]
        # DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) x0_s
        b[i] = alpha[i + 1] * phi
        if order == 2:
            # DPM-Solver++(2M) with D1 = (x0_i - x0_{i-1}) / r, r = h_prev / h:
            #   midpoint: + alpha_t (1 - e^-h) / 2 * D1
            #   heun:     + alpha_t (1 - (1 - e^-h) / h) * D1
            r = (lam[i] - lam[i - 1]) / h
            if config.solver_type == "midpoint":
                k = 0.5 * alpha[i + 1] * phi / r
            else:
                k = alpha[i + 1] * (1.0 - phi / h) / r
            b[i] += k
            c[i] = -k
    return {
        "timesteps": timesteps,
        "input_scale": np.ones(n),
        "alpha": alpha[:n],
        "sigma": sigma[:n],
        "a": a,
        "b": b,
        "c": c,
        "init_noise_sigma": np.float64(1.0),
    }


def _ddim(config: SchedulerConfig, n: int) -> dict[str, np.ndarray]:
    T = config.num_train_timesteps
    cumprod = alphas_cumprod(config)
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64)
        timesteps += config.steps_offset
    else:  # trailing
        timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1

    # diffusers steps DDIM to t - T // N whatever the spacing; below 0 it uses
    # final_alpha_cumprod (1 with set_alpha_to_one, else alphas_cumprod[0]).
    final = 1.0 if config.set_alpha_to_one else float(cumprod[0])
    previous = timesteps - T // n
    n_steps = len(timesteps)
    acp = cumprod[timesteps].astype(np.float64)
    acp_prev = np.where(previous >= 0, cumprod[np.maximum(previous, 0)], final).astype(np.float64)

    # eta = 0: x_prev = sqrt(acp_prev) x0 + sqrt(1 - acp_prev) eps, eps = (x - sqrt(acp) x0) /
    # sqrt(1 - acp).
    alpha, sigma = np.sqrt(acp), np.sqrt(1.0 - acp)
    a = np.sqrt(1.0 - acp_prev) / sigma
    b = np.sqrt(acp_prev) - a * alpha
    return {
        "timesteps": timesteps,
        "input_scale": np.ones(n_steps),
        "alpha": alpha,
        "sigma": sigma,
        "a": a,
        "b": b,
        "c": np.zeros(n_steps),
        "init_noise_sigma": np.float64(1.0),
    }


def _euler(config: SchedulerConfig, n: int) -> dict[str, np.ndarray]:
    T = config.num_train_timesteps
    cumprod = alphas_cumprod(config)
    train_sigmas = _train_sigmas(cumprod)
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(n) * (T // n)).round()[::-1].astype(np.float32)
        timesteps += config.steps_offset
    else:  # trailing
        timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - 1

    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
    if config.use_karras_sigmas:
        # Bounds default to the interpolated sigmas of this schedule, not the training range.
        lo = config.sigma_min if config.sigma_min is not None else float(sigmas[-1])
        hi = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        sigmas = _karras(hi, lo, n)
        timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
    sigmas = np.append(sigmas, _final_sigma(config, cumprod)).astype(np.float32)
    n = len(timesteps)

    s = sigmas.astype(np.float64)
    scale = 1.0 / np.sqrt(s[:n] ** 2 + 1.0)
    # Euler on dx/ds = (x - x0) / s: x_next = x + (s_next - s) (x - x0) / s.
    a = s[1:] / s[:n]
    # init_noise_sigma: max sigma for linspace / trailing, the VP-consistent sqrt(max^2 + 1)
    # for leading (diffusers' choice).
    top = float(sigmas.max())
    init = top if config.timestep_spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
    return {
        "timesteps": timesteps,
        "input_scale": scale,
        "alpha": scale,
        "sigma": s[:n] * scale,
        "a": a,
        "b": 1.0 - a,
        "c": np.zeros(n),
        "init_noise_sigma": np.float64(np.float32(init)),
    }


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> Schedule:
    """The coefficients of `num_inference_steps` sampling steps, as diffusers'
    `set_timesteps(num_inference_steps)` followed by that many `step` calls would use them.

    Returns a Schedule of (N,) float32 arrays (N = num_inference_steps, except that diffusers'
    DPM-Solver with trailing spacing may produce one more step for some N; that is reproduced).
    """
    _check_steps(config, num_inference_steps)
    build = {"dpmsolver": _dpmsolver, "ddim": _ddim, "euler": _euler}[config.kind]
    arrays = build(config, num_inference_steps)
    return Schedule(
        **{name: jnp.asarray(np.asarray(value, np.float32)) for name, value in arrays.items()}
    )


# ----------------------------------------------------------------------------- sampling step


def _compute_dtype(x: jnp.ndarray) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def initial_latents(schedule: Schedule, noise: jnp.ndarray) -> jnp.ndarray:
    """Standard normal noise (any shape) -> the first sample x[0] = noise * init_noise_sigma."""
    return noise * schedule.init_noise_sigma.astype(noise.dtype)


def scale_model_input(schedule: Schedule, i: jnp.ndarray, sample: jnp.ndarray) -> jnp.ndarray:
    """The model input at step i: sample * input_scale[i] (same shape and dtype as sample)."""
    return sample * schedule.input_scale[i].astype(sample.dtype)


def predict_x0(
    schedule: Schedule,
    i: jnp.ndarray,
    sample: jnp.ndarray,
    model_output: jnp.ndarray,
    prediction_type: str,
) -> jnp.ndarray:
    """The data prediction at step i from the (unscaled) sample and the raw model output, both
    of one shape; computed in (at least) float32."""
    dtype = _compute_dtype(sample)
    x_in = sample.astype(dtype) * schedule.input_scale[i].astype(dtype)
    out = model_output.astype(dtype)
    alpha, sigma = schedule.alpha[i].astype(dtype), schedule.sigma[i].astype(dtype)
    if prediction_type == "epsilon":
        return (x_in - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_in - sigma * out
    if prediction_type == "sample":
        return out
    raise _unsupported("prediction_type", prediction_type, ", ".join(PREDICTION_TYPES))


def step(
    schedule: Schedule,
    i: jnp.ndarray,
    sample: jnp.ndarray,
    model_output: jnp.ndarray,
    previous_x0: jnp.ndarray,
    prediction_type: str,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One sampler step: (x[i], model output at step i, x0[i-1]) -> (x[i+1], x0[i]).

    `sample` is the unscaled sample x[i] (the model was called on `scale_model_input` of it),
    `model_output` the raw prediction of kind `prediction_type` (a static string), and
    `previous_x0` the x0 returned by the previous step (zeros at i = 0). All three have one
    shape; `i` is a scalar int and may be traced. Pure: use it as the body of a `lax.scan`.
    Results are in float32 (or the sample's wider float dtype).
    """
    dtype = _compute_dtype(sample)
    x0 = predict_x0(schedule, i, sample, model_output, prediction_type)
    a, b, c = (coef[i].astype(dtype) for coef in (schedule.a, schedule.b, schedule.c))
    next_sample = a * sample.astype(dtype) + b * x0 + c * previous_x0.astype(dtype)
    return next_sample, x0


# ----------------------------------------------------------------------------- training


def _per_example(
    alphas_cumprod: jnp.ndarray, timesteps: jnp.ndarray, like: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """sqrt(acp[t]) and sqrt(1 - acp[t]) shaped (B, 1, ..., 1) to broadcast against `like`."""
    acp = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(timesteps)]
    acp = jnp.reshape(acp, acp.shape + (1,) * (like.ndim - acp.ndim))
    return jnp.sqrt(acp).astype(like.dtype), jnp.sqrt(1.0 - acp).astype(like.dtype)


def add_noise(
    alphas_cumprod: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, timesteps: jnp.ndarray
) -> jnp.ndarray:
    """DDPM forward process: sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise.

    alphas_cumprod (T,); x0, noise (B, ...) e.g. NHWC; timesteps (B,) int -> (B, ...) in x0's
    dtype.
    """
    signal, noise_scale = _per_example(alphas_cumprod, timesteps, x0)
    return signal * x0 + noise_scale * noise.astype(x0.dtype)


def velocity(
    alphas_cumprod: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, timesteps: jnp.ndarray
) -> jnp.ndarray:
    """The v-prediction target sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0; shapes as `add_noise`."""
    signal, noise_scale = _per_example(alphas_cumprod, timesteps, x0)
    return signal * noise.astype(x0.dtype) - noise_scale * x0


def snr(alphas_cumprod: jnp.ndarray, timesteps: jnp.ndarray) -> jnp.ndarray:
    """Signal-to-noise ratio acp[t] / (1 - acp[t]) of timesteps (B,) -> (B,) float32 (as
    diffusers' `training_utils.compute_snr`, for min-SNR loss weighting)."""
    acp = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(timesteps)]
    return acp / (1.0 - acp)
