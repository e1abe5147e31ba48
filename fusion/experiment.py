"""What every job shares: the hub, the tasks, the mesh and cached features.

`Context.create(config, workdir)` loads the config's hub (`config.hub`, HF
specs or local directories, and/or `config.offline_hub`, built on first use)
and builds the mesh; `ctx.tasks()` and `ctx.features(backbone, task, split)`
give the tasks and their cached features. Jobs and methods get everything
through a Context; no job imports another job for plumbing.
"""
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from fusion import features as features_lib
from fusion import hub
from fusion import provenance
from fusion import sharding

SPLITS = ("train800", "val200", "train800val200", "test")
SHIFT = "test_shift"


def test_splits(task) -> tuple[str, ...]:
  """The splits a method's test-time model predicts: `test`, and `test_shift`
  where the task has a shifted test split (the offline tasks)."""
  return ("test", SHIFT) if getattr(task, "has_shift", False) else ("test",)


def task_key(task) -> str:
  """What a task's predictions depend on: its fingerprint, and its shift's."""
  shift = getattr(task, "shift", None)
  return task.fingerprint if shift is None else f"{task.fingerprint}+{shift.fingerprint}"


def load_hub(config) -> list[hub.Backbone]:
  """The config's hub: `config.hub` specs, then the offline hub's models."""
  specs = list(config.get("hub") or [])
  if config.get("offline_hub") is not None:
    from fusion import offline_hub  # Builds the embedded default hub when missing.
    specs += offline_hub.build(config.offline_hub, workers=config.get("workers") or 1)
  if not specs:
    raise ValueError("The config names no models: give `hub` (HF ids or local "
                     "directories) or `offline_hub` (configs/demo.py has one).")
  return hub.load_hub(specs)


def load_tasks(names: Sequence[str], data_dir: str | None = None) -> list:
  """Tasks by registry name or image-folder path; unknown names are an error that
  lists the valid ones. `data_dir` (config.data_dir): where TFDS keeps the data
  of tasks that are not generated here (default: $TFDS_DATA_DIR, else
  ~/tensorflow_datasets)."""
  from fusion.data import tasks as tasks_lib  # TF/TFDS only where data is read.
  if not names:
    raise ValueError("config.tasks is empty; name at least one task.")
  return [tasks_lib.with_data_dir(tasks_lib.get(name), data_dir or None) for name in names]


def preprocess_fields(members: Sequence[hub.Backbone]) -> dict:
  """A one-model row's `preprocess`: the resolution, mean and std its images got
  (from the model's preprocessor_config.json, else its architecture's default)."""
  if len(members) != 1 or members[0].preprocess is None:
    return {}
  pre = members[0].preprocess
  return {"preprocess": {"resolution": pre.resolution, "mean": list(pre.mean),
                         "std": list(pre.std)}}


# Splits up to this size (float32 pixels) are kept in memory while the job is
# on their task, e.g. the offline tasks' (2,000 images of 32 x 32: 25 MB), not
# a VTAB test split at 224 x 224.
IMAGES_IN_MEMORY_BYTES = 256 * 2 ** 20


@dataclasses.dataclass
class Context:
  """The loaded hub, the mesh and the caches of one job run."""
  config: object
  workdir: str | None
  backbones: list[hub.Backbone]
  mesh: jax.sharding.Mesh
  _images: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def create(cls, config, workdir: str | None, backbones=None) -> "Context":
    mesh = sharding.make_mesh(config.get("num_devices") or None)
    backbones = load_hub(config) if backbones is None else backbones
    provenance.note_hub(backbones)  # Its fingerprints go into results.json.
    return cls(config, workdir, backbones, mesh)

  def backbone(self, name: str) -> hub.Backbone:
    for b in self.backbones:
      if b.name == name:
        return b
    raise ValueError(f"No model {name!r} in the hub; models: {self.model_names}.")

  @property
  def model_names(self) -> list[str]:
    return [b.name for b in self.backbones]

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))

  def tasks(self) -> list:
    return load_tasks(self.config.tasks, self.config.get("data_dir"))

  def features(self, backbone: hub.Backbone, task, split: str) -> features_lib.FeatureSet:
    """Cached features of one split, with the job's batch size and cache.

    A split small enough to keep in memory is decoded once for every model of
    one preprocessing (`images`); a larger one streams through the pipeline.
    """
    def small_split():
      from fusion.data import pipeline  # TF only where data is read.
      pre = backbone.preprocess
      size = pipeline.num_examples(task, split) * pre.resolution ** 2 * 3 * 4
      return self.images(task, split, pre) if size <= IMAGES_IN_MEMORY_BYTES else None
    return features_lib.extract(backbone, task, split, mesh=self.mesh,
                                batch_size=self.config.get("batch_size", 64),
                                cache_dir=self.config.get("cache_dir") or None,
                                load_images=small_split)

  def images(self, task, split: str, preprocess: hub.Preprocess
             ) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, R, R, 3] float32, labels [N]) of a split, preprocessed, in memory.

    Kept while the job stays on one task: fine-tuning every model of one
    preprocessing on it decodes each split once.
    """
    key = (task.name, task.fingerprint, split, preprocess)
    if any(k[:2] != key[:2] for k in self._images):  # Another task: free its images.
      self._images.clear()
    if key not in self._images:
      from fusion.data import pipeline  # TF only where data is read.
      self._images[key] = pipeline.load_split(
          task, split, resolution=preprocess.resolution, mean=preprocess.mean,
          std=preprocess.std)
    return self._images[key]
