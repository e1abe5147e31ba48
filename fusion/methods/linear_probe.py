"""Linear-probe job: a linear head on frozen, cached features of each hub model.

Per (task, backbone): features of train800, val200, train800val200 and test;
a softmax-regression head per learning rate on train800, the learning rate
with the best val200 accuracy (ties: lower NLL) retrained on train800val200,
reported on test (top-1, NLL, 15-bin ECE).
"""
import dataclasses
import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from fusion import features as features_lib
from fusion import hub
from fusion import metrics
from fusion import report
from fusion import sharding
from fusion import train


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """Per-dimension centring and scaling fitted on the training features.

  Models' feature scales differ by orders of magnitude; one learning-rate grid
  serves them all once features are standardised.
  """
  mean: np.ndarray
  scale: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray) -> "Standardizer":
    x = np.asarray(x, np.float64)
    return cls(x.mean(0), np.maximum(x.std(0), 1e-6))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, np.float64) - self.mean) / self.scale).astype(np.float32)


def head_logits(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  return x @ params["kernel"] + params["bias"]


def _loss_fn(params, batch, rng):
  del rng
  logits = head_logits(params, batch["x"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
  return loss, {"accuracy": accuracy}


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, *, learning_rate: float,
             config, mesh: jax.sharding.Mesh, seed: int, workdir: str | None = None,
             run_name: str = "probe") -> dict[str, np.ndarray]:
  """Trains a zero-initialised linear head on standardised features."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  batch_size = min(config.batch_size, len(x))
  batch_size -= batch_size % sharding.data_size(mesh)

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    # A fresh sample per step, a pure function of (seed, step): resumable.
    idx = np.random.default_rng((seed, step)).choice(len(x), batch_size, replace=False)
    return {"x": x[idx], "y": y[idx]}

  params = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  opt = config.optimizer.to_dict()
  opt.update(learning_rate=learning_rate, total_steps=config.steps)
  state = train.train(loss_fn=_loss_fn, params=params, batch_fn=batch_fn,
                      config=opt, mesh=mesh, num_steps=config.steps,
                      workdir=workdir, seed=seed, run_name=run_name,
                      checkpoint=False, progress=False)
  return jax.tree.map(np.asarray, state.params)


def evaluate_head(params, x: np.ndarray, y: np.ndarray, prefix: str) -> dict[str, float]:
  logits = np.asarray(x, np.float64) @ params["kernel"] + params["bias"]
  return metrics.classification_metrics(logits, y, prefix=prefix)


def probe(splits: Mapping[str, features_lib.FeatureSet], num_classes: int, config, *,
          mesh: jax.sharding.Mesh, seed: int, workdir: str | None = None,
          run_name: str = "probe") -> dict:
  """The learning-rate sweep, then the final head; returns the result fields."""
  if not config.learning_rates:
    raise ValueError("config.probe.learning_rates is empty; give at least one.")
  train_fs, val_fs = splits["train800"], splits["val200"]
  norm = Standardizer.fit(train_fs.features)
  sweep = []
  for lr in config.learning_rates:
    params = fit_head(norm(train_fs.features), train_fs.labels, num_classes,
                      learning_rate=lr, config=config, mesh=mesh, seed=seed,
                      workdir=workdir, run_name=f"{run_name}/lr={lr:g}")
    val = evaluate_head(params, norm(val_fs.features), val_fs.labels, "val_")
    sweep.append((-val["val_accuracy"], val["val_nll"], lr, val))
  _, _, best_lr, best_val = min(sweep, key=lambda s: s[:2])

  final_fs, test_fs = splits["train800val200"], splits["test"]
  norm = Standardizer.fit(final_fs.features)
  params = fit_head(norm(final_fs.features), final_fs.labels, num_classes,
                    learning_rate=best_lr, config=config, mesh=mesh, seed=seed,
                    workdir=workdir, run_name=f"{run_name}/final")
  return {**evaluate_head(params, norm(test_fs.features), test_fs.labels, "test_"),
          **best_val, "learning_rate": best_lr,
          "sweep": {f"{s[2]:g}": s[3]["val_accuracy"] for s in sweep}}


SPLITS = ("train800", "val200", "train800val200", "test")


def load_hub(config) -> list[hub.Backbone]:
  """The config's hub: `config.offline_hub` (built here on first use) or `config.hub`."""
  if config.get("offline_hub") is not None:
    from fusion import offline_hub  # Builds the embedded default hub when missing.
    return hub.load_hub(offline_hub.build(config.offline_hub))
  return hub.load_hub(config.hub)


def load_tasks(config) -> list:
  from fusion.data import tasks as tasks_lib  # TF/TFDS only where data is read.
  if not config.tasks:
    raise ValueError("config.tasks is empty; name at least one task.")
  return [tasks_lib.get(name) for name in config.tasks]


def extract(config, backbone, task, split: str,
            mesh: jax.sharding.Mesh) -> features_lib.FeatureSet:
  """Cached features of one split, with the job config's batch size and cache."""
  return features_lib.extract(backbone, task, split, mesh=mesh,
                              batch_size=config.batch_size,
                              cache_dir=config.get("cache_dir") or None)


def probe_hub(config, workdir: str | None, backbones, task_list,
              mesh: jax.sharding.Mesh) -> list[dict]:
  """Linear-probe result rows for every (task, backbone), in that order."""
  rows = []
  pairs = [(t, b) for t in task_list for b in backbones]
  for task, backbone in tqdm.tqdm(pairs, desc="linear probes", unit="probe"):
    splits = {s: extract(config, backbone, task, s, mesh) for s in SPLITS}
    result = probe(splits, task.num_classes, config.probe, mesh=mesh,
                   seed=config.seed, workdir=workdir,
                   run_name=f"linear_probe/{task.name}/{backbone.name}")
    rows.append({"task": task.name, "category": task.category,
                 "method": "linear_probe", "model": backbone.name,
                 "inference_gflops": hub.inference_gflops(backbone),
                 "feature_dim": backbone.feature_dim, **result})
    logging.info("%s %s: test accuracy %.1f%% (learning rate %g)", task.name,
                 backbone.name, 100 * result["test_accuracy"], result["learning_rate"])
  return rows


def run(config, workdir: str) -> str:
  """The linear-probe job: results.json, results.md and a heatmap under `workdir`."""
  task_list = load_tasks(config)
  backbones = load_hub(config)
  mesh = sharding.make_mesh(config.get("num_devices") or None)
  rows = probe_hub(config, workdir, backbones, task_list, mesh)
  markdown = report.write_results(workdir, rows)
  report.plot_heatmap(rows, os.path.join(workdir, "plots", "linear_probe.png"),
                      method="linear_probe", title="Linear probe test accuracy (%)")
  return markdown
