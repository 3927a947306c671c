"""The training loop: config checks, mesh, data source, frozen models, sharded state, data,
resume, the run's files, compile, loop, export; each a short section, in that order."""

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from ella_jax import storage
from ella_jax.flops import model_flops, peak_flops_per_second, utilisation
from ella_jax.images import grid, save_png
from ella_jax.sampling import sample_latents
from ella_jax.schedulers import initial_latents, make_schedule
from ella_jax.sharding import make_mesh
from ella_jax.train import checkpoint, data
from ella_jax.train.errors import ConfigError, DataError, DivergedError
from ella_jax.train.metrics import MetricsWriter
from ella_jax.train.program import build_program, conform, method_of
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.trained_run import RUN_CONFIG_FILE

__all__ = ["ConfigError", "DataError", "DivergedError", "check_config", "train"]

REMAT = ("none", "blocks")  # config.remat: "blocks" recomputes each UNet block in the backward


def check_config(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    with_data: bool = True,
) -> None:
    """Fails fast, naming the key: missing folders, a mesh that does not fit the devices (by
    default this host's), batch sizes the mesh cannot split, precomputed data made otherwise
    (unless not `with_data`: the data is not needed to compile), and the method's own checks
    (an ELLA that does not fit the UNet or the T5, ...)."""
    method = method_of(config)
    if not config.sd or not storage.reachable(config.sd).is_dir():
        raise ConfigError(f"config.sd={config.sd!r} is not a model folder")
    for sub in ("unet", "vae", "scheduler"):
        if not (storage.path(config.sd) / sub).is_dir():
            raise ConfigError(f"config.sd={config.sd!r} has no {sub}/ folder")
    if with_data:
        storage.reachable(config.data.path)
    cross_attention_dim = read_json(storage.path(config.sd) / "unet" / "config.json").get(
        "cross_attention_dim"
    )
    try:
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    if config.batch_size % mesh.size:
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not split over {mesh.size} devices"
        )
    for key in ("total_steps", "checkpoint_every", "log_every", "sample_every"):
        if config[key] <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be positive")
    if config.get("gradient_accumulation", 1) < 1:
        raise ConfigError(
            f"config.gradient_accumulation={config.gradient_accumulation} must be at least 1"
        )
    if not 0 < config.data.max_skipped_fraction <= 1:
        raise ConfigError(
            f"config.data.max_skipped_fraction={config.data.max_skipped_fraction} must be in (0, 1]"
        )
    if config.remat not in REMAT:
        raise ConfigError(f"config.remat={config.remat!r}: use one of {', '.join(REMAT)}")
    if config.data.source == "precomputed" and with_data:
        summary_path = storage.path(config.data.path) / "precompute.json"
        try:
            made = read_json(summary_path)
        except CheckpointError as e:
            message = f"config.data.path={config.data.path!r}: {e} (train.precompute writes it)"
            raise ConfigError(message) from None
        if made.get("resolution", config.data.resolution) != config.data.resolution:
            raise ConfigError(
                f"config.data.resolution={config.data.resolution!r}, but {summary_path} was "
                f"made with resolution={made['resolution']!r}: rerun train.precompute with "
                "this config"
            )
    method.check(cross_attention_dim, with_data)


