"""Device mesh from config and logical-axis -> mesh-axis rules.

Model code names each parameter's dimensions with logical axes (`vocab`, `embed`, `heads`, ...), stored
as the variable metadata `logical_axes`. Which mesh axes those map to is decided here, from
`config.mesh.rules`, so a new parallelism layout is a config change, never a model change.
"""
from __future__ import annotations

from collections.abc import Sequence
import math

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('dcn_data', 'data', 'fsdp', 'tensor')


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves the configured axis sizes (one may be -1) against the device count."""
  sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {free}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'config.mesh: axis sizes must be positive or -1, got {sizes}')
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh: {num_devices} devices do not divide by the fixed axes {sizes}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'config.mesh: axes {sizes} need {math.prod(sizes.values())} devices, '
                     f'have {num_devices}')
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis Mesh (dcn_data, data, fsdp, tensor); unused axes have size 1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if sizes['dcn_data'] > 1 and len({d.slice_index for d in devices if hasattr(d, 'slice_index')}) > 1:
    ici = (1,) + shape[1:]
    dcn = (sizes['dcn_data'], 1, 1, 1)
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      arr = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
      arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules) -> P:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
  if logical_axes is None:
    return P()
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used: set[str] = set()
  out = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (e.g. 9 heads over tensor=2): replicate instead."""
  out = []
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for a in axes:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def named_sharding(mesh: Mesh, logical_axes, shape, rules) -> NamedSharding:
  return NamedSharding(mesh, fit_spec(logical_to_spec(logical_axes, rules), shape, mesh))


def state_shardings(state, mesh: Mesh, rules):
  """NamedShardings for an nnx.State (or any pytree of nnx.Variable) from `logical_axes` metadata."""
  from flax import nnx

  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get('logical_axes')
      return v.replace(named_sharding(mesh, axes, v.get_value().shape, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, T, ...] batch: B over the rules' `batch` axes."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules) -> jax.Array:
  """Pins an activation's sharding by logical axes inside jit; a no-op when no mesh is set.

  XLA propagates shardings from the parameters, which under FSDP can leave activations split on
  `embed` instead of `batch`; a constraint at the few places that matter keeps them batch-parallel.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fit_spec(logical_to_spec(logical_axes, rules), x.shape, mesh))


def process_rows(mesh: Mesh, rules, global_batch: int) -> np.ndarray:
  """Rows of a global batch that this process feeds, in the order `global_batch_array` expects.

  The pipeline chooses shapes for the global batch, then each process builds only these rows.
  Processes that are replicas along the batch axes get the same rows.
  """
  sharding = batch_sharding(mesh, rules, ndim=1)
  starts = sorted({idx[0].start or 0 for idx in sharding.addressable_devices_indices_map((global_batch,)).values()})
  per_device = sharding.shard_shape((global_batch,))[0]
  return np.concatenate([np.arange(s, s + per_device) for s in starts])


def global_batch_array(local: np.ndarray, mesh: Mesh, rules, global_batch: int) -> jax.Array:
  """A global [B, ...] jax.Array from this process's rows (`process_rows`) of it."""
  sharding = batch_sharding(mesh, rules, ndim=local.ndim)
  return jax.make_array_from_process_local_data(sharding, local, (global_batch,) + local.shape[1:])


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (the product of its mesh axes)."""
  spec = batch_sharding(mesh, rules, ndim=1).spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(mesh.shape[a] for a in axes)


def batch_axes_shards(mesh: Mesh, rules, batch_size: int, what: str) -> int:
  """`batch_shards`, checking that `batch_size` (named `what` in the error) divides over them."""
  shards = batch_shards(mesh, rules)
  if batch_size % shards:
    raise ValueError(f'{what}={batch_size} must be a multiple of the {shards} batch shards of the mesh '
                     f'{dict(mesh.shape)}')
  return shards


class Placement:
  """Where inference batches live: a mesh and its logical-axis rules, or (mesh None) the default device.

  `put` lays a host array [B, ...] out with its rows split over the batch axes (every process holds the
  whole array); `constrain` pins an array's sharding by logical axes inside jit.
  """

  def __init__(self, mesh: Mesh | None = None, rules=None):
    if mesh is not None and rules is None:
      raise ValueError('a mesh needs its logical-axis rules (config.mesh.rules)')
    self.mesh = mesh
    self.rules = () if rules is None else tuple((n, tuple(t) if isinstance(t, list) else t) for n, t in rules)

  def __hash__(self):  # a static jit argument
    return hash((self.mesh, self.rules))

  def __eq__(self, other):
    return isinstance(other, Placement) and (self.mesh, self.rules) == (other.mesh, other.rules)

  def check_batch(self, batch_size: int, what: str) -> None:
    if self.mesh is not None:
      batch_axes_shards(self.mesh, self.rules, batch_size, what)

  def put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jax.numpy.asarray(x)
    s = batch_sharding(self.mesh, self.rules, ndim=x.ndim)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, named_sharding(self.mesh, logical_axes, x.shape, self.rules))

  def to_host(self, x: jax.Array) -> np.ndarray:
    """The whole array on this host (an all-gather when other processes hold parts of it)."""
    from jax.experimental import multihost_utils
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def local_mesh(mesh_config) -> Mesh:
  """A mesh of this process's own devices, for the work each process does alone (sharded inference).

  One process: the configured mesh. Several: the configured `tensor` size where it divides the local
  device count, `fsdp` over the rest, so the weights are sharded and the batch split over the host's
  devices with the same rules as training.
  """
  if jax.process_count() == 1:
    return make_mesh(mesh_config)
  devices = jax.local_devices()
  tensor = int(mesh_config['tensor'])
  tensor = tensor if tensor > 0 and len(devices) % tensor == 0 else 1
  return make_mesh({'dcn_data': 1, 'data': 1, 'fsdp': len(devices) // tensor, 'tensor': tensor}, devices)
