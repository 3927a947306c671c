"""python -m train.main --config configs/X.py --workdir DIR [--config.key=value ...]

Trains the ELLA connector on a frozen text encoder and UNet. The config is a Python file whose
get_config() returns an ml_collections ConfigDict (see configs/); any value can be overridden on
the command line, and an unknown key is an error. Rerunning the same command resumes from the
newest checkpoint in DIR/checkpoints; SIGTERM or SIGINT saves a checkpoint and exits 0.
"""

from absl import app, flags
from ml_collections import config_flags

from train.cli import parse_flags, run_command
from train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    return run_command(argv, _CONFIG, lambda config: train(config, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
