"""python -m train.main --config configs/X.py --workdir DIR [--config.key=value ...]

Trains the ELLA connector on a frozen text encoder and UNet. The config is a Python file whose
get_config() returns an ml_collections ConfigDict (see configs/); any value can be overridden on
the command line, and an unknown key is an error. Rerunning the same command resumes from the
newest checkpoint in DIR/checkpoints; SIGTERM or SIGINT saves a checkpoint and exits 0.
"""

import re
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad override (an unknown key, a value of the wrong type) as one
    line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by ml_collections
        text = str(e)
        key = re.search(r"([A-Za-z_][\w.]*)", text)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        message = f"--config has no key {key.group(1) if key else text!r}"
        message += f" (did you mean {hint.group(1)!r}?)" if hint else ""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = _CONFIG.value
        config.get("sd")  # config_flags reports a file it could not load on first access
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        train(config, _WORKDIR.value)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
