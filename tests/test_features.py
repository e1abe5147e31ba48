"""Feature extraction: 8 simulated devices equal 1, padding is dropped, the cache
is used when valid and rebuilt when corrupt, stale or half-written."""
import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest

from fusion import features
from fusion import hub
from fusion import sharding
from fusion.data import synthetic
from fusion.data import tasks

import tiny_models

TASK = tasks.get("digits")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  synthetic.Digits(data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope="module", params=["vit", "resnet"])
def backbone(request, tmp_path_factory):
  directory = tiny_models.save_tiny(request.param, tmp_path_factory.mktemp(request.param))
  return hub.load({"name": request.param, "path": directory})


def _reference(backbone, images):
  """Features one image at a time, outside any mesh."""
  fn = jax.jit(backbone.features)
  return np.concatenate([np.asarray(fn(backbone.params, images[i:i + 1]))
                         for i in range(len(images))])


def test_extract_array_8_devices_equals_1_device_and_unbatched(backbone):
  assert len(jax.devices()) == 8  # conftest simulates 8 CPU devices.
  images = np.random.default_rng(0).normal(size=(37, 32, 32, 3)).astype(np.float32)
  one = features.extract_array(backbone, images, mesh=sharding.make_mesh(1), batch_size=16)
  eight = features.extract_array(backbone, images, mesh=sharding.make_mesh(8), batch_size=16)
  assert one.shape == (37, backbone.feature_dim)  # The padded tail is dropped.
  np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(one, _reference(backbone, images), rtol=1e-5, atol=1e-5)


def test_extract_array_rejects_bad_shapes_and_batch_sizes(backbone):
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    features.extract_array(backbone, np.zeros((32, 32, 3)), batch_size=8)
  with pytest.raises(ValueError, match="not divisible"):
    features.extract_array(backbone, np.zeros((4, 32, 32, 3)), batch_size=12,
                           mesh=sharding.make_mesh(8))


def test_extract_task_split_sharded_equals_single_device(backbone, data_dir, tmp_path):
  kwargs = dict(batch_size=64, data_dir=data_dir)
  one = features.extract(backbone, TASK, "val200", mesh=sharding.make_mesh(1),
                         cache_dir=str(tmp_path / "one"), **kwargs)
  eight = features.extract(backbone, TASK, "val200", mesh=sharding.make_mesh(8),
                           cache_dir=str(tmp_path / "eight"), **kwargs)
  assert one.features.shape == (200, backbone.feature_dim)
  assert one.fingerprint == eight.fingerprint
  np.testing.assert_array_equal(one.labels, eight.labels)
  np.testing.assert_allclose(eight.features, one.features, rtol=1e-5, atol=1e-5)


def test_images_from_memory_give_the_pipeline_features(backbone, data_dir, tmp_path,
                                                       monkeypatch):
  from fusion.data import pipeline
  pre = backbone.preprocess
  streamed = features.extract(backbone, TASK, "val200", batch_size=64, data_dir=data_dir,
                              cache_dir=str(tmp_path / "a"))
  images, labels = pipeline.load_split(TASK, "val200", resolution=pre.resolution,
                                       mean=pre.mean, std=pre.std, data_dir=data_dir)
  monkeypatch.setattr(pipeline, "iterate_batches", None)  # The pipeline is not read.
  in_memory = features.extract(backbone, TASK, "val200", batch_size=64, data_dir=data_dir,
                               cache_dir=str(tmp_path / "b"),
                               load_images=lambda: (images, labels))
  assert in_memory.fingerprint == streamed.fingerprint
  np.testing.assert_array_equal(in_memory.labels, streamed.labels)
  np.testing.assert_array_equal(in_memory.features, streamed.features)


def test_models_of_one_preprocessing_decode_a_small_split_once(backbone, data_dir,
                                                                tmp_path, monkeypatch):
  import ml_collections
  from fusion import experiment
  from fusion.data import pipeline
  loads = []
  real = pipeline.load_split
  monkeypatch.setattr(pipeline, "load_split", lambda *a, **k: loads.append(a) or real(*a, **k))
  task = tasks.with_data_dir(TASK, data_dir)
  twin = dataclasses.replace(backbone, name=backbone.name + "_twin")
  config = ml_collections.ConfigDict({"batch_size": 64, "cache_dir": str(tmp_path)})
  ctx = experiment.Context(config, None, [backbone, twin], sharding.make_mesh())
  for b in (backbone, twin):
    ctx.features(b, task, "val200")
  assert len(loads) == 1
  monkeypatch.setattr(experiment, "IMAGES_IN_MEMORY_BYTES", 0)  # Too big: streamed.
  ctx.features(backbone, task, "test")
  assert len(loads) == 1


def _count_runs(monkeypatch):
  calls = []
  real_run = features._run

  def counting_run(*args, **kwargs):
    calls.append(1)
    return real_run(*args, **kwargs)
  monkeypatch.setattr(features, "_run", counting_run)
  return calls


