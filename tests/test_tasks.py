"""Task registry: VTAB-1k split arithmetic and label maps (under
tfds.testing.mock_data), the registry with the offline tasks, and the real
offline digits builder (the rendered builders: test_synthetic.py)."""
import dataclasses
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fusion.data import render
from fusion.data import synthetic
from fusion.data import tasks

# Sizes of the TFDS splits (TFDS catalog / dataset_info of the pinned
# versions), written down independently of fusion.data.tasks.
TFDS_SIZES = {
    "caltech101": {"train": 3060, "test": 6084},
    "cifar100": {"train": 50000, "test": 10000},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "sun397": {"train": 76128, "validation": 10875, "test": 21750},
    "svhn": {"train": 73257, "test": 26032},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr_count": {"train": 70000, "validation": 15000, "test": 15000},
    "clevr_distance": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti_distance": {"train": 6347, "validation": 423, "test": 711},
    "dsprites_location": {"train": 737280},
    "dsprites_orientation": {"train": 737280},
    "smallnorb_azimuth": {"train": 24300, "test": 24300},
    "smallnorb_elevation": {"train": 24300, "test": 24300},
    "digits": {"train": 800, "validation": 200, "test": 797},
}
# The rendered offline tasks (fusion.data.render): 800 / 200 / 2000 each.
RENDERED = ("house_numbers", "mixed", "novel_textures", "shapes_location",
            "shapes_orientation", "scenes_count", "scenes_closest")
TFDS_SIZES.update({name: {"train": 800, "validation": 200, "test": 2000}
                   for name in RENDERED})


def _pct(count, percent):
  return percent * count // 100


# task_adaptation's definitions, restated: (split of "val", where val starts,
# (split of "test", start, end)). val/test cut out of TFDS train by percent:
# caltech/cifar/svhn/clevr 90%, pets 80%, eurosat/resisc 60/20/20,
# dsprites 80/10/10; smallNORB: val = test[:50%], test = test[50%:].
VTAB = {
    "caltech101": ("train", _pct(3060, 90), ("test", 0, 6084)),
    "cifar100": ("train", _pct(50000, 90), ("test", 0, 10000)),
    "dtd": ("validation", 0, ("test", 0, 1880)),
    "oxford_flowers102": ("validation", 0, ("test", 0, 6149)),
    "oxford_iiit_pet": ("train", _pct(3680, 80), ("test", 0, 3669)),
    "sun397": ("validation", 0, ("test", 0, 21750)),
    "svhn": ("train", _pct(73257, 90), ("test", 0, 26032)),
    "patch_camelyon": ("validation", 0, ("test", 0, 32768)),
    "eurosat": ("train", _pct(27000, 60), ("train", _pct(27000, 80), 27000)),
    "resisc45": ("train", _pct(31500, 60), ("train", _pct(31500, 80), 31500)),
    "diabetic_retinopathy": ("validation", 0, ("test", 0, 42670)),
    "clevr_count": ("train", _pct(70000, 90), ("validation", 0, 15000)),
    "clevr_distance": ("train", _pct(70000, 90), ("validation", 0, 15000)),
    "dmlab": ("validation", 0, ("test", 0, 22735)),
    "kitti_distance": ("validation", 0, ("test", 0, 711)),
    "dsprites_location": ("train", _pct(737280, 80), ("train", _pct(737280, 90), 737280)),
    "dsprites_orientation": ("train", _pct(737280, 80), ("train", _pct(737280, 90), 737280)),
    "smallnorb_azimuth": ("test", 0, ("test", 12150, 24300)),
    "smallnorb_elevation": ("test", 0, ("test", 12150, 24300)),
    "digits": ("validation", 0, ("test", 0, 797)),
    **{name: ("validation", 0, ("test", 0, 2000)) for name in RENDERED},
}

# VTAB-1k class counts and groups (Zhai et al. 2019, table of tasks).
NUM_CLASSES = {
    "caltech101": 102, "cifar100": 100, "dtd": 47, "oxford_flowers102": 102,
    "oxford_iiit_pet": 37, "sun397": 397, "svhn": 10, "patch_camelyon": 2,
    "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8,
    "clevr_distance": 6, "dmlab": 6, "kitti_distance": 4, "dsprites_location": 16,
    "dsprites_orientation": 16, "smallnorb_azimuth": 18, "smallnorb_elevation": 9,
    "digits": 10, "house_numbers": 10, "mixed": 10, "novel_textures": 10,
    "shapes_location": 16, "shapes_orientation": 16, "scenes_count": 8,
    "scenes_closest": 6,
}
SPECIALIZED = {"patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
               "novel_textures"}
