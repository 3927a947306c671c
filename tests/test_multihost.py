"""Multi-process training on one machine: 2 processes x 4 CPU devices, gloo collectives over
loopback, interrupted and resumed, against 1 process x 8 devices; one process killed."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from conftest import ROOT, SHORT, read_metrics, relative_error

ARGS = ["--config", "configs/tiny.py", *[f"--config.{k}={v}" for k, v in SHORT.items()]]


def launch(workdir, *extra):
    launcher = [sys.executable, "-m", "train.launch", "--num_processes", "2"]
    command = [*launcher, "--devices_per_process", "4", "--", *ARGS, f"--workdir={workdir}", *extra]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache")}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(process, workdir, step):
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and any(m["step"] >= step for m in read_metrics(workdir))):
        # The timeout turns a launch that never logs into a failure, not a hung suite.
        assert process.poll() is None and time.time() < deadline, process.communicate(timeout=60)
        time.sleep(0.1)


def weights(workdir):
    return safetensors.numpy.load_file(workdir / "ella.safetensors")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The SHORT tiny run on 2 processes x 4 devices, stopped by a SIGTERM to the launcher
    once step 4 is logged, then rerun to the end (one run serves both tests below: each launch
    costs a minute here). Returns (workdir, the stopped launch's stdout, the checkpoint steps
    it left, whether it exported)."""
    workdir = tmp_path_factory.mktemp("two_processes")
    process = launch(workdir)
    wait_for_step(process, workdir, 4)
    process.send_signal(signal.SIGTERM)  # the launcher passes it on to both processes
    stopped_out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    exported = (workdir / "ella.safetensors").exists()

    process = launch(workdir)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    return workdir, stopped_out, checkpoints, exported


def test_sigterm_to_both_stops_them_at_one_step_with_a_checkpoint(two_processes):
    _, stopped_out, checkpoints, exported = two_processes
    assert "stopped by signal" in stopped_out and not exported
    # Both processes agreed on the step (orbax saves a step only when every process writes it).
    assert 4 <= checkpoints[-1] < 12 and checkpoints[-1] % 2 == 0  # a logged step


def test_two_processes_resumed_equal_one_uninterrupted(two_processes, uninterrupted):
    """Same global batches and forward: the first losses are bit-equal. The gradient all-reduce
    then sums the 8 devices' gradients in another order (gloo's ring across processes, XLA's
    own within one), an 8th-digit difference that Adam's normalised steps carry into the loss
    (measured: 1e-7 at step 6, up to 1.2e-4 at step 12 since the CPU convolutions became
    matmuls, whose sums XLA:CPU may split differently with 4 or 8 devices per process) and the
    weights (within the learning rate, 1e-3). The resumed steps read the batches they would
    have read: a resume that lost the data position or the weights would differ by more."""
    workdir = two_processes[0]
    two, one = read_metrics(workdir), read_metrics(uninterrupted)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    assert [m["loss"] for m in two[:2]] == [m["loss"] for m in one[:2]]
    for a, b in zip(two, one, strict=True):
        assert relative_error(a["loss"], b["loss"]) < 1e-3, a["step"]
    expected = weights(uninterrupted)
    for name, tensor in weights(workdir).items():
        np.testing.assert_allclose(tensor, expected[name], rtol=0, atol=1e-3, err_msg=name)
    # Process 0 alone wrote the logs (one TensorBoard file per launch) and the export.
    assert (workdir / "samples" / "step_0000012.png").is_file()
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 2


def test_a_killed_process_stops_the_launcher(tmp_path):
    process = launch(tmp_path, "--config.total_steps=100000", "--config.sample_every=100000")
    pid = process_pid(tmp_path, process)
    time.sleep(5)  # both processes are up and joined
    os.kill(pid, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "process 1 was killed by SIGKILL; stopped the others" in err


def process_pid(workdir, process):
    """Process 1's pid, from the launcher's '[launch] process 1: pid N' line."""
    for line in process.stdout:
        if match := re.match(r"\[launch\] process 1: pid (\d+)", line):
            return int(match.group(1))
    raise AssertionError("no pid line")
