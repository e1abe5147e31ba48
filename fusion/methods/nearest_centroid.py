"""Nearest centroid: cosine similarity to class means of standardised features.

A cheap baseline with no optimizer: standardise one hub model's cached
features with the training split's statistics, take each class's mean, and
score an input by its cosine similarity to each mean, divided by a
temperature. The temperature only calibrates (it never changes the argmax):
it is chosen on val200 by NLL from `temperatures`, then used on test, whose
means come from train800val200.
"""
import ml_collections
import numpy as np

from fusion import experiment
from fusion import hub
from fusion import metrics
from fusion import predictions
from fusion.methods import linear_probe

MEMBERS = "each"


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"temperatures": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)})


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroid_cosines(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """[N, C] cosine similarity of standardised `x` to each class mean (float64)."""
  train_y = np.asarray(train_y)
  missing = sorted(set(range(num_classes)) - set(train_y.tolist()))
  if missing:
    raise ValueError(f"Nearest centroid needs training examples of every class; "
                     f"classes {missing} have none.")
  norm = linear_probe.Standardizer.fit(train_x)
  train_z = norm(train_x).astype(np.float64)
  means = np.stack([train_z[train_y == c].mean(0) for c in range(num_classes)])
  return _unit(norm(x).astype(np.float64)) @ _unit(means).T


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  del seed  # Deterministic.
  temperatures = tuple(float(t) for t in config.temperatures)
  if not temperatures or min(temperatures) <= 0:
    raise ValueError(f"nearest_centroid.temperatures={temperatures} must be a non-empty "
                     "list of positive numbers.")
  backbone, = members
  tests = experiment.test_splits(task)
  fs = {s: ctx.features(backbone, task, s)
        for s in ("train800", "val200", "train800val200") + tests}
  val_cos = centroid_cosines(fs["train800"].features, fs["train800"].labels,
                             fs["val200"].features, task.num_classes)
  nll = {t: metrics.nll(val_cos / t, fs["val200"].labels) for t in temperatures}
  best = min(temperatures, key=lambda t: (nll[t], t))
  logits = {s: centroid_cosines(fs["train800val200"].features, fs["train800val200"].labels,
                                 fs[s].features, task.num_classes) / best for s in tests}
  preds = predictions.Predictions({"val200": val_cos / best, **logits},
                                  {s: fs[s].labels for s in ("val200",) + tests})
  return predictions.Result(
      preds, members=(backbone.name,),
      inference_gflops=hub.inference_gflops(backbone) + linear_probe.head_gflops(
          backbone.feature_dim, task.num_classes),
      fields={"temperature": best, "feature_dim": backbone.feature_dim})
