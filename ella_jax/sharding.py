"""The device mesh and the one place that maps parameter and batch names to PartitionSpecs.

The mesh has two axes: `data` (replicas that split the batch) and `fsdp` (devices that split
the batch *and* every large parameter). A parameter is sharded over `fsdp` along its largest
axis that `fsdp` divides, unless a rule (a regex on its '/'-joined path) says otherwise; small
parameters are replicated. The same rule serves every tree: T5, UNet, VAE, CLIP, ELLA and the
optimizer state, whose leaves mirror the parameters.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Below this many elements a parameter is replicated: sharding it saves little and costs a gather.
MIN_SHARDED_SIZE = 2**12


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); one size may be -1, filled from the
    device count. Raises ValueError naming the sizes when they do not fit the devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: only one of data and fsdp may be -1")
    known = (data if data != -1 else 1) * (fsdp if fsdp != -1 else 1)
    if known <= 0 or len(devices) % known:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not fit {len(devices)} devices")
    data = len(devices) // known if data == -1 else data
    fsdp = len(devices) // known if fsdp == -1 else fsdp
    if data * fsdp != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """`fsdp` on the largest axis it divides (the first, on ties); replicated when the
    parameter is small or no axis divides."""
    if fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: (shape[a], -a))
    return PartitionSpec(*(["fsdp" if a == axis else None for a in range(len(shape))]))


def param_specs(params: Any, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] = ()) -> Any:
    """A tree of PartitionSpecs like `params` (any pytree of arrays or ShapeDtypeStructs): the
    first rule whose regex matches the '/'-joined path (`re.search`), else `fsdp_spec`."""

    def spec(path: tuple, leaf: Any) -> PartitionSpec:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rule = next((spec for pattern, spec in rules if re.search(pattern, name)), None)
        return rule if rule is not None else fsdp_spec(np.shape(leaf), mesh.shape["fsdp"])

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(
    params: Any, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] = ()
) -> Any:
    """NamedShardings for `params` (see `param_specs`)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(params, mesh, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """The leading (batch) axis split over data and fsdp; the other `ndim - 1` axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(mesh: Mesh, tree: Any) -> Any:
    """Puts every array of `tree` on the mesh, split along its leading (batch) axis."""
    return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, np.ndim(a))), tree)
