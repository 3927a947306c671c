"""One denoising step of ELLA inference at SD 1.5 size, random weights: jitted JAX against
diffusers + PyTorch eager on the same machine.

    .venv/bin/python -m bench.denoising_step [--size 256] [--repeats 10] [--dtype float32]
        [--profile]

One step, as `ella_jax.sampling` runs it with classifier-free guidance:

    context = ELLA(t5_features (2, 128, 2048) [negative; positive], t)     -> (2, 64, 768)
    noise   = SD 1.5 UNet([x; x] (2, size/8, size/8, 4), t, context)
    guided  = noise_uncond + 7.5 * (noise_cond - noise_uncond)
    x_next  = x - 0.1 * guided                           (a stand-in for the scheduler update)

ELLA has the released size (`ella_jax.ELLA()` defaults; PyTorch: `bench.torch_ella.TorchELLA`),
the UNet the SD 1.5 config (`ella_jax.weights.released.SD15_UNET`). The PyTorch models are built
first with random weights (every parameter perturbed, so no path is trivially zero) and their
state dicts converted to this project's parameter trees; PyTorch's Linear weights, biases and
norm scales are then pointed at the JAX buffers (one copy of those in memory; a transposed view
runs as fast). JAX runs the whole step as one jitted function; PyTorch runs eager, float32,
under `torch.inference_mode()`, with as many threads as this process may use (2 here).

Prints the relative errors max|jax - torch| / max|torch| (ELLA context, UNet alone, the step's
guided noise and next latents; all must be < 1e-4, else exit 1), then the median milliseconds of
`--repeats` calls after warm-up for the step, the UNet alone and ELLA alone on each side, with
the fastest call. The JAX and PyTorch calls are interleaved, one of each per round, so that load
from other work hits both; 'other' says how many cores other processes took meanwhile (from
/proc/stat): PyTorch's OpenMP threads slow down many times over when another process takes a
core, XLA's much less, so compare runs with 'other' near 0. The step's model FLOPs
(`ella_jax.flops.model_flops`: its matmuls and convolutions) give the GFLOP/s of both.

`--profile` (automatic when the JAX step is slower) profiles a few steps on each side: JAX with
`jax.profiler.trace` (the trace's XLA op events, matched to the optimized HLO's instructions),
PyTorch with `torch.profiler` (operators' self CPU time), and prints both in the same categories
(3x3 / 1x1 convolutions, dense matmuls, attention core, norms, data movement, elementwise), the
convolutions by shape, and the top HLO instruction names (numeric suffix stripped).

XLA flags come from the XLA_FLAGS environment variable and are printed, e.g.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \\
        .venv/bin/python -m bench.denoising_step

`--dtype bfloat16` also runs the JAX step and UNet with bfloat16 parameters and compute, on
separate lines against the same float32 PyTorch timings (PyTorch stays float32).

Default size: 256 (latents 32x32) on the CPU, 512 when JAX's default backend is a GPU (PyTorch
then runs on CUDA if it can). Peak RSS at 256 is about 7.6 GiB (the UNet's convolution kernels
are held by both frameworks). Needs the test extra (torch, diffusers).
"""

import argparse
import collections
import contextlib
import ctypes
import gc
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.real_size_backbones import perturb_, relative_error
from bench.torch_ella import TorchELLA
from ella_jax import ELLA
from ella_jax.flops import model_flops
from ella_jax.models.unet import UNet2DConditionModel, UNetConfig
from ella_jax.weights.naming import params_from_torch, params_to_torch
from ella_jax.weights.released import SD15_UNET

TOLERANCE = 1e-4
GUIDANCE = 7.5
STEP_SIZE = 0.1  # x_next = x - STEP_SIZE * guided
TIMESTEP = 500.0
TOKENS = 128


# ----------------------------------------------------------------------------------------------
# Models, weights and the step on both sides.


