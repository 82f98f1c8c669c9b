"""The device mesh and how parameters, optimizer state and batches are laid out on it.

One mesh with two axes, `('data', 'fsdp')`. The batch is split over both (every chip gets a
different slice). Parameters and optimizer state are replicated over `data` and, when the
`fsdp` axis is larger than 1, split over it (ZeRO-3 / FSDP), which is what lets M48 train with
big per-chip batches. PoolFormer-S fits on any chip, so the default is pure data parallelism.

The mesh uses `AxisType.Auto` on purpose: the train step states its input and output shardings
at the `jax.jit` boundary and XLA's partitioner places the collectives (gradient all-reduce,
FSDP all-gathers) inside. Explicit axes would make every reshape of a sharded batch (gradient
accumulation) and every parameter use spell out its sharding by hand, for the same program.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP: splitting them saves nothing.
_MIN_SHARDED_SIZE = 2**14


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices (or `devices`) with `fsdp` chips per param group.

  Over several TPU slices (multislice) `data` also spans the slices, which talk over the
  data-center network, and each FSDP group stays inside one slice (its all-gathers need the
  slice's own interconnect).
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.fsdp={fsdp} must divide the number of devices ({len(devices)})")
  axis_types = (AxisType.Auto, AxisType.Auto)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    per_slice = len(devices) // slices
    if per_slice % fsdp:
      raise ValueError(f"config.fsdp={fsdp} must divide the devices of one slice ({per_slice})")
    grid = mesh_utils.create_hybrid_device_mesh((per_slice // fsdp, fsdp), (slices, 1), devices)
    return Mesh(grid, BATCH_AXES, axis_types=axis_types)
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, axis_types=axis_types,
                       devices=devices)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Replicated, or (FSDP) split along the largest dimension that `fsdp` divides."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_SHARDED_SIZE:
    return P()
  dims = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0]
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = "fsdp"
  return P(*spec)


def state_shardings(tree, mesh: Mesh):
  """NamedShardings for a tree of arrays / ShapeDtypeStructs (params, optimizer state, ...).

  The rule depends on the shape alone, so Adam's moments land exactly where their params do.
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays (each process passes its own, same-sized slice)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch_to_device(batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` batches in flight to the devices while the current step runs.

  Transfers are asynchronous, so queueing them ahead hides host->device copies behind compute
  (tf.data already prefetches the host side in its own threads).
  """
  queue = collections.deque()
  batches = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append(global_batch(batch, sharding))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
