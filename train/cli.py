"""Command-line plumbing shared by the training entry points (absl flags, ml_collections)."""

import contextlib
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


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins the processes of a multi-process run. With no arguments, JAX reads the cluster
    environment where it recognises one (TPU pods, SLURM, Open MPI); otherwise this is a
    single-process run."""
    import jax

    # CPU collectives between processes (tests, development); GPUs and TPUs have their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in given):
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    with contextlib.suppress(ValueError):  # raised where there is no cluster: one process
        jax.distributed.initialize()
