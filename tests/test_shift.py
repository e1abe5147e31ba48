"""The shifted test split `test_shift` of offline tasks: each corruption against
a float64 numpy reference, seeded noise, the split deterministic and paired
with `test` example by example, features of it cached under their own key,
VTAB tasks without it and clear errors when it is missing."""
import dataclasses
import types

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
import tensorflow_datasets as tfds

from fusion import features
from fusion import hub
from fusion.data import corruptions
from fusion.data import pipeline
from fusion.data import synthetic
from fusion.data import tasks

import tiny_models

TASK = tasks.get("digits")
SHIFT = corruptions.Shift(severity=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  synthetic.Digits(data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  directory = tiny_models.save_tiny("resnet", tmp_path_factory.mktemp("resnet"))
  return hub.load({"name": "resnet", "path": directory})


def _image(shape=(9, 7, 3), seed=0):
  """A float image in [0, 255], not square (so the blur's axes are told apart)."""
  return np.random.default_rng(seed).uniform(0, 255, size=shape)


def _blur_reference(image, sigma):
  # skimage.filters.gaussian (ImageNet-C's blur): mode "nearest", truncate 4.
  out = scipy.ndimage.gaussian_filter(np.asarray(image, np.float64), sigma=(sigma, sigma, 0),
                                      mode="nearest", truncate=4.0)
  return np.clip(out, 0, 255)


def _contrast_reference(image, factor):
  image = np.asarray(image, np.float64)
  mean = image.mean(axis=(0, 1), keepdims=True)
  return np.clip((image - mean) * factor + mean, 0, 255)


def _shift(image, index, shift=SHIFT):
  return shift(tf.constant(image, tf.float32), tf.constant(index, tf.int64)).numpy()


def test_blur_and_contrast_match_numpy_references():
  image = _image()
  for severity in range(1, 6):
    params = corruptions.Shift(severity=severity).params
    got = corruptions.gaussian_blur(tf.constant(image, tf.float32),
                                    params["gaussian_blur"]).numpy()
    np.testing.assert_allclose(got, _blur_reference(image, params["gaussian_blur"]),
                               rtol=0, atol=2e-3)
    got = corruptions.contrast(tf.constant(image, tf.float32), params["contrast"]).numpy()
    np.testing.assert_allclose(got, _contrast_reference(image, params["contrast"]),
                               rtol=0, atol=2e-3)
  # A blur wider than the image still replicates its edges (radius 4 > 3 rows).
  thin = _image((3, 11, 3), seed=1)
  got = corruptions.gaussian_blur(tf.constant(thin, tf.float32), 1.0).numpy()
  np.testing.assert_allclose(got, _blur_reference(thin, 1.0), rtol=0, atol=2e-3)
  # The Shift picks them by index: 1 mod 3 blurs, 2 mod 3 lowers the contrast,
  # at CIFAR-10-C's severity-3 parameters.
  assert SHIFT.params == {"gaussian_noise": 0.08, "gaussian_blur": 0.7, "contrast": 0.4}
  for index in (1, 4, 7):
    np.testing.assert_allclose(_shift(image, index), _blur_reference(image, 0.7),
                               rtol=0, atol=2e-3)
  for index in (2, 5):
    np.testing.assert_allclose(_shift(image, index), _contrast_reference(image, 0.4),
                               rtol=0, atol=2e-3)
  assert [SHIFT.corruption_of(i) for i in range(4)] == [
      "gaussian_noise", "gaussian_blur", "contrast", "gaussian_noise"]


def test_noise_is_seeded_by_index_and_has_the_severity_std():
  grey = np.full((64, 64, 3), 127.5)  # Far from 0 and 255: nothing is clipped.
  tf.random.set_seed(1)
  first = _shift(grey, 3)
  tf.random.set_seed(2)  # The global random state plays no part.
  np.testing.assert_array_equal(_shift(grey, 3), first)
  noise = first - grey
  assert abs(noise.std() / (0.08 * 255) - 1) < 0.03, noise.std()
  assert abs(noise.mean()) < 0.5
  assert not np.array_equal(_shift(grey, 6), first)  # Another index, other noise.
  other_seed = corruptions.Shift(severity=3, seed=1)
  assert not np.array_equal(_shift(grey, 3, other_seed), first)
  # Clipped to [0, 255] as ImageNet-C does.
  clipped = _shift(np.zeros((16, 16, 3)), 0)
  assert clipped.min() == 0 and clipped.max() > 0


def _raw_test(data_dir):
  ds = tfds.builder("digits", data_dir=data_dir).as_dataset(split=TASK.splits["test"])
  examples = list(ds.as_numpy_iterator())
  return (np.stack([e["image"] for e in examples]).astype(np.float64),
          np.array([e["label"] for e in examples]))


def _load(data_dir, split, resolution=32):
  # Native resolution, mean 0, std 1: the images are the pixels / 255.
  return pipeline.load_split(TASK, split, resolution=resolution, mean=0.0, std=1.0,
                             data_dir=data_dir)


def test_shifted_split_is_deterministic_and_pairs_with_test(data_dir):
  test_images, test_labels = _load(data_dir, "test")
  shifted, labels = _load(data_dir, "test_shift")
  again, again_labels = _load(data_dir, "test_shift")
  np.testing.assert_array_equal(again, shifted)  # Two loads, the same split.
  np.testing.assert_array_equal(again_labels, labels)
  np.testing.assert_array_equal(labels, test_labels)  # Same examples, same order.
  assert shifted.shape == test_images.shape == (797, 32, 32, 3)
  assert pipeline.num_examples(TASK, "test_shift", data_dir) == 797
  differs = np.abs(shifted - test_images).reshape(len(labels), -1).max(axis=1)
  assert (differs > 1 / 255).all(), np.flatnonzero(differs <= 1 / 255)
  # Example i is test example i under the corruption of i mod 3.
  raw, raw_labels = _raw_test(data_dir)
  np.testing.assert_array_equal(raw_labels, labels)
  for i in range(12):
    kind = SHIFT.corruption_of(i)
    if kind == "gaussian_blur":
      want = _blur_reference(raw[i], 0.7)
    elif kind == "contrast":
      want = _contrast_reference(raw[i], 0.4)
    else:
      want = _shift(raw[i], i)
      assert np.abs(want - raw[i]).max() > 10
    np.testing.assert_allclose(shifted[i] * 255, want, rtol=0, atol=5e-3)
  # Batches for evaluation carry the same images.
  batch = next(pipeline.iterate_batches(TASK, "test_shift", resolution=32, mean=0.0,
                                        std=1.0, batch_size=64, data_dir=data_dir))
  np.testing.assert_array_equal(batch["image"], shifted[:64])


def test_features_of_the_shifted_split_have_their_own_cache_key(backbone, data_dir,
                                                                tmp_path):
  clean = features.extract(backbone, TASK, "test", cache_dir=str(tmp_path),
                           data_dir=data_dir, batch_size=200)
  shifted = features.extract(backbone, TASK, "test_shift", cache_dir=str(tmp_path),
                             data_dir=data_dir, batch_size=200)
  np.testing.assert_array_equal(shifted.labels, clean.labels)
  assert shifted.fingerprint != clean.fingerprint
  assert not np.allclose(shifted.features, clean.features)
  cached = features.extract(backbone, TASK, "test_shift", cache_dir=str(tmp_path),
                            data_dir="/nonexistent")  # From the cache: no data read.
  np.testing.assert_array_equal(cached.features, shifted.features)


def test_the_shift_leaves_the_standard_keys_alone(backbone):
  """Giving a task a shift changes neither its fingerprint nor its four splits'
  feature keys; the shifted split's key follows the corruption."""
  plain = dataclasses.replace(TASK, shift=None)
  assert plain.fingerprint == TASK.fingerprint
  for split in tasks.SPLITS:
    key, inputs = features.fingerprint(backbone, TASK, split)
    assert key == features.fingerprint(backbone, plain, split)[0]
    assert "shift" not in inputs and inputs["split_spec"] == TASK.splits[split]
  key, inputs = features.fingerprint(backbone, TASK, "test_shift")
  assert inputs["split_spec"] == TASK.splits["test"]
  assert inputs["shift"] == SHIFT.fingerprint
  assert key != features.fingerprint(backbone, TASK, "test")[0]
  harsher = dataclasses.replace(TASK, shift=corruptions.Shift(severity=5))
  assert features.fingerprint(backbone, harsher, "test_shift")[0] != key
  assert harsher.fingerprint == TASK.fingerprint


def test_only_offline_tasks_have_a_shifted_split_and_asking_others_is_an_error():
  for name, task in tasks.TASKS.items():
    assert task.has_shift == task.offline, name
    assert task.all_splits == tasks.SPLITS + (("test_shift",) if task.offline else ())
    assert "test_shift" not in task.splits  # splits: the four TFDS slices only.
    if task.offline:
      assert task.shift == tasks.OFFLINE_SHIFT and task.split_spec("test_shift") == \
          task.splits["test"]
  vtab = tasks.get("cifar100")
  message = "Task 'cifar100' has no shifted split 'test_shift'"
  with pytest.raises(ValueError, match=message):
    vtab.split_spec("test_shift")
  with pytest.raises(ValueError, match=message):  # Before any data is looked for.
    pipeline.num_examples(vtab, "test_shift", data_dir="/nonexistent")
  with pytest.raises(ValueError, match=message):
    pipeline.load_split(vtab, "test_shift", resolution=8, mean=0.0, std=1.0,
                        data_dir="/nonexistent")
  with pytest.raises(ValueError, match=message):
    features.extract(types.SimpleNamespace(kind="vision", name="b"), vtab, "test_shift",
                     cache_dir="/nonexistent")
  with pytest.raises(ValueError, match=r"Unknown split 'test_shifted'.*test_shift"):
    TASK.split_spec("test_shifted")
  good = dict(name="t", tfds_name="digits:1.0.0", label_fn=tasks.class_label,
              num_classes=10, category="natural", splits=dict(TASK.splits))
  with pytest.raises(ValueError, match="set `shift`"):
    tasks.Task(**{**good, "splits": {**TASK.splits, "test_shift": "test"}})
  with pytest.raises(TypeError, match="Shift"):
    tasks.Task(**good, shift="gaussian_noise")
  with pytest.raises(ValueError, match="severity"):
    corruptions.Shift(severity=6)
