"""Jitted, sharded feature extraction with an on-disk cache.

A cache entry is `<fingerprint>.npz` (features, labels) plus `<fingerprint>.json`
(what produced it and the sha256 of the npz). The json is written last, so an
interrupted write never looks complete; an entry whose json, checksum or shapes
do not match is rebuilt, not trusted.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm

import fusion
from fusion import hub
from fusion import io
from fusion import sharding

# Bump when the extraction itself changes meaning (pooling, dtype, ...).
FEATURES_VERSION = 1
# fusion.data.tasks.SHIFT_SPLIT (not imported: features run without TF).
SHIFT_SPLIT = "test_shift"


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  features: np.ndarray  # [N, D] float32
  labels: np.ndarray  # [N] int32
  fingerprint: str


def default_cache_dir() -> str:
  return os.path.join(fusion.fusion_home(), "features")


@functools.lru_cache(maxsize=16)
def _features_fn(backbone: hub.Backbone, mesh: jax.sharding.Mesh):
  return jax.jit(backbone.features,
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def _run(backbone: hub.Backbone, batches: Iterable[Mapping[str, Any]],
         mesh: jax.sharding.Mesh, total: int | None, desc: str,
         params: Any = None) -> dict[str, np.ndarray]:
  """Features (and any other batch entries) of the unmasked examples."""
  fn = _features_fn(hub.computation_twin(backbone), mesh)  # Shared by one architecture.
  params = sharding.replicate(backbone.params if params is None else params, mesh)
  chunks: dict[str, list[np.ndarray]] = {}
  pending = None

  def collect(out, batch):
    keep = np.asarray(batch["mask"], bool)
    chunks.setdefault("features", []).append(np.asarray(out, np.float32)[keep])
    for key, value in batch.items():
      if key not in ("image", "mask"):
        chunks.setdefault(key, []).append(np.asarray(value)[keep])

  for batch in tqdm.tqdm(batches, total=total, desc=desc, unit="batch",
                         leave=False, disable=None if total else True):
    images = batch["image"]
    if not isinstance(images, jax.Array):
      images = jax.device_put(images, sharding.batch_sharded(mesh))
    out = fn(params, images)  # Dispatched asynchronously: overlap with the next batch.
    if pending is not None:
      collect(*pending)
    pending = (out, batch)
  if pending is not None:
    collect(*pending)
  if not chunks:
    raise ValueError(f"No examples to extract features from ({desc}).")
  return {k: np.concatenate(v) for k, v in chunks.items()}


def _numpy_batches(images: np.ndarray, batch_size: int):
  n = len(images)
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    mask = np.ones(batch_size, bool)
    mask[len(chunk):] = False
    if len(chunk) < batch_size:  # Pad the last batch; the mask drops it again.
      pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    yield {"image": chunk, "mask": mask}


def extract_array(backbone: hub.Backbone, images: np.ndarray, *,
                  mesh: jax.sharding.Mesh | None = None, batch_size: int = 64,
                  params: Any = None) -> np.ndarray:
  """Features [N, D] of preprocessed NHWC float32 images (no cache).

  `params` replaces the backbone's own variables (e.g. fine-tuned ones) and
  reuses its compiled forward pass.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"Expected images [N, H, W, C]; got shape {images.shape}.")
  mesh = mesh or sharding.make_mesh()
  sharding.check_divisible(batch_size, mesh)
  total = -(-len(images) // batch_size)
  out = _run(backbone, _numpy_batches(images, batch_size), mesh, total,
             desc=f"features {backbone.name}", params=params)
  return out["features"]


def fingerprint(backbone: hub.Backbone, task, split: str) -> tuple[str, dict[str, Any]]:
  """A key for (backbone name + weights, task, split, preprocessing).

  `test_shift` also keys on the task's corruption (`task.shift.fingerprint`),
  which `task.fingerprint` leaves out; the other splits' keys do not see it.
  """
  pre = backbone.preprocess
  inputs = {
      "version": FEATURES_VERSION,
      "backbone": backbone.name,
      "params": hub.params_fingerprint(backbone),
      "task": task.fingerprint,
      "split": split,
      "split_spec": task.split_spec(split),
      "preprocess": dataclasses.asdict(pre) if pre is not None else None,
  }
  if split == SHIFT_SPLIT:
    inputs["shift"] = task.shift.fingerprint
  digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
  return digest[:32], inputs


def _load_cached(directory: str, key: str) -> FeatureSet | None:
  """The cached entry, or None if it is missing, incomplete or corrupt."""
  meta_path = os.path.join(directory, key + ".json")
  data_path = os.path.join(directory, key + ".npz")
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta["fingerprint"] != key or meta["sha256"] != io.sha256_file(data_path):
      raise ValueError("fingerprint or checksum mismatch")
    with np.load(data_path, allow_pickle=False) as data:
      features, labels = data["features"], data["labels"]
    if features.shape != (meta["num_examples"], meta["feature_dim"]) or \
        labels.shape != (meta["num_examples"],) or not np.isfinite(features).all():
      raise ValueError("shape or content mismatch")
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    logging.warning("Rebuilding corrupt or stale feature cache entry %s: %s", key, e)
    return None
  return FeatureSet(features, labels, key)


def _save_cached(directory: str, key: str, inputs: dict, fs: FeatureSet) -> None:
  os.makedirs(directory, exist_ok=True)
  io.atomic_write(os.path.join(directory, key + ".npz"),
                 lambda f: np.savez(f, features=fs.features, labels=fs.labels))
  meta = {
      "fingerprint": key,
      "inputs": inputs,
      "num_examples": int(fs.features.shape[0]),
      "feature_dim": int(fs.features.shape[1]),
      "sha256": io.sha256_file(os.path.join(directory, key + ".npz")),
  }
  io.write_json(os.path.join(directory, key + ".json"), meta)


def extract(backbone: hub.Backbone, task, split: str, *,
            mesh: jax.sharding.Mesh | None = None, batch_size: int = 64,
            cache_dir: str | None = None, data_dir: str | None = None,
            load_images: Callable[[], tuple[np.ndarray, np.ndarray] | None] | None = None
            ) -> FeatureSet:
  """Features and labels of `task`'s `split`, from the cache when valid.

  On a cache miss, `load_images()` may give the split's preprocessed images
  and labels from memory (the data pipeline's, in its order: the same
  features), so models of one preprocessing decode a split once; None reads
  it through the pipeline.
  """
  from fusion.data import pipeline  # Only here: features run without TF otherwise.

  if backbone.kind != "vision":
    raise ValueError(f"Backbone {backbone.name!r} is a {backbone.kind} model; "
                     "image features need a vision backbone.")
  task.split_spec(split)  # Unknown split, or test_shift of a task without one.
  directory = cache_dir or default_cache_dir()
  key, inputs = fingerprint(backbone, task, split)
  cached = _load_cached(directory, key)
  if cached is not None:
    return cached
  mesh = mesh or sharding.make_mesh()
  loaded = load_images() if load_images is not None else None
  if loaded is not None:
    images, labels = loaded
    result = FeatureSet(extract_array(backbone, images, mesh=mesh, batch_size=batch_size),
                        np.asarray(labels, np.int32), key)
  else:
    pre = backbone.preprocess
    batches = pipeline.iterate_batches(
        task, split, resolution=pre.resolution, mean=pre.mean, std=pre.std,
        batch_size=batch_size, data_dir=data_dir, mesh=mesh)
    total = -(-pipeline.num_examples(task, split, data_dir=data_dir) // batch_size)
    out = _run(backbone, batches, mesh, total, desc=f"{backbone.name}/{task.name}/{split}")
    result = FeatureSet(out["features"], out["label"].astype(np.int32), key)
  _save_cached(directory, key, inputs, result)
  return result


# ------------------------------------------------------------- thumbnails
# Small images for gates that look at the input itself (fusion.routing's
# ThumbnailCNN): the task's images through the data pipeline, resized
# (bilinear, as for the backbones) to size x size and scaled to [-1, 1]
# (mean = std = 0.5 per channel). Cached like features, keyed by task, split
# and size.

THUMBNAILS_VERSION = 1
THUMBNAIL_MEAN = THUMBNAIL_STD = (0.5, 0.5, 0.5)  # (x / 255 - 0.5) / 0.5: [-1, 1].


@dataclasses.dataclass(frozen=True)
class Thumbnails:
  images: np.ndarray  # [N, size, size, 3] float32 in [-1, 1]
  labels: np.ndarray  # [N] int32
  fingerprint: str


def native_image_size(task, data_dir: str | None = None) -> int | None:
  """The smaller side of the task's stored images, or None where it varies."""
  from fusion.data import tasks as tasks_lib
  feature = tasks_lib.make_builder(task, data_dir).info.features[task.image_key]
  height, width = tuple(feature.shape)[:2]
  return min(height, width) if height and width else None


def thumbnail_fingerprint(task, split: str, size: int) -> tuple[str, dict[str, Any]]:
  inputs = {"version": THUMBNAILS_VERSION, "kind": "thumbnails", "task": task.fingerprint,
            "split": split, "split_spec": task.split_spec(split), "size": int(size),
            "mean": THUMBNAIL_MEAN, "std": THUMBNAIL_STD, "resize": "bilinear"}
  if split == SHIFT_SPLIT:
    inputs["shift"] = task.shift.fingerprint
  digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
  return digest[:32], inputs


def extract_thumbnails(task, split: str, size: int, *, batch_size: int = 256,
                       cache_dir: str | None = None,
                       data_dir: str | None = None) -> Thumbnails:
  """Thumbnails [N, size, size, 3] in [-1, 1] and labels of `task`'s `split`, cached.

  Same examples in the same order as `extract`. A size above the task's
  image size is an error (an upsampled thumbnail adds nothing).
  """
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"Thumbnail size must be a positive int, got {size!r}.")
  task.split_spec(split)  # Unknown split, or test_shift of a task without one.
  native = native_image_size(task, data_dir)
  if native is not None and size > native:
    raise ValueError(f"Thumbnail size {size} is larger than the {native}x{native} images "
                     f"of task {task.name!r}; use a size <= {native} (e.g. 8 or 16).")
  directory = cache_dir or default_cache_dir()
  key, inputs = thumbnail_fingerprint(task, split, size)
  shape = (int(size), int(size), 3)
  cached = _load_cached(directory, key)  # Stored flat, [N, size * size * 3].
  if cached is None:
    from fusion.data import pipeline  # Only here: no TF otherwise.
    images, labels = pipeline.load_split(task, split, resolution=int(size),
                                         mean=THUMBNAIL_MEAN, std=THUMBNAIL_STD,
                                         batch_size=batch_size, data_dir=data_dir)
    cached = FeatureSet(images.reshape(len(images), -1).astype(np.float32),
                        labels.astype(np.int32), key)
    _save_cached(directory, key, inputs, cached)
  return Thumbnails(cached.features.reshape((-1,) + shape), cached.labels, key)
