"""config.workers: the suite's tasks computed in worker processes give the
results.json of one process, the workers continue the run (its id on their
metrics lines), and a worker's error reaches the caller naming its task. (The
offline hub built in workers: tests/test_offline_hub.py.)"""
import json
import os
import types

import ml_collections
import pytest

from fusion import config_lib
from fusion import main
from fusion import methods
from fusion import predictions
from fusion import provenance
from fusion import report
from fusion import suite
from fusion import workers
from fusion.methods import nearest_centroid
from fusion.selection import job as select_job

import tiny_models
from test_image_folder import write_images


@pytest.fixture(scope="module")
def hub_specs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  return [{"name": a, "path": tiny_models.save_tiny(a, root / a)} for a in ("vit", "resnet")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A second task beside digits: a folder of images (a task registered at runtime)."""
  # Not "colours": test_image_folder registers that name, maybe in this process.
  return write_images(tmp_path_factory.mktemp("images") / "swatches", 1050)


def _config(specs, folder, **overrides):
  select = select_job.default_config()
  select.estimators = ("knn", "hscore")
  values = dict(job="suite", seed=0, tasks=("digits", folder), hub=specs, batch_size=64,
                num_devices=0, cache_dir="", predictions_dir="", workers=1,
                methods=("linear_probe", "nearest_centroid"),
                method_tasks={"nearest_centroid": ("digits",)},
                linear_probe=config_lib.probe_config(learning_rates=(1e-1,), steps=20),
                nearest_centroid=nearest_centroid.default_config(), select=select)
  return ml_collections.ConfigDict({**values, **overrides})


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_two_workers_give_the_results_of_one(hub_specs, folder, tmp_path, monkeypatch):
  # A standalone method (registered here, at runtime): its units are jobs of their own.
  monkeypatch.setitem(methods.METHODS, "alone", methods.Method(
      "alone", nearest_centroid.fit_predict, nearest_centroid.default_config,
      standalone=True))
  names = ("linear_probe", "nearest_centroid", "alone")
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home1"))
  one = str(tmp_path / "one")
  main.run(_config(hub_specs, folder, methods=names), one)
  # Another home: nothing cached. The workers compute every unit and ranking,
  # this process none.
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home2"))
  saved, ranked = [], []
  save, rank = predictions.Cache.save, select_job.rank_task
  monkeypatch.setattr(predictions.Cache, "save",
                      lambda self, key, *a: saved.append(key) or save(self, key, *a))
  monkeypatch.setattr(select_job, "rank_task", lambda *a: ranked.append(a) or rank(*a))
  two = str(tmp_path / "two")
  main.run(_config(hub_specs, folder, workers=2, methods=names), two)
  assert saved == [] and ranked == []
  assert report.comparable(_results(two)) == report.comparable(_results(one))
  with open(os.path.join(two, "rows.jsonl")) as f:  # In plan order, as in one process.
    assert [json.loads(line)["unit"] for line in f] == [r["unit"] for r in _results(one)["rows"]
                                                         if "unit" in r]
  # The workers' metrics lines carry this run's id.
  run_id = _results(two)[provenance.KEY]["run_id"]
  with open(os.path.join(two, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert {line["run"].split("/")[1] for line in lines} == {"digits", "swatches"}
  assert {line["run_id"] for line in lines} == {run_id}


def test_a_standalone_methods_units_are_a_job_of_their_own(monkeypatch):
  monkeypatch.setitem(methods.METHODS, "alone", methods.Method(
      "alone", nearest_centroid.fit_predict, nearest_centroid.default_config,
      standalone=True))
  config = ml_collections.ConfigDict({"method_tasks": {"nearest_centroid": ("digits",)}})
  digits, other = (types.SimpleNamespace(name=n) for n in ("digits", "other"))
  names = ("linear_probe", "alone", "nearest_centroid")
  jobs = suite.task_jobs(config, names, digits)
  assert [(j.names, j.ranks, j.label) for j in jobs] == [
      (("linear_probe", "nearest_centroid"), True, "task 'digits'"),
      (("alone",), False, "task 'digits', method 'alone'")]
  assert [j.names for j in suite.task_jobs(config, names, other)] == [
      ("linear_probe",), ("alone",)]  # nearest_centroid runs on digits only.
  assert all(not j.standalone for j in suite.task_jobs(config, ("linear_probe",), digits))


def _fail(ctx, task, members, config, seed):
  raise ValueError("no such luck")


def test_a_workers_error_names_its_task(hub_specs, folder, tmp_path, monkeypatch):
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home"))
  # Registered here, at runtime: the workers get this process's registry.
  monkeypatch.setitem(methods.METHODS, "fail", methods.Method(
      "fail", _fail, nearest_centroid.default_config))
  config = _config(hub_specs, folder, workers=2, methods=("fail",), method_tasks={},
                   select=None)
  with pytest.raises(ValueError, match=r"^task '(digits|swatches)' \(in a worker process\): "
                     "no such luck$"):
    main.run(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work" / "results.json")


def test_bad_workers_values_are_named(hub_specs, folder, tmp_path):
  for value in (0, -1):
    with pytest.raises(ValueError, match=rf"config.workers={value} must be an integer >= 1"):
      main.run(_config(hub_specs, folder, workers=value), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_core_sets_deal_the_cores_out_or_pin_nothing(monkeypatch):
  monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
  assert workers.core_sets(2) == [{0, 2}, {1, 3}]
  assert workers.core_sets(4) == [{0}, {1}, {2}, {3}]
  assert workers.core_sets(5) is None  # More workers than cores: the scheduler decides.


def _affinity(_):
  import time
  time.sleep(0.3)  # So that both workers take jobs.
  return os.getpid(), frozenset(os.sched_getaffinity(0))


@pytest.mark.skipif(workers.core_sets(2) is None, reason="needs 2 cores and sched_setaffinity")
def test_pinned_workers_each_run_on_their_own_cores():
  expected = {frozenset(c) for c in workers.core_sets(2)}
  with workers.pool(2, pin=True) as pool:
    seen = dict(pool.map(_affinity, range(6), chunksize=1))
  assert set(seen.values()) <= expected
  assert len(set(seen.values())) == len(seen)  # Two workers: two different shares.