STRUCTURED = {"clevr_count", "clevr_distance", "dmlab", "kitti_distance",
              "dsprites_location", "dsprites_orientation", "smallnorb_azimuth",
              "smallnorb_elevation", "shapes_location", "shapes_orientation",
              "scenes_count", "scenes_closest"}
OFFLINE = {"digits", *RENDERED}


def _built_in():
  """The tasks fusion ships (the registry may hold more: tasks.register)."""
  return {name: tasks.TASKS[name] for name in tasks.VTAB_TASKS + tasks.OFFLINE_TASKS}


def test_registry_holds_the_19_vtab_tasks_and_the_offline_ones():
  assert set(_built_in()) == set(NUM_CLASSES) and set(NUM_CLASSES) <= set(tasks.TASKS)
  assert len(tasks.VTAB_TASKS) == 19 and not OFFLINE & set(tasks.VTAB_TASKS)
  assert set(tasks.OFFLINE_TASKS) == OFFLINE and len(tasks.OFFLINE_TASKS) == len(OFFLINE)
  assert tasks.OFFLINE_TASKS[0] == "digits"
  # VTAB order: natural, then specialized, then structured.
  order = [tasks.CATEGORIES.index(tasks.get(n).category) for n in tasks.OFFLINE_TASKS]
  assert order == sorted(order) and set(order) == {0, 1, 2}
  for name, task in _built_in().items():
    assert task.name == name
    assert task.num_classes == NUM_CLASSES[name], name
    expected = ("specialized" if name in SPECIALIZED else
                "structured" if name in STRUCTURED else "natural")
    assert task.category == expected, name
    assert set(task.splits) == {"train800", "val200", "train800val200", "test"}
    assert task.offline == (name in OFFLINE), name


def test_offline_task_class_names_say_in_words_what_their_builders_label():
  """The TFDS ClassLabel keeps the rendered task's short names; the registry's
  names say the same class by class in words, without changing the fingerprint."""
  for name in RENDERED:
    task = tasks.get(name)
    builder = tasks.make_builder(task)  # Nothing is generated by looking.
    assert tuple(builder.info.features["label"].names) == render.get_task(name).class_names
    assert len(task.class_names) == task.num_classes
    assert dataclasses.replace(task, label_names=None).fingerprint == task.fingerprint
  assert tasks.get("mixed").class_names[:2] == ("digit 0 or checker texture",
                                                "digit 1 or dot lattice texture")
  assert tasks.get("scenes_count").class_names[0] == "scene with 3 objects"
  assert tasks.get("shapes_location").class_names[0] == "shape 3% from the left"
  assert tasks.get("shapes_orientation").class_names[1] == "shape rotated 22.5 to 45 degrees"
  assert tasks.get("scenes_closest").class_names[0] == (
      "scene whose closest object is 2.00 to 2.18 away")
  assert tasks.get("house_numbers").class_names == tuple("0123456789")  # Digits: as is.


def test_class_names_one_per_class():
  for name, task in _built_in().items():
    names = task.class_names
    assert len(names) == task.num_classes, name
    assert len(set(names)) == len(names), name
    assert all(isinstance(n, str) and n for n in names), name
  assert tasks.get("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")
  assert tasks.get("digits").class_names == tuple("0123456789")


def test_unknown_task_error_lists_the_valid_ones():
  with pytest.raises(ValueError, match="Unknown task 'cifar10'") as info:
    tasks.get("cifar10")
  for name in ("cifar100", "dtd", "digits", "smallnorb_azimuth"):
    assert name in str(info.value)


def test_task_rejects_bad_definitions():
  good = dict(name="t", tfds_name="digits:1.0.0", label_fn=tasks.class_label,
              num_classes=10, category="natural",
              splits={"train800": "train", "val200": "validation",
                      "train800val200": "train+validation", "test": "test"})
  tasks.Task(**good)
  with pytest.raises(ValueError, match="category"):
    tasks.Task(**{**good, "category": "unnatural"})
  with pytest.raises(ValueError, match="splits"):
    tasks.Task(**{**good, "splits": {"train800": "train"}})
  with pytest.raises(ValueError, match="label_names"):
    tasks.Task(**{**good, "label_names": ("a", "b")})


