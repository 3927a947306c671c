"""python -m train.main --config configs/X.py --workdir DIR [--config.key=value ...]
(in the repository; installed, anywhere: ella-jax-train --config ... --workdir ...)

Trains the ELLA connector (or a SUR-adapter: config.method = "sur") on a frozen text encoder
and UNet. The config is a Python file whose get_config() returns an ml_collections ConfigDict
(see configs/); any value can be overridden on the command line, and an unknown key is an error.
Rerunning the same command resumes from the newest checkpoint in DIR/checkpoints; SIGTERM or
SIGINT saves a checkpoint and exits 0.

Several processes (hosts): pass --coordinator-address, --num-processes and --process-id to each,
or nothing where JAX reads them from the cluster (TPU pods, SLURM, Open MPI); process 0's
coordinator listens on every interface unless --coordinator-bind-address says where. On one
machine, `python -m train.launch` starts them (on loopback). Each process reads its slice of
every global batch; logs, samples and the export are written by process 0.
"""

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from ella_jax.train.cli import flags_parser, initialize_distributed, run_command
from ella_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_BIND_ADDRESS = flags.DEFINE_string(
    "coordinator_bind_address",
    None,
    "HOST:PORT where process 0's coordinator listens (default: every interface, on the port "
    "of --coordinator-address, which other hosts must reach; 127.0.0.1:PORT when all the "
    "processes run on this machine).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    def command(config: ConfigDict) -> None:
        initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _BIND_ADDRESS.value
        )
        train(config, _WORKDIR.value)

    return run_command(argv, _CONFIG, command)


def run() -> None:
    """The command (`python -m train.main`, `ella-jax-train`)."""
    app.run(main, flags_parser=flags_parser(__doc__))


if __name__ == "__main__":
    run()
