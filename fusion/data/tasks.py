"""Task registry: the 19 VTAB-1k tasks and the offline tasks.

Offline tasks (`OFFLINE_TASKS`, the embedded mini-VTAB) are generated on this
machine: `digits` (scikit-learn's handwriting) and the tasks of
`fusion.data.render` (`synthetic.RenderedTasks`).

A `Task` says where the data lives (TFDS builder name + version), which TFDS
slices make the four VTAB-1k splits, and how an example's label is computed.
It does not load anything: `fusion.data.pipeline` turns a task into batches.

The VTAB-1k splits follow google-research/task_adaptation
(`task_adaptation/data/*.py`): `train800` is the first 800 examples of its
"train" split and `val200` the first 200 of its "val" split, which is either a
TFDS split (validation, or the first half of smallNORB's test) or the part of
TFDS "train" that task_adaptation cuts off by a percentage (`count * pct // 100`
examples stay "train", the rest is "val"). `test` is its "test" split.

Offline tasks also have `test_shift` (`SHIFT_SPLIT`): the examples of `test`,
same order and labels, each under an ImageNet-C-style corruption applied after
decoding (`Task.shift`, `fusion.data.corruptions`). It is not a TFDS split and
not in `Task.splits`; `task.has_shift` says whether a task has it and
`task.all_splits` lists every split a task can load. VTAB tasks have none.

Tasks of one's own: `register(Task(...))` adds any TFDS-backed task;
`image_folder_task(path)` makes one from a folder of images with one sub-folder
per class (`fusion.data.image_folder`), and `get(path)` registers and returns
it, so a config's `tasks` may name folders next to registered tasks.
"""
import dataclasses
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

import fusion
from fusion.data import corruptions
from fusion.data import render
from fusion.data import synthetic  # Registers the offline TFDS builders.

SPLITS = ("train800", "val200", "train800val200", "test")
# The shifted test split of tasks with a `shift` (the offline ones).
SHIFT_SPLIT = corruptions.SHIFT_SPLIT
CATEGORIES = ("natural", "specialized", "structured")

# Bump when a shared label helper (e.g. `_bin_index`) changes meaning; label
# functions themselves enter the fingerprint through their source.
LABELS_VERSION = 1

Example = Mapping[str, Any]  # A TFDS example: nested dict of tf tensors.
LabelFn = Callable[[Example], tf.Tensor]
ImageFn = Callable[[tf.Tensor], tf.Tensor]


class DatasetUnavailableError(ValueError):
  """The TFDS data of a task is not prepared and could not be prepared; the
  message says where to get it and where to put it."""