def test_fingerprint_tracks_what_the_data_means():
  task = tasks.get("cifar100")
  assert task.fingerprint == tasks.get("cifar100").fingerprint
  assert len({t.fingerprint for t in _built_in().values()}) == len(_built_in())
  moved = dataclasses.replace(task, splits={**task.splits, "val200": "train[:200]"})
  relabelled = dataclasses.replace(task, label_fn=tasks.clevr_count_label)
  elsewhere = dataclasses.replace(task, data_dir="/somewhere/else")
  assert moved.fingerprint != task.fingerprint
  assert relabelled.fingerprint != task.fingerprint
  assert elsewhere.fingerprint == task.fingerprint


def test_source_sizes_match_tfds():
  for name, task in _built_in().items():
    for split, size in task.source_sizes.items():
      assert TFDS_SIZES[name][split] == size, (name, split)


# ------------------------------------------------------- split arithmetic


def _ranges(spec, sizes):
  """TFDS's own reading of a split string: [(split, start, end)]."""
  infos = {k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()}
  out = []
  for instr in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos):
    size = sizes[instr.splitname]
    start = 0 if instr.from_ is None else instr.from_
    end = size if instr.to is None else instr.to
    out.append((instr.splitname, start, end))
  return out


def _index_dataset_fn(sizes):
  """A mock `_as_dataset`: one record (split, index) per example that the
  split string selects, in TFDS's order."""

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, decoders, read_config, shuffle_files
    ranges = _ranges(split, sizes)
    return tf.data.Dataset.from_tensor_slices({
        "source": np.concatenate([np.full(end - start, name) for name, start, end in ranges]),
        "index": np.concatenate([np.arange(start, end) for _, start, end in ranges]),
    })

  return as_dataset


def _read_ids(task, split):
  builder = tasks.make_builder(task)
  ds = builder.as_dataset(split=task.splits[split])
  ids = []
  for batch in ds.batch(1 << 20).as_numpy_iterator():  # Few large batches: fast.
    ids += zip([s.decode() for s in batch["source"]], batch["index"].tolist())
  return ids


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_vtab1k_split_arithmetic(name):
  task = tasks.get(name)
  sizes = TFDS_SIZES[name]
  val_split, val_start, (test_split, test_start, test_end) = VTAB[name]
  # The builder name + version must resolve in the installed TFDS.
  with tfds.testing.mock_data(as_dataset_fn=_index_dataset_fn(sizes)):
    train = _read_ids(task, "train800")
    val = _read_ids(task, "val200")
    both = _read_ids(task, "train800val200")
    test = _read_ids(task, "test")
  assert (len(train), len(val), len(both)) == (800, 200, 1000)
  assert train == [("train", i) for i in range(800)]
  assert val == [(val_split, i) for i in range(val_start, val_start + 200)]
  assert both == train + val
  assert not set(train) & set(val)
  assert set(test) == {(test_split, i) for i in range(test_start, test_end)}
  assert len(test) == test_end - test_start
  assert not set(test) & set(both)
  for split_name, index in set(both) | set(test):
    assert 0 <= index < sizes[split_name]


# ------------------------------------------------------------- label maps


def _fake_value(feature, rng, path, ranges, lengths):
  """A random example of a TFDS feature; Sequences get one length for all
  their sub-features (tfds.testing's generator draws one per sub-feature)."""
  if isinstance(feature, tfds.features.FeaturesDict):
    return {k: _fake_value(f, rng, f"{path}{k}", ranges, lengths)
            for k, f in feature.items()}
  if isinstance(feature, tfds.features.Sequence):
    low, high = lengths.get(path, (0, 4))
    length = int(rng.integers(low, high + 1))
    items = [_fake_value(feature.feature, rng, f"{path}/", ranges, lengths)
             for _ in range(length)]
    if isinstance(feature.feature, tfds.features.FeaturesDict):
      return {k: [item[k] for item in items] for k in feature.feature.keys()}
    return items
  if isinstance(feature, tfds.features.Image):
    shape = [int(rng.integers(8, 24)) if d is None else d for d in feature.shape]
    low, high = ranges.get(path, (0, 256))
    return rng.integers(low, high, size=shape).astype(np.uint8)
  if isinstance(feature, tfds.features.ClassLabel):
    return int(rng.integers(0, feature.num_classes))
  if isinstance(feature, tfds.features.Text):
    return "text"
  if isinstance(feature, tfds.features.BBoxFeature):
    y, x = np.sort(rng.random(2)), np.sort(rng.random(2))
    return tfds.features.BBox(ymin=y[0], xmin=x[0], ymax=y[1], xmax=x[1])
  dtype = np.dtype(feature.np_dtype)
  low, high = ranges.get(path, (0, 1))
  if np.issubdtype(dtype, np.integer):
    return rng.integers(low, max(high, low + 1), size=feature.shape).astype(dtype)
  return rng.uniform(low, high, size=feature.shape).astype(dtype)


