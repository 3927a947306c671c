"""Orbax checkpoints of the trained state and the data iterator, saved together."""

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from ella_jax.weights.tensors import CheckpointError

UNREADABLE_SUFFIX = ".unreadable"  # a step that could not be restored is moved aside to this


def make_manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
    """Asynchronous saves, the newest `keep` kept; the trainer decides when to save."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator: Any) -> None:
    """Starts saving the state and the iterator's position at `step` (asynchronously)."""
    # The iterator's position is snapshotted now: an asynchronous save must not see it move on.
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())
    )
    manager.save(step, args=args, force=True)


def read_trained_params(directory: str | Path, step: int | None = None, ema: bool = True) -> dict:
    """The ELLA params (EMA or raw) of a saved step (default: the newest), as numpy arrays; no
    optimizer or model needed."""
    manager = ocp.CheckpointManager(Path(directory).absolute())
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no step {step} (saved: {sorted(steps)})")
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    try:
        state = manager.restore(step, args=args).state
    except Exception as e:  # orbax and tensorstore raise many types for a damaged step
        raise CheckpointError(f"{Path(directory) / str(step)}: unreadable ({_brief(e)})") from None
    return state["ema_params" if ema else "params"]


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    iterator: Any,
    any_process: Callable[[bool], bool] = bool,
) -> Any | None:
    """The newest readable saved state, laid out as `abstract_state` (ShapeDtypeStructs with
    shardings), with `iterator` moved to where it was; None when there is no checkpoint. A step
    that cannot be restored (on any process: `any_process` makes them agree) is moved aside to
    STEP.unreadable, said on stderr, and the previous one is tried; none readable is an error."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            restored, error = manager.restore(step, args=args), None
        except Exception as e:  # orbax and tensorstore raise many types for a damaged step
            restored, error = None, e
        if not any_process(error is not None):
            manager.reload()  # forget the steps moved aside
            iterator.set_state(restored.data)
            return restored.state
        path = Path(manager.directory) / str(step)
        aside = path.with_name(path.name + UNREADABLE_SUFFIX)
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            path.rename(aside)
        why = _brief(error) if error is not None else "unreadable on another process"
        print(f"warning: checkpoint {path} is unreadable ({why}); moved aside to {aside.name}",
              file=sys.stderr)  # fmt: skip
    if steps:
        raise CheckpointError(
            f"{manager.directory}: none of the checkpoints {steps} could be restored (moved "
            f"aside to STEP{UNREADABLE_SUFFIX}); remove them to start over"
        )
    return None


def _brief(error: Exception) -> str:
    """The first line of an error (without TensorStore's "See full details" tail)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" See full TensorStore details")[0][:300]
