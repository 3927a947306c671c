"""Orbax checkpoints of the trained state and the data iterator, saved together."""

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from ella_jax import storage
from ella_jax.weights.tensors import CheckpointError

UNREADABLE_SUFFIX = ".unreadable"  # a step that could not be restored is moved aside to this


def make_manager(directory: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """Asynchronous saves, the newest `keep` kept; the trainer decides when to save."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=True,
        # S3 has no rename: a step is finished when its commit file is there (as orbax does on GCS).
        temporary_path_class=_commit_file_class(directory),
    )
    return ocp.CheckpointManager(_orbax_path(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator: Any) -> None:
    """Starts saving the state and the iterator's position at `step` (asynchronously)."""
    # The iterator's position is snapshotted now: an asynchronous save must not see it move on.
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())
    )
    manager.save(step, args=args, force=True)


def read_trained_params(
    directory: str | os.PathLike, step: int | None = None, ema: bool = True
) -> dict:
    """The ELLA params (EMA or raw) of a saved step (default: the newest), as numpy arrays; no
    optimizer or model needed."""
    manager = ocp.CheckpointManager(_orbax_path(directory))
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
        raise CheckpointError(
            f"{storage.path(directory) / str(step)}: unreadable ({_brief(e)})"
        ) from None
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
        path = storage.path(manager.directory) / str(step)
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


def _orbax_path(directory: str | os.PathLike) -> epath.Path:
    path = storage.path(directory)
    if not storage.is_remote(path):
        return path.absolute()
    if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):
        # TensorStore (orbax's array store) does not read the clients' emulator variable.
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # any token will do
    if os.fspath(path).startswith("s3://"):
        _give_orbax_s3()
    return path


def _commit_file_class(directory: str | os.PathLike) -> Any:
    from orbax.checkpoint._src.path import atomicity

    return atomicity.CommitFileTemporaryPath if os.fspath(directory).startswith("s3://") else None


@functools.cache
def _give_orbax_s3() -> None:
    """Lets orbax store its arrays in s3:// through TensorStore's S3 driver.

    orbax 0.12 builds TensorStore specs for gs:// and local paths only (google/orbax#359, #2739):
    the two private functions that decide are extended here, for s3:// only, with the endpoint
    and region of AWS_ENDPOINT_URL(_S3) and AWS_REGION / AWS_DEFAULT_REGION (TensorStore reads
    neither for itself). The S3 training test fails if a later orbax moves them."""
    try:
        from orbax.checkpoint._src.path import gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        uses_gcs_driver, normalize = ts_utils._use_gcs_driver, ts_utils._normalize_path
        gcs_kvstore = gcs_utils.get_kvstore_for_gcs
    except (ImportError, AttributeError):
        raise storage.StorageError(
            f"orbax-checkpoint {ocp.__version__} cannot be given s3:// (this project knows 0.12): "
            "use a gs:// or local work directory"
        ) from None

    def kvstore(path: str) -> dict[str, Any]:
        if not path.startswith("s3://"):
            return gcs_kvstore(path)
        bucket, _, key = path.removeprefix("s3://").partition("/")
        spec = {"driver": "s3", "bucket": bucket, "path": key}
        if endpoint := os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
            spec["endpoint"] = endpoint
        if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            spec["aws_region"] = region
        return spec

    ts_utils._use_gcs_driver = lambda path: path.startswith("s3://") or uses_gcs_driver(path)
    ts_utils._normalize_path = lambda path: (
        "s3://" + normalize(path.removeprefix("s3://"))
        if path.startswith("s3://")
        else normalize(path)
    )
    gcs_utils.get_kvstore_for_gcs = kvstore
