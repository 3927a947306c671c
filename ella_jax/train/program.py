"""The program a training run compiles, built in one place for `train.main` and for compiling
ahead of time for chips that are not here (`train.aot`): the frozen models, the trained state's
and the global batch's shapes with their shardings on the mesh, and the jitted train step.

`build_program` reads the models as the config names them; inside `weights.shapes_only()` it
reads their config.json files alone and the frozen params are shapes. Sharding: every tree (the
frozen models, the trained params and their optimizer state) by `sharding.param_shardings`, with
the config's partition rules (`config.mesh.rules`: (regex, spec) pairs, a spec a tuple of mesh
axis names or None per dimension, e.g. `(("unet/.*/kernel$", (None, "fsdp")),)`) before the
default, which shards each large parameter over `fsdp` along its largest divisible axis.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ella_jax import storage
from ella_jax.schedulers import SchedulerConfig, alphas_cumprod
from ella_jax.sharding import batch_sharding, param_shardings
from ella_jax.train.ella import ELLARun
from ella_jax.train.errors import ConfigError
from ella_jax.train.step import Models, StepConfig, init_state, make_optimizer, make_train_step
from ella_jax.train.sur import SURRun
from ella_jax.weights.diffusers import load_unet, load_vae
from ella_jax.weights.tensors import read_config

METHODS = {"ella": ELLARun, "sur": SURRun}  # config.method: what trains on the frozen UNet


def method_of(config: ml_collections.ConfigDict) -> ELLARun | SURRun:
    """The run's method (config.method, "ella" when the config has none)."""
    name = config.get("method", "ella")
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name](config)


class Program(NamedTuple):
    """What a run compiles (see the module docstring)."""

    method: Any  # the run's method (train.ella.ELLARun, train.sur.SURRun), its modules built
    models: Models  # the frozen modules and the trained one, as the step sees them
    scheduler: SchedulerConfig
    frozen: dict  # the frozen params: host arrays as read, or shapes (`shapes_only`)
    frozen_shardings: Any
    initial_state: Callable[[], Any]  # () -> TrainState at step 0 (jittable)
    learning_rate: Callable[[int], Any]  # the schedule, by step
    state: Any  # the TrainState's ShapeDtypeStructs, with their shardings
    batch: dict  # the global batch's ShapeDtypeStructs, with their shardings
    step: Any  # the jitted train step: (state, frozen, batch) -> (state, metrics), state donated
    modelled_step: Callable  # the same step without rematerialisation: its model FLOPs

    def lower(self) -> Any:
        """The step lowered for the program's shapes and shardings (`.compile()` it)."""
        return self.step.lower(self.state, with_shardings(self.frozen, self.frozen_shardings),
                               self.batch)  # fmt: skip


def partition_rules(config: ml_collections.ConfigDict) -> list[tuple[str, PartitionSpec]]:
    """config.mesh.rules as (regex, PartitionSpec) pairs (module docstring); a malformed one is
    a ConfigError naming it."""
    rules = []
    for rule in config.mesh.get("rules", ()) or ():
        try:
            pattern, axes = rule
            if not isinstance(pattern, str):
                raise TypeError("the regex is not a string")
            rules.append((pattern, PartitionSpec(*axes)))
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"config.mesh.rules: {rule!r} is not a (regex, (axis or None, ...)) pair ({e})"
            ) from None
    return rules


def with_shardings(tree: Any, shardings: Any) -> Any:
    """`tree`'s leaves (arrays or ShapeDtypeStructs) as ShapeDtypeStructs with `shardings`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def build_program(config: ml_collections.ConfigDict, mesh: Mesh, workdir: Any) -> Program:
    """The program of `config` on `mesh` (a run in `workdir`, which a SUR-adapter run reads its
    projection from when it resumes). Loads the frozen models (shapes only inside
    `weights.shapes_only()`); compiles nothing."""
    method = method_of(config)
    sd = storage.path(config.sd)
    vae, vae_params = load_vae(sd / "vae", config.dtype)
    unet, unet_params = load_unet(sd / "unet", config.dtype)
    frozen = {**method.load_frozen(workdir), "vae": vae_params, "unet": unet_params}
    rules = partition_rules(config)
    frozen_shardings = param_shardings(frozen, mesh, rules)
    scheduler = read_config(sd / "scheduler" / "scheduler_config.json", SchedulerConfig.from_dict)

    optimizer, learning_rate = make_optimizer(
        config.learning_rate,
        config.warmup_steps,
        config.total_steps,
        config.lr_schedule,
        config.weight_decay,
        config.grad_clip,
        config.get("gradient_accumulation", 1),
        getattr(method, "trainable", None),
    )

    def initial_state():
        return init_state(method.init_params(), optimizer, config.seed)

    abstract_state = jax.eval_shape(initial_state)
    state_shardings = param_shardings(abstract_state, mesh, rules)

    step_config = StepConfig(
        prediction_type=scheduler.prediction_type,
        scaling_factor=vae.config.scaling_factor,
        shift_factor=vae.config.shift_factor or 0.0,
        ema_decay=config.ema_decay,
        min_snr_gamma=config.min_snr_gamma,
        mask_padding=config.get("mask_padding", False),
    )
    acp = jnp.asarray(alphas_cumprod(scheduler))
    models = Models(getattr(method, "text_model", None), vae, unet, method.model)
    conditioner = method.conditioner(models)
    remat = models._replace(unet=unet.clone(remat=config.remat == "blocks"))
    spec = method.batch_spec(config.batch_size, frozen, vae)
    batch_shardings = {name: batch_sharding(mesh, len(s.shape)) for name, s in spec.items()}
    step = jax.jit(
        make_train_step(remat, optimizer, acp, step_config, conditioner),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    return Program(
        method=method,
        models=models,
        scheduler=scheduler,
        frozen=frozen,
        frozen_shardings=frozen_shardings,
        initial_state=initial_state,
        learning_rate=learning_rate,
        state=with_shardings(abstract_state, state_shardings),
        batch=with_shardings(spec, batch_shardings),
        step=step,
        modelled_step=make_train_step(models, optimizer, acp, step_config, conditioner),
    )


def conform(batch: dict, spec: dict, where: str) -> dict:
    """A process's `batch` with the fields, shapes (but its leading, per-process size) and
    dtypes of the global `spec`: a float field of another precision (features precomputed in
    another dtype) is cast; another field, shape or kind is a ValueError naming it."""
    if set(batch) != set(spec):
        raise ValueError(
            f"{where}: the data gives the fields {sorted(batch)}, the run expects {sorted(spec)}"
        )
    conformed = {}
    for name, array in batch.items():
        expected = spec[name]
        array = np.asarray(array)
        same_kind = np.issubdtype(array.dtype, np.floating) and jnp.issubdtype(
            expected.dtype, jnp.floating
        )
        if array.shape[1:] != expected.shape[1:] or (
            array.dtype != expected.dtype and not same_kind
        ):
            raise ValueError(
                f"{where}: the data's {name!r} is {array.dtype}{list(array.shape[1:])} per "
                f"example, the run expects {expected.dtype}{list(expected.shape[1:])}"
            )
        conformed[name] = array if array.dtype == expected.dtype else array.astype(expected.dtype)
    return conformed
