"""python -m ella_jax.train.aot --config configs/X.py --topology v5p:4x4x4 [--out report.json]
[--config.key=value ...]   (installed: ella-jax-aot ...)

Compiles a config's training run ahead of time for a TPU slice that is not here, on any host
with the `tpu` extra (libtpu: the TPU compiler; pip install 'ella-jax[tpu]'), and reports what
the compiler says of it per chip: the HBM of the step's arguments, outputs and temporaries
against the chip's, whether it fits, the largest per-chip batch that does, the FLOPs of a step
(XLA's count and the model's), the collectives and the bytes they return, the samples/s that 40%
MFU would give, and the inference sampler's HBM. Nothing runs and no weight is read.

It builds exactly what `train.main` builds (`train.program`): the mesh of config.mesh over the
topology's chips, the frozen models as the config names them (online text model or precomputed
features), the step, remat, accumulation and shardings. The models' shapes come from their
config.json files alone: config.sd and config.t5 (or config.text_encoder.path) may name folders
that hold nothing else; left empty, the released models' shapes are used (SD 1.5 or SDXL base
by the ELLA's width, flan-t5-xl). No data is read (precomputed features are shaped as
train.precompute makes them).

Topologies are named as JAX names them: v4:2x2x1 (v4 counts each TensorCore as a device),
v5e:2x4, v5e:16x16, v5p:2x2x1, v5p:4x4x4, v6e:2x4, ... These are the compiler's numbers, not a
measured run. Errors print one line and exit with status 2.
"""

import os

# The TPU is the target, not a device of this host: JAX would otherwise look for one, and
# libtpu warn of every environment variable a TPU VM sets.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ella_jax import storage
from ella_jax.flops import PEAK_BF16_TFLOPS, model_flops
from ella_jax.kernels import compiling_for
from ella_jax.sampling import TextConditioning, sample_latents, sdxl_time_ids
from ella_jax.schedulers import make_schedule
from ella_jax.sharding import batch_sharding, make_mesh
from ella_jax.train.cli import flags_parser, run_command
from ella_jax.train.errors import ConfigError
from ella_jax.train.program import Program, build_program, with_shardings
from ella_jax.train.trainer import check_config
from ella_jax.weights import released
from ella_jax.weights.shapes_only import shapes_only

GIB = 2**30
TARGET_MFU = 0.4  # the utilisation the predicted throughput assumes
# HBM per chip in GiB, by device kind (Google Cloud's TPU documentation); peaks: flops.py's.
HBM_GIB = (("TPU v6 lite", 32), ("TPU v5 lite", 16), ("TPU v5", 95), ("TPU v4", 32))
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
               "c64": 8, "c128": 16}  # fmt: skip

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology, as v5e:2x4, v5p:4x4x4 (JAX's names; see above)."
)
_OUT = flags.DEFINE_string("out", None, "Also write the report here as JSON (local or a URI).")
_LARGEST = flags.DEFINE_integer(
    "largest_batch",
    512,
    "Search the largest power-of-two batch a device up to this that fits (a few more "
    "compiles; 0: no search).",
)
_SAMPLER = flags.DEFINE_boolean("sampler", True, "Also compile the inference sampler.")
flags.mark_flags_as_required(["config", "topology"])


class TpuSlice:
    """The devices of a topology as the report counts them: a device's HBM and peak are its
    chip's divided among the devices a chip shows (v4 shows its 2 TensorCores)."""

    def __init__(self, devices: list) -> None:
        self.kind = devices[0].device_kind
        self.devices = len(devices)
        self.chips = len({tuple(d.coords) for d in devices})
        self.hosts = len({d.process_index for d in devices})
        per_chip = self.devices // self.chips
        hbm = next((gib for name, gib in HBM_GIB if name in self.kind), None)
        peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in self.kind), None)
        if hbm is None or peak is None:
            raise ConfigError(f"{self.kind}: no HBM or peak FLOP/s known for this chip")
        self.hbm_bytes = hbm * GIB // per_chip
        self.peak_flops = peak * 1e12 / per_chip


