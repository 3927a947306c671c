"""Compiling the training run ahead of time for TPU topologies that are not here (`train.aot`,
libtpu's compiler on this CPU host): what it reports against what the program's shapes and the
CPU compile of the same step say, a multi-host slice, the kernels traced for the TPU, and a
config that does not fit."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config

from ella_jax.kernels import compiling_for, kernel_path, target_platform
from ella_jax.models.attention import _device
from ella_jax.sharding import make_mesh
from ella_jax.train import aot
from ella_jax.train.program import build_program, with_shardings
from ella_jax.weights.shapes_only import shapes_only

GIB = 2**30


def per_device_bytes(tree, tiles: bool = False) -> int:
    """Bytes a device holds of a tree of ShapeDtypeStructs with shardings: each leaf's shard,
    or with `tiles` each shard's last two dimensions padded to whole (8, 128) tiles of 32 bits
    (a vector as one row), the most a TPU layout pads a small array to."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape, size = list(leaf.sharding.shard_shape(leaf.shape)), np.dtype(leaf.dtype).itemsize
        if tiles:
            shape = [1] * max(2 - len(shape), 0) + shape
            rows = 8 * max(4 // size, 1)
            shape[-2:] = [-(-shape[-2] // rows) * rows, -(-shape[-1] // 128) * 128]
        total += math.prod(shape) * size
    return total


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """The command on the tiny config for v5e:2x2 (4 chips, batch 2 a chip), with the largest
    batch searched up to 2 a chip and the sampler: its JSON report."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    command = [sys.executable, "-m", "ella_jax.train.aot", "--config", "configs/tiny.py",
               "--topology", "v5e:2x2", "--largest_batch", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fits" in done.stdout and "not a measured run" in done.stdout, done.stdout
    assert "E0000" not in done.stderr and "TPU_WORKER_HOSTNAMES" not in done.stderr, done.stderr
    return json.loads(out.read_text())


def test_the_report_says_what_the_compiler_says(tiny_report):
    report = tiny_report
    assert (report["devices"], report["chips"], report["hosts"]) == (4, 4, 1)
    assert report["device_kind"] == "TPU v5 lite" and report["hbm_per_device"] == 16 * GIB
    assert report["mesh"] == {"data": 4, "fsdp": 1} and report["batch_per_device"] == 2
    memory = report["memory"]
    assert all(memory[k] > 0 for k in ("arguments", "outputs", "temporaries", "total"))
    assert 0 < memory["aliased"] <= memory["outputs"]  # the donated state, written over
    assert report["fits"] and memory["total"] < report["hbm_per_device"]
    # The gradients are averaged over the data axis: an all-reduce of at least ELLA's params.
    assert report["collectives"]["all-reduce"]["count"] >= 1
    assert report["model_flops_per_step"] > 0 and report["compiled_flops_per_device"] > 0
    assert report["samples_per_s_at_40_percent_mfu"] > 0
    largest = report["largest_batch"]
    assert largest["batch"] == 2 and set(largest["tried"]) == {"1", "2"}
    assert 0 < largest["tried"]["1"] < largest["tried"]["2"] == memory["total"]
    assert largest["per_example_bytes"] == largest["tried"]["2"] - largest["tried"]["1"]
    assert 0 < report["sampler"]["memory"]["total"] < report["hbm_per_device"]
    assert report["sampler"]["batch"] == 4 and report["sampler"]["steps"] == 8


def test_the_report_agrees_with_the_shapes_and_the_cpu_compile(tiny_report):
    """Its argument bytes are the state's, frozen params' and batch's shards (counted from the
    program's shapes and shardings), padded at most to TPU tiles (the tiny model's many small
    arrays are); its model FLOPs are those of the CPU run's step; XLA's TPU count is within a
    factor of two of XLA's CPU count of the same step."""
    config = tiny_config()
    devices = aot.topology_devices("v5e:2x2")
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    with shapes_only(), compiling_for("tpu"):
        program = build_program(config, mesh, ROOT / "no-run")
    frozen = with_shardings(program.frozen, program.frozen_shardings)
    arguments = (program.state, frozen, program.batch)
    assert per_device_bytes(arguments) <= tiny_report["memory"]["arguments"]
    assert tiny_report["memory"]["arguments"] <= per_device_bytes(arguments, tiles=True)

    cpu_mesh = make_mesh(-1, 1, jax.devices()[:4])
    cpu = build_program(config, cpu_mesh, ROOT / "no-run")
    from ella_jax.flops import model_flops

    assert model_flops(cpu.modelled_step, cpu.state, cpu.frozen, cpu.batch) == pytest.approx(
        tiny_report["model_flops_per_step"]
    )
    cost = cpu.lower().compile().cost_analysis()
    cpu_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0.5 < tiny_report["compiled_flops_per_device"] / cpu_flops < 2


def test_a_multi_host_slice_compiles_from_one_host():
    """v5p:2x2x2: 8 chips on 2 hosts, ELLA's state sharded over fsdp=4: all-gathers appear."""
    config = tiny_config(batch_size=16)
    config.mesh.update(data=2, fsdp=4)
    report = aot.report(config, "v5p:2x2x2", largest_batch_limit=0, sampler=False)
    assert (report["devices"], report["hosts"]) == (8, 2)
    assert report["fits"] and report["hbm_per_device"] == 95 * GIB
    assert {"all-gather", "all-reduce"} <= set(report["collectives"])


def test_a_config_that_does_not_fit_says_so_with_the_numbers():
    """The tiny models at 4096 px: the compiler's out-of-memory is the report's, not a
    traceback; the FLOPs are still counted."""
    config = tiny_config(batch_size=4)
    config.data.resolution = 4096
    report = aot.report(config, "v5e:2x2", largest_batch_limit=0, sampler=False)
    assert not report["fits"] and report["memory"] is None
    assert "Ran out of memory" in report["compiler_note"] and "HBM" in report["compiler_note"]
    assert report["model_flops_per_step"] > 0
    assert "DOES NOT FIT" in aot.summary(report)


def test_an_unknown_topology_is_one_error_line():
    command = [sys.executable, "-m", "ella_jax.train.aot", "--config", "configs/tiny.py"]
    done = subprocess.run(
        [*command, "--topology", "v5litepod-16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --topology v5litepod-16: ")
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_models_trace_for_the_platform_compiled_for():
    """On this CPU host, `compiling_for("tpu")` traces the accelerator kernels and the TPU's
    attention dtypes; outside it, the CPU's."""
    assert (kernel_path(), target_platform()) == ("cpu", "cpu")
    with compiling_for("tpu"):
        assert (kernel_path(), target_platform(), _device()) == (
            "accelerator",
            "tpu",
            ("tpu", None),
        )
    assert kernel_path() == "cpu"


def test_released_shapes_stand_for_the_models(tmp_path):
    """An empty config.sd and text model: SD 1.5 and flan-t5-xl's shapes (SDXL's at ELLA width
    2048), from config files alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("c", ROOT / "configs" / "ella_sdxl_t5xl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert aot.with_released_shapes(config, tmp_path) == [
        "config.sd=stable-diffusion-xl-base-1.0", "config.t5=flan-t5-xl"]  # fmt: skip
    assert {p.name for p in (tmp_path / "stable-diffusion-xl-base-1.0").iterdir()} == {
        "unet", "vae", "scheduler", "text_encoder_2", "model_index.json"}  # fmt: skip
    assert not list(tmp_path.rglob("*.safetensors"))


def test_precomputed_batches_are_shaped_from_the_models_shapes():
    """A precomputed run's batch, with the models' shapes only: the VAE's moments and the text
    model's features as train.precompute writes them (the frozen encoders' output dtypes)."""
    from conftest import shapes_program

    config = tiny_config()
    config.data.source = "precomputed"
    batch = shapes_program(config).batch
    assert set(batch) == {"latent_mean", "latent_logvar", "valid", "t5_features", "token_mask"}
    assert batch["latent_mean"].shape == (8, 8, 8, 4) and batch["latent_mean"].dtype == np.float32
    assert batch["t5_features"].shape == (8, 128, 96) and batch["token_mask"].dtype == bool
