"""python -m train.main --config configs/X.py --workdir DIR [--config.key=value ...]

Trains the ELLA connector on a frozen text encoder and UNet. The config is a Python file whose
get_config() returns an ml_collections ConfigDict (see configs/); any value can be overridden on
the command line, and an unknown key is an error. Rerunning the same command resumes from the
newest checkpoint in DIR/checkpoints; SIGTERM or SIGINT saves a checkpoint and exits 0.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ella_jax.weights.tensors import CheckpointError
from train.trainer import ConfigError, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
