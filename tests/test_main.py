"""The entry point: the linear-probe job end to end, and bad configs or names
stop with an error that names them."""
import json
import logging
import os
import re
import subprocess
import sys

import types

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import pytest

from fusion import config_lib
from fusion import experiment
from fusion import main
from fusion import sharding

import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "fusion.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


def _probe_config(hub_specs, **overrides):
  values = dict(job="linear_probe", seed=0, tasks=("digits",), hub=hub_specs,
                batch_size=64, num_devices=0, cache_dir="",
                linear_probe=config_lib.probe_config(learning_rates=(1e-2, 1e-1), steps=100))
  return ml_collections.ConfigDict({**values, **overrides})


def test_linear_probe_job_writes_every_output(tmp_path, monkeypatch):
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home"))
  specs = [{"name": arch, "path": tiny_models.save_tiny(arch, tmp_path / arch)}
           for arch in ("vit", "resnet")]
  workdir = str(tmp_path / "work")
  markdown = main.run(_probe_config(specs), workdir)

  for name in ("config.json", "metrics.jsonl", "rows.jsonl", "results.json", "results.md",
               "plots/linear_probe.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["job"] == "linear_probe"
  with open(os.path.join(workdir, "results.json")) as f:
    rows = json.load(f)["rows"]
  assert [(r["task"], r["model"]) for r in rows] == [("digits", "vit"), ("digits", "resnet")]
  for row in rows:
    assert row["method"] == "linear_probe" and row["category"] == "natural"
    assert 0.1 < row["test_accuracy"] <= 1  # Ten classes; a probe beats chance.
    assert row["test_nll"] > 0 and 0 <= row["test_ece"] <= 1
    assert row["inference_gflops"] > 0 and row["learning_rate"] in (1e-2, 1e-1)
    assert set(row["sweep"]) == {"0.01", "0.1"}
  assert "| digits | natural |" in markdown
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    runs = {json.loads(line)["run"] for line in f}
  assert "linear_probe/digits/vit/final" in runs
  # The same curves as TensorBoard events, one folder per run, beside metrics.jsonl.
  assert os.listdir(os.path.join(workdir, "tensorboard", "linear_probe", "digits", "vit",
                                 "final"))


class _MeshBuilt(Exception):
  pass


@pytest.mark.parametrize("job, num_devices", [("suite", 2), ("select", 2),
                                              ("linear_probe", 0)])
def test_num_devices_flag_sets_the_jobs_mesh(job, num_devices, tmp_path, monkeypatch):
  """`--config.num_devices=N` reaches the mesh each job builds (0: every device);
  the job stops there (the hub is two stand-ins, nothing is trained)."""
  argv = ["main", "--config", os.path.join(REPO, "configs", "demo.py:tasks=digits"),
          f"--config.job={job}", f"--config.num_devices={num_devices}"]
  flag_values = flags.FlagValues()  # As main's flags, without touching the global ones.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  meshes = []
  real_make_mesh = sharding.make_mesh

  def make_mesh(*args, **kwargs):
    meshes.append(real_make_mesh(*args, **kwargs))
    raise _MeshBuilt

  monkeypatch.setattr(sharding, "make_mesh", make_mesh)
  monkeypatch.setattr(experiment, "load_hub", lambda config: [
      types.SimpleNamespace(name="a"), types.SimpleNamespace(name="b")])
  with pytest.raises(_MeshBuilt):
    main.run(flag_values.config, str(tmp_path))
  mesh, = meshes
  want = num_devices or len(jax.devices())
  assert len(jax.devices()) == 8 and want in (2, 8)  # conftest's simulated devices.
  assert dict(mesh.shape) == {sharding.DATA: want, sharding.MODEL: 1}
  assert list(mesh.devices.flat) == jax.devices()[:want]


def test_unknown_job_and_task_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown job 'bogus'.*linear_probe"):
    main.run(_probe_config([], job="bogus"), str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a")  # Nothing written for a job that cannot run.
  with pytest.raises(ValueError, match="nope"):
    main.run(_probe_config([], tasks=("nope",)), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "results.json")


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/vtab1k.py", "--config.nope=1"], "unknown config key.*nope"),
    (["--config", "configs/vtab1k.py", "--config.linear_probe.stepz=3"], "stepz"),
    (["--config", "configs/vtab1k.py", "--config.seed=abc"], "config.seed=abc"),
    (["--config", "configs/vtab1k.py", "--config.job=bogus"], "Unknown job 'bogus'"),
    (["--config", "configs/vtab1k.py:models=bogus"], r"Unknown models \['bogus'\]"),
    (["--config", "configs/vtab1k.py:nope=1"], "Unknown config argument 'nope'"),
])
def test_cli_rejects_bad_config(args, message, tmp_path):
  result = _cli(*args, "--workdir", str(tmp_path / "w"))
  assert result.returncode != 0
  assert re.search(message, result.stderr), result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")


def test_cli_names_the_offline_alternative_for_a_hub_id(tmp_path):
  result = _cli("--config", "configs/vtab1k.py:models=dinov2_s,tasks=cifar100",
                "--workdir", str(tmp_path / "w"),
                env={"HF_HUB_OFFLINE": "1", "FUSION_HOME": str(tmp_path / "home"),
                     "HF_HOME": str(tmp_path / "hf")})
  assert result.returncode != 0
  assert "facebook/dinov2-small" in result.stderr and "configs/demo.py" in result.stderr