def test_cache_hit_then_corrupt_stale_and_half_written_entries_rebuilt(
    backbone, data_dir, tmp_path, monkeypatch):
  calls = _count_runs(monkeypatch)
  cache = str(tmp_path / "cache")

  def extract():
    return features.extract(backbone, TASK, "val200", batch_size=64, cache_dir=cache,
                            data_dir=data_dir)

  first = extract()
  assert len(calls) == 1
  second = extract()
  assert len(calls) == 1  # Served from the cache.
  np.testing.assert_array_equal(second.features, first.features)
  np.testing.assert_array_equal(second.labels, first.labels)
  data_path = os.path.join(cache, first.fingerprint + ".npz")
  meta_path = os.path.join(cache, first.fingerprint + ".json")

  # Corrupt: the npz no longer matches its checksum.
  with open(data_path, "r+b") as f:
    f.seek(200)
    f.write(b"\x00garbage\x00")
  np.testing.assert_array_equal(extract().features, first.features)
  assert len(calls) == 2

  # Stale: the metadata says another fingerprint produced it.
  with open(meta_path) as f:
    meta = json.load(f)
  with open(meta_path, "w") as f:
    json.dump({**meta, "fingerprint": "0" * 32}, f)
  extract()
  assert len(calls) == 3

  # Half-written: the npz is there but its json (written last) is not.
  os.remove(meta_path)
  extract()
  assert len(calls) == 4
  assert extract().fingerprint == first.fingerprint and len(calls) == 4
  assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]


def _cached_extract(backbone, data_dir, cache):
  return features.extract(backbone, TASK, "val200", batch_size=64, cache_dir=cache,
                          data_dir=data_dir)


@pytest.mark.parametrize("backbone", ["vit"], indirect=True)
def test_a_valid_npz_with_other_numbers_fails_the_checksum_and_is_rebuilt(
    backbone, data_dir, tmp_path, monkeypatch, caplog):
  """Only the sha256 in the json can tell: the npz is a well-formed zip (its
  CRCs hold) with the recorded shapes and finite numbers."""
  calls = _count_runs(monkeypatch)
  cache = str(tmp_path)
  first = _cached_extract(backbone, data_dir, cache)
  data_path = os.path.join(cache, first.fingerprint + ".npz")
  with open(data_path, "wb") as f:
    np.savez(f, features=first.features + 1, labels=first.labels)
  with np.load(data_path) as data:  # Readable, and what the json describes.
    assert data["features"].shape == first.features.shape
  with caplog.at_level(logging.WARNING):
    again = _cached_extract(backbone, data_dir, cache)
  assert len(calls) == 2
  np.testing.assert_array_equal(again.features, first.features)
  np.testing.assert_array_equal(again.labels, first.labels)
  assert f"Rebuilding corrupt or stale feature cache entry {first.fingerprint}" in caplog.text
  assert "checksum mismatch" in caplog.text
  np.testing.assert_array_equal(_cached_extract(backbone, data_dir, cache).features,
                                first.features)
  assert len(calls) == 2  # The rebuilt entry is trusted again.


@pytest.mark.parametrize("backbone", ["vit"], indirect=True)
def test_truncated_or_garbled_npz_is_rebuilt(backbone, data_dir, tmp_path, monkeypatch,
                                             caplog):
  calls = _count_runs(monkeypatch)
  cache = str(tmp_path)
  first = _cached_extract(backbone, data_dir, cache)
  data_path = os.path.join(cache, first.fingerprint + ".npz")
  size = os.path.getsize(data_path)
  garble = {
      "truncated": lambda f: f.truncate(size // 2),
      # The zip's central directory at the end: no member can even be found.
      "garbled": lambda f: (f.seek(size - 40), f.write(b"\xff" * 40)),
  }
  for name, corrupt in garble.items():
    with open(data_path, "r+b") as f:
      corrupt(f)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      again = _cached_extract(backbone, data_dir, cache)
    assert len(calls) == 2 + list(garble).index(name), name
    np.testing.assert_array_equal(again.features, first.features)
    assert "Rebuilding corrupt or stale feature cache entry" in caplog.text, name
    assert os.path.getsize(data_path) == size, name


def test_fingerprint_changes_with_split_weights_and_preprocessing(backbone):
  key, _ = features.fingerprint(backbone, TASK, "val200")
  assert features.fingerprint(backbone, TASK, "test")[0] != key
  shifted = jax.tree.map(lambda x: x + 1, backbone.params)
  assert features.fingerprint(dataclasses.replace(backbone, params=shifted), TASK, "val200")[0] != key
  other = dataclasses.replace(backbone.preprocess, resolution=backbone.preprocess.resolution + 8)
  assert features.fingerprint(dataclasses.replace(backbone, preprocess=other), TASK,
                              "val200")[0] != key


def test_extract_errors_name_the_problem(backbone, tmp_path):
  with pytest.raises(ValueError, match="Unknown split 'train'.*train800"):
    features.extract(backbone, TASK, "train", cache_dir=str(tmp_path))
  text = dataclasses.replace(backbone, kind="text")
  with pytest.raises(ValueError, match="vision backbone"):
    features.extract(text, TASK, "val200", cache_dir=str(tmp_path))
