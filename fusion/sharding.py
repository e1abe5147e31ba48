"""Mesh helpers: one `Mesh` with a `data` axis (and optionally `model`)."""
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(num_devices: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over the first `num_devices` devices.

  Axes are Auto: the HF Flax models fail inside `jit` on Explicit axes.
  """
  devices = list(devices if devices is not None else jax.devices())
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices "
                       f"are available: {devices}")
    devices = devices[:num_devices]
  if model < 1 or len(devices) % model:
    raise ValueError(f"model={model} must divide the {len(devices)} devices.")
  grid = np.asarray(devices).reshape(len(devices) // model, model)
  return Mesh(grid, (DATA, MODEL),
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def data_size(mesh: Mesh) -> int:
  return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def check_divisible(batch_size: int, mesh: Mesh) -> None:
  if batch_size % data_size(mesh):
    raise ValueError(f"Global batch size {batch_size} is not divisible by the "
                     f"mesh's data axis ({data_size(mesh)} devices); pick a "
                     "multiple of it.")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Puts a host batch (global arrays) onto the mesh, split on `data`."""
  sharding = batch_sharded(mesh)
  for value in batch.values():
    check_divisible(np.shape(value)[0], mesh)
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
