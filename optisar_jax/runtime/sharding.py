"""Device mesh, parameter sharding rules, batch sharding and placing a host state on the mesh.

The mesh has named axes from the config (`mesh.shape`, `mesh.axes`, default `(-1, 1)` over
`('data', 'fsdp')`; one degree may be -1 and is resolved from the device count). All axes are `Auto`,
so `jax.lax.with_sharding_constraint` works inside jitted code.

Parameter shardings come from `(regex, spec)` rules (`mesh.sharding_rules`), matched with `re.search`
against the '/'-joined path of every leaf of a state tree (e.g. `params/backbone/0/conv/kernel`,
`opt_state/1/0/mu/backbone/0/conv/kernel`); the first matching rule wins. A spec is either

* a tuple of PartitionSpec entries (`()` = replicated, `(None, 'fsdp')`, `(('data', 'fsdp'),)`), or
* the string `'largest:AXIS'`: shard the largest dimension that the AXIS size divides over AXIS.

A dimension whose size the mesh axes do not divide falls back to replicated, so one rule set serves every
layer and every mesh. Because rules match anywhere in the path, a rule written for a parameter also
shards the optimizer moments and the EMA copy of it, which mirror the parameter's path.

Batches are sharded on their leading axis over every batch axis of the mesh (`data` and `fsdp`
together), so each device holds `global_batch / device_count` examples. On several processes each one
passes only its own slice to `global_batch_from_process_local`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Pure data parallelism: everything replicated (the config default).
REPLICATED_RULES = (('.*', ()),)

# Fully sharded data parallelism: every weight matrix / conv kernel / embedding is split along its largest
# divisible dimension over 'fsdp'; biases, norm scales and scalars stay replicated. Use from a config with
#   c.mesh.shape = (-1, 8); c.mesh.sharding_rules = sharding.FSDP_RULES
FSDP_RULES = (
    (r'(^|/)(kernel|embedding|weight)$', 'largest:fsdp'),
    ('.*', ()),
)

BATCH_AXES = ('data', 'fsdp')

_LARGEST_PREFIX = 'largest:'


def _resolve_shape(shape: Sequence[int], axes: Sequence[str], device_count: int) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(axes):
    raise ValueError(f'mesh.shape {shape} and mesh.axes {tuple(axes)} have different lengths')
  if len(set(axes)) != len(axes):
    raise ValueError(f'mesh.axes {tuple(axes)} repeats an axis name')
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f'mesh.shape {shape}: at most one degree may be -1')
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh.shape {shape}: degrees must be positive (or one -1)')
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if device_count % known:
      raise ValueError(f'mesh.shape {shape}: the fixed degrees (product {known}) do not divide the '
                       f'{device_count} devices')
    shape = tuple(device_count // known if s == -1 else s for s in shape)
  elif known != device_count:
    raise ValueError(f'mesh.shape {shape} has {known} devices but {device_count} are available; '
                     'make the product equal the device count or use -1 for one degree')
  return shape


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` from `mesh_config.shape` (one -1 allowed) and `mesh_config.axes`, all axes `Auto`.

  `devices` defaults to all devices of all processes (`jax.devices()`).
  """
  axes = tuple(mesh_config.axes)
  device_count = len(devices) if devices is not None else jax.device_count()
  shape = _resolve_shape(mesh_config.shape, axes, device_count)
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def path_to_str(path: Sequence[Any]) -> str:
  """'/'-joined names of a jax key path; the `.value` of an nnx Variable is dropped.

  `(DictKey('bn'), DictKey('scale'), GetAttrKey('value'))` -> `'bn/scale'`.
  """
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  if names and names[-1] == 'value' and path and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names.pop()
  return '/'.join(names)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, (tuple, list)) else (entry,)
  for name in names:
    if name not in mesh.shape:
      raise ValueError(f'sharding rule names mesh axis {name!r}; the mesh has {tuple(mesh.axis_names)}')
  return math.prod(mesh.shape[name] for name in names)


