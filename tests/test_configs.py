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
  assert config.workers == 2 and vtab1k.get_config().workers == 1  # 2 CPU cores; 1 accelerator.
  assert tuple(demo.get_config("tasks=digits+mixed").tasks) == ("digits", "mixed")
  with pytest.raises(ValueError, match="cifar"):
    demo.get_config("tasks=digits+cifar")


def test_demo_fine_tunes_on_its_subset_of_tasks_and_full_on_all():
  config = demo.get_config()
  for method in demo.FEATURE_METHODS:  # Not listed: every task.
    assert method not in config.method_tasks
  for method in demo.FINETUNE_METHODS:
    expect = (demo.PATHWAY_TASKS if method in demo.PATHWAY_FINETUNED
              else demo.FINETUNE_TASKS)
    assert config.method_tasks[method] == expect, method
  assert set(demo.PATHWAY_TASKS) < set(demo.FINETUNE_TASKS) < set(demo.TASKS)
  assert set(demo.PATHWAY_FINETUNED) == {"pathway", "pathway_k1"}
  # A task subset keeps each method's own tasks among the chosen ones.
  config = demo.get_config("tasks=digits+scenes_count")
  assert config.method_tasks["pathway"] == ("scenes_count",)
  assert config.method_tasks["shift"] == ("digits", "scenes_count")
  assert not demo.get_config("full").method_tasks  # Every method on every task.


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


def test_vtab1k_args_pick_methods_tasks_and_models():
  config = vtab1k.get_config()
  assert config.dry_run is False and demo.get_config().dry_run is False
  assert set(config.methods) <= set(methods.METHODS)
  assert {spec["name"] for spec in config.hub} == set(config.model_gflops)
  assert [spec["path"] for spec in config.hub] == [  # One of each architecture.
      "google/vit-base-patch16-224", "microsoft/beit-base-patch16-224-pt22k-ft22k",
      "openai/clip-vit-base-patch16", "facebook/dinov2-base", "microsoft/resnet-50",
      "facebook/regnet-y-040"]
  assert tuple(config.finetune.learning_rates) == (0.001, 0.01, 0.1)
  assert tuple(config.finetune.steps) == (2500,) and config.finetune.batch_size == 512
  small = vtab1k.get_config("tasks=dtd+svhn,models=resnet50,methods=finetune+ensemble")
  assert tuple(small.tasks) == ("dtd", "svhn") and tuple(small.methods) == (
      "finetune", "ensemble")
  assert [s["path"] for s in small.hub] == ["microsoft/resnet-50"] and small.select is None
  assert small.ensemble.top_k == 1 and config.ensemble.top_k == 3
  with pytest.raises(ValueError, match="pathway.*at least 2"):
    vtab1k.get_config("models=resnet50,methods=finetune+pathway")
  one = vtab1k.get_config("models=resnet50")  # Every method that fits one model.
  assert set(one.methods) == set(vtab1k.METHODS) - set(vtab1k.ROUTING_METHODS)
  assert tuple(config.methods) == vtab1k.METHODS
  for bad, match in (("methods=finetune+shuffle", "shuffle"), ("tasks=dtd+mnist", "mnist"),
                     ("models=resnet50+gpt2", "gpt2")):
    with pytest.raises(ValueError, match=match):
      vtab1k.get_config(bad)


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