def offline_data_dir() -> str:
  """Where offline builders are prepared: $FUSION_HOME/tensorflow_datasets."""
  return os.path.join(fusion.fusion_home(), "tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class Task:
  """A downstream classification task.

  Attributes:
    name: registry key, e.g. "cifar100".
    tfds_name: TFDS builder name with config and version, e.g. "cifar100:3.*.*".
    splits: VTAB-1k split name (`SPLITS`) -> TFDS split string; exactly the
      four of `SPLITS` (the shifted split is `shift`, not an entry here).
    label_fn: TFDS example (dict of tf tensors) -> int label tensor in
      [0, num_classes). A module-level named function.
    num_classes: number of classes.
    category: "natural" | "specialized" | "structured" (VTAB groups).
    label_names: class names; None reads them from the TFDS ClassLabel feature
      `label_key` (see `class_names`).
    label_key: the TFDS ClassLabel feature holding the names when
      `label_names` is None.
    image_key: the TFDS image feature.
    image_fn: optional float32 image -> float32 image in [0, 255], applied
      right after decoding (e.g. dSprites stores 0/1 pixels).
    data_dir: TFDS data_dir; None: TFDS's default, or `offline_data_dir()`
      for offline tasks.
    offline: the builder generates its data on this machine (synthetic.py).
    source_sizes: sizes of the TFDS splits that the slice indices were
      computed from (task_adaptation cuts "val"/"test" out of them by
      percentage); the pipeline checks them against the prepared dataset.
    shift: the corruption of the `test_shift` split (same examples as `test`,
      each corrupted after decoding, see `fusion.data.corruptions`); None: the
      task has no shifted split. Not part of `fingerprint`, which keys the
      four standard splits: the features of `test_shift` are keyed by
      `split_spec` plus `shift.fingerprint` (`fusion.features.fingerprint`).
    folder: for a task from an image folder, its split layout, read with
      `tfds.ImageFolder` (`fusion.data.image_folder`); its `splits` name the
      layout's split folders and `tfds_name` is a label with its fingerprint.
  """
  name: str
  tfds_name: str
  splits: Mapping[str, str]
  label_fn: LabelFn
  num_classes: int
  category: str
  label_names: tuple[str, ...] | None = None
  label_key: str = "label"
  image_key: str = "image"
  image_fn: ImageFn | None = None
  data_dir: str | None = None
  offline: bool = False
  source_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  shift: corruptions.Shift | None = None
  folder: str | None = None

  def __post_init__(self):
    if SHIFT_SPLIT in self.splits:
      raise ValueError(f"Task {self.name!r}: {SHIFT_SPLIT!r} is not a TFDS split "
                       f"and does not go in `splits`; set `shift` "
                       "(fusion.data.corruptions.Shift) to give the task a shifted "
                       "copy of its test split.")
    if tuple(sorted(self.splits)) != tuple(sorted(SPLITS)):
      raise ValueError(f"Task {self.name!r}: splits must have exactly the keys "
                       f"{SPLITS}, got {tuple(self.splits)}.")
    if self.category not in CATEGORIES:
      raise ValueError(f"Task {self.name!r}: category {self.category!r} is not "
                       f"one of {CATEGORIES}.")
    if self.num_classes < 2:
      raise ValueError(f"Task {self.name!r}: num_classes={self.num_classes} < 2.")
    if self.label_names is not None and len(self.label_names) != self.num_classes:
      raise ValueError(f"Task {self.name!r}: {len(self.label_names)} label_names "
                       f"for num_classes={self.num_classes}.")
    if self.shift is not None and not isinstance(self.shift, corruptions.Shift):
      raise TypeError(f"Task {self.name!r}: shift must be a "
                      f"fusion.data.corruptions.Shift or None, got {self.shift!r}.")
    # Own copies, so the caller's dicts cannot change a task afterwards.
    object.__setattr__(self, "splits", dict(self.splits))
    object.__setattr__(self, "source_sizes", dict(self.source_sizes))

  def __hash__(self):
    return hash((self.name, self.fingerprint))

  @property
  def has_shift(self) -> bool:
    """Whether the task has the shifted test split `test_shift`."""
    return self.shift is not None

  @property
  def all_splits(self) -> tuple[str, ...]:
    """Every split the task can load: `SPLITS`, then `test_shift` if it has one."""
    return SPLITS + ((SHIFT_SPLIT,) if self.has_shift else ())

  def split_spec(self, split: str) -> str:
    """The TFDS split string that `split` reads (`test`'s for `test_shift`)."""
    if split == SHIFT_SPLIT and not self.has_shift:
      raise ValueError(f"Task {self.name!r} has no shifted split {SHIFT_SPLIT!r} "
                       f"(Task.shift is None; of the registered tasks only the offline ones "
                       f"{', '.join(OFFLINE_TASKS)} have one); valid splits: "
                       f"{list(self.all_splits)}.")
    if split not in self.all_splits:
      raise ValueError(f"Unknown split {split!r} for task {self.name!r}; valid: "
                       f"{list(self.all_splits)}.")
    return self.splits["test" if split == SHIFT_SPLIT else split]

  @functools.cached_property
  def class_names(self) -> tuple[str, ...]:
    """One name per class; from the TFDS ClassLabel unless given."""
    if self.label_names is not None:
      return tuple(self.label_names)
    feature = make_builder(self).info.features[self.label_key]
    names = tuple(feature.names)
    if len(names) != self.num_classes:
      raise ValueError(f"Task {self.name!r}: TFDS feature {self.label_key!r} of "
                       f"{self.tfds_name} has {len(names)} classes, expected "
                       f"{self.num_classes}.")
    return names

  @functools.cached_property
  def fingerprint(self) -> str:
    """A stable key for what this task's data means (cache key for features).

    Covers the name, builder + version, split strings, label and image maps
    (their source code) and the class count; not the data_dir, and not the
    `shift` (so that giving a task a shifted split leaves the keys of its
    four standard splits alone): whatever holds data of `test_shift` keys it
    with `shift.fingerprint` as well.
    """
    spec = {
        "name": self.name,
        "tfds_name": self.tfds_name,
        "splits": dict(sorted(self.splits.items())),
        "label_fn": _function_id(self.label_fn),
        "image_fn": _function_id(self.image_fn),
        "image_key": self.image_key,
        "num_classes": self.num_classes,
        "labels_version": LABELS_VERSION,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return f"{self.name}-{digest[:16]}"


def _function_id(fn: Callable | None) -> str | None:
  if fn is None:
    return None
  name = f"{fn.__module__}.{fn.__qualname__}"
  try:
    source = inspect.getsource(fn)
  except (OSError, TypeError):  # No source (e.g. a zipped install).
    return name
  return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def resolve_data_dir(task: Task, data_dir: str | None = None) -> str | None:
  """The TFDS data_dir to use: argument > task.data_dir > offline default."""
  if data_dir is not None:
    return data_dir
  if task.data_dir is not None:
    return task.data_dir
  return offline_data_dir() if task.offline else None


def make_builder(task: Task, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `task` (nothing is downloaded or prepared here)."""
  if task.folder is not None:
    from fusion.data import image_folder
    return image_folder.builder(task.folder)
  try:
    return tfds.builder(task.tfds_name, data_dir=resolve_data_dir(task, data_dir))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetUnavailableError(
        f"Task {task.name!r} names the TFDS dataset {task.tfds_name!r}, which this "
        f"TFDS ({tfds.__version__}) does not have: {' '.join(str(e).split()[:40])} "
        "Check the name and version (`tfds.list_builders()`), or register the task "
        "with another (fusion.data.tasks.register).") from None


def with_data_dir(task: Task, data_dir: str | None) -> Task:
  """`task` reading its TFDS data from `data_dir` (config.data_dir), where the
  task downloads from TFDS; offline and image-folder tasks keep their own."""
  if not data_dir or task.offline or task.folder is not None or task.data_dir is not None:
    return task
  return dataclasses.replace(task, data_dir=os.path.expanduser(data_dir))


# ------------------------------------------------------------ label maps


def class_label(example: Example) -> tf.Tensor:
  """The TFDS "label" feature as is."""
  return example["label"]


def _bin_index(value: tf.Tensor, thresholds: tuple[float, ...]) -> tf.Tensor:
  """The largest i with thresholds[i] < value, as task_adaptation computes
  `tf.reduce_max(tf.where((thresholds - value) < 0))`."""
  below = tf.cast(tf.constant(thresholds, value.dtype) < value, tf.int64)
  return tf.reduce_sum(below) - 1


def clevr_count_label(example: Example) -> tf.Tensor:
  """Number of objects minus 3 (CLEVR scenes hold 3..10): 8 classes.

  task_adaptation clevr.py `_count_preprocess_fn` (task "count_all").
  """
  return tf.cast(tf.size(example["objects"]["size"]), tf.int64) - 3


def clevr_distance_label(example: Example) -> tf.Tensor:
  """Depth bin of the closest object: 6 classes.

  task_adaptation clevr.py `_closest_object_preprocess_fn` (task
  "closest_object_distance"): depth = min of pixel_coords[:, 2], bins
  (0, 8], (8, 8.5], (8.5, 9], (9, 9.5], (9.5, 10], (10, 100].
  """
  depth = tf.reduce_min(example["objects"]["pixel_coords"][:, 2])
  return _bin_index(depth, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))


def kitti_distance_label(example: Example) -> tf.Tensor:
  """Distance bin of the closest vehicle, or "no vehicle": 4 classes.

  task_adaptation kitti.py `_closest_vehicle_distance_pp` (task
  "closest_vehicle_distance"): vehicles are objects of type Car, Van, Truck
  (ClassLabel ids 0..2); distance = min location z, 1000 when there is none;
  bins (-100, 8], (8, 20], (20, 999], (999, inf).
  """
  objects = example["objects"]
  is_vehicle = objects["type"] < 3
  depths = tf.boolean_mask(objects["location"][:, 2], is_vehicle)
  depth = tf.reduce_min(tf.concat([depths, tf.constant([1000.0], depths.dtype)], 0))
  return _bin_index(depth, (-100.0, 8.0, 20.0, 999.0))


def _dsprites_bins(value: tf.Tensor, num_values: int, num_bins: int) -> tf.Tensor:
  """floor(value / (num_values / num_bins)), in exact integer arithmetic."""
  return tf.math.floordiv(tf.cast(value, tf.int64) * num_bins, num_values)


def dsprites_location_label(example: Example) -> tf.Tensor:
  """x position (32 values) grouped into 16 bins of 2.

  task_adaptation dsprites.py with predicted_attribute="label_x_position",
  num_classes=16: floor(value / (32 / 16)).
  """
  return _dsprites_bins(example["label_x_position"], 32, 16)


def dsprites_orientation_label(example: Example) -> tf.Tensor:
  """Orientation (40 values) grouped into 16 bins of 2.5.

  task_adaptation dsprites.py with predicted_attribute="label_orientation",
  num_classes=16: floor(value / (40 / 16)).
  """
  return _dsprites_bins(example["label_orientation"], 40, 16)


def smallnorb_azimuth_label(example: Example) -> tf.Tensor:
  """task_adaptation smallnorb.py, predicted_attribute="label_azimuth" (18)."""
  return example["label_azimuth"]


def smallnorb_elevation_label(example: Example) -> tf.Tensor:
  """task_adaptation smallnorb.py, predicted_attribute="label_elevation" (9)."""
  return example["label_elevation"]


def dsprites_image(image: tf.Tensor) -> tf.Tensor:
  """dSprites pixels are 0/1; task_adaptation scales them by 255."""
  return image * 255.0


# ------------------------------------------------------------ split specs


def _vtab_splits(train800: str, val200: str, test: str) -> dict[str, str]:
  # task_adaptation: train800val200 = train800 + val200, in that order.
  return {"train800": train800, "val200": val200,
          "train800val200": f"{train800}+{val200}", "test": test}


def _percent(count: int, percent: int) -> int:
  # task_adaptation's split sizes: `percent * count // 100`.
  return percent * count // 100


def _val_from_train(train_count: int, train_percent: int, test: str) -> dict[str, str]:
  """"val" is TFDS train after its first `train_percent`% (caltech, cifar,
  pets, svhn, clevr): val200 = the first 200 examples after that cut."""
  start = _percent(train_count, train_percent)
  return _vtab_splits("train[:800]", f"train[{start}:{start + 200}]", test)


def _three_way_from_train(train_count: int, train_percent: int,
                          val_percent: int) -> dict[str, str]:
  """TFDS has only "train", cut into train / val / test by percentages
  (eurosat, resisc45: 60/20/20; dsprites: 80/10/10); test is the rest."""
  train_end = _percent(train_count, train_percent)
  val_end = train_end + _percent(train_count, val_percent)
  return _vtab_splits("train[:800]", f"train[{train_end}:{train_end + 200}]",
                      f"train[{val_end}:]")


# TFDS "validation" is VTAB's "val" (dtd, flowers, sun397, pcam, retinopathy,
# dmlab, kitti).
_WITH_VALIDATION = _vtab_splits("train[:800]", "validation[:200]", "test")

# Sizes of the TFDS "train" splits that percentages are taken of.
_CALTECH101_TRAIN = 3060
_CIFAR100_TRAIN = 50000
_PETS_TRAIN = 3680
_SVHN_TRAIN = 73257
_EUROSAT_TRAIN = 27000
_RESISC45_TRAIN = 31500
_CLEVR_TRAIN = 70000
_DSPRITES_TRAIN = 737280

# The 100 CIFAR-100 fine labels in TFDS order (TFDS reads them from the
# downloaded archive, so they are not known before preparation).
_CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy "
    "bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee "
    "clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()


def _bin_names(thresholds: tuple[float, ...], unit: str = "") -> tuple[str, ...]:
  return tuple(f"({lo:g}, {hi:g}]{unit}" for lo, hi in zip(thresholds, thresholds[1:]))


def _vtab_tasks() -> list[Task]:
  natural = [
      # caltech.py: val = TFDS train after 90%.
      Task("caltech101", "caltech101:3.*.*",
           _val_from_train(_CALTECH101_TRAIN, 90, "test"), class_label, 102,
           "natural", source_sizes={"train": _CALTECH101_TRAIN}),
      # cifar.py (num_classes=100): val = TFDS train after 90%.
      Task("cifar100", "cifar100:3.*.*",
           _val_from_train(_CIFAR100_TRAIN, 90, "test"), class_label, 100,
           "natural", label_names=tuple(_CIFAR100_NAMES),
           source_sizes={"train": _CIFAR100_TRAIN}),
      # dtd.py: TFDS train / validation / test (fold 1).
      Task("dtd", "dtd:3.*.*", _WITH_VALIDATION, class_label, 47, "natural"),
      # oxford_flowers102.py (no train_split_percent): TFDS splits.
      Task("oxford_flowers102", "oxford_flowers102:2.*.*", _WITH_VALIDATION,
           class_label, 102, "natural"),
      # oxford_iiit_pet.py: val = TFDS train after 80%. task_adaptation pins
      # 3.*.*, which current TFDS no longer builds; 4.0.0 has the same
      # 3680/3669 train/test images (it adds head boxes, fixes corrupt files).
      Task("oxford_iiit_pet", "oxford_iiit_pet:4.*.*",
           _val_from_train(_PETS_TRAIN, 80, "test"), class_label, 37, "natural",
           source_sizes={"train": _PETS_TRAIN}),
      # sun397.py (config "tfds"): TFDS splits.
      Task("sun397", "sun397/tfds:4.*.*", _WITH_VALIDATION, class_label, 397,
           "natural"),
      # svhn.py: val = TFDS train after 90% ("extra" unused).
      Task("svhn", "svhn_cropped:3.*.*",
           _val_from_train(_SVHN_TRAIN, 90, "test"), class_label, 10, "natural",
           source_sizes={"train": _SVHN_TRAIN}),
  ]
  specialized = [
      # patch_camelyon.py: TFDS splits.
      Task("patch_camelyon", "patch_camelyon:2.*.*", _WITH_VALIDATION,
           class_label, 2, "specialized"),
      # eurosat.py (subset "rgb"): TFDS train cut 60/20/20.
      Task("eurosat", "eurosat/rgb:2.*.*",
           _three_way_from_train(_EUROSAT_TRAIN, 60, 20), class_label, 10,
           "specialized", source_sizes={"train": _EUROSAT_TRAIN}),
      # resisc45.py: TFDS train cut 60/20/20 (manual download in TFDS).
      Task("resisc45", "resisc45:3.*.*",
           _three_way_from_train(_RESISC45_TRAIN, 60, 20), class_label, 45,
           "specialized", source_sizes={"train": _RESISC45_TRAIN}),
      # diabetic_retinopathy.py (config "btgraham-300"): TFDS splits (manual
      # download in TFDS).
      Task("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
           _WITH_VALIDATION, class_label, 5, "specialized"),
  ]
  clevr_distance_bins = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
  structured = [
      # clevr.py: val = TFDS train after 90%; VTAB's test is TFDS "validation"
      # (CLEVR's test scenes carry no annotations).
      Task("clevr_count", "clevr:3.*.*",
           _val_from_train(_CLEVR_TRAIN, 90, "validation"), clevr_count_label, 8,
           "structured", label_names=tuple(f"{n} objects" for n in range(3, 11)),
           source_sizes={"train": _CLEVR_TRAIN}),
      Task("clevr_distance", "clevr:3.*.*",
           _val_from_train(_CLEVR_TRAIN, 90, "validation"), clevr_distance_label,
           6, "structured", label_names=_bin_names(clevr_distance_bins),
           source_sizes={"train": _CLEVR_TRAIN}),
      # dmlab.py: TFDS splits, pinned to 2.0.1.
      Task("dmlab", "dmlab:2.0.1", _WITH_VALIDATION, class_label, 6, "structured"),
      # kitti.py (task "closest_vehicle_distance"): TFDS splits, pinned 3.1.0.
      Task("kitti_distance", "kitti:3.1.0", _WITH_VALIDATION, kitti_distance_label,
           4, "structured",
           label_names=("vehicle (-100, 8] m", "vehicle (8, 20] m",
                        "vehicle (20, 999] m", "no vehicle")),
      # dsprites.py: TFDS train cut 80/10/10.
      Task("dsprites_location", "dsprites:2.*.*",
           _three_way_from_train(_DSPRITES_TRAIN, 80, 10), dsprites_location_label,
           16, "structured", image_fn=dsprites_image,
           label_names=tuple(f"x positions {2 * i}-{2 * i + 1}" for i in range(16)),
           source_sizes={"train": _DSPRITES_TRAIN}),
      Task("dsprites_orientation", "dsprites:2.*.*",
           _three_way_from_train(_DSPRITES_TRAIN, 80, 10),
           dsprites_orientation_label, 16, "structured", image_fn=dsprites_image,
           label_names=tuple(f"rotated {22.5 * i:g} to {22.5 * (i + 1):g} degrees"
                             for i in range(16)),
           source_sizes={"train": _DSPRITES_TRAIN}),
      # smallnorb.py: val = first half of TFDS test, test = second half.
      Task("smallnorb_azimuth", "smallnorb:2.*.*",
           _vtab_splits("train[:800]", "test[:200]", "test[50%:]"),
           smallnorb_azimuth_label, 18, "structured", label_key="label_azimuth"),
      Task("smallnorb_elevation", "smallnorb:2.*.*",
           _vtab_splits("train[:800]", "test[:200]", "test[50%:]"),
           smallnorb_elevation_label, 9, "structured", label_key="label_elevation"),
  ]
  return natural + specialized + structured




# ---------------------------------------------------------- offline tasks
# Built on this machine by the builders of synthetic.py; no network needed.

# Every offline task's `test_shift`: CIFAR-10-C's noise / blur / contrast at
# severity 3 of 5 (the middle one), one corruption per image by index.
OFFLINE_SHIFT = corruptions.Shift(severity=3, seed=0)


def _spoken_names(name: str, names: tuple[str, ...]) -> tuple[str, ...]:
  """Class names in words, for text encoders (the label head of gated fusion).

  The rendered tasks' own names (their TFDS ClassLabel's) are short codes
  ("x3", "2.00-2.18"); these say the same in words, class by class. Names are
  no part of the task's fingerprint: features and data do not change.
  """
  words = {
      "mixed": lambda n: "digit {} or {} texture".format(*n.replace("_", " ").split("|")),
      "novel_textures": lambda n: f"{n.replace('_', ' ')} texture",
      "shapes_orientation": lambda n: "shape rotated {} to {} degrees".format(
          *n.removesuffix("deg").split("-")),
      "scenes_count": lambda n: f"scene with {n} objects",
      "scenes_closest": lambda n: "scene whose closest object is {} to {} away".format(
          *n.split("-")),
  }
  if name == "shapes_location":  # "x<k>": k-th of len(names) equal bins of the width.
    return tuple(f"shape {100 * (k + 0.5) / len(names):.0f}% from the left"
                 for k in range(len(names)))
  return tuple(map(words[name], names)) if name in words else names


def _rendered_task(name: str) -> Task:
  """A task of `render.TASKS` as built by `synthetic.RenderedTasks`.

  Its splits are exactly VTAB-1k sized (800 / 200 / >= 2000), so the specs
  are those of the tasks with a TFDS validation split; `source_sizes` makes the
  pipeline refuse data prepared with other sizes.
  """
  config = synthetic.RenderedTasks.builder_configs[name]
  spec = render.get_task(name)
  return Task(name, f"{synthetic.RenderedTasks.name}/{name}:{config.version}",
              _WITH_VALIDATION, class_label, spec.num_classes, spec.category,
              label_names=_spoken_names(name, spec.class_names), offline=True,
              source_sizes=config.split_sizes, shift=OFFLINE_SHIFT)


def _offline_tasks() -> list[Task]:
  digits = Task("digits", f"digits:{synthetic.Digits.VERSION}",
                _vtab_splits("train", "validation", "test"), class_label, 10,
                "natural", label_names=tuple(str(d) for d in range(10)), offline=True,
                source_sizes=synthetic.DIGITS_SPLIT_SIZES, shift=OFFLINE_SHIFT)
  rendered = [_rendered_task(name) for name in render.TASKS]
  # VTAB order: natural, specialized, structured (stable within a group).
  return sorted([digits] + rendered, key=lambda t: CATEGORIES.index(t.category))


# --------------------------------------------------------------- registry

_VTAB = _vtab_tasks()
_OFFLINE = _offline_tasks()
VTAB_TASKS: tuple[str, ...] = tuple(task.name for task in _VTAB)
# The offline mini-VTAB (configs/demo.py): digits and the rendered tasks.
OFFLINE_TASKS: tuple[str, ...] = tuple(task.name for task in _OFFLINE)
TASKS: dict[str, Task] = {task.name: task for task in _VTAB + _OFFLINE}


# Datasets that TFDS cannot download: their files are fetched by hand into
# <data_dir>/downloads/manual/ (TFDS's manual_dir) before the first run.
MANUAL_DOWNLOADS = {
    "resisc45": "NWPU-RESISC45.rar from the dataset's OneDrive link, extracted there "
                "(TFDS's resisc45 builder says which)",
    "diabetic_retinopathy": "the Kaggle diabetic-retinopathy-detection files: test.zip "
                            "unpacked into test/, sample.zip into sample/, "
                            "trainLabels.csv and sampleSubmission.csv unpacked",
}


def register(task: Task, *, replace: bool = False) -> Task:
  """Adds `task` to the registry: `get`, a config's `tasks` and the suite find it.

  Registering the same task again is a no-op; another task under a registered
  name is an error unless `replace`.
  """
  if not isinstance(task, Task):
    raise TypeError(f"register takes a fusion.data.tasks.Task, got {type(task).__name__}.")
  old = TASKS.get(task.name)
  if old is not None and old.fingerprint != task.fingerprint and not replace:
    raise ValueError(f"Another task is registered as {task.name!r} ({old.tfds_name}); "
                     f"give {task.tfds_name} another name (an image folder: rename it, or "
                     f"tasks.image_folder_task(path, name=...)), or pass replace=True.")
  TASKS[task.name] = task
  return task


def image_folder_task(path: str, *, name: str | None = None, seed: int = 0,
                      category: str = "natural") -> Task:
  """A task from a folder with one sub-folder of images per class.

  VTAB-1k splits, deterministic from `seed`: train800, val200, train800val200
  and the rest as test (`fusion.data.image_folder`). Named after the folder
  unless `name`. Not registered: `register(image_folder_task(...))`.
  """
  from fusion.data import image_folder
  root = os.path.abspath(os.path.expanduser(path))
  images = image_folder.list_images(root)
  image_folder.check(root, images)
  digest = image_folder.fingerprint(root, images, seed)
  name = name or os.path.basename(root)
  return Task(name, f"image_folder/{name}:{digest[:16]}",
              {s: s for s in image_folder.SPLITS}, class_label, len(images), category,
              label_names=tuple(images),
              folder=image_folder.stage(root, images, seed, digest))


def get(name: str) -> Task:
  """The registered task called `name`; a folder path gives (and registers) the
  task of its images (`image_folder_task`, seed 0)."""
  if name in TASKS:
    return TASKS[name]
  from fusion.data import image_folder
  if image_folder.looks_like_path(name):
    return register(image_folder_task(name))
  raise ValueError(f"Unknown task {name!r}; valid tasks: {sorted(TASKS)}, or a folder of "
                   "images with one sub-folder per class (a path, e.g. ./my_images).")
