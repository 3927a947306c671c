"""Multi-process training on one machine: 2 processes x 4 CPU devices, gloo collectives over
loopback, reading WebDataset shards from a GCS bucket (fake-gcs-server) and writing into it,
interrupted and resumed, against 1 process x 8 devices; one process killed."""

import ipaddress
import itertools
import os
import re
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    SHORT,
    finish,
    read_metrics,
    read_tensors,
    relative_error,
    start,
    wait_for,
)

from ella_jax import storage
from ella_jax.train import shards

ARGS = ["--config", "configs/tiny.py", *[f"--config.{k}={v}" for k, v in SHORT.items()]]


def launch(workdir, log, *extra, port: int | None = None):
    launcher = [sys.executable, "-m", "train.launch", "--num_processes", "2"]
    launcher += [] if port is None else ["--port", str(port)]
    command = [*launcher, "--devices_per_process", "4", "--", *ARGS, f"--workdir={workdir}", *extra]
    return start(command, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and
    tcp6: hexadecimal addresses, each 32-bit word in the host's byte order, little-endian), an
    IPv6 socket's IPv4-mapped address (gRPC's ::ffff:127.0.0.1) as the IPv4 one."""
    addresses = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                packed = bytes.fromhex(address)
                words = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
                address = ipaddress.ip_address(socket.inet_ntop(family, words))
                addresses.add(str(getattr(address, "ipv4_mapped", None) or address))
    return addresses


def both_ready(text: str) -> bool:
    """Both processes have joined and handle SIGTERM (the trainer's first line)."""
    return "[0] process 0 of 2" in text and "[1] process 1 of 2" in text


def process_pid(text: str, index: int) -> int:
    """A process's pid, from the launcher's '[launch] process N: pid P' line."""
    return int(re.search(rf"\[launch\] process {index}: pid (\d+)", text).group(1))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, buckets):
    """The SHORT tiny run on 2 processes x 4 devices, its data (WebDataset shards of data/tiny
    in the manifest's order: the same global batches; indexed by process 0 alone) and work
    directory in a GCS bucket, with a SIGTERM to process 1 alone as soon as both handle it
    (before their first step), then rerun to the end: one run serves both tests below (each
    launch costs a minute here). Returns (workdir, the stopped launch's output, the checkpoint
    steps it left, whether it exported)."""
    bucket = buckets("gs")
    manifest = ROOT / "data" / "tiny" / "captions.jsonl"
    assert shards.main(["--path", str(manifest), "--out", f"{bucket}/tiny", "--format",
                        "webdataset", "--per-shard", "10"]) == 0  # fmt: skip
    workdir = storage.path(f"{bucket}/two_processes")
    data = ["--config.data.source=webdataset", f"--config.data.path={bucket}/tiny"]
    log = tmp_path_factory.mktemp("two_processes") / "launch.log"
    process = launch(workdir, log, *data)
    text = wait_for(process, log, both_ready)
    os.kill(process_pid(text, 1), signal.SIGTERM)
    stopped_out = finish(process, log)
    assert process.returncode == 0, stopped_out[-3000:]
    checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    exported = (workdir / "ella.safetensors").exists()

    process = launch(workdir, log, *data)
    out = finish(process, log)
    assert process.returncode == 0, out[-3000:]
    assert not (ROOT / "gs:").exists()
    return workdir, stopped_out, checkpoints, exported


def test_sigterm_to_one_stops_both_at_one_step_with_a_checkpoint(two_processes):
    _, stopped_out, checkpoints, exported = two_processes
    # Process 1 alone was asked; both stop at the first step where they compare (a logged one),
    # and orbax saves a step only when every process writes it.
    assert "[0] stopped by signal at step 2" in stopped_out
    assert "[1] stopped by signal at step 2" in stopped_out
    assert checkpoints == [2] and not exported


def test_two_processes_resumed_equal_one_uninterrupted(two_processes, uninterrupted):
    """Same global batches and forward: the losses up to the stop are bit-equal (step 1 runs at
    a warmup learning rate of 0, so step 2's loss checks how the processes split the batch). The
    gradient all-reduce then sums the 8 devices' gradients in another order (gloo's ring across
    processes, XLA's own within one), an 8th-digit difference that Adam's normalised steps carry
    into the loss (measured <= 6e-6) and the weights (<= 4.6e-5). A step that read another batch
    than the one due (a resume that lost the data position) would be 5.7e-3 away at least: the
    reference run's logged losses are that far apart."""
    workdir = two_processes[0]
    two, one = read_metrics(workdir), read_metrics(uninterrupted)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    assert two[0]["loss"] == one[0]["loss"]
    tolerance = 1e-4
    for a, b in zip(two, one, strict=True):
        assert relative_error(a["loss"], b["loss"]) < tolerance, a["step"]
    losses = [m["loss"] for m in one]
    other_batch = min(relative_error(a, b) for a, b in itertools.combinations(losses, 2))
    assert other_batch > 10 * tolerance
    expected = read_tensors(uninterrupted / "ella.safetensors")
    for name, tensor in read_tensors(workdir / "ella.safetensors").items():
        np.testing.assert_allclose(tensor, expected[name], rtol=0, atol=2e-4, err_msg=name)
    # Process 0 alone wrote the logs (one TensorBoard file per launch) and the export.
    assert (workdir / "samples" / "step_0000012.png").is_file()
    assert len(storage.glob(f"{workdir}/events.out.tfevents.*")) == 2


def test_a_killed_process_stops_the_launcher(tmp_path):
    """Also: the launcher's coordinator listens on loopback alone (JAX's default is every
    interface, [::])."""
    log, port = tmp_path / "launch.log", free_port()
    process = launch(tmp_path, log, "--config.total_steps=100000", "--config.sample_every=100000",
                     port=port)  # fmt: skip
    text = wait_for(process, log, both_ready)
    assert listening_addresses(port) == {"127.0.0.1"}
    os.kill(process_pid(text, 1), signal.SIGKILL)
    out = finish(process, log, timeout=120)
    assert process.returncode == 1
    assert "process 1 was killed by SIGKILL; stopped the others" in out