def torch_device() -> torch.device:
    """CUDA when JAX runs on a GPU and PyTorch can use one, else the CPU."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_torch_models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' SD 1.5 UNet and TorchELLA with random, perturbed weights, in eval mode."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    unet = TorchUNet(**SD15_UNET).eval()
    perturb_(unet, seed=1)
    ella = TorchELLA().eval()
    perturb_(ella, seed=2)
    return unet.to(device), ella.to(device)


def jax_params(module: nn.Module, torch_model: torch.nn.Module, *example: Any) -> dict:
    """The module's parameter tree from the PyTorch model's state dict (shapes from
    `jax.eval_shape` on `example`, so nothing is computed)."""
    expected = jax.eval_shape(module.init, jax.random.key(0), *example)["params"]
    state = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    params = params_from_torch(state, expected, type(torch_model).__name__)
    return jax.tree.map(jnp.asarray, params)


def share_weights(torch_model: torch.nn.Module, params: dict) -> int:
    """Points the PyTorch model's parameters of at most 2 dimensions (Linear weights, biases,
    norm scales) at the JAX buffers of the same values, so that one copy of them is held
    (PyTorch reads a Linear weight through a transposed view at the same speed); convolution
    kernels keep PyTorch's own copy (OIHW, where JAX holds HWIO). CPU only. Returns the
    bytes freed."""
    views = params_to_torch(params)  # np.asarray of a CPU jax.Array does not copy
    freed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the arrays are read-only; so is the use
        for name, param in torch_model.named_parameters():
            if param.ndim <= 2:
                view = torch.from_numpy(views[name])
                if view.shape != param.shape or view.dtype != param.dtype:
                    raise ValueError(f"{name}: {tuple(view.shape)} against {tuple(param.shape)}")
                freed += param.numel() * param.element_size()
                param.data = view
    return freed


def release_freed_memory() -> None:
    """Hands memory freed to the C heap back to the system (glibc; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def cast_(params: dict, dtype: Any) -> None:
    """Casts a nested dict of arrays in place, one array at a time (no second full copy)."""
    for key, value in params.items():
        if isinstance(value, dict):
            cast_(value, dtype)
        else:
            params[key] = value.astype(dtype)


def jax_functions(unet: UNet2DConditionModel, ella: ELLA) -> dict[str, Callable[..., Any]]:
    """The step, the UNet alone and ELLA alone as pure functions of (params, ...)."""

    def step(params: dict, latents: jax.Array, timestep: jax.Array, t5: jax.Array) -> tuple:
        context = ella.apply({"params": params["ella"]}, t5, timestep)
        x_in = latents.astype(unet.dtype)
        noise = unet.apply(
            {"params": params["unet"]}, jnp.concatenate([x_in, x_in]), timestep, context
        ).astype(jnp.float32)
        unconditional, conditional = jnp.split(noise, 2)
        guided = unconditional + GUIDANCE * (conditional - unconditional)
        return latents - STEP_SIZE * guided, guided

    def unet_alone(params: dict, latents: jax.Array, timestep: jax.Array, context: jax.Array):
        return unet.apply({"params": params["unet"]}, latents, timestep, context)

    def ella_alone(params: dict, t5: jax.Array, timestep: jax.Array) -> jax.Array:
        return ella.apply({"params": params["ella"]}, t5, timestep)

    return {"step": step, "unet": unet_alone, "ella": ella_alone}


def torch_functions(unet: torch.nn.Module, ella: torch.nn.Module) -> dict[str, Callable[..., Any]]:
    """The same three functions in PyTorch (NCHW latents)."""

    def step(latents: torch.Tensor, timestep: torch.Tensor, t5: torch.Tensor) -> tuple:
        context = ella(t5, timestep)
        noise = unet(torch.cat([latents, latents]), timestep, context).sample
        unconditional, conditional = noise.chunk(2)
        guided = unconditional + GUIDANCE * (conditional - unconditional)
        return latents - STEP_SIZE * guided, guided

    def unet_alone(latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        return unet(latents, timestep, context).sample

    return {"step": step, "unet": unet_alone, "ella": ella}


# ----------------------------------------------------------------------------------------------
# Timing.


def interleaved_times(
    runs: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each call over `repeats` rounds (one call of every run per round, in order),
    after one warm-up call of each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


class OtherLoad:
    """Cores' worth of CPU time that other processes used while the block ran: busy time from
    /proc/stat less this process's own (Linux; `cores` stays None elsewhere). PyTorch's
    OpenMP threads slow down many times over when another process takes a core."""

    cores: float | None = None

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as file:
            ticks = [int(v) for v in file.readline().split()[1:]]
        busy = (
            ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])
        )  # user nice system irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherLoad":
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._start = (self._busy_s(), sum(os.times()[:2]), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        if hasattr(self, "_start"):
            busy, own, wall = self._start
            other = (self._busy_s() - busy) - (sum(os.times()[:2]) - own)
            self.cores = max(other, 0.0) / (time.perf_counter() - wall)


def cores(load: OtherLoad) -> str:
    return "n/a" if load.cores is None else f"{load.cores:.2f}"


def ms(times: list[float]) -> str:
    return f"{1e3 * statistics.median(times):8.1f} ms (best {1e3 * min(times):7.1f})"


def compile_timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(compiled executable, compile seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    return compiled, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Profiles: where the time goes on each side, in the same categories.

CATEGORIES = (
    "3x3 convolutions",
    "1x1 convolutions (shortcuts, proj_in/out)",
    "dense matmuls (linear layers)",
    "attention core (QK^T, softmax, PV)",
    "norms (group/layer norm)",
    "data movement (copy/concat/pad/upsample)",
    "elementwise and other",
)
# name = shape opcode(operands), attributes; a tuple shape "(f32[2]{0}, s32[])" has spaces.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\(.*?\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NORM_SCOPE = re.compile(r"/(norm\d?|conv_norm_out|ln_\w+)/")
_MOVEMENT = {
    "bitcast",
    "broadcast",
    "concatenate",
    "constant",
    "copy",
    "dynamic-slice",
    "dynamic-update-slice",
    "fusion",
    "gather",
    "get-tuple-element",
    "iota",
    "pad",
    "parameter",
    "reshape",
    "reverse",
    "slice",
    "transpose",
    "tuple",
}


class Instruction(NamedTuple):
    """An instruction of the entry computation, as far as the profile needs it."""

    opcodes: frozenset[str]  # its own and those of the computations it calls
    op_name: str  # the metadata's op_name (Flax names its module scopes)
    convolution: str  # "HxW Cin->Cout kxk" of the NHWC convolution it runs, else ""


def _dims(shape: str) -> list[int]:
    """'f32[2,32,32,320]{3,2,1,0}' -> [2, 32, 32, 320]."""
    inside = shape[shape.index("[") + 1 : shape.index("]")]
    return [int(d) for d in inside.split(",") if d]


def _convolution_key(rest: str, shapes: dict[str, str]) -> str:
    """'HxW Cin->Cout kxk' from a convolution's operands: input NHWC and kernel HWIO, or the
    form XLA gives a small input (the kernel as the left operand, 01fb_o01i->f01b)."""
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    labels = re.search(r"dim_labels=(\S+?)[,\s]", rest)
    if len(operands) != 2 or labels is None or not all(o in shapes for o in operands):
        return "convolution"
    lhs, rhs = (_dims(shapes[o]) for o in operands)
    if labels.group(1) == "b01f_01io->b01f":
        (_, height, width, c_in), (kh, kw, _, c_out) = lhs, rhs
    elif labels.group(1) == "01fb_o01i->f01b":
        (kh, kw, c_in, c_out), (_, height, width, _) = lhs, rhs
    else:
        return f"convolution {labels.group(1)}"
    return f"{height}x{width} {c_in}->{c_out} {kh}x{kw}"


def parse_hlo(text: str) -> dict[str, Instruction]:
    """The instructions the runtime traces (the entry computation's and its loops' bodies'),
    from an optimized HLO module's text."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and (match := _INSTRUCTION.match(line)):
            computations[current].append(match.groups())  # name, shape, opcode, rest

    def contents(
        lines: list[tuple[str, str, str, str]], shapes: dict[str, str], seen: frozenset[str]
    ) -> tuple[set[str], str]:
        """Opcodes run by `lines` and the computations they call; a convolution's key."""
        opcodes, convolution = set(), ""
        for _, _, opcode, rest in lines:
            opcodes.add(opcode)
            if opcode == "convolution":
                convolution = _convolution_key(rest, shapes)
            for called in set(_CALLS.findall(rest)) - seen:
                body = computations.get(called, [])
                inner, key = contents(body, {n: s for n, s, _, _ in body}, seen | {called})
                opcodes |= inner
                convolution = convolution or key
        return opcodes, convolution

    # The entry computation and the bodies of its loops (lax.map): their instructions are the
    # ones the runtime traces.
    traced, pending = [], [entry]
    while pending:
        computation = pending.pop()
        traced.append(computation)
        for _, _, opcode, rest in computations.get(computation, []):
            if opcode == "while":
                pending += re.findall(r"(?:body|condition)=%([\w.\-]+)", rest)
    instructions = {}
    for computation in traced:
        lines = computations.get(computation, [])
        shapes = {name: shape for name, shape, _, _ in lines}
        for line in lines:
            if line[2] == "while":
                continue  # its body's instructions are traced one by one
            opcodes, convolution = contents([line], shapes, frozenset())
            op_name = _OP_NAME.search(line[3])
            instructions[line[0]] = Instruction(
                frozenset(opcodes), op_name.group(1) if op_name else "", convolution
            )
    return instructions


_CONV_SCOPE = re.compile(r"/(conv\d?|conv_in|conv_out|conv_shortcut|proj_in|proj_out)/")


def jax_category(instruction: Instruction) -> str:
    opcodes, op_name = instruction.opcodes, instruction.op_name
    if "convolution" in opcodes:
        return CATEGORIES[1] if instruction.convolution.endswith(" 1x1") else CATEGORIES[0]
    conv_scope = _CONV_SCOPE.search(op_name)
    if "dot" in opcodes and conv_scope:  # a 1x1 convolution as a dot, or a PatchConv
        one_by_one = conv_scope.group(1) in ("conv_shortcut", "proj_in", "proj_out")
        return CATEGORIES[1] if one_by_one else CATEGORIES[0]
    if "vmap(" in op_name or "blocked_attention" in op_name:  # jax.nn's or the CPU one's
        return CATEGORIES[3]  # scores, softmax and values
    if "dot" in opcodes:
        return CATEGORIES[2]
    if _NORM_SCOPE.search(op_name):
        return CATEGORIES[4]
    if opcodes <= _MOVEMENT:
        return CATEGORIES[5]
    return CATEGORIES[6]


def torch_category(name: str, shapes: list) -> tuple[str, str]:
    """(category, convolution key) of a PyTorch operator from its name and input shapes."""
    if "conv" in name:
        if len(shapes) > 1 and len(shapes[0]) == 4 and len(shapes[1]) == 4:
            (_, c_in, height, width), (c_out, _, kh, kw) = shapes[0], shapes[1]
            key = f"{height}x{width} {c_in}->{c_out} {kh}x{kw}"
            return CATEGORIES[1] if (kh, kw) == (1, 1) else CATEGORIES[0], key
        return CATEGORIES[0], "convolution"
    if "attention" in name or name in ("aten::bmm", "aten::baddbmm", "aten::_softmax"):
        return CATEGORIES[3], ""
    if name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear"):
        return CATEGORIES[2], ""
    if "norm" in name:
        return CATEGORIES[4], ""
    if name in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous") or (
        "upsample" in name or "pad" in name
    ):
        return CATEGORIES[5], ""
    return CATEGORIES[6], ""


class Profile(NamedTuple):
    wall_s: float  # per step
    categories: collections.Counter[str]  # seconds per step
    convolutions: collections.Counter[str]  # seconds per step by "HxW Cin->Cout kxk"
    names: collections.Counter[str]  # seconds per step by op or HLO name (suffix stripped)


def profile_jax(compiled: Any, args: tuple, calls: int) -> Profile | None:
    """Traces `calls` runs with `jax.profiler.trace` and sums the durations of the XLA ops'
    events (one event per op run, on the thread that ran it) per step."""
    instructions = parse_hlo(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory(prefix="denoising_step.") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
            wall = (time.perf_counter() - start) / calls
        traces = sorted(Path(folder).rglob("*.trace.json.gz"))
        if not traces:
            print("  JAX profile: no *.trace.json.gz was written", flush=True)
            return None
        with gzip.open(traces[-1], "rt") as file:
            trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    profile = Profile(wall, collections.Counter(), collections.Counter(), collections.Counter())
    for event in events:
        instruction = instructions.get(event.get("name", ""))
        if event.get("ph") != "X" or instruction is None:
            continue
        seconds = event.get("dur", 0.0) / 1e6 / calls
        category = jax_category(instruction)
        profile.categories[category] += seconds
        profile.names[re.sub(r"\.\d+$", "", event["name"])] += seconds
        if category in CATEGORIES[:2]:
            key = instruction.convolution or "(as matmuls: 1x1, or PatchConv)"
            profile.convolutions[key] += seconds
    return profile


def profile_torch(run: Callable[[], object], calls: int) -> Profile:
    """Runs `run` `calls` times under `torch.profiler` and sums the operators' self CPU time
    (that of the calling thread, intra-op parallel work included) per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            run()
        wall = (time.perf_counter() - start) / calls
    profile = Profile(wall, collections.Counter(), collections.Counter(), collections.Counter())
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6 / calls
        category, key = torch_category(event.key, list(event.input_shapes or []))
        profile.categories[category] += seconds
        profile.names[event.key] += seconds
        if key:
            profile.convolutions[key] += seconds
    return profile


def print_profiles(jax_profile: Profile | None, torch_profile: Profile) -> None:
    """The two profiles side by side: per category, per convolution shape, top op names."""
    if jax_profile is None:
        return

    def row(label: str, j: float, t: float, width: int = 42) -> str:
        return f"    {label:{width}s} {1e3 * j:8.1f} {1e3 * t:8.1f} {1e3 * (j - t):+8.1f}"

    j, t = jax_profile, torch_profile
    print(
        f"profile of the step, ms per step (JAX: XLA op events from jax.profiler.trace; "
        f"PyTorch: operators' self CPU time from torch.profiler):\n"
        f"    {'':42s} {'JAX':>8s} {'torch':>8s} {'JAX-torch':>9s}\n"
        + row("wall (profiled)", j.wall_s, t.wall_s),
        flush=True,
    )
    for category in CATEGORIES:
        print(row(category, j.categories[category], t.categories[category]))
    print(row("sum of ops", sum(j.categories.values()), sum(t.categories.values())))
    print("  convolutions by input HxW, channels, kernel (both sides):")
    keys = sorted(set(j.convolutions) | set(t.convolutions), key=lambda k: -j.convolutions[k])
    for key in keys:
        print(row(key, j.convolutions[key], t.convolutions[key], 40))
    for side, profile in (("XLA HLO instructions, numeric suffix stripped", j), ("torch ops", t)):
        top = ", ".join(f"{n} {1e3 * s:.0f}" for n, s in profile.names.most_common(8))
        print(f"  top {side} (ms): {top}", flush=True)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    gpu = jax.default_backend() == "gpu"
    parser.add_argument("--size", type=int, default=512 if gpu else 256, help="image pixels")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="profile the JAX step")
    parser.add_argument("--profile-calls", type=int, default=3)
    args = parser.parse_args()
    if args.size % 64:
        parser.error("--size must be a multiple of 64 (latents divisible by 8)")

    device = torch_device()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    side = args.size // 8
    print(
        f"denoising step, SD 1.5 UNet + ELLA, {args.size}x{args.size} (latents {side}x{side}), "
        f"CFG batch 2, {TOKENS} T5 tokens, t={TIMESTEP:g}; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({device}, {threads} threads); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, side, side, 4), dtype=np.float32)  # NHWC
    t5 = rng.standard_normal((2, TOKENS, 2048), dtype=np.float32)
    pair = rng.standard_normal((2, side, side, 4), dtype=np.float32)  # the UNet alone
    context = rng.standard_normal((2, 64, 768), dtype=np.float32)

    start = time.perf_counter()
    torch_unet, torch_ella = build_torch_models(device)
    unet = UNet2DConditionModel(UNetConfig.from_dict(SD15_UNET))
    ella = ELLA()
    f32 = jnp.float32
    params = {
        "unet": jax_params(
            unet,
            torch_unet,
            jax.ShapeDtypeStruct((1, 8, 8, 4), f32),
            jax.ShapeDtypeStruct((1,), f32),
            jax.ShapeDtypeStruct((1, 1, 768), f32),
        ),
        "ella": jax_params(
            ella,
            torch_ella,
            jax.ShapeDtypeStruct((1, 1, 2048), f32),
            jax.ShapeDtypeStruct((1,), f32),
        ),
    }
    shared = 0
    if device.type == "cpu":
        shared = share_weights(torch_unet, params["unet"]) + share_weights(
            torch_ella, params["ella"]
        )
        release_freed_memory()
    print(
        f"models built and converted in {time.perf_counter() - start:.0f} s; "
        f"{shared / 2**30:.2f} GiB of weights shared by both (Linear weights, biases, norms)",
        flush=True,
    )

    # Inputs on each side.
    timestep = jnp.float32(TIMESTEP)
    j_in = {
        "step": (jnp.asarray(latents), timestep, jnp.asarray(t5)),
        "unet": (jnp.asarray(pair), timestep, jnp.asarray(context)),
        "ella": (jnp.asarray(t5), timestep),
    }
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(device)  # noqa: E731
    t_timestep = torch.tensor(TIMESTEP, device=device)
    t_t5 = torch.from_numpy(t5).to(device)
    t_in = {
        "step": (nchw(latents), t_timestep, t_t5),
        "unet": (nchw(pair), t_timestep, torch.from_numpy(context).to(device)),
        "ella": (t_t5, t_timestep),
    }

    # Compile.
    compiled: dict[str, Any] = {}
    flops: dict[str, float] = {}
    for name in ("step", "unet", "ella"):
        function = jax_functions(unet, ella)[name]
        compiled[name], seconds = compile_timed(function, params, *j_in[name])
        flops[name] = model_flops(function, params, *j_in[name])
        print(
            f"compiled JAX {name} in {seconds:.0f} s: {flops[name] / 1e9:.1f} GFLOP (model FLOPs)",
            flush=True,
        )
    torch_fn = torch_functions(torch_unet, torch_ella)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Parity.
    with torch.inference_mode():
        t_out = {name: torch_fn[name](*t_in[name]) for name in torch_fn}
    nhwc = lambda t: t.float().cpu().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    j_out = {name: compiled[name](params, *j_in[name]) for name in compiled}
    references = {"step": nhwc(t_out["step"][1]), "unet": nhwc(t_out["unet"])}
    errors = {
        "ELLA context": relative_error(j_out["ella"], t_out["ella"].cpu().numpy()),
        "UNet alone": relative_error(j_out["unet"], references["unet"]),
        "step guided noise": relative_error(j_out["step"][1], references["step"]),
        "step x_next": relative_error(j_out["step"][0], nhwc(t_out["step"][0])),
    }
    print(
        "relative error max|jax - torch| / max|torch|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()),
        flush=True,
    )
    if max(errors.values()) > TOLERANCE:
        print(f"FAIL: a relative error exceeds {TOLERANCE:g}", file=sys.stderr)
        sys.exit(1)
    del t_out, j_out

    # Timing, interleaved.
    def jax_run(name: str, executable: Any, p: dict) -> Callable[[], object]:
        return lambda: jax.block_until_ready(executable(p, *j_in[name]))

    def torch_run(name: str) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                out = torch_fn[name](*t_in[name])
            sync()
            return out

        return run

    times: dict[str, dict[str, list[float]]] = {}
    loads: dict[str, OtherLoad] = {}
    for name in ("step", "unet", "ella"):
        with OtherLoad() as loads[name]:
            times[name] = interleaved_times(
                {"jax": jax_run(name, compiled[name], params), "torch": torch_run(name)},
                args.repeats,
            )
    print(
        f"median of {args.repeats} calls after warm-up (JAX and PyTorch interleaved), float32; "
        f"'other' is the CPU other processes used meanwhile, in cores of {threads}:",
        flush=True,
    )
    labels = {"step": "step (ELLA+UNet+CFG)", "unet": "UNet alone (B=2)", "ella": "ELLA alone"}
    for name, label in labels.items():
        j, t = times[name]["jax"], times[name]["torch"]
        ratio = statistics.median(t) / statistics.median(j)
        gflop = flops[name] / 1e9
        print(
            f"  {label:21s} JAX {ms(j)} | torch {ms(t)} | torch/JAX {ratio:5.2f}x | "
            f"{gflop:6.1f} GFLOP: JAX {gflop / statistics.median(j):5.0f} GFLOP/s, "
            f"torch {gflop / statistics.median(t):5.0f} GFLOP/s | other {cores(loads[name])}",
            flush=True,
        )

    slower = statistics.median(times["step"]["jax"]) > statistics.median(times["step"]["torch"])
    if args.profile or slower:
        if slower:
            print("JAX is slower than PyTorch: profiling the JAX step", flush=True)
        with OtherLoad() as load:
            profiles = (
                profile_jax(compiled["step"], (params, *j_in["step"]), args.profile_calls),
                profile_torch(torch_run("step"), args.profile_calls),
            )
        print_profiles(*profiles)
        print(f"  (other processes used {cores(load)} cores meanwhile)", flush=True)

    if args.dtype == "bfloat16":
        # PyTorch's float32 models are freed first; the bfloat16 lines reuse its timings above.
        del torch_unet, torch_ella, torch_fn, compiled
        gc.collect()  # diffusers' modules hold reference cycles
        release_freed_memory()
        cast_(params, jnp.bfloat16)
        unet16 = UNet2DConditionModel(UNetConfig.from_dict(SD15_UNET), dtype=jnp.bfloat16)
        ella16 = ELLA(dtype=jnp.bfloat16)
        print("bfloat16 JAX (parameters and compute) against float32 PyTorch:", flush=True)
        functions16 = jax_functions(unet16, ella16)
        for name in ("step", "unet"):
            executable, _, seconds = compile_timed(functions16[name], params, *j_in[name])
            out = executable(params, *j_in[name])
            out = out[1] if name == "step" else out  # the guided noise of the step
            error = relative_error(np.asarray(out, np.float32), references[name])
            with OtherLoad() as load:
                j = interleaved_times({"jax": jax_run(name, executable, params)}, args.repeats)
            t = times[name]["torch"]
            ratio = statistics.median(t) / statistics.median(j["jax"])
            print(
                f"  {labels[name]:21s} JAX bf16 {ms(j['jax'])} | torch fp32 "
                f"{1e3 * statistics.median(t):8.1f} ms | torch/JAX {ratio:5.2f}x | "
                f"{flops[name] / 1e9 / statistics.median(j['jax']):5.0f} GFLOP/s | "
                f"rel err vs torch fp32 {error:.2e} | other {cores(load)} "
                f"(compile {seconds:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
