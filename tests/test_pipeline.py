"""tf.data pipeline on the real (offline) digits data: shapes, normalisation
against numpy, padding + mask, sharding onto an 8-device mesh, errors; a
rendered offline task end to end from $FUSION_HOME."""
import dataclasses

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fusion import sharding
from fusion.data import pipeline
from fusion.data import render
from fusion.data import synthetic
from fusion.data import tasks

TASK = tasks.get("digits")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  synthetic.Digits(data_dir=path).download_and_prepare()
  return path


def _raw(data_dir, split):
  """The split as TFDS stores it: uint8 images and labels, in order."""
  ds = tfds.builder("digits", data_dir=data_dir).as_dataset(split=TASK.splits[split])
  examples = list(ds.as_numpy_iterator())
  return (np.stack([e["image"] for e in examples]),
          np.array([e["label"] for e in examples]))


def _bilinear_reference(images, size):
  """float64 bilinear resize, half-pixel centres, edge clamping (no antialias)."""
  def sample(x, axis):
    n = x.shape[axis]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    t = (coords - lo).reshape(shape)
    return np.take(x, lo, axis) * (1 - t) + np.take(x, hi, axis) * t
  return sample(sample(np.asarray(images, np.float64), 1), 2)


def _all(data_dir, split, batch_size, resolution, mean=MEAN, std=STD, mesh=None):
  return list(pipeline.iterate_batches(TASK, split, resolution=resolution, mean=mean,
                                       std=std, batch_size=batch_size,
                                       data_dir=data_dir, mesh=mesh))


def test_num_examples(data_dir):
  sizes = {s: pipeline.num_examples(TASK, s, data_dir) for s in tasks.SPLITS}
  assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}


def test_batches_shapes_dtypes_and_padding(data_dir):
  batches = _all(data_dir, "test", batch_size=128, resolution=24)
  assert len(batches) == 7  # ceil(797 / 128): nothing dropped.
  for batch in batches:
    assert set(batch) == {"image", "label", "mask"}
    assert batch["image"].shape == (128, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert batch["mask"].shape == (128,) and batch["mask"].dtype == bool
  assert all(b["mask"].all() for b in batches[:-1])
  last = batches[-1]
  real = 797 - 6 * 128
  np.testing.assert_array_equal(last["mask"], np.arange(128) < real)
  assert not last["image"][real:].any() and not last["label"][real:].any()
  # Every example exactly once, in TFDS order.
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, _raw(data_dir, "test")[1])


def test_exact_multiple_has_no_padding(data_dir):
  batches = _all(data_dir, "val200", batch_size=100, resolution=8)
  assert len(batches) == 2 and all(b["mask"].all() for b in batches)


