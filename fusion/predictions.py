"""What a method produces for one task, and its on-disk cache.

`Predictions` hold logits and labels per split: `val200` (the model trained on
train800, what validation choices see) and `test` (the model retrained on
train800val200), plus optional further test-time splits (e.g. `test_shift`).
A `Result` is Predictions plus what the report needs: the members used (with
multiplicity), inference GFLOPs per image, training cost and method fields.

A unit (method, task, members, config, seed, code version) is computed once:
`Cache.load(key)` / `Cache.save(key, inputs, result)` store its Result as
`<key>.npz` (the arrays) + `<key>.json` (everything else and the npz's
sha256), under `$FUSION_HOME/predictions` by default. The json is written
last, so an interrupted save never looks complete; an entry whose checksum,
fingerprint or shapes do not match is recomputed, never trusted. No pickle.
"""
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

import fusion
from fusion import io

# Bump when the cache layout or the meaning of a stored field changes.
PREDICTIONS_VERSION = 1
REQUIRED_SPLITS = ("val200", "test")


@dataclasses.dataclass(frozen=True)
class Predictions:
  """logits[split] [N, C] (unnormalised log-probabilities) and labels[split] [N].

  A method's unit predicts `REQUIRED_SPLITS` (and the task's other test
  splits); a part of one (a fine-tuning run) may need fewer (`required`).
  """
  logits: Mapping[str, np.ndarray]
  labels: Mapping[str, np.ndarray]
  required: tuple[str, ...] = dataclasses.field(default=REQUIRED_SPLITS, compare=False)

  def __post_init__(self):
    missing = [s for s in self.required if s not in self.logits]
    if missing or not self.logits or set(self.logits) != set(self.labels):
      raise ValueError(f"Predictions need logits and labels of {self.required} (and the "
                       f"same splits in both); got logits of {sorted(self.logits)}, labels "
                       f"of {sorted(self.labels)}.")
    logits = {s: np.asarray(v, np.float32) for s, v in self.logits.items()}
    labels = {s: np.asarray(v, np.int32) for s, v in self.labels.items()}
    classes = {v.shape[-1] for v in logits.values() if v.ndim == 2}
    for split in logits:
      if logits[split].ndim != 2 or labels[split].shape != logits[split].shape[:1]:
        raise ValueError(f"Predictions of {split!r}: logits {logits[split].shape} must be "
                         f"[N, C] and labels {labels[split].shape} [N].")
      if not np.isfinite(logits[split]).all():
        raise ValueError(f"Predictions of {split!r} contain NaN or inf logits.")
    if len(classes) != 1:
      raise ValueError(f"Predictions' splits disagree on the number of classes: {classes}.")
    object.__setattr__(self, "logits", logits)
    object.__setattr__(self, "labels", labels)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.logits)


@dataclasses.dataclass(frozen=True)
class Result:
  """What `fit_predict` returns for one (method, task, members)."""
  predictions: Predictions
  members: tuple[str, ...]  # Model names, repeated for multiplicity.
  inference_gflops: float  # Per image, everything inference runs.
  train_steps: int = 0  # Optimizer steps, every run of the unit counted.
  train_examples: int = 0  # Examples seen by those steps.
  train_seconds: float = 0.0  # Wall time of the unit (a wall-time field).
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Method's own, JSON.

  def __post_init__(self):
    object.__setattr__(self, "members", tuple(str(m) for m in self.members))
    if not self.members:
      raise ValueError("A Result needs at least one member.")
    if not (np.isfinite(self.inference_gflops) and self.inference_gflops >= 0):
      raise ValueError(f"inference_gflops={self.inference_gflops} must be finite, >= 0.")
    json.dumps(dict(self.fields), default=io.json_default)  # Fails early if not JSON.


def default_cache_dir() -> str:
  return os.path.join(fusion.fusion_home(), "predictions")


def unit_key(inputs: Mapping[str, Any]) -> str:
  """The cache key (32 hex digits) of a unit's inputs (JSON-able)."""
  return io.sha256_json({"version": PREDICTIONS_VERSION, **inputs})[:32]


class Cache:
  """Verified, atomic npz + json store of Results, keyed by `unit_key`."""

  def __init__(self, directory: str | None = None):
    self.directory = directory or default_cache_dir()

  def _paths(self, key: str) -> tuple[str, str]:
    return (os.path.join(self.directory, key + ".npz"),
            os.path.join(self.directory, key + ".json"))

  def load(self, key: str) -> Result | None:
    """The stored Result, or None when missing, incomplete or corrupt."""
    data_path, meta_path = self._paths(key)
    if not os.path.exists(meta_path):
      return None
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      if meta["key"] != key or meta["sha256"] != io.sha256_file(data_path):
        raise ValueError("key or checksum mismatch")
      with np.load(data_path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
      splits = meta["splits"]
      # The splits it was saved with (checked then; a run's may be fewer).
      predictions = Predictions({s: arrays[f"logits/{s}"] for s in splits},
                                {s: arrays[f"labels/{s}"] for s in splits}, required=())
      r = meta["result"]
      return Result(predictions, tuple(r["members"]), r["inference_gflops"],
                    r["train_steps"], r["train_examples"], r["train_seconds"], r["fields"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
      logging.warning("Recomputing corrupt or stale predictions cache entry %s: %s", key, e)
      return None

  def save(self, key: str, inputs: Mapping[str, Any], result: Result) -> None:
    data_path, meta_path = self._paths(key)
    p = result.predictions
    arrays = {**{f"logits/{s}": p.logits[s] for s in p.splits},
              **{f"labels/{s}": p.labels[s] for s in p.splits}}
    io.atomic_write(data_path, lambda f: np.savez(f, **arrays))
    fields = dataclasses.asdict(result)
    del fields["predictions"]
    io.write_json(meta_path, {"key": key, "inputs": inputs, "splits": list(p.splits),
                              "result": fields, "sha256": io.sha256_file(data_path)})