def test_orbax_info_records_are_dropped_not_warnings():
  quiet = main._QuietLibraries()

  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "message", None, None)

  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not quiet.filter(record(orbax, logging.INFO))
  assert quiet.filter(record(orbax, logging.WARNING))
  assert quiet.filter(record("/work/fusion/train.py", logging.INFO))


def test_hub_and_offline_hub_together_mean_both(monkeypatch):
  from fusion import hub
  from fusion import offline_hub
  monkeypatch.setattr(offline_hub, "build", lambda config, workers: [{"name": "off", "path": "/o"}])
  monkeypatch.setattr(hub, "load_hub", lambda specs: list(specs))
  config = ml_collections.ConfigDict({"hub": [{"name": "mine", "path": "/m"}],
                                      "offline_hub": {"seed": 0}})
  assert [s["name"] for s in experiment.load_hub(config)] == ["mine", "off"]


def test_help_lists_jobs_configs_and_their_arguments():
  result = _cli("--help")
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  for part in (*main.JOBS, "configs/demo.py", "configs/vtab1k.py", "configs/build_hub.py",
               "tasks=digits+house_numbers+", "models=vit_b16+beit_b16+", "full=false",
               "models+=", "--print_config", "--workdir", "-v 1"):
    assert part in out, part


def test_print_config_and_arguments_of_a_config():
  result = _cli("--config", "configs/demo.py:tasks=digits,models+=/m/a+org/b",
                "--config.seed=3", "--print_config")
  assert result.returncode == 0, result.stderr[-2000:]
  for part in ("name: a", "path: /m/a", "name: b", "path: org/b", "seed: 3", "offline_hub:"):
    assert part in result.stdout, part
  result = _cli("--config", "configs/vtab1k.py:help")
  assert result.returncode == 0 and "models=vit_b16+beit_b16+" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.py:tasks=digits,mixed"], r"did you mean tasks=digits\+mixed"),
    (["--config", "configs/demo.py", "--config.hub.0.path=x"],
     r"Overrides name keys with dots.*configs/demo.py:models\+=PATH"),
    (["--config", "configs/demo.py:tasks=./no_such_folder"], "'.*no_such_folder' does not "
     "exist"),
])
def test_cli_errors_are_one_line_with_the_way_out(args, message, tmp_path):
  result = _cli(*args, "--workdir", str(tmp_path / "w"),
                env={"FUSION_HOME": str(tmp_path / "home")})
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert re.search(message, lines[0]), lines[0]
  assert not os.path.exists(tmp_path / "w")


def test_unavailable_vtab_data_is_a_value_error_naming_data_dir(tmp_path, monkeypatch):
  """main turns ValueErrors into one `error:` line: data errors are ones, and
  config.data_dir reaches the task."""
  import tensorflow_datasets as tfds
  from fusion.data import pipeline

  def no_network(self, *args, **kwargs):
    raise ConnectionError("no route to host")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  for name, way_out in (("dtd", "--config.data_dir=DIR or TFDS_DATA_DIR=DIR"),
                        ("resisc45", f"NWPU-RESISC45.rar .* in {tmp_path}/downloads/manual/")):
    task, = experiment.load_tasks((name,), str(tmp_path))
    assert task.data_dir == str(tmp_path)
    with pytest.raises(ValueError) as info:
      pipeline.num_examples(task, "test")
    assert isinstance(info.value, pipeline.DatasetUnavailableError)
    assert re.search(way_out, str(info.value)) and "'digits'" in str(info.value)
  with pytest.raises(ValueError, match="does not have"):
    from fusion.data import tasks as tasks_lib
    tasks_lib.make_builder(tasks_lib.Task(
        "mine", "no_such_dataset:1.0.0", {s: s for s in tasks_lib.SPLITS},
        tasks_lib.class_label, 2, "natural"))


NOISE = ("oneDNN", "absl::InitializeLog", "Unable to initialize backend",
         "are deprecated and will be removed", "Generating splits", "cuda", "TPU")


def test_a_users_models_and_images_from_the_command_line_quietly(tmp_path):
  """models+= and a folder of images on a config of one's own: the run prints no
  library start-up noise, keeps its log in the workdir; `-v 1` shows more."""
  import test_image_folder
  images = test_image_folder.write_images(tmp_path / "colours", 1010)
  model = tiny_models.save_tiny("vit", tmp_path / "my_vit")
  config = tmp_path / "mine.py"
  config.write_text("from configs import demo\n\n\ndef get_config(arg=None):\n"
                    "  config = demo.get_config(arg)\n  config.offline_hub = None\n"
                    "  return config\n")
  workdir = tmp_path / "w"
  env = {"FUSION_HOME": str(tmp_path / "home")}
  result = _cli("--config", f"{config}:tasks={images},methods=nearest_centroid,"
                f"models+={model}", "--workdir", str(workdir), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| colours | natural |" in result.stdout
  for noise in NOISE:
    assert noise not in result.stderr, (noise, result.stderr[-3000:])
  assert all(re.match(r"I\d{4} ", line) for line in result.stderr.splitlines()), result.stderr
  with open(workdir / "results.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["task"], r["model"]) for r in rows] == [("colours", "my_vit")]
  log = (workdir / main.LOG_FILE).read_text()
  assert "suite: 1 rows of 1 methods on 1 tasks" in log
  small = test_image_folder.write_images(tmp_path / "small", 30)
  verbose = _cli("--config", f"{config}:tasks={small}", "--workdir", str(tmp_path / "v"),
                 "-v", "1", env=env)
  assert verbose.returncode == 1 and "error: Image folder" in verbose.stderr
  assert "Traceback" in verbose.stderr  # Quiet by default: one line; -v 1: the traceback.
