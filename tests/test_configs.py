"""Every config file builds, names only known tasks, models and jobs, and
rejects unknown names in its arg."""
import os
import subprocess
import sys

import pytest

from configs import build_hub, demo, vtab1k
from fusion import config_lib
from fusion import main
from fusion import methods
from fusion import suite
from fusion import offline_hub
from fusion.data import tasks as tasks_lib
from fusion.selection import job as select_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_is_the_offline_default():
  config = demo.get_config()
  assert config.job == "suite" and main.job_module(config) is suite
  assert set(config.methods) <= set(methods.METHODS)
  assert tuple(config.tasks) == tasks_lib.OFFLINE_TASKS
  assert offline_hub.fingerprint(config.offline_hub) == offline_hub.fingerprint(
      build_hub.get_config().offline_hub)  # The hub that configs/build_hub.py builds.
  select_job.entries(config.select)  # A valid estimator list.
  assert tuple(demo.get_config("tasks=digits+mixed").tasks) == ("digits", "mixed")
  with pytest.raises(ValueError, match="cifar"):
    demo.get_config("tasks=digits+cifar")


def test_vtab1k_probes_and_selects_the_19_tasks():
  config = vtab1k.get_config()
  assert main.job_module(config) is suite
  assert len(config.tasks) == 19 and set(config.tasks) <= set(tasks_lib.TASKS)
  assert {tasks_lib.TASKS[t].category for t in config.tasks} == {
      "natural", "specialized", "structured"}
  assert all(spec["path"] for spec in config.hub)
  select_job.entries(config.select)
  config.job = "select"
  assert main.job_module(config) is select_job


def test_loading_the_demo_config_does_not_import_tensorflow():
  code = ("import sys; sys.path.insert(0, 'configs'); import demo; demo.get_config(); "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "False"


def test_demo_without_probes_has_no_ranking_evaluation():
  config = demo.get_config("methods=nearest_centroid")
  assert config.select is None
  main.validate(config)  # Would fail if select stayed without its linear-probe ground truth.
  assert demo.get_config().select is not None


def test_config_argument_errors_show_the_right_form():
  with pytest.raises(ValueError, match=r"did you mean tasks=digits\+mixed\?"):
    demo.get_config("tasks=digits,mixed")
  with pytest.raises(ValueError, match=r"seed='x' is not a int, e.g. seed=0"):
    demo.get_config("seed=x")
  with pytest.raises(ValueError, match=r"`models\+=` adds models through.*add_models"):
    demo.get_config("models+=/a")
  with pytest.raises(config_lib.ArgumentsHelp) as info:
    demo.get_config(config_lib.HELP)
  assert str(info.value).splitlines() == [
      "tasks=" + "+".join(demo.TASKS), "methods=" + "+".join(demo.METHODS), "seed=0",
      "full=false"]


def test_models_added_to_any_config_join_its_hub():
  arg, added = config_lib.split_added_models("tasks=digits,models+=/m/a+org/b,seed=1")
  assert arg == "tasks=digits,seed=1" and added == ("/m/a", "org/b")
  assert config_lib.split_added_models("models+=x") == (None, ("x",))
  with pytest.raises(ValueError, match="names no model"):
    config_lib.split_added_models("models+=")
  config = vtab1k.get_config("models=dinov2_s")
  config_lib.add_models(config, added)  # Locked configs too: main's are.
  assert [(s["name"], s["path"]) for s in config.hub] == [
      ("dinov2_s", "facebook/dinov2-small"), ("a", "/m/a"), ("b", "org/b")]
  config = demo.get_config()
  config.lock()
  config_lib.add_models(config, ("/m/a",))
  assert [s["name"] for s in config.hub] == ["a"] and config.offline_hub is not None
