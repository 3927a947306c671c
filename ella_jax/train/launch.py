"""python -m train.launch --num-processes 2 --devices-per-process 4 -- <train.main arguments>

Runs a multi-process training on this machine, for development and tests: N processes of
`train.main`, each with its own CPU devices, joined through a coordinator that listens on
loopback only (127.0.0.1, not the machine's other interfaces). Their output is forwarded line
by line behind a "[i] " prefix; SIGTERM and SIGINT are passed on to all of them (each saves a
checkpoint and exits); if one fails or dies, the others are stopped and the launcher exits with
status 1, naming the process.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10  # after SIGTERM, before SIGKILL: a survivor may be stuck in a collective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(index: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def _describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.time() + GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--num-processes", "--num_processes", type=int, required=True, help="processes to start"
    )
    parser.add_argument(
        "--devices-per-process",
        "--devices_per_process",
        type=int,
        default=1,
        help="CPU devices each (default 1)",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.main's")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    port = args.port or free_port()

    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    device_flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env = {**os.environ, "XLA_FLAGS": " ".join([*inherited, device_flag]), "JAX_PLATFORMS": "cpu"}
    processes = []
    for index in range(args.num_processes):
        command = [
            sys.executable,
            "-m",
            "ella_jax.train.main",
            *train_args,
            f"--coordinator-address=127.0.0.1:{port}",
            f"--coordinator-bind-address=127.0.0.1:{port}",
            f"--num-processes={args.num_processes}",
            f"--process-id={index}",
        ]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=_forward, args=(index, process.stdout), daemon=True).start()
        print(f"[launch] process {index}: pid {process.pid}", flush=True)
        processes.append(process)

    def pass_on(signum, frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    while True:
        statuses = [process.poll() for process in processes]
        failed = next((i for i, s in enumerate(statuses) if s not in (None, 0)), None)
        if failed is not None:
            _stop(processes)
            print(
                f"[launch] error: process {failed} {_describe(statuses[failed])}; "
                "stopped the others",
                file=sys.stderr,
                flush=True,
            )
            return 1
        if all(s == 0 for s in statuses):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
