"""A folder of one's own images as a task: VTAB-1k splits from a seed, clear
errors for folders too small, the public registry, and a run end to end with
the run's provenance (run id in metrics.jsonl, results.json, log.txt)."""
import json
import os
import stat

import ml_collections
import numpy as np
from PIL import Image
import pytest

from fusion import config_lib
from fusion import hub
from fusion import main
from fusion import provenance
from fusion import report
from fusion.data import image_folder
from fusion.data import pipeline
from fusion.data import tasks
from fusion.methods import nearest_centroid

import tiny_models

COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def write_images(root, count: int, size: int = 16) -> str:
  """`count` small PNGs, one sub-folder per class: noisy patches of its colour."""
  rng = np.random.default_rng(0)
  names = list(COLOURS)
  for k in range(count):
    name = names[k % len(names)]
    os.makedirs(os.path.join(root, name), exist_ok=True)
    pixels = rng.normal(COLOURS[name], 40, (size, size, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(root, name, f"{k:05d}.png"))
  return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_images(tmp_path_factory.mktemp("images") / "colours", 1050)


def _labels(task, split):
  _, labels = pipeline.load_split(task, split, resolution=8, mean=0.5, std=0.5)
  return labels


def test_splits_are_vtab1k_sized_disjoint_and_fixed_by_the_seed(folder, home):
  task = tasks.image_folder_task(folder)
  assert task.name == "colours" and task.class_names == ("blue", "green", "red")
  sizes = {s: pipeline.num_examples(task, s) for s in tasks.SPLITS}
  assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 50}
  staged = {s: {f for _, _, files in os.walk(os.path.join(task.folder, s)) for f in files}
            for s in tasks.SPLITS}
  assert not staged["train800"] & staged["val200"] and not staged["val200"] & staged["test"]
  assert staged["train800"] | staged["val200"] == staged["train800val200"]
  assert len(staged["train800val200"] | staged["test"]) == 1050
  # Labels are the class sub-folders: image k is in class k % 3.
  for split in ("val200", "test"):
    names = sorted(staged[split])
    labels = {int(os.path.splitext(f)[0]) % 3 for f in names}
    assert labels == {0, 1, 2}
  assert np.bincount(_labels(task, "test"), minlength=3).tolist() == [
      sum(int(f[:5]) % 3 == c for f in staged["test"]) for c in range(3)]
  again = tasks.image_folder_task(folder)
  other = tasks.image_folder_task(folder, seed=1)
  assert again.fingerprint == task.fingerprint and again.folder == task.folder
  assert other.fingerprint != task.fingerprint
  other_test = {f for _, _, files in os.walk(os.path.join(other.folder, "test")) for f in files}
  assert other_test != staged["test"]


def test_a_folder_too_small_says_how_many_images_it_has(tmp_path, home):
  small = write_images(tmp_path / "small", 37)
  with pytest.raises(ValueError, match=r"has 37 images in 3 classes.*more than 1,000"):
    tasks.get(small)
  with pytest.raises(ValueError, match="does not exist"):
    tasks.get(str(tmp_path / "missing"))
  assert "small" not in tasks.TASKS


def test_register_is_public_and_refuses_a_second_task_under_one_name(folder, home):
  task = tasks.image_folder_task(folder, name="colours_registered")
  assert tasks.register(task) is task and tasks.get("colours_registered") is task
  assert tasks.register(tasks.image_folder_task(folder, name="colours_registered")) is not None
  with pytest.raises(ValueError, match="Another task is registered as 'digits'"):
    tasks.register(tasks.image_folder_task(folder, name="digits"))
  assert tasks.get("digits").offline  # The built-in one stays.
  config_lib.check_tasks(("digits", folder), tasks.OFFLINE_TASKS)  # Paths pass the configs.
  with pytest.raises(ValueError, match="or a folder of images"):
    config_lib.check_tasks(("digits", "colourz"), tasks.OFFLINE_TASKS)


def _config(specs, folder, **overrides):
  values = dict(job="suite", seed=0, tasks=(folder,), hub=specs, batch_size=64,
                num_devices=0, cache_dir="", predictions_dir="",
                methods=("linear_probe", "nearest_centroid"),
                linear_probe=config_lib.probe_config(learning_rates=(1e-1,), steps=20),
                nearest_centroid=nearest_centroid.default_config())
  return ml_collections.ConfigDict({**values, **overrides})


def test_a_folder_task_runs_end_to_end_with_provenance(folder, home, tmp_path):
  specs = [{"name": "vit", "path": tiny_models.save_tiny("vit", tmp_path / "vit")}]
  workdir = str(tmp_path / "work")
  main.run(_config(specs, folder), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  rows = results["rows"]
  assert [(r["task"], r["method"]) for r in rows] == [("colours", "linear_probe"),
                                                      ("colours", "nearest_centroid")]
  assert all(r["test_accuracy"] > 0.9 for r in rows)  # Three colours: easy.
  backbone = hub.load(specs[0])
  pre = backbone.preprocess
  assert rows[0]["preprocess"] == {"resolution": pre.resolution, "mean": list(pre.mean),
                                   "std": list(pre.std)}
  # Provenance, under its one key.
  record = results[provenance.KEY]
  assert record["hub"] == {"vit": {"source": specs[0]["path"],
                                   "fingerprint": hub.params_fingerprint(backbone)}}
  assert record["fusion_version"] and record["packages"]["jax"] and record["devices"]["kind"]
  assert record["config"]["tasks"] == [folder] and record["started"] <= record["written"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert lines and {line["run_id"] for line in lines} == {record["run_id"]}
  with open(os.path.join(workdir, main.LOG_FILE)) as f:
    assert record["run_id"] in f.read()
  mode = stat.S_IMODE(os.stat(os.path.join(workdir, "results.json")).st_mode)
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask  # As every other output, not mkstemp's 0600.
  # The same config again: the same results.json but for provenance and wall time.
  again = str(tmp_path / "again")
  main.run(_config(specs, folder), again)
  with open(os.path.join(again, "results.json")) as f:
    second = json.load(f)
  assert second[provenance.KEY]["run_id"] != record["run_id"]

  def comparable(r):
    return [{k: v for k, v in row.items() if k not in report.WALL_TIME_FIELDS}
            for row in r["rows"]]

  assert set(second) == set(results) == {"rows", provenance.KEY}
  assert comparable(second) == comparable(results)