def test_normalisation_matches_numpy(data_dir):
  images, labels = _raw(data_dir, "val200")
  batches = _all(data_dir, "val200", batch_size=200, resolution=32)  # Native size.
  want = (images.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(batches[0]["image"], want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(batches[0]["label"], labels)


def test_resize_is_plain_bilinear_of_the_whole_image(data_dir):
  images, _ = _raw(data_dir, "val200")
  for resolution in (20, 45):  # Down and up, non-integer factors.
    got = _all(data_dir, "val200", batch_size=200, resolution=resolution,
               mean=0.0, std=1.0)[0]["image"]
    want = _bilinear_reference(images, resolution) / 255
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_scalar_stats_broadcast(data_dir):
  a = _all(data_dir, "val200", batch_size=200, resolution=8, mean=0.5, std=0.25)[0]
  b = _all(data_dir, "val200", batch_size=200, resolution=8,
           mean=(0.5,) * 3, std=[0.25] * 3)[0]
  np.testing.assert_array_equal(a["image"], b["image"])


def test_load_split(data_dir):
  images, labels = pipeline.load_split(TASK, "train800val200", resolution=16,
                                       mean=MEAN, std=STD, data_dir=data_dir)
  assert images.shape == (1000, 16, 16, 3) and images.dtype == np.float32
  assert labels.shape == (1000,) and labels.dtype == np.int32
  batches = _all(data_dir, "train800val200", batch_size=300, resolution=16)
  np.testing.assert_array_equal(
      images, np.concatenate([b["image"][b["mask"]] for b in batches]))
  # train800val200 = train800 then val200.
  np.testing.assert_array_equal(labels, np.concatenate(
      [_raw(data_dir, "train800")[1], _raw(data_dir, "val200")[1]]))


def test_sharded_batches_on_8_devices(data_dir):
  mesh = sharding.make_mesh()
  assert sharding.data_size(mesh) == 8
  sharded = _all(data_dir, "val200", batch_size=64, resolution=8, mesh=mesh)
  host = _all(data_dir, "val200", batch_size=64, resolution=8)
  assert len(sharded) == len(host) == 4
  for s, h in zip(sharded, host):
    for key in ("image", "label", "mask"):
      assert isinstance(s[key], jax.Array)
      assert s[key].sharding.is_equivalent_to(sharding.batch_sharded(mesh), s[key].ndim)
      assert {shard.data.shape[0] for shard in s[key].addressable_shards} == {8}
      np.testing.assert_array_equal(np.asarray(s[key]), h[key])


def test_bad_arguments_raise_clear_errors(data_dir):
  mesh = sharding.make_mesh()
  kwargs = dict(resolution=8, mean=MEAN, std=STD, data_dir=data_dir)
  with pytest.raises(ValueError, match="batch_size=60.*divisible.*8"):
    pipeline.iterate_batches(TASK, "test", batch_size=60, mesh=mesh, **kwargs)
  with pytest.raises(ValueError, match="batch_size=12.*divisible"):
    pipeline.train_batches(TASK, "test", batch_size=12, mesh=mesh, **kwargs)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    pipeline.iterate_batches(TASK, "test", batch_size=0, **kwargs)
  with pytest.raises(ValueError, match="Unknown split 'train'.*train800val200"):
    pipeline.iterate_batches(TASK, "train", batch_size=8, **kwargs)
  with pytest.raises(ValueError, match="mean must be one value or one per"):
    pipeline.make_dataset(TASK, "test", resolution=8, mean=(0.5, 0.5), std=STD,
                          batch_size=8, data_dir=data_dir)
  with pytest.raises(ValueError, match="std positive"):
    pipeline.make_dataset(TASK, "test", resolution=8, mean=MEAN, std=0.0,
                          batch_size=8, data_dir=data_dir)
  with pytest.raises(ValueError, match="resolution must be a positive int"):
    pipeline.make_dataset(TASK, "test", resolution=0, mean=MEAN, std=STD,
                          batch_size=8, data_dir=data_dir)


def test_train_batches_shuffle_deterministically(data_dir):
  def first(seed, n):
    it = pipeline.train_batches(TASK, "train800", resolution=8, mean=MEAN, std=STD,
                                batch_size=100, seed=seed, data_dir=data_dir)
    return [next(it) for _ in range(n)]

  a, b, c = first(0, 9), first(0, 9), first(1, 9)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any((x["label"] != y["label"]).any() for x, y in zip(a, c))
  assert all(x["mask"].all() and x["image"].shape == (100, 8, 8, 3) for x in a)
  # The first 8 batches are one epoch: a permutation of train800.
  train_labels = _raw(data_dir, "train800")[1]
  epoch = np.concatenate([x["label"] for x in a[:8]])
  np.testing.assert_array_equal(np.sort(epoch), np.sort(train_labels))
  assert (epoch != train_labels).any()  # Shuffled, not in file order.
  # The next epoch is shuffled differently.
  assert (a[8]["label"] != a[0]["label"]).any()


def test_array_batch_fn_is_a_pure_resumable_stream():
  n, batch_size = 10, 4
  images = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  labels = np.arange(n, dtype=np.int32)
  fn = pipeline.array_batch_fn(images, labels, batch_size=batch_size, seed=3)
  stream = np.concatenate([fn(step)["label"] for step in range(5)])  # 2 epochs.
  for epoch in range(2):
    np.testing.assert_array_equal(np.sort(stream[epoch * n:(epoch + 1) * n]), labels)
  assert (stream[:n] != stream[n:]).any()
  # Pure in the step: any order, any new function with the same seed.
  again = pipeline.array_batch_fn(images, labels, batch_size=batch_size, seed=3)
  for step in (4, 0, 2):
    np.testing.assert_array_equal(again(step)["label"], fn(step)["label"])
  batch = fn(2)
  np.testing.assert_array_equal(batch["image"][:, 0], batch["label"])
  assert batch["mask"].all()
  other = pipeline.array_batch_fn(images, labels, batch_size=batch_size, seed=4)
  assert any((other(s)["label"] != fn(s)["label"]).any() for s in range(5))
  with pytest.raises(ValueError, match="as many images as labels"):
    pipeline.array_batch_fn(images[:3], labels, batch_size=2)


def test_unavailable_dataset_says_what_to_do(tmp_path, monkeypatch):
  def no_network(self, *args, **kwargs):
    raise ConnectionError("no route to host")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  task = tasks.get("dtd")
  with pytest.raises(pipeline.DatasetUnavailableError) as info:
    pipeline.num_examples(task, "test", data_dir=str(tmp_path))
  message = str(info.value)
  for part in ("'dtd'", "dtd:3.*.*", str(tmp_path), "no route to host", "'digits'",
               "'novel_textures'"):
    assert part in message, part


def test_source_size_mismatch_is_an_error(data_dir):
  task = dataclasses.replace(TASK, source_sizes={"train": 801})
  with pytest.raises(ValueError, match="800 examples in 'train'.*computed for 801"):
    pipeline.prepare(task, data_dir)


def test_rendered_task_end_to_end_from_fusion_home(tmp_path, monkeypatch):
  """Generated under $FUSION_HOME on first use, VTAB-1k sized, in render order."""
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  task = tasks.get("shapes_orientation")
  spec = render.get_task(task.name)
  builder = pipeline.prepare(task)
  assert builder.is_prepared()
  assert str(builder.data_dir).startswith(str(tmp_path / "tensorflow_datasets"))
  assert {s: pipeline.num_examples(task, s) for s in tasks.SPLITS} == {
      "train800": 800, "val200": 200, "train800val200": 1000, "test": 2000}
  train, val = (spec.render_range(s, 0, n) for s, n in (("train", 800), ("validation", 200)))
  images, labels = pipeline.load_split(task, "train800val200", resolution=32, mean=0.0,
                                       std=1.0)
  np.testing.assert_array_equal(labels, np.concatenate([train["label"], val["label"]]))
  want = np.concatenate([train["image"], val["image"]]) / 255  # Native size: no resize.
  np.testing.assert_allclose(images, want, rtol=0, atol=1e-6)
  batches = list(pipeline.iterate_batches(task, "test", resolution=16, mean=MEAN, std=STD,
                                          batch_size=512))
  assert len(batches) == 4 and batches[-1]["mask"].sum() == 2000 - 3 * 512
  test_labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(test_labels, spec.render_range("test", 0, 2000)["label"])
