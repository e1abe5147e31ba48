"""How well an estimator's scores rank models: weighted Kendall tau, Spearman,
top-1 regret, and a table of them per (estimator, task) plus means.

Ground-truth transfer accuracies are fractions in [0, 1] (the project's
convention for `test_accuracy`); regret is reported in points (x100).
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

METRICS = ("weighted_tau", "spearman", "top1_regret")


def _check_pair(scores: Any, accuracies: Any) -> tuple[np.ndarray, np.ndarray]:
  s = np.asarray(scores, np.float64)
  a = np.asarray(accuracies, np.float64)
  if s.ndim != 1 or s.shape != a.shape:
    raise ValueError(f"scores and accuracies must be 1-D, one per model, same length; "
                     f"got shapes {s.shape} and {a.shape}.")
  if s.size < 2:
    raise ValueError(f"ranking needs at least 2 models; got {s.size}.")
  if not (np.all(np.isfinite(s)) and np.all(np.isfinite(a))):
    raise ValueError("scores and accuracies must be finite (an estimator returned "
                     "NaN/inf for some model: check its features).")
  if a.min() < 0 or a.max() > 1:
    raise ValueError(f"accuracies must be fractions in [0, 1]; got values in "
                     f"[{a.min()}, {a.max()}] (divide percentages by 100).")
  return s, a


def weighted_tau(scores: Any, accuracies: Any) -> float:
  """scipy.stats.weightedtau (hyperbolic weights, top ranks matter most; the
  average of the taus weighted by each side's ranking), as in LogME's papers."""
  s, a = _check_pair(scores, accuracies)
  return float(stats.weightedtau(a, s).statistic)


def spearman(scores: Any, accuracies: Any) -> float:
  s, a = _check_pair(scores, accuracies)
  return float(stats.spearmanr(s, a).statistic)


def top1_regret(scores: Any, accuracies: Any) -> float:
  """Best ground-truth accuracy minus that of the estimator's top pick, in points.
  Ties in the scores go to the first model listed."""
  s, a = _check_pair(scores, accuracies)
  return float(100.0 * (a.max() - a[int(np.argmax(s))]))


_METRIC_FNS = {"weighted_tau": weighted_tau, "spearman": spearman, "top1_regret": top1_regret}


def evaluate(scores: Any, accuracies: Any, metrics: Sequence[str] = METRICS
             ) -> dict[str, float]:
  """{metric: value} for one estimator on one task."""
  unknown = [m for m in metrics if m not in _METRIC_FNS]
  if unknown:
    raise ValueError(f"unknown ranking metrics {unknown}; choose from {METRICS}.")
  return {m: _METRIC_FNS[m](scores, accuracies) for m in metrics}


def ranking_table(scores: Mapping[str, Mapping[str, Mapping[str, float]]],
                  accuracies: Mapping[str, Mapping[str, float]],
                  metrics: Sequence[str] = METRICS) -> dict[str, Any]:
  """Ranking quality per (estimator, task) and its mean over tasks.

  scores: {task: {estimator: {model: score}}}; accuracies: {task: {model:
  accuracy}}. Every estimator must score exactly the models that have an
  accuracy on that task. Returns plain lists/dicts for a report to format:
    {"metrics": [...], "tasks": [...], "estimators": [...],
     "rows": [{"estimator", "task", "num_models", <metric>: value, ...}, ...],
     "mean": [{"estimator", "num_tasks", <metric>: mean over tasks, ...}, ...]}
  Estimators are listed in first-seen order, tasks in the order of `scores`.
  """
  missing_tasks = [t for t in scores if t not in accuracies]
  if missing_tasks:
    raise ValueError(f"no ground-truth accuracies for tasks {missing_tasks}; "
                     f"accuracies cover {list(accuracies)}.")
  tasks = list(scores)
  estimators = list(dict.fromkeys(e for t in tasks for e in scores[t]))
  rows = []
  for task in tasks:
    truth = accuracies[task]
    for estimator, per_model in scores[task].items():
      if set(per_model) != set(truth):
        raise ValueError(
            f"task {task!r}, estimator {estimator!r}: scored models differ from the models "
            f"with accuracies (missing scores: {sorted(set(truth) - set(per_model))}, "
            f"no accuracy: {sorted(set(per_model) - set(truth))}).")
      models = sorted(truth)
      values = evaluate([per_model[m] for m in models], [truth[m] for m in models], metrics)
      rows.append({"estimator": estimator, "task": task, "num_models": len(models), **values})
  mean = []
  for estimator in estimators:
    mine = [r for r in rows if r["estimator"] == estimator]
    mean.append({"estimator": estimator, "num_tasks": len(mine),
                 **{m: float(np.mean([r[m] for r in mine])) if mine else math.nan
                    for m in metrics}})
  return {"metrics": list(metrics), "tasks": tasks, "estimators": estimators,
          "rows": rows, "mean": mean}