def _fake_dataset_fn(num_examples, ranges=None, lengths=None, seed=0):
  """A mock `_as_dataset` yielding random examples of the builder's features,
  serialized and parsed back the way TFDS reads its files."""
  ranges, lengths = ranges or {}, lengths or {}

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del split, read_config, shuffle_files
    features = self.info.features
    rng = np.random.default_rng(seed)
    serialized = [features.serialize_example(
        _fake_value(features, rng, "", ranges, lengths)) for _ in range(num_examples)]
    return tf.data.Dataset.from_tensor_slices(serialized).map(
        lambda s: features.deserialize_example(s, decoders=decoders))

  return as_dataset


def _vtab_bins(values, thresholds):
  # np.digitize(right=True) - 1 = the largest i with thresholds[i] < value.
  return np.digitize(values, np.asarray(thresholds, np.float64), right=True) - 1


def _numpy_label(name, ex):
  objects = ex.get("objects")
  if name == "clevr_count":
    return len(objects["size"]) - 3
  if name == "clevr_distance":
    depth = np.min(objects["pixel_coords"][:, 2].astype(np.float64))
    return _vtab_bins(depth, [0, 8, 8.5, 9, 9.5, 10, 100])
  if name == "kitti_distance":
    z = objects["location"][:, 2].astype(np.float64)[objects["type"] < 3]
    return _vtab_bins(np.min(z, initial=1000.0), [-100, 8, 20, 999])
  if name == "dsprites_location":
    return int(np.floor(ex["label_x_position"] / (32 / 16)))
  if name == "dsprites_orientation":
    return int(np.floor(ex["label_orientation"] / (40 / 16)))
  if name == "smallnorb_azimuth":
    return ex["label_azimuth"]
  if name == "smallnorb_elevation":
    return ex["label_elevation"]
  return ex["label"]


# Realistic value ranges, so that every bin gets used: CLEVR depths ~7-12,
# KITTI camera-frame z in metres; CLEVR shows 3..10 objects.
FAKE_RANGES = {"objects/pixel_coords": (6.0, 12.0), "objects/location": (-5.0, 40.0)}
FAKE_LENGTHS = {"objects": (3, 10)}
BINNED = {"clevr_count", "clevr_distance", "kitti_distance", "dsprites_location",
          "dsprites_orientation"}


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_label_maps_on_mock_examples(name):
  task = tasks.get(name)
  lengths = dict(FAKE_LENGTHS)
  if name == "kitti_distance":
    lengths["objects"] = (0, 4)  # Include scenes without any vehicle.
  num_examples = 64 if name in BINNED else 8
  fake = _fake_dataset_fn(num_examples, FAKE_RANGES, lengths)
  with tfds.testing.mock_data(as_dataset_fn=fake):
    builder = tasks.make_builder(task)
    ds = builder.as_dataset(split=task.splits["train800"],
                            decoders={task.image_key: tfds.decode.SkipDecoding()})
    got, want = [], []
    for ex in ds:
      got.append(int(task.label_fn(ex)))
      want.append(int(_numpy_label(name, tf.nest.map_structure(np.asarray, ex))))
  assert got == want
  assert all(0 <= g < task.num_classes for g in got), got
  if name in BINNED:  # The random examples reach several bins.
    assert len(set(got)) >= min(3, task.num_classes), got


@pytest.mark.parametrize("depth, label", [(0.5, 0), (8.0, 0), (8.01, 1), (8.5, 1),
                                          (9.7, 4), (10.0, 4), (10.5, 5), (99.0, 5)])
def test_clevr_distance_bin_edges(depth, label):
  pixel_coords = tf.constant([[1.0, 2.0, 50.0], [3.0, 4.0, depth]])
  example = {"objects": {"pixel_coords": pixel_coords}}
  assert int(tasks.clevr_distance_label(example)) == label


@pytest.mark.parametrize("types_, depths, label", [
    ([0, 3], [8.0, 1.0], 0),       # the pedestrian (type 3) closer doesn't count
    ([1, 2], [30.0, 8.5], 1),
    ([2], [25.0], 2),
    ([3, 5, 7], [5.0, 6.0, 7.0], 3),  # no vehicle
    ([], [], 3),
])
def test_kitti_distance_cases(types_, depths, label):
  location = tf.constant([[0.0, 0.0, d] for d in depths], tf.float32, shape=(len(depths), 3))
  example = {"objects": {"type": tf.constant(types_, tf.int64), "location": location}}
  assert int(tasks.kitti_distance_label(example)) == label


