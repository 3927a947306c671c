"""Shapes instead of weights: inside `shapes_only()`, the loaders of `ella_jax.weights` read a
model folder's config.json alone and give its parameters as `jax.ShapeDtypeStruct`s, opening no
tensor file. An ahead-of-time compile (`ella_jax.train.aot`) needs the real models' shapes on a
host that holds none of their weights."""

import contextlib
import contextvars
from collections.abc import Iterator

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within the block, model loaders return parameter shapes instead of reading weights."""
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def active() -> bool:
    """Whether loaders give shapes only (inside `shapes_only()`)."""
    return _active.get()
