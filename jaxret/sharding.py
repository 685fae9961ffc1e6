"""Devices and sharding: the one data-parallel mesh, its two shardings, and host <-> global arrays.

Every jaxret program (trainer, evaluation, catalogue, benchmarks) puts its devices in one `Mesh` with a single
axis, `"data"`: batches are split along it and parameters are replicated. The same code runs on one CPU,
fake CPU devices, a GPU, a TPU slice and several processes; only this module builds meshes and shardings.
"""

from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np

DATA_AXIS = "data"


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A one-axis mesh (`DATA_AXIS`) over `devices` (default: every device of every process)."""
  return jax.sharding.Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Arrays split along their first (batch) dimension over the devices of `mesh`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Arrays held whole on every device of `mesh` (parameters, optimizer state, metrics)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def host_array(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded array as one NumPy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's block of a global batch (dict of `[B_local, ...]`) as global arrays split over `mesh`."""
  sharding = data_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}


def global_from_host(values: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds in full, as a global array with `sharding`."""
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])