def test_dsprites_bins_cover_all_values():
  for fn, key, count in ((tasks.dsprites_location_label, "label_x_position", 32),
                         (tasks.dsprites_orientation_label, "label_orientation", 40)):
    values = np.arange(count)
    got = [int(fn({key: tf.constant(v, tf.int64)})) for v in values]
    np.testing.assert_array_equal(got, np.floor(values / (count / 16)).astype(int))
    assert set(got) == set(range(16))


def test_grey_and_binary_images_become_rgb_in_range():
  """smallNORB (grey) and dSprites (0/1 pixels) through the real pipeline."""
  from fusion.data import pipeline
  for name, image_range in (("smallnorb_azimuth", (0, 256)), ("dsprites_location", (0, 2))):
    task = tasks.get(name)
    fake = _fake_dataset_fn(4, {"image": image_range})
    with tfds.testing.mock_data(as_dataset_fn=fake):
      batch = next(pipeline.make_dataset(
          task, "test", resolution=8, mean=(0, 0, 0), std=(1, 1, 1),
          batch_size=4).as_numpy_iterator())
    image = batch["image"]
    assert image.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Tiled channels.
    assert image.min() >= 0 and image.max() <= 1
    assert image.max() > 0.5  # dSprites' 1s map to 255, not 1/255.


# ------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic.Digits(data_dir=data_dir).download_and_prepare()
  return data_dir


def _digits_split(data_dir, split):
  ds = tfds.builder("digits", data_dir=data_dir).as_dataset(split=split)
  images, labels = [], []
  for ex in ds.as_numpy_iterator():
    images.append(ex["image"])
    labels.append(ex["label"])
  return np.stack(images), np.array(labels)


def test_digits_builder_splits_partition_the_data(digits_dir):
  builder = tfds.builder("digits", data_dir=digits_dir)
  assert builder.is_prepared()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 800, "validation": 200, "test": 797}
  splits = {s: _digits_split(digits_dir, s) for s in ("train", "validation", "test")}
  for images, labels in splits.values():
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Grey RGB.
    assert set(labels) <= set(range(10))
  # Together the splits hold every digit exactly once: disjoint and complete.
  def keyed(images, labels):
    return sorted(im.tobytes() + bytes([int(l)]) for im, l in zip(images, labels))
  all_images = np.concatenate([s[0] for s in splits.values()])
  all_labels = np.concatenate([s[1] for s in splits.values()])
  assert keyed(all_images, all_labels) == keyed(*synthetic.digits_arrays())
  assert all_images.max() == 255 and all_images.min() == 0


def test_digits_images_are_the_upsampled_sklearn_digits():
  images, labels = synthetic.digits_arrays()
  from sklearn import datasets
  digits = datasets.load_digits()
  assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
  order = np.random.default_rng(synthetic.DIGITS_SEED).permutation(len(labels))
  np.testing.assert_array_equal(labels, digits.target[order])
  # Independent bilinear reference (half-pixel centres, clamped edges).
  source = digits.images[order[:5]] * (255 / 16)
  coords = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
  lo = np.floor(coords).astype(int)
  hi = np.minimum(lo + 1, 7)
  t = coords - lo
  rows = source[:, lo] * (1 - t)[None, :, None] + source[:, hi] * t[None, :, None]
  ref = rows[:, :, lo] * (1 - t) + rows[:, :, hi] * t
  np.testing.assert_array_equal(images[:5, ..., 0], np.clip(np.round(ref), 0, 255))


def test_prepare_builds_offline_task_once_and_deterministically(
    digits_dir, tmp_path, monkeypatch):
  from fusion.data import pipeline
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  task = tasks.get("digits")
  data_dir = str(tmp_path / "tensorflow_datasets")
  assert tasks.resolve_data_dir(task) == data_dir
  assert tasks.resolve_data_dir(task, "/explicit") == "/explicit"
  assert pipeline.prepare(task).is_prepared()
  info = tmp_path / "tensorflow_datasets" / "digits" / "1.0.0" / "dataset_info.json"
  stamp = info.stat().st_mtime_ns
  pipeline.prepare(task)  # No-op now.
  assert info.stat().st_mtime_ns == stamp
  assert pipeline.num_examples(task, "train800val200") == 1000
  # A second, independent generation writes the same examples in the same order.
  for split in ("train", "validation", "test"):
    first, second = _digits_split(digits_dir, split), _digits_split(data_dir, split)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