def topology_devices(name: str) -> list:
    """The devices of the TPU topology `name`; an unknown name or a missing libtpu is a
    ConfigError. libtpu's start-up messages are kept off the terminal."""
    from jax.experimental import topologies

    try:
        with _quiet_stderr():
            return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # jaxlib raises RuntimeError, ValueError, XlaRuntimeError
        text = " ".join(str(e).split())
        if "tpu" in text.lower() and ("plugin" in text.lower() or "not found" in text.lower()):
            text += " (is libtpu installed? pip install 'ella-jax[tpu]')"
        raise ConfigError(f"--topology {name}: {text[:300]}") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Sends this process's file descriptor 2 (C++ logging included) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def with_released_shapes(config: ml_collections.ConfigDict, root: str) -> list[str]:
    """Fills an empty config.sd (SD 1.5's or SDXL base's, by the ELLA's width) and text model
    (flan-t5-xl) with the released models' shape folders written under `root`; returns what it
    filled, as "key=folder" lines."""
    filled = []
    folders = released.write_folders(root)
    if not config.sd:
        name = released.SDXL if config.ella.width == 2048 else released.SD15
        config.sd = str(folders / name)
        filled.append(f"config.sd={name}")
    encoder = config.get("text_encoder")
    if not (encoder and encoder.get("path")) and not config.get("t5"):
        config.t5 = str(folders / released.FLAN_T5)
        filled.append(f"config.t5={released.FLAN_T5}")
    return filled


def memory(compiled: Any) -> dict[str, int]:
    """Bytes per device of a compiled program: arguments, outputs, aliased (outputs written
    over donated arguments), temporaries, code, and their total live at once."""
    stats = compiled.memory_analysis()
    found = dict(
        arguments=stats.argument_size_in_bytes,
        outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes,
        temporaries=stats.temp_size_in_bytes,
        code=stats.generated_code_size_in_bytes,
    )
    live = ("arguments", "outputs", "temporaries", "code")
    found["total"] = sum(found[name] for name in live) - found["aliased"]
    return found


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an optimised HLO module, `bytes` the
    size of their results per device (an asynchronous one counted at its `-done`). A loop's
    body is counted once."""
    found: dict[str, dict[str, int]] = {}
    pattern = re.compile(
        rf"=\s*(?P<shape>.+?)\s+(?P<kind>{'|'.join(COLLECTIVES)})(?P<phase>-start|-done)?\("
    )
    for match in pattern.finditer(hlo):
        if match["phase"] == "-start":
            continue
        entry = found.setdefault(match["kind"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _shape_bytes(match["shape"])
    return dict(sorted(found.items()))


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: `bf16[8,320]{1,0}`, or a tuple of such."""
    total = 0
    for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shape):
        total += DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def compile_program(config: ml_collections.ConfigDict, devices: list) -> tuple[Program, Any]:
    """(program, compiled train step) of `config` on `devices`; a program that does not fit
    the chips' HBM is a MemoryError carrying the compiler's numbers."""
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    with tempfile.TemporaryDirectory() as workdir, shapes_only(), compiling_for("tpu"):
        program = build_program(config, mesh, storage.path(workdir))
        per_device = config.batch_size // len(devices)
        return program, _compile(program.lower(), f"the train step, {per_device} a device")


def _compile(lowered: Any, what: str) -> Any:
    """`lowered` compiled (said on stdout: a real model takes minutes)."""
    print(f"compiling {what} ...", flush=True)
    try:
        with _quiet_stderr():
            return lowered.compile()
    except Exception as e:  # XlaRuntimeError
        text = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            raise MemoryError(text[max(text.find("Ran out of memory"), 0) :][:300]) from None
        raise


def batch_per_device(config: ml_collections.ConfigDict, devices: list) -> int:
    """The config's batch per device (the global batch splits over every device)."""
    if config.batch_size % len(devices):
        raise ConfigError(
            f"config.batch_size={config.batch_size} does not split over {len(devices)} devices"
        )
    return config.batch_size // len(devices)


