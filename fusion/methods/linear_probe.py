"""Linear probe: a linear head on frozen, cached features of one hub model.

VTAB-1k protocol: a softmax-regression head per learning rate on train800, the
learning rate with the best val200 accuracy (ties: lower NLL) retrained on
train800val200; val200 predictions come from the chosen train800 head, test
predictions from the retrained one. Features are standardised with the
statistics of the split the head trains on.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusion import config_lib
from fusion import experiment
from fusion import features as features_lib
from fusion import hub
from fusion import metrics
from fusion import predictions
from fusion import sharding
from fusion import train

MEMBERS = "each"


def default_config():
  return config_lib.probe_config()


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


# Padded heads. A head trained in a jitted step is padded to a multiple of some
# classes, so that tasks with different class counts share one compiled step
# (on a CPU, tens of seconds of tracing and XLA compiling per model and task);
# a `class_mask` (1 for the task's classes, 0 for the padding) that never trains
# pushes the padding's logits to PAD_LOGIT: probability exactly 0 in float32, so
# the loss, the gradients and the real classes' logits are those of the unpadded
# head, and the padding gets no gradient.
PAD_LOGIT = -1e9


def head_width(num_classes: int, multiple, key: str = "class_multiple") -> int:
  """num_classes rounded up to a multiple of `multiple` (an integer >= 1; 1: no
  padding); `key` names the config key in the error."""
  if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
    raise ValueError(f"{key}={multiple!r} must be an integer >= 1 (1: no padding).")
  return -(-num_classes // multiple) * multiple


def class_mask(num_classes: int, width: int) -> np.ndarray:
  return (np.arange(width) < num_classes).astype(np.float32)


def masked_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Logits with the padded classes (mask 0) at PAD_LOGIT; mask None: no padding."""
  return logits if mask is None else logits + (1.0 - mask) * PAD_LOGIT


def pad_head(head: Mapping[str, Any], width: int) -> dict[str, np.ndarray]:
  """A [D, C] head as [D, width], zeros in the padding."""
  kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
  extra = width - bias.shape[-1]
  return {"kernel": np.pad(kernel, ((0, 0), (0, extra))), "bias": np.pad(bias, (0, extra))}


def unpad_head(head: Mapping[str, Any], num_classes: int) -> dict[str, np.ndarray]:
  return {"kernel": np.asarray(head["kernel"])[:, :num_classes],
          "bias": np.asarray(head["bias"])[:num_classes]}


def _loss_fn(params, batch, rng):
  del rng
  logits = head_logits(params, batch["x"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
  return loss, {"accuracy": accuracy}


def _batch_size(num_examples: int, config, mesh: jax.sharding.Mesh) -> int:
  """The configured batch, at most the split, a multiple of the data axis."""
  batch_size = min(config.batch_size, num_examples)
  return batch_size - batch_size % sharding.data_size(mesh)


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, *, learning_rate: float,
             config, mesh: jax.sharding.Mesh, seed: int, workdir: str | None = None,
             run_name: str = "probe") -> dict[str, np.ndarray]:
  """Trains a zero-initialised linear head on standardised features."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  batch_size = _batch_size(len(x), config, mesh)

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


def logits_of(params, x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float64) @ params["kernel"] + params["bias"]


def validate_config(config) -> None:
  if not config.learning_rates:
    raise ValueError("linear_probe.learning_rates is empty; give at least one.")
  for key in ("steps", "batch_size"):
    if not int(config[key]) >= 1:
      raise ValueError(f"linear_probe.{key}={config[key]!r} must be >= 1.")
  train.parse_config({**config.optimizer.to_dict(), "learning_rate": 1.0}, int(config.steps))


def probe(splits: Mapping[str, features_lib.FeatureSet], num_classes: int, config, *,
          mesh: jax.sharding.Mesh, seed: int, workdir: str | None = None,
          run_name: str = "probe") -> tuple[predictions.Predictions, dict]:
  """The learning-rate sweep, then the final head: (Predictions, method fields).

  `splits` has train800, val200, train800val200 and test, and optionally
  test_shift, which the final head predicts too.
  """
  validate_config(config)
  train_fs, val_fs = splits["train800"], splits["val200"]
  norm = Standardizer.fit(train_fs.features)
  sweep = []
  for lr in config.learning_rates:
    params = fit_head(norm(train_fs.features), train_fs.labels, num_classes,
                      learning_rate=lr, config=config, mesh=mesh, seed=seed,
                      workdir=workdir, run_name=f"{run_name}/lr={lr:g}")
    logits = logits_of(params, norm(val_fs.features))
    val = metrics.classification_metrics(logits, val_fs.labels, "val_")
    sweep.append((-val["val_accuracy"], val["val_nll"], lr, logits, val))
  _, _, best_lr, val_logits, _ = min(sweep, key=lambda s: s[:2])

  final_fs = splits["train800val200"]
  norm = Standardizer.fit(final_fs.features)
  params = fit_head(norm(final_fs.features), final_fs.labels, num_classes,
                    learning_rate=best_lr, config=config, mesh=mesh, seed=seed,
                    workdir=workdir, run_name=f"{run_name}/final")
  tests = [s for s in ("test", "test_shift") if s in splits]
  preds = predictions.Predictions(
      {"val200": val_logits, **{s: logits_of(params, norm(splits[s].features)) for s in tests}},
      {"val200": val_fs.labels, **{s: splits[s].labels for s in tests}})
  fields = {"learning_rate": best_lr,
            "sweep": {f"{s[2]:g}": s[4]["val_accuracy"] for s in sweep},
            "train_steps": (len(sweep) + 1) * config.steps,
            "train_examples": config.steps * (
                len(sweep) * _batch_size(len(train_fs.labels), config, mesh) +
                _batch_size(len(final_fs.labels), config, mesh))}
  return preds, fields


def head_gflops(feature_dim: int, num_classes: int) -> float:
  return 2 * feature_dim * num_classes / 1e9


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  backbone, = members
  splits = {s: ctx.features(backbone, task, s)
            for s in ("train800", "val200", "train800val200") + experiment.test_splits(task)}
  preds, fields = probe(splits, task.num_classes, config, mesh=ctx.mesh, seed=seed,
                        workdir=ctx.workdir,
                        run_name=f"linear_probe/{task.name}/{backbone.name}")
  return predictions.Result(
      preds, members=(backbone.name,),
      inference_gflops=hub.inference_gflops(backbone) + head_gflops(
          backbone.feature_dim, task.num_classes),
      train_steps=fields.pop("train_steps"), train_examples=fields.pop("train_examples"),
      fields={**fields, "feature_dim": backbone.feature_dim})