def check_resume(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """A run that has trained in `workdir` (a checkpoint or its export) resumes only with the
    architecture it was trained with: a changed method or shape-bearing key (`ella.*`, the text
    model's width; `sur.depth`, `sur.eta`, `sur.attend`) would relabel its weights, so it is a
    ConfigError naming every change, raised before any of the run's files is touched."""
    saved_path = workdir / RUN_CONFIG_FILE
    method = method_of(config)
    checkpoints = workdir / "checkpoints"
    trained = (workdir / method.export_name).exists() or (
        checkpoints.is_dir() and any(checkpoints.iterdir())
    )
    if not trained or not saved_path.is_file():
        return
    saved = ml_collections.ConfigDict(read_json(saved_path))
    old_method, new_method = saved.get("method", "ella"), config.get("method", "ella")
    if old_method != new_method:
        changes = [f"method {old_method!r} -> {new_method!r}"]
    else:
        changes = method.architecture_changes(saved, workdir)
    if changes:
        raise ConfigError(
            f"{workdir} holds a run trained with other shapes ({'; '.join(changes)}; "
            f"{saved_path}): resume it with its own values, or train in a new --workdir"
        )


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Trains (or resumes) the run of `config` in `workdir`. From its first line on, SIGTERM and
    SIGINT stop the run at its next step (the next logged step when there are several
    processes) with a checkpoint; a second SIGINT interrupts at once."""
    with _stop_on_signals() as stop:
        print(
            f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} of {jax.device_count()} devices: "
            "SIGTERM or SIGINT saves a checkpoint and stops",
            flush=True,
        )
        _train(config, storage.reachable(workdir), stop)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, stop: "_StopFlag") -> None:
    check_config(config)
    check_resume(config, workdir)
    # Nothing is written into `workdir` until the first batch is read: a run that cannot start
    # leaves a new work directory unmade.

    # ---------------------------------------------------------------------------------- Mesh
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    primary = jax.process_index() == 0  # writes logs, samples and the export

    # ------------------------------------------------------- Data source: before the models
    source = None
    if config.data.source == "webdataset" and jax.process_count() > 1:
        # Process 0 indexes the shards that have no cached index yet; the others then read the
        # cached indexes instead of each reading every shard's headers.
        if primary:
            source = data.open_configured(config.data)
        _barrier("webdataset indexes")
    if source is None:
        source = data.open_configured(config.data)
    check_readable(config, source)

    # ------------------------------------ Frozen models, trained state, batch, step: the program
    if primary:
        print(f"loading the frozen models of {storage.path(config.sd)} ...", flush=True)
    program = build_program(config, mesh, workdir)
    method, models, scheduler = program.method, program.models, program.scheduler
    # Placed from host values, which works for any number of processes.
    frozen = jax.device_put(jax.device_get(program.frozen), program.frozen_shardings)
    state_shardings = jax.tree.map(lambda s: s.sharding, program.state)

    # -------------------------------------------------------------------------------- Data
    skipped_images = data.Skipped()  # this process's unreadable images
    dataset = data.make_dataset(
        source,
        method.prepare(skipped_images),
        config.batch_size,
        config.data.caption_dropout,
        config.seed,
        jax.process_index(),
        jax.process_count(),
        **data.dataset_options(config.data),
    )
    iterator = iter(dataset.to_iter_dataset(read_options(config.data)))

    # ------------------------------------------------------------------------------ Resume
    checkpoints, manager, state = workdir / "checkpoints", None, None
    # Asked together (a collective), before any process can have made the folder of a new run.
    if _any_process(checkpoints.is_dir()):
        manager = checkpoint.make_manager(checkpoints, config.keep_checkpoints)
        state = checkpoint.restore_latest(manager, program.state, iterator, _any_process)
    if state is None:
        state = jax.jit(program.initial_state, out_shardings=state_shardings)()
    start = int(state.step)
    first = conform(next(iterator), program.batch, data_name(config))
    if not _any_process(bool(np.any(first["valid"])), after=state):
        raise DataError(
            f"no image of the first batch could be read ({skipped_images.count} unreadable "
            f"so far on this process); {skipped_images.describe()}"
        )

    # ------------------------------------------------- The run's files, now that it can start
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:  # lets `python -m convert` read any checkpoint, and readers see the run
        method.write_run_files(workdir)
        (workdir / RUN_CONFIG_FILE).write_text(config.to_json(indent=2) + "\n")
    if manager is None:
        manager = checkpoint.make_manager(checkpoints, config.keep_checkpoints)
    writer = MetricsWriter(workdir, resume_step=start) if primary else None

    # ----------------------------------------------------------------------------- Compile
    lowered = program.lower()
    # Model FLOPs of a step (without the recomputation of remat) and the devices' peak: MFU.
    # Traced on a thread while XLA compiles (which leaves Python free): the trace is Python's.
    if primary:
        print("compiling the train step ...", flush=True)
    with ThreadPoolExecutor(1) as pool:
        step_flops = pool.submit(
            model_flops, program.modelled_step, program.state, frozen, program.batch
        )
        compiled = lowered.compile()
        throughput = _Throughput(
            config.batch_size,
            step_flops.result(),
            jax.device_count(),
            peak_flops_per_second(jax.devices()[0], config.dtype),
        )
    sampler = _make_sampler(config, method, frozen, models.unet, models.vae, scheduler)

    # -------------------------------------------------------------------------------- Loop
    _barrier("first step")
    batch, pending, stopping = first, None, False
    checks = _StepChecks(
        manager, config.batch_size, config.data.max_skipped_fraction, skipped_images
    )
    clock = _StepClock(state, start)
    # Closed however the loop ends: an error printed after it starts a line of its own.
    with tqdm(
        total=config.total_steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not primary,
    ) as bar:

        def log(step: int, metrics: dict) -> None:  # waits for the step
            checks.check(step, logged=True)
            seconds, steps = clock.lap(metrics, step)
            total_skipped = checks.total_skipped
            _log(
                writer,
                bar,
                step,
                metrics,
                seconds,
                steps,
                program.learning_rate,
                throughput,
                total_skipped,
            )

        for step in range(start + 1, config.total_steps + 1):
            global_batch = jax.tree.map(
                lambda s, a: jax.make_array_from_process_local_data(s.sharding, a),
                program.batch,
                batch,
            )
            state, metrics = compiled(state, frozen, global_batch)
            checks.add(step, metrics)
            if pending is not None:  # fetch the previous logged step while this one runs
                log(*pending)
                pending = None
            logged = step % config.log_every == 0 or step == config.total_steps
            if logged:
                pending = (step, metrics)
            if logged or jax.process_count() == 1:
                # Across processes a blocking collective, which would keep the host from
                # queueing steps ahead: asked at logged steps only, the same steps on every
                # process.
                stopping = _any_process(stop.requested, after=state)
            if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
                checks.check(step, logged=False)  # the save would wait for the step too
                checkpoint.save(manager, step, state, iterator)
            if step % config.sample_every == 0:
                images = sampler(state.ema_params)
                if primary:
                    prompts = {"step": step, "prompts": list(config.sample_prompts),
                               "cells": "row-major, a prompt a cell, EMA weights"}  # fmt: skip
                    save_png(grid(images, gap=2), workdir / "samples" / f"step_{step:07d}.png",
                             {"ella-jax": json.dumps(prompts)})  # fmt: skip
            bar.update(1)
            if stopping:
                break
            if step < config.total_steps:
                batch = conform(next(iterator), program.batch, data_name(config))
        if pending is not None:
            log(*pending)
        checks.check(config.total_steps, logged=False)
        manager.wait_until_finished()
    if writer is not None:
        writer.close()

    # ------------------------------------------------------------------------------ Export
    if stopping:
        print(f"stopped by signal at step {int(state.step)}; checkpoint saved, rerun to resume")
        return
    ema_params = _to_host(state.ema_params)
    if primary:
        print(method.export(workdir, ema_params))


def check_readable(config: ml_collections.ConfigDict, source: Any) -> None:
    """Reads the records of `source` (the configured one) in order until one gives an example,
    the same records on every process, so that a source of the wrong kind (a ValueError) or of
    no readable image among the first batch's worth (a DataError naming it) stops the run
    before any model loads."""
    where = data_name(config)
    if not len(source):
        raise DataError(f"{where} holds no records")
    if config.data.source == "precomputed":  # its records are all readable: their kind is checked
        data.precomputed_examples({})(source[0], drop_caption=False)
        return
    skipped = data.Skipped()
    tries = min(len(source), config.batch_size)
    for index in range(tries):
        if data.decode(source[index], config.data.resolution, skipped)["valid"]:
            return
    raise DataError(
        f"{where}: none of its first {tries} records could be read; {skipped.describe()}"
    )


def data_name(config: ml_collections.ConfigDict) -> str:
    """The run's data, as its errors name it."""
    return f"config.data.path={config.data.path!r} (data.source={config.data.source!r})"


def read_options(data_config: ml_collections.ConfigDict) -> grain.ReadOptions:
    """How grain reads ahead: `prefetch_batches` batches (an element of the dataset is a
    batch), decoded by `read_threads` threads, one batch each (more threads than batches would
    idle: grain warns). A short read-ahead: grain's default of 500 would hold hundreds of GiB
    of decoded images at the paper's batch size, and its threads would take the cores from
    the compile."""
    return grain.ReadOptions(
        num_threads=data_config.read_threads, prefetch_buffer_size=data_config.prefetch_batches
    )


class _StepClock:
    """The seconds between the ends of two steps. A step ends when its outputs are ready,
    which the host learns by waiting for them: its dispatch returns at once, the host queueing
    steps ahead of the devices (a clock read at dispatch counts queued steps as done)."""

    def __init__(self, ready, step: int):
        """Starts at `step` once the arrays `ready` are (the state it starts from)."""
        jax.block_until_ready(ready)
        self.time, self.step = time.perf_counter(), step

    def lap(self, outputs, step: int) -> tuple[float, int]:
        """(seconds, steps) from the last lap (or the start) to the end of `step`, whose
        `outputs` are waited for."""
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        seconds, steps = now - self.time, step - self.step
        self.time, self.step = now, step
        return seconds, steps


class _Throughput(NamedTuple):
    batch_size: int
    step_flops: float  # model FLOPs of one step, all devices together
    devices: int
    peak: float | None  # FLOP/s of one device

    def record(self, seconds: float, steps: int) -> dict[str, float | None]:
        """samples_per_s, tflops_per_device, mfu over `steps` steps that took `seconds`."""
        rates = utilisation(self.step_flops * steps, seconds, self.devices, self.peak)
        rates["samples_per_s"] = self.batch_size * steps / max(seconds, 1e-9)
        return {name: value for name, value in rates.items() if value is not None}


class _StepChecks:
    """What the host reads of each step lazily, at logged and saved steps (a step's outputs are
    fetched only once it has finished): whether it was finite, and how many images it skipped.
    A non-finite step, or more unreadable images over a logging interval than
    `max_skipped_fraction` of them, stops the run with one error."""

    def __init__(self, manager, batch_size: int, max_skipped_fraction: float, skipped):
        self.manager, self.batch_size = manager, batch_size
        self.max_fraction, self.skipped = max_skipped_fraction, skipped  # data.Skipped
        self.pending: list[tuple[int, jax.Array, jax.Array]] = []  # (step, finite, skipped)
        self.total_skipped = self.window_skipped = self.window_steps = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics["finite"], metrics["skipped"]))

    def check(self, up_to: int, logged: bool) -> None:
        """Checks the steps up to `up_to`; at a logged step, the interval's skipped images."""
        due = [entry for entry in self.pending if entry[0] <= up_to]
        self.pending = [entry for entry in self.pending if entry[0] > up_to]
        fetched = jax.device_get([(finite, skipped) for _, finite, skipped in due])
        for (step, _, _), (finite, skipped) in zip(due, fetched, strict=True):
            if not finite:
                raise DivergedError(
                    f"the loss, gradient or update is not finite at step {step} (not applied; "
                    f"the run stopped there, saving nothing of it): {self._resume()}"
                )
            self.total_skipped += int(skipped)
            self.window_skipped += int(skipped)
            self.window_steps += 1
        if logged and self.window_steps:
            images = self.window_steps * self.batch_size
            if self.window_skipped > self.max_fraction * images:
                raise DataError(
                    f"{self.window_skipped} of the last {images} images could not be read (more "
                    f"than data.max_skipped_fraction={self.max_fraction}), "
                    f"{self.total_skipped} in all; {self.skipped.describe()}"
                )
            self.window_skipped = self.window_steps = 0

    def _resume(self) -> str:
        self.manager.wait_until_finished()
        newest = self.manager.latest_step()
        if newest is None:
            return "no checkpoint was saved"
        path = self.manager.directory / str(newest)
        return f"the newest checkpoint is step {newest} ({path}), where a rerun resumes"