def at_batch(config: ml_collections.ConfigDict, per_device: int, devices: int):
    """`config` with a global batch of `per_device` a device."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.batch_size = per_device * devices
    return copy


def largest_batch(
    config: ml_collections.ConfigDict,
    devices: list,
    tpu: TpuSlice,
    limit: int,
    known: dict[int, int | None],
) -> dict:
    """The largest power-of-two batch per device, at most `limit`, whose step fits the
    device's HBM: memory at batches 1 and 2 gives a line (fixed + per example), whose
    prediction is compiled to check (halved while it does not fit). `known`: {batch: total
    bytes or None (out of memory)} already compiled. {"batch", "per_example_bytes", "tried":
    {batch: total bytes or None}}."""
    tried = dict(known)

    def total(batch: int) -> int | None:
        if batch not in tried:
            try:
                _, compiled = compile_program(at_batch(config, batch, len(devices)), devices)
                tried[batch] = memory(compiled)["total"]
            except MemoryError:
                tried[batch] = None
        return tried[batch]

    one, two = total(1), total(2)
    if one is None:
        return {"batch": 0, "per_example_bytes": None, "tried": tried}
    per_example = max((two or 2 * one) - one, 1)
    predicted = max(1, int((tpu.hbm_bytes - (one - per_example)) // per_example))
    batch = 2 ** int(math.log2(min(predicted, limit)))
    while batch > 1 and (total(batch) is None or total(batch) > tpu.hbm_bytes):
        batch //= 2
    if batch == 1 and one > tpu.hbm_bytes:
        batch = 0
    return {"batch": batch, "per_example_bytes": per_example, "tried": tried}


def sampler_memory(config: ml_collections.ConfigDict, program: Program, devices: list) -> dict:
    """The inference sampler of `config` compiled for the devices, an image a device: T5
    features in, ELLA and the UNet at each of config.sample_steps steps with classifier-free
    guidance, the VAE decode at config.data.resolution. {"batch", "steps", "memory"}."""
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    models, batch = program.models, len(devices)
    vae, unet = models.vae, models.unet
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = config.data.resolution // factor
    schedule = make_schedule(program.scheduler, config.sample_steps)
    spec = program.batch
    tokens = (batch, *spec["token_mask"].shape[1:])
    ids, mask = jax.ShapeDtypeStruct(tokens, jnp.int32), jax.ShapeDtypeStruct(tokens, bool)
    features = jax.eval_shape(models.text, program.frozen["text"], ids, mask)
    conditioning = dict(t5_features=features, token_mask=mask)
    if "time_ids" in spec:  # SDXL
        width = program.method.clip_2.config.projection_dim
        conditioning["pooled"] = jax.ShapeDtypeStruct((batch, width), jnp.float32)
    conditioning = {name: with_shardings(s, batch_sharding(mesh, len(s.shape)))
                    for name, s in conditioning.items()}  # fmt: skip
    latents = jax.ShapeDtypeStruct(
        (batch, latent, latent, vae.config.latent_channels),
        jnp.float32,
        sharding=batch_sharding(mesh, 4),
    )
    frozen = with_shardings(program.frozen, program.frozen_shardings)
    ella_params = program.state.ema_params
    size = config.data.resolution

    def sample(frozen, ella_params, latents, conditioning):
        if "pooled" in conditioning:
            conditioning = {**conditioning, "time_ids": sdxl_time_ids(size, size, batch)}
        cond = TextConditioning(**conditioning)
        params = {"unet": frozen["unet"], "ella": ella_params}
        x = sample_latents(unet, models.ella, params, schedule, program.scheduler.prediction_type,
                           latents, cond, cond, config.sample_guidance)  # fmt: skip
        scaled = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.apply({"params": frozen["vae"]}, scaled, method="decode")

    with compiling_for("tpu"):
        lowered = jax.jit(sample).lower(frozen, ella_params, latents, conditioning)
    compiled = _compile(lowered, f"the sampler, {batch} images")
    return {"batch": batch, "steps": config.sample_steps, "memory": memory(compiled)}


def report(
    config: ml_collections.ConfigDict,
    topology: str,
    largest_batch_limit: int = 512,
    sampler: bool = True,
) -> dict:
    """Compiles `config` for `topology` and returns the report (module docstring): the
    largest batch searched up to `largest_batch_limit` a device (0: not searched), the
    inference sampler compiled too if `sampler`."""
    if config.get("method", "ella") != "ella":
        raise ConfigError(f"config.method={config.method!r}: only ELLA runs are compiled here yet")
    devices = topology_devices(topology)
    tpu = TpuSlice(devices)
    with tempfile.TemporaryDirectory() as root:
        filled = with_released_shapes(config, root)
        check_config(config, devices, with_data=False)
        per_device = batch_per_device(config, devices)
        started = time.perf_counter()
        try:
            program, compiled = compile_program(config, devices)
            step_memory, compiler_note = memory(compiled), None
        except MemoryError as e:
            program, compiled, step_memory, compiler_note = None, None, None, str(e)
        seconds = time.perf_counter() - started
        if program is None:  # the shapes alone, for the FLOPs and the sampler
            mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
            with shapes_only(), compiling_for("tpu"):
                program = build_program(config, mesh, storage.path(root))
        with compiling_for("tpu"):
            flops = model_flops(program.modelled_step, program.state, program.frozen,
                                program.batch)  # fmt: skip
        result: dict[str, Any] = dict(
            config=config.to_dict(),
            shapes_from=filled,
            topology=topology,
            device_kind=tpu.kind,
            devices=tpu.devices,
            chips=tpu.chips,
            hosts=tpu.hosts,
            mesh=dict(make_mesh(config.mesh.data, config.mesh.fsdp, devices).shape),
            batch_size=config.batch_size,
            batch_per_device=per_device,
            gradient_accumulation=config.get("gradient_accumulation", 1),
            remat=config.remat,
            hbm_per_device=tpu.hbm_bytes,
            memory=step_memory,
            fits=step_memory is not None and step_memory["total"] <= tpu.hbm_bytes,
            compiler_note=compiler_note,
            compile_seconds=round(seconds, 1),
            model_flops_per_step=flops,
            model_flops_per_example=flops / config.batch_size,
        )
        if compiled is not None:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            result["compiled_flops_per_device"] = float(cost.get("flops", 0.0))
            result["collectives"] = collectives(compiled.as_text())
        step_seconds = flops / (TARGET_MFU * tpu.peak_flops * tpu.devices)
        result["samples_per_s_at_40_percent_mfu"] = config.batch_size / step_seconds
        if largest_batch_limit:
            known = {per_device: None if step_memory is None else step_memory["total"]}
            result["largest_batch"] = largest_batch(
                config, devices, tpu, largest_batch_limit, known
            )
        if sampler:
            try:
                result["sampler"] = sampler_memory(config, program, devices)
            except MemoryError as e:
                result["sampler"] = {"memory": None, "compiler_note": str(e)}
    return result


def size_text(size: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def summary(result: dict) -> str:
    """The report as a few lines of text."""
    gib = lambda n: "-" if n is None else size_text(n)  # noqa: E731
    memory = result["memory"] or {}
    lines = [
        f"{result['topology']}: {result['devices']} x {result['device_kind']} "
        f"({result['chips']} chips, {result['hosts']} hosts), mesh data={result['mesh']['data']} "
        f"fsdp={result['mesh']['fsdp']}, batch {result['batch_size']} "
        f"({result['batch_per_device']} a device), remat={result['remat']}, accumulation "
        f"{result['gradient_accumulation']}",
        f"  HBM a device: arguments {gib(memory.get('arguments'))}, outputs "
        f"{gib(memory.get('outputs'))} ({gib(memory.get('aliased'))} over donated arguments), "
        f"temporaries {gib(memory.get('temporaries'))}; total {gib(memory.get('total'))} of "
        f"{gib(result['hbm_per_device'])}: " + ("fits" if result["fits"] else "DOES NOT FIT"),
    ]
    if result["compiler_note"]:
        lines.append(f"  the compiler: {result['compiler_note']}")
    lines.append(
        f"  FLOPs: model {result['model_flops_per_example'] / 1e12:.3f} TFLOP an example"
        + (
            f", XLA {result['compiled_flops_per_device'] / 1e12:.3f} TFLOP a device-step"
            if "compiled_flops_per_device" in result
            else ""
        )
        + f"; at 40% MFU {result['samples_per_s_at_40_percent_mfu']:.1f} samples/s"
    )
    for kind, entry in result.get("collectives", {}).items():
        lines.append(f"  {kind}: {entry['count']} ops, {gib(entry['bytes'])} a device-step")
    if "largest_batch" in result:
        largest = result["largest_batch"]
        lines.append(
            f"  largest batch a device that fits: {largest['batch']} (about "
            f"{gib(largest['per_example_bytes'])} an example)"
        )
    if "sampler" in result:
        sampler = result["sampler"]
        total = (sampler.get("memory") or {}).get("total")
        lines.append(
            f"  sampler: {sampler.get('batch', '-')} images ({sampler.get('steps', '-')} steps, "
            f"CFG), {gib(total)} a device"
        )
    lines.append("  (the TPU compiler's numbers for this program, not a measured run)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    def command(config: ml_collections.ConfigDict) -> None:
        config = ml_collections.ConfigDict(config.to_dict())  # unlocked: shapes may be filled
        result = report(config, _TOPOLOGY.value, _LARGEST.value, _SAMPLER.value)
        print(summary(result))
        if _OUT.value:
            with storage.atomic_path(_OUT.value, overwrite=True) as staging:
                staging.write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"wrote {_OUT.value}")

    return run_command(argv, _CONFIG, command)


def run() -> None:
    """The command (`python -m ella_jax.train.aot`, `ella-jax-aot`)."""
    app.run(main, flags_parser=flags_parser(__doc__))


if __name__ == "__main__":
    run()
