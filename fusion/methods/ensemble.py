"""Greedy ensembles of fine-tuned hub models and their baselines.

"Deep Ensembles for Low-Data Transfer Learning" (Mustafa et al., 2020): rank
the hub by nearest-neighbour accuracy on cached train800 features (any
`fusion.selection.ESTIMATORS` entry can rank instead), fine-tune the top K
with `finetune` (its cached units), then build the ensemble greedily (Caruana
et al., 2004): start empty; repeatedly add, with replacement, the candidate
whose addition most lowers the val200 NLL of the averaged probabilities; stop
when no addition lowers it, or at `max_size` members. The selection comes
from the val200 predictions of the train800 runs; the test predictions
average the same members' train800val200 retrains, with the same
multiplicities.

Each variant is its own method (one row each), all sharing `config.ensemble`:
  ensemble        the greedy ensemble over the top K
  finetune_best   the best single fine-tuned model of the top K by val200
  uniform_topk    the uniform average of the top K
  seed_ensemble   K fine-tunes of the single best-ranked model, seeds
                  seed..seed+K-1: diversity from seeds at equal inference cost
                  (seeds after the first reuse the setting its sweep chose)
  greedy_all      the greedy ensemble over every hub model (the upper reference)
Inference GFLOPs are the sum over distinct members (distinct weights: a member
the greedy selection repeats runs once; the seeds of `seed_ensemble` each run).
"""
from collections.abc import Sequence

import ml_collections
import numpy as np

from fusion import metrics
from fusion import predictions
from fusion import selection

MEMBERS = "hub"
USES = ("finetune",)
VERSION = 2  # 2: GFLOPs count each distinct set of weights (seed ensembles).


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "ranking": {"estimator": "knn", "options": {"k": 1, "metric": "cosine"}},
      "top_k": 3,  # An int, or 0 for every hub model.
      "max_size": 10,  # Greedy selection stops at this many members (with repeats).
  })


def check_config(config, num_models: int) -> None:
  if config.ranking.estimator not in selection.ESTIMATORS:
    raise ValueError(f"ensemble.ranking.estimator={config.ranking.estimator!r} is unknown; "
                     f"valid: {sorted(selection.ESTIMATORS)}.")
  if not 0 <= int(config.top_k) <= num_models:
    raise ValueError(f"ensemble.top_k={config.top_k} is larger than the hub, which has "
                     f"{num_models} models (0 means all of them).")
  if int(config.max_size) < 1:
    raise ValueError(f"ensemble.max_size={config.max_size} must be >= 1.")


def check_hub(config, backbones) -> None:
  check_config(config, len(backbones))


# ------------------------------------------------------------------ pure parts


def greedy_select(val_probs: Sequence[np.ndarray], labels: np.ndarray,
                  max_size: int) -> list[int]:
  """Caruana's greedy selection with replacement by validation NLL.

  Returns candidate indices in the order they were added (repeats allowed).
  Each step adds the candidate whose addition gives the lowest NLL of the
  averaged probabilities (ties: the lower index); it stops when that NLL is
  not lower than the current ensemble's, or at `max_size` members.
  """
  total = np.zeros_like(np.asarray(val_probs[0], np.float64))
  chosen: list[int] = []
  current = np.inf
  while len(chosen) < max_size:
    nll = [metrics.nll_from_probs((total + p) / (len(chosen) + 1), labels) for p in val_probs]
    best = int(np.argmin(nll))
    if not nll[best] < current:
      break
    chosen.append(best)
    total = total + val_probs[best]
    current = nll[best]
  return chosen


def average(results: Sequence[predictions.Result], weights: Sequence[float]
            ) -> predictions.Predictions:
  """The (weighted) average of the members' probabilities, as log-probabilities."""
  weights = np.asarray(weights, np.float64) / np.sum(weights)
  first = results[0].predictions
  for r in results:
    if set(r.predictions.splits) != set(first.splits):
      raise ValueError(f"Cannot average members with different splits: {r.members} has "
                       f"{r.predictions.splits}, {results[0].members} {first.splits}.")
  logits = {}
  for split in first.splits:
    probs = sum(w * metrics.softmax(r.predictions.logits[split])
                for w, r in zip(weights, results))
    logits[split] = np.log(np.maximum(probs, 1e-30))
  return predictions.Predictions(logits, dict(first.labels))


