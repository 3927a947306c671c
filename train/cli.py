"""Command-line plumbing shared by the training entry points (absl flags, ml_collections)."""

import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict

from ella_jax.weights.tensors import CheckpointError


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


def run_command(
    argv: list[str], config_flag: flags.FlagHolder, command: Callable[[ConfigDict], None]
) -> int:
    """`command(config)` with every expected failure (a config file that does not load, a bad
    config, a broken model folder or dataset) as one `error:` line and exit status 2."""
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_flag.value
        config.get("sd")  # config_flags reports a file it could not load on first access
        command(config)
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
