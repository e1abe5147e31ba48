"""The method contract and the suite job: units computed once and cached,
rows from Results in one place, a method registered at runtime runs through
the suite, and a suite killed mid-unit resumes to the same results.json."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from fusion import config_lib
from fusion import experiment
from fusion import main
from fusion import methods
from fusion import metrics
from fusion import predictions
from fusion import report
from fusion.methods import nearest_centroid

import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("vit", "resnet")


def _suite_config(specs, **overrides):
  values = dict(job="suite", seed=0, tasks=("digits",), hub=specs, batch_size=64,
                num_devices=0, cache_dir="", predictions_dir="",
                methods=("linear_probe", "nearest_centroid"),
                linear_probe=config_lib.probe_config(learning_rates=(1e-2, 1e-1), steps=40),
                nearest_centroid=nearest_centroid.default_config())
  return ml_collections.ConfigDict({**values, **overrides})


@pytest.fixture(scope="module")
def hub_specs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  return [{"name": a, "path": tiny_models.save_tiny(a, root / a)} for a in ARCHS]


@pytest.fixture(scope="module")
def first_run(hub_specs, home, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("work"))
  markdown = main.run(_suite_config(hub_specs), workdir)
  return workdir, markdown


def _rows(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["rows"]


def _comparable(workdir):
  """results.json less what differs between two runs (provenance, wall time)."""
  with open(os.path.join(workdir, "results.json")) as f:
    return report.comparable(json.load(f))


def test_suite_rows_come_from_the_cached_predictions(first_run, home):
  workdir, markdown = first_run
  for name in ("config.json", "rows.jsonl", "results.json", "results.md",
               "plots/linear_probe.png", "plots/nearest_centroid.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  rows = _rows(workdir)
  assert [(r["method"], r["model"]) for r in rows] == [
      ("linear_probe", "vit"), ("linear_probe", "resnet"),
      ("nearest_centroid", "vit"), ("nearest_centroid", "resnet")]
  cache = predictions.Cache(os.path.join(home, "predictions"))
  for row in rows:
    result = cache.load(row["unit"])
    p = result.predictions
    # The row's metrics are those of the cached logits, through fusion.metrics.
    assert row["test_accuracy"] == metrics.accuracy(p.logits["test"], p.labels["test"])
    assert row["val_nll"] == pytest.approx(metrics.nll(p.logits["val200"], p.labels["val200"]))
    assert len(p.labels["val200"]) == 200 and p.splits == ("val200", "test", "test_shift")
    assert row["shift_accuracy"] == metrics.accuracy(p.logits["test_shift"],
                                                     p.labels["test_shift"])
    assert row["inference_gflops"] > 0 and row["train_seconds"] > 0
  probe = rows[0]
  assert probe["train_steps"] == 3 * 40 and probe["learning_rate"] in (1e-2, 1e-1)
  assert "| digits | natural |" in markdown and "## nearest_centroid" in markdown
  for row in rows:  # Intervals from the cached predictions, around the accuracy.
    p = cache.load(row["unit"]).predictions
    for split, prefix in (("test", "test_"), ("test_shift", "shift_")):
      assert row[f"{prefix}accuracy_ci"] == report.bootstrap_accuracy_interval(
          p.logits[split], p.labels[split])
      lo, hi = row[f"{prefix}accuracy_ci"]
      assert lo <= row[f"{prefix}accuracy"] <= hi
  # The tables show them, the costs, the shifted split; every plot linked exists.
  assert " ±" in markdown.split("## All methods: shifted")[0]
  assert "| *optimizer steps / task* |" in markdown
  assert "## All methods: shifted test split" in markdown
  links = re.findall(r"\]\((plots/[^)]+)\)", markdown)
  assert "plots/accuracy_vs_gflops.png" in links and "plots/linear_probe.png" in links
  for link in links:
    assert os.path.exists(os.path.join(workdir, link)), link


def test_second_run_recomputes_nothing(first_run, hub_specs, home, tmp_path, monkeypatch):
  workdir, _ = first_run
  calls = []
  for name in ("linear_probe", "nearest_centroid"):
    method = methods.METHODS[name]
    monkeypatch.setitem(methods.METHODS, name, methods.Method(
        name, lambda *a, m=method: calls.append(a) or m.fit_predict(*a),
        method.default_config, method.members, method.version))
  fresh = str(tmp_path / "fresh")  # Another workdir: the units come from $FUSION_HOME.
  main.run(_suite_config(hub_specs), fresh)
  assert calls == []
  assert _comparable(fresh) == _comparable(workdir)  # Intervals included: fixed seed.
  # A changed method config is another unit: computed anew.
  config = _suite_config(hub_specs, methods=("nearest_centroid",))
  config.nearest_centroid.temperatures = (0.05,)
  main.run(config, str(tmp_path / "other"))
  assert len(calls) == 2
  assert {r["temperature"] for r in _rows(str(tmp_path / "other"))} == {0.05}


def test_nearest_centroid_matches_a_float64_reference():
  rng = np.random.default_rng(0)
  train_x = rng.normal(size=(60, 5)) * [1, 10, 100, 0.1, 1] + 3
  train_y = np.arange(60) % 3
  x = rng.normal(size=(7, 5))
  z_train = (train_x - train_x.mean(0)) / train_x.std(0)
  z = (x - train_x.mean(0)) / train_x.std(0)
  means = np.stack([z_train[train_y == c].mean(0) for c in range(3)])
  reference = (z @ means.T) / np.outer(np.linalg.norm(z, axis=1), np.linalg.norm(means, axis=1))
  got = nearest_centroid.centroid_cosines(train_x, train_y, x, 3)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"classes \[3\] have none"):
    nearest_centroid.centroid_cosines(train_x, train_y, x, 4)


# A method defined here, registered at runtime: the suite needs nothing else.
def _majority_fit_predict(ctx, task, members, config, seed):
  """Predicts the most frequent train800 class everywhere (with a prior)."""
  backbone, = members
  train = ctx.features(backbone, task, "train800")
  counts = np.bincount(train.labels, minlength=task.num_classes) + config.smoothing
  logits = np.log(counts / counts.sum())
  labels = {s: ctx.features(backbone, task, s).labels for s in ("val200", "test")}
  return predictions.Result(
      predictions.Predictions({s: np.tile(logits, (len(y), 1)) for s, y in labels.items()},
                              labels),
      members=(backbone.name,), inference_gflops=0.0, fields={"smoothing": config.smoothing})


def test_a_method_registered_at_runtime_runs_through_the_suite(hub_specs, home, tmp_path,
                                                               monkeypatch):
  monkeypatch.setitem(methods.METHODS, "majority", methods.Method(
      "majority", _majority_fit_predict,
      lambda: ml_collections.ConfigDict({"smoothing": 1.0})))
  config = _suite_config(hub_specs, methods=("majority",))
  main.run(config, str(tmp_path / "w"))
  rows = _rows(str(tmp_path / "w"))
  assert [(r["method"], r["model"]) for r in rows] == [("majority", "vit"),
                                                        ("majority", "resnet")]
  ctx = experiment.Context.create(config, None)
  task, = ctx.tasks()
  test_labels = ctx.features(ctx.backbones[0], task, "test").labels
  train_labels = ctx.features(ctx.backbones[0], task, "train800").labels
  majority = np.bincount(train_labels).argmax()
  assert rows[0]["test_accuracy"] == pytest.approx(np.mean(test_labels == majority))
  assert rows[0]["smoothing"] == 1.0  # Method fields reach the row.


def test_bad_suite_configs_fail_before_any_work(hub_specs, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown method 'bogus'.*linear_probe"):
    main.run(_suite_config(hub_specs, methods=("bogus",)), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="config.methods is empty"):
    main.run(_suite_config(hub_specs, methods=()), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_cache_entries_that_do_not_verify_are_recomputed(tmp_path):
  cache = predictions.Cache(str(tmp_path))
  labels = {"val200": np.array([0, 1]), "test": np.array([1, 0, 1])}
  logits = {"val200": np.eye(2), "test": np.eye(2)[[1, 0, 0]]}
  result = predictions.Result(predictions.Predictions(logits, labels), ("m",), 0.5,
                              fields={"x": 1})
  cache.save("k", {"a": 1}, result)
  loaded = cache.load("k")
  np.testing.assert_array_equal(loaded.predictions.logits["test"], logits["test"])
  assert loaded.members == ("m",) and loaded.fields == {"x": 1}
  # Another valid npz under the same name: zip's CRC passes, the sha256 does not.
  np.savez(os.path.join(tmp_path, "k.npz"), **{"logits/val200": np.eye(2),
                                               "labels/val200": labels["val200"],
                                               "logits/test": np.eye(2)[[0, 0, 0]],
                                               "labels/test": labels["test"]})
  assert cache.load("k") is None
  assert cache.load("missing") is None


def test_killed_suite_resumes_to_the_same_results(hub_specs, home, tmp_path):
  """SIGKILL during a unit; the rerun ends with the uninterrupted run's results.json."""
  config_path = tmp_path / "config.py"
  config_path.write_text(
      "import ml_collections\n"
      "from fusion import config_lib\n"
      "from fusion.methods import nearest_centroid\n"
      "def get_config():\n"
      f"  return ml_collections.ConfigDict(dict(job='suite', seed=0, tasks=('digits',),\n"
      f"      hub={hub_specs!r}, batch_size=64, num_devices=0, cache_dir='',\n"
      "      predictions_dir='', methods=('linear_probe', 'nearest_centroid'),\n"
      "      linear_probe=config_lib.probe_config(learning_rates=(1e-2, 1e-1), steps=400),\n"
      "      nearest_centroid=nearest_centroid.default_config()))\n")
  env = {**os.environ, "FUSION_HOME": str(tmp_path / "home")}

  def start(workdir):
    return subprocess.Popen([sys.executable, "-m", "fusion.main", "--config", str(config_path),
                             "--workdir", str(workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  killed = tmp_path / "killed"
  process = start(killed)
  # Kill inside the second unit: after the first row lands, during the second probe.
  deadline = time.time() + 240
  rows_file = killed / "rows.jsonl"
  while time.time() < deadline and process.poll() is None:
    if rows_file.exists() and rows_file.read_text().count("\n") >= 1:
      break
    time.sleep(0.05)
  assert process.poll() is None, process.stdout.read()[-3000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "results.json").exists()
  assert rows_file.read_text().count("\n") == 1

  resumed = start(killed)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out[-3000:]
  # Uninterrupted, in this process, with another $FUSION_HOME: nothing cached.
  fresh = str(tmp_path / "fresh")
  main.run(_suite_config(hub_specs, linear_probe=config_lib.probe_config(
      learning_rates=(1e-2, 1e-1), steps=400)), fresh)
  assert len(_rows(killed)) == 4
  assert _comparable(killed) == _comparable(fresh)