def _log(writer, bar, step, metrics, seconds, steps, learning_rate, throughput, skipped) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for checked in ("skipped", "finite"):  # by _StepChecks, over every step
        values.pop(checked)
    record = {
        **values,
        "lr": float(learning_rate(step - 1)),
        **throughput.record(seconds, steps),
        "skipped_images": skipped,
    }
    if writer is not None:
        writer.write(step, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """While active, SIGTERM / SIGINT ask the loop to save a checkpoint and return (a second
    SIGINT raises KeyboardInterrupt: a run asked to stop during a long compile can be left)."""
    flag = _StopFlag()

    def request(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True

    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _make_sampler(config, method, frozen, unet, vae, scheduler):
    """Trained params -> host images (N, H, W, 3) in [0, 1] for config.sample_prompts (every
    process must call it: the computation spans the mesh)."""
    schedule = make_schedule(scheduler, config.sample_steps)
    latent = config.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(config.sample_prompts), latent, latent, vae.config.latent_channels)
    start = initial_latents(schedule, jax.random.normal(jax.random.key(config.seed), shape))
    conditioning = method.sample_conditioning()

    @jax.jit
    def sample(frozen, params):
        cond, uncond, adapters = conditioning(frozen, params)
        latents = sample_latents(
            unet,
            method.model,
            {"unet": frozen["unet"], **adapters},
            schedule,
            scheduler.prediction_type,
            start,
            cond,
            uncond,
            config.sample_guidance,
        )
        scaled = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.apply({"params": frozen["vae"]}, scaled, method="decode")
        return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1)

    return lambda params: _to_host(sample(frozen, params))


def _to_host(tree):
    """Global arrays as numpy on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _barrier(name: str) -> None:
    """Waits until every process is here, on the coordination service (for up to 30 minutes).
    Gloo, XLA:CPU's collectives, gives a collective's first call 30 s to find every process,
    and two processes' compilations can differ by more; the public barrier would itself be a
    gloo collective."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # private: guarded by the process count above

    distributed.global_state.client.wait_at_barrier(name, 30 * 60 * 1000)  # (id, milliseconds)


def _any_process(flag: bool, after=None) -> bool:
    """True on every process when it is True on any (they must stop at the same step). The
    arrays `after` (the outputs of the step in flight) are waited for first on the CPU: XLA:CPU
    runs programs without data dependencies side by side, so this all-gather could run beside
    the step, and two processes that interleave the two programs' collectives differently
    deadlock in gloo (GPUs and TPUs run one device's programs in order)."""
    if jax.process_count() == 1:
        return flag
    if jax.default_backend() == "cpu":
        jax.block_until_ready(after)
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))
