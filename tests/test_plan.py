"""The dry run: configs/vtab1k.py's plan prints offline and writes nothing else,
and its FLOPs agree with an independent count."""
import os
import re
import subprocess
import sys

import pytest

from configs import vtab1k
from fusion import plan
from fusion.data import tasks as tasks_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a real run writes into its workdir or $FUSION_HOME; a dry run writes none of it.
RUN_OUTPUTS = ("rows.jsonl", "results.json", "results.md", "metrics.jsonl", "plots",
               "checkpoints")


def _estimates(arg):
  config = vtab1k.get_config(arg)
  return plan.estimate(config, plan.units(config), plan.model_gflops(config),
                       plan.task_sizes(config.tasks))


def test_vtab1k_dry_run_prints_the_plan_offline(tmp_path):
  home, workdir = tmp_path / "home", tmp_path / "work"
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "FUSION_HOME": str(home), "PYTHONPATH": REPO}
  proc = subprocess.run(
      [sys.executable, "-m", "fusion.main", "--config", "configs/vtab1k.py",
       "--config.dry_run=true", "--workdir", str(workdir)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^\| (\d+) \| (\w+) \| (\w+) \| ([\w+]+) \|", proc.stdout, re.M)
  expected = plan.units(vtab1k.get_config())
  assert [(m, t, tuple(s.split("+"))) for _, m, t, s in rows] == [
      (u.method, u.task, u.members) for u in expected]
  assert {t for _, _, t, _ in rows} == set(tasks_lib.VTAB_TASKS)
  per_task = {t: sum(1 for _, _, task, _ in rows if task == t) for t in tasks_lib.VTAB_TASKS}
  assert len(set(per_task.values())) == 1 and len(rows) == 19 * per_task["dtd"]
  assert "**Total:" in proc.stdout
  # Nothing but the plan (and the resolved config main writes for every job).
  assert (workdir / "plan.md").read_text() in proc.stdout
  assert (workdir / "plan.json").exists()
  assert not set(os.listdir(workdir)) & set(RUN_OUTPUTS)
  assert not home.exists() or not any(home.iterdir())


def _xla_gflops_of_resnet50():
  """Forward GFLOPs of microsoft/resnet-50's architecture (HF's ResNetConfig
  defaults) at 224x224, from XLA's cost analysis on abstract shapes."""
  import jax
  import jax.numpy as jnp
  import transformers
  model = transformers.FlaxResNetModel(transformers.ResNetConfig(), _do_init=False)
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.module.apply(v, x, deterministic=True)).lower(
      model.params_shape_tree, image)
  return lowered.cost_analysis()["flops"] / 1e9


def test_finetune_flops_match_an_independent_count():
  f = _xla_gflops_of_resnet50() * 1e9
  assert vtab1k.GFLOPS["resnet50"] * 1e9 == pytest.approx(f, rel=1e-3)
  probe, finetune = _estimates("tasks=cifar100,models=resnet50,methods=linear_probe+finetune")
  # The VTAB sweep: 3 learning rates x 2,500 steps at batch 512 on train800, then
  # the chosen one retrained on train800val200; a step is forward + backward,
  # ~3 forward passes. Every run predicts val200 and CIFAR-100's 10,000 test images.
  assert finetune.train_flops == pytest.approx(4 * 2500 * 512 * 3 * f, rel=1e-3)
  assert finetune.forward_flops == pytest.approx(4 * (200 + 10_000) * f, rel=1e-3)
  assert finetune.inference_gflops == pytest.approx(f / 1e9, rel=1e-3)
  # The probe: features of train800, val200, train800val200 and test.
  assert probe.train_flops == 0
  assert probe.forward_flops == pytest.approx((800 + 200 + 1000 + 10_000) * f, rel=1e-3)


def test_shared_work_counts_once_and_rankings_are_upper_bounds():
  alone = {e.unit.method: e for e in _estimates("tasks=dtd,methods=ensemble")}
  after = {e.unit.method: e for e in _estimates("tasks=dtd,methods=finetune+ensemble")}
  # After every model's fine-tune, the ensemble adds no training: its units are cached.
  assert after["ensemble"].train_flops == 0
  finetunes = _estimates("tasks=dtd,methods=finetune")
  costliest = sorted(finetunes, key=lambda e: -e.train_flops)[:3]  # top_k = 3
  assert alone["ensemble"].train_flops == pytest.approx(sum(e.train_flops for e in costliest))
  assert alone["ensemble"].upper_bound
  assert alone["ensemble"].inference_gflops == pytest.approx(
      sum(e.inference_gflops for e in costliest))


def test_a_model_without_gflops_is_named():
  config = vtab1k.get_config("tasks=dtd,models=resnet50,methods=linear_probe")
  with pytest.raises(ValueError, match="resnet50.*model_gflops"):
    plan.estimate(config, plan.units(config), {}, plan.task_sizes(config.tasks))