def spec_for_shape(mesh: Mesh, shape: Sequence[int], spec) -> PartitionSpec:
  """The PartitionSpec a rule's `spec` gives an array of `shape` on `mesh` (non-divisible dims replicated)."""
  shape = tuple(shape)
  if isinstance(spec, str):
    if not spec.startswith(_LARGEST_PREFIX):
      raise ValueError(f'sharding spec {spec!r}: expected a tuple of PartitionSpec entries or '
                       f"'{_LARGEST_PREFIX}AXIS'")
    axis = spec[len(_LARGEST_PREFIX):]
    size = _axis_size(mesh, axis)
    candidates = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
    if size == 1 or not candidates:
      return PartitionSpec()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    entries = [None] * (dim + 1)
    entries[dim] = axis
    return PartitionSpec(*entries)
  entries = list(spec)
  if len(entries) > len(shape):
    return PartitionSpec()
  resolved = []
  for dim, entry in enumerate(entries):
    if isinstance(entry, list):
      entry = tuple(entry)
    size = _axis_size(mesh, entry)
    resolved.append(entry if size > 1 and shape[dim] % size == 0 else None)
  while resolved and resolved[-1] is None:
    resolved.pop()
  return PartitionSpec(*resolved)


def partition_specs(mesh: Mesh, abstract_state, rules) -> Any:
  """A tree of PartitionSpecs (same structure as `abstract_state`) from `(regex, spec)` rules."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def leaf_spec(path, leaf):
    name = path_to_str(path)
    shape = getattr(leaf, 'shape', ())
    for pattern, spec in compiled:
      if pattern.search(name):
        return spec_for_shape(mesh, shape, spec)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(leaf_spec, abstract_state)


def param_shardings(mesh: Mesh, abstract_state, rules) -> Any:
  """A tree of NamedShardings (same structure as `abstract_state`) from `(regex, spec)` rules.

  `abstract_state` is any pytree whose leaves have `.shape` (arrays or `jax.ShapeDtypeStruct`s, e.g.
  from `jax.eval_shape`); nnx `State`s work (their Variables stay in the tree structure).
  """
  specs = partition_specs(mesh, abstract_state, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on `mesh` (scalars, step counters, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
  """The batch axes of `axes` that `mesh` has, in mesh order."""
  return tuple(name for name in mesh.axis_names if name in axes)


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Leading (batch) axis split over the mesh's batch axes together; other axes replicated."""
  names = batch_axes(mesh, axes)
  if not names:
    return replicated(mesh)
  return NamedSharding(mesh, PartitionSpec(names))


def abstract_with_shardings(abstract_state, shardings) -> Any:
  """`jax.ShapeDtypeStruct`s carrying `shardings`: the restore target for a checkpoint on this mesh."""
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract_state, shardings)


def place_state(host_state, mesh: Mesh, rules) -> tuple[Any, Any]:
  """`(state, shardings)`: the host arrays of `host_state` (numpy or CPU arrays, the same values on every
  process) placed on `mesh` with shardings from the rules; each device receives only its shard
  (`make_array_from_callback`), so the whole state never sits on one accelerator."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), host_state)
  shardings = param_shardings(mesh, abstract, rules)

  def place(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, host_state, shardings), shardings


def global_batch_from_process_local(batch, sharding: NamedSharding) -> Any:
  """A global `jax.Array` tree from this process's share of the batch (numpy, leading axis local).

  Every process passes its own rows (the global batch is the concatenation over processes in
  process order); on one process this is simply the whole batch placed with `sharding`.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """Rows this process feeds per step; checks the global batch splits evenly over processes and devices."""
  processes = jax.process_count()
  devices = mesh.size if mesh is not None else jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f'train.batch_size {global_batch_size} is not divisible by the {devices} devices')
  return global_batch_size // processes
