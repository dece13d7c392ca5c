"""Meshes, sharding rules and batch placement: the same code on 1 CPU, 8 emulated devices, a pod.

Where every parameter lives is decided by an ordered list of (regex over the parameter path,
PartitionSpec) rules, EasyLM style; the first rule whose regex matches the "/"-joined path wins.
Batches are sharded along their leading axis over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, P]]

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; -1 takes the devices the other axes leave over."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def axes(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def checked(self) -> MeshConfig:
    check_axes(self.axes())
    return self


def check_axes(axes: Mapping[str, int]) -> None:
  """Sizes are positive, or -1 for at most one axis: what fits the devices is known only when
  the mesh is made (`mesh_shape`)."""
  if any(size < 1 and size != -1 for size in axes.values()):
    raise ValueError(f"mesh {dict(axes)}: expected positive axis sizes, or -1")
  if list(axes.values()).count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one -1 entry to the devices the other axes leave over."""
  check_axes(axes)
  sizes = dict(axes)
  unknown = [name for name, size in sizes.items() if size == -1]
  known = math.prod(size for size in sizes.values() if size != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
  return sizes


def make_mesh(axes: Mapping[str, int] = MeshConfig().axes(), devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with named axes, e.g. {"data": -1, "fsdp": 2}."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(axes, len(devices))
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def path_str(path) -> str:
  """'params/layers_0/attn/q_proj/kernel' for a jax.tree_util key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _on_mesh(axis, mesh: Mesh):
  """`axis` (a name, a tuple of names or None) less the names `mesh` lacks: a rules table
  written for {data, fsdp, tensor} then runs unchanged on a mesh with fewer axes."""
  names = tuple(n for n in (axis if isinstance(axis, tuple) else (axis,)) if n in mesh.axis_names)
  return names[0] if len(names) == 1 else (names or None)


def _axis_size(mesh: Mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[name] for name in names if name is not None)


def spec_for(name: str, shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
  """The PartitionSpec of the first rule matching `name`, checked against `shape` and `mesh`."""
  for pattern, spec in rules:
    if re.search(pattern, name):
      break
  else:
    raise ValueError(f"no sharding rule matches parameter {name!r} (shape {tuple(shape)})")
  if len(spec) > len(shape):
    raise ValueError(f"rule {pattern!r} gives {spec} for {name!r} of rank {len(shape)}")
  spec = P(*(_on_mesh(axis, mesh) for axis in spec))
  for dim, axis in enumerate(spec):
    if axis is None:
      continue
    size = _axis_size(mesh, axis)
    if shape[dim] % size:
      raise ValueError(
          f"rule {pattern!r} shards dim {dim} of {name!r} (shape {tuple(shape)}) over mesh "
          f"axis {axis!r} of size {size}, which does not divide {shape[dim]}")
  return spec


def param_shardings(params, rules: Rules, mesh: Mesh):
  """A pytree of NamedSharding matching `params` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_str(path), np.shape(x), rules, mesh)),
      params)


def shard_params(params, rules: Rules, mesh: Mesh):
  """Places every parameter according to `rules`."""
  return jax.device_put(params, param_shardings(params, rules, mesh))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
  """Global batch sizes must be a multiple of this to split evenly over the batch axes."""
  return _axis_size(mesh, batch_axes(mesh))


def global_rows(x: np.ndarray, mesh: Mesh, split: bool = True) -> jax.Array:
  """`x`, the same on every process, as one global array on `mesh`: rows split over the batch
  axes when asked to and they divide them, else replicated."""
  rows = split and np.ndim(x) > 0 and np.shape(x)[0] % batch_size_multiple(mesh) == 0
  sharding = batch_sharding(mesh, np.ndim(x)) if rows else replicated(mesh)
  return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])


def to_host(x) -> np.ndarray:
  """A global array's value on every process (gathered when it spans other processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into global arrays sharded over the batch axes."""
  return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x)
          for name, x in local_batch.items()}
