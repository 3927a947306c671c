"""Orbax checkpoints of the trained state and the data iterator, saved together."""

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


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
    return manager.restore(step, args=args).state["ema_params" if ema else "params"]


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, iterator: Any
) -> Any | None:
    """The newest saved state, laid out as `abstract_state` (ShapeDtypeStructs with shardings),
    with `iterator` moved to where it was; None when there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    restored = manager.restore(step, args=args)
    iterator.set_state(restored.data)
    return restored.state
