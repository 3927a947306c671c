"""Command-line plumbing shared by the training entry points (absl flags, ml_collections)."""

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import ConfigDict

from ella_jax.weights.tensors import CheckpointError

HELP_FLAGS = ("-h", "--help", "--helpshort", "-?")  # the command's own flags; --helpfull: all


def dashed_flags(argv: list[str]) -> list[str]:
    """`argv` with the command's own flags in absl's spelling: the project writes flag names
    with dashes (--num-processes), absl defines them with underscores (--num_processes, kept
    as an alias). Config overrides (--config.key=value) are left as they are."""
    defined = set(flags.FLAGS)
    spelled = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        absl_name = name.replace("-", "_")
        if name.startswith("--") and "." not in name and absl_name[2:] in defined:
            arg = f"--{absl_name[2:]}{equals}{value}"
        spelled.append(arg)
    return spelled


def flags_parser(usage: str) -> Callable[[list[str]], list[str]]:
    """absl's `flags_parser` for a command described by `usage` (its module's docstring; absl
    would print the docstring of `__main__`, an installed script's wrapper): see `parse_flags`."""
    return functools.partial(parse_flags, usage=usage)


def parse_flags(argv: list[str], usage: str = "") -> list[str]:
    """absl's parsing, with a bad override (an unknown key, a value of the wrong type) as one
    line instead of a traceback, flags spelled with dashes or underscores, and --help printing
    `usage` and the command's own flags, --helpfull every module's, with exit status 0 (absl's
    exits 1)."""
    argv = dashed_flags(argv)
    if "--helpfull" in argv[1:]:
        _print_help(
            f"{usage.strip()}\n\nflags (--name or --name-with-dashes), by module:\n"
            + flags.FLAGS.get_help().strip("\n")
        )
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        # The command's module defines --config (each command here has one); it is named
        # `ella_jax.train.main` installed, and by its file under `python -m`. The libraries'
        # flags (grain, orbax, array_record: 85 lines) are left to --helpfull.
        module = flags.FLAGS.find_module_defining_flag("config")
        own = flags.FLAGS.module_help(module).strip().split("\n", 1)[-1]  # without its name
        _print_help(
            f"{usage.strip()}\n\nflags (--name or --name-with-dashes):\n{own}\n\n"
            "--helpfull lists every flag."
        )
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


def _print_help(text: str) -> NoReturn:
    """Prints `text` and exits 0, quietly when the reader left early (`--help | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    sys.exit(0)


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
    except KeyboardInterrupt:  # a second SIGINT: no checkpoint
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    coordinator_bind_address: str | None = None,
) -> None:
    """Joins the processes of a multi-process run. With no arguments, JAX reads the cluster
    environment where it recognises one (TPU pods, SLURM, Open MPI, Kubernetes); where it
    recognises none, this is a single-process run. A join that fails is a ValueError naming
    the cluster: each process would otherwise train alone into the same work directory.
    `coordinator_bind_address` (HOST:PORT) is where process 0's coordinator listens; None:
    JAX's default, every interface on the coordinator's port (other hosts must reach it)."""
    import jax

    # CPU collectives between processes (tests, development); GPUs and TPUs have their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = (coordinator_address, num_processes, process_id)
    explicit = any(value is not None for value in given)
    cluster = None if explicit else detected_cluster()
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address,
                num_processes,
                process_id,
                coordinator_bind_address=coordinator_bind_address,
            )
        else:
            jax.distributed.initialize(coordinator_bind_address=coordinator_bind_address)
    except ValueError as e:
        if explicit or cluster is not None:
            raise ValueError(_join_failed(given if explicit else None, cluster, e)) from None
        # JAX found no cluster to join (it asks for a coordinator address): one process.
    except Exception as e:  # a cluster that does not answer: a timeout, a refused connection
        raise ValueError(_join_failed(given if explicit else None, cluster, e)) from None


def _join_failed(given: tuple | None, cluster: str | None, error: Exception) -> str:
    if given is not None:
        address, count, index = given
        where = f"--coordinator-address={address} --num-processes={count} --process-id={index}"
    else:
        where = f"the {cluster} environment" if cluster else "the environment"
    return f"joining the processes of {where} failed: {' '.join(str(error).split())}"


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX recognises here (its own detection), or None."""
    try:
        from jax._src.clusters import ClusterEnv  # private: guarded, and only a name is read
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None