def ensemble_result(results: Sequence[predictions.Result], counts: Sequence[int],
                    fields: dict) -> predictions.Result:
  """A Result averaging `results` with multiplicities `counts` (zeros left out)."""
  used = [(r, c) for r, c in zip(results, counts) if c > 0]
  members = tuple(m for r, c in used for m in r.members * c)
  return predictions.Result(
      average([r for r, _ in used], [c for _, c in used]), members=members,
      inference_gflops=float(sum(r.inference_gflops for r, _ in used)),
      train_steps=sum(r.train_steps for r in results),
      train_examples=sum(r.train_examples for r in results), fields=fields)


# ------------------------------------------------------------------ the hub side


def rank(ctx, task, backbones, config) -> list[str]:
  """Model names, best first, by the configured estimator on train800 features."""
  estimator = selection.ESTIMATORS[config.ranking.estimator]
  options = dict(config.ranking.get("options") or {})
  scores = {}
  for b in backbones:
    fs = ctx.features(b, task, "train800")
    scores[b.name] = float(estimator(fs.features, fs.labels, num_classes=task.num_classes,
                                     **options))
  return sorted(scores, key=lambda m: -scores[m])


def _finetunes(ctx, task, backbones) -> list[predictions.Result]:
  from fusion import methods  # The registry imports this module.
  return [methods.run_unit(ctx, "finetune", task, [b])[1] for b in backbones]


def _top(ctx, task, members, config) -> tuple[list, list[str]]:
  check_config(config, len(members))
  order = rank(ctx, task, members, config)
  k = int(config.top_k) or len(members)
  by_name = {b.name: b for b in members}
  return [by_name[m] for m in order[:k]], order


def _greedy(ctx, task, backbones, config, order) -> predictions.Result:
  results = _finetunes(ctx, task, backbones)
  labels = results[0].predictions.labels["val200"]
  chosen = greedy_select([metrics.softmax(r.predictions.logits["val200"]) for r in results],
                         labels, int(config.max_size))
  counts = np.bincount(chosen, minlength=len(results))
  return ensemble_result(results, counts, {
      "ranking": order, "candidates": [b.name for b in backbones],
      "selection_order": [backbones[i].name for i in chosen]})


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  """The greedy ensemble over the top K ranked models."""
  del seed  # The fine-tune units use the job's seed.
  top, order = _top(ctx, task, members, config)
  return _greedy(ctx, task, top, config, order)


def fit_greedy_all(ctx, task, members, config, seed) -> predictions.Result:
  del seed
  check_config(config, len(members))
  return _greedy(ctx, task, list(members), config, rank(ctx, task, members, config))


def fit_finetune_best(ctx, task, members, config, seed) -> predictions.Result:
  del seed
  top, order = _top(ctx, task, members, config)
  results = _finetunes(ctx, task, top)
  from fusion.methods import finetune
  best, _ = finetune.choose(list(enumerate(results)))
  counts = [int(i == best) for i in range(len(results))]
  return ensemble_result(results, counts, {"ranking": order,
                                           "candidates": [b.name for b in top]})


def fit_uniform_topk(ctx, task, members, config, seed) -> predictions.Result:
  del seed
  top, order = _top(ctx, task, members, config)
  results = _finetunes(ctx, task, top)
  return ensemble_result(results, [1] * len(results), {"ranking": order})


def fit_seed_ensemble(ctx, task, members, config, seed) -> predictions.Result:
  from fusion import methods
  from fusion.methods import finetune
  top, order = _top(ctx, task, members, config)
  first, = _finetunes(ctx, task, top[:1])
  ft_config = methods.method_config(ctx.config, "finetune")
  results = [first] + [
      finetune.with_setting(ctx, top[0], task, ft_config, seed + i,
                            first.fields["learning_rate"], first.fields["steps"])
      for i in range(1, len(top))]
  return ensemble_result(results, [1] * len(top), {
      "ranking": order, "seeds": list(range(seed, seed + len(top)))})
