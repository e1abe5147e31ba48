"""Model soups (Wortsman et al., 2022) of one model's fine-tuning sweep.

The train800 runs of one pre-trained model's sweep share an initialisation,
so their weights can be averaged. The soup is made of the sweep of the model
that `finetune_best` picks (the best fine-tuned model of the top K ranked,
by val200):
  uniform_soup  the average of the weights of every finished run;
  greedy_soup   the runs sorted by val200 accuracy (ties: lower NLL), best
                first; each is kept if the soup's val200 accuracy with it does
                not drop.
Either way inference costs one model. The ingredients are the train800 runs
as they are (no retrain on train800val200: a soup of retrained runs would
need every run retrained, and the greedy choice is made on val200), so the
soups' test predictions come from weights that never saw val200.
BatchNorm statistics are averaged like the other weights.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fusion import experiment
from fusion import metrics
from fusion import predictions
from fusion.methods import ensemble
from fusion.methods import finetune

MEMBERS = "hub"
USES = ("finetune",)
default_config = ensemble.default_config


def average_params(trees: Sequence[Any]) -> Any:
  """The element-wise mean of parameter trees of one structure (float64 sum)."""
  return jax.tree.map(
      lambda *leaves: (np.sum([np.asarray(x, np.float64) for x in leaves], axis=0)
                       / len(leaves)).astype(np.asarray(leaves[0]).dtype), *trees)


def greedy_soup(ingredients: Sequence[Any], val_score: Callable[[Any], tuple[float, float]]
                ) -> tuple[Any, list[int]]:
  """(soup params, kept indices) of Wortsman et al.'s greedy soup.

  `val_score(params) -> (val accuracy, val NLL)`. Ingredients are visited once,
  best first (accuracy, then lower NLL); one is kept if the soup's accuracy
  with it is at least the soup's accuracy without it.
  """
  scores = [val_score(p) for p in ingredients]
  order = sorted(range(len(ingredients)), key=lambda i: (-scores[i][0], scores[i][1], i))
  kept = [order[0]]
  soup, best = ingredients[order[0]], scores[order[0]][0]
  for i in order[1:]:
    candidate = average_params([ingredients[j] for j in kept + [i]])
    accuracy = val_score(candidate)[0]
    if accuracy >= best:
      kept.append(i)
      soup, best = candidate, accuracy
  return soup, kept


def _ingredients(ctx, task, members, config):
  """(backbone, [(run record, params)]) of the finetune_best model's sweep."""
  from fusion import methods
  best = ensemble.fit_finetune_best(ctx, task, members, config, ctx.seed)
  backbone = ctx.backbone(best.members[0])
  key, unit = methods.run_unit(ctx, "finetune", task, [backbone])
  cache = predictions.Cache(ctx.config.get("predictions_dir") or None)
  runs = []
  for record in unit.fields["sweep"]:
    if "failed" in record:
      continue
    result = cache.load(record["key"])
    if result is None or "params_sha256" not in result.fields:
      raise ValueError(f"Soups need the weights of every fine-tuning run; run {record['key']} "
                       f"of {backbone.name} has none saved. Set finetune.save_params=True.")
    runs.append((record, finetune.load_params(cache, record["key"],
                                              result.fields["params_sha256"])))
  return backbone, runs, best


def _soup_result(ctx, task, backbone, params, fields, best) -> predictions.Result:
  images = {s: ctx.images(task, s, backbone.preprocess)
            for s in ("val200",) + experiment.test_splits(task)}
  logits = {s: finetune.predict(backbone, params, x, ctx.mesh, 256)
            for s, (x, _) in images.items()}
  return predictions.Result(
      predictions.Predictions(logits, {s: y for s, (_, y) in images.items()}),
      members=(backbone.name,), inference_gflops=best.inference_gflops,
      train_steps=best.train_steps, train_examples=best.train_examples, fields=fields)


def fit_uniform(ctx, task, members, config, seed) -> predictions.Result:
  del seed
  backbone, runs, best = _ingredients(ctx, task, members, config)
  soup = average_params([p for _, p in runs])
  return _soup_result(ctx, task, backbone, soup, {
      "ingredients": [[r["learning_rate"], r["steps"]] for r, _ in runs]}, best)


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  """The greedy soup."""
  del seed
  backbone, runs, best = _ingredients(ctx, task, members, config)
  x, y = ctx.images(task, "val200", backbone.preprocess)

  def val_score(params):
    logits = finetune.predict(backbone, params, x, ctx.mesh, 256)
    return metrics.accuracy(logits, y), metrics.nll(logits, y)

  soup, kept = greedy_soup([p for _, p in runs], val_score)
  return _soup_result(ctx, task, backbone, soup, {
      "ingredients": [[runs[i][0]["learning_rate"], runs[i][0]["steps"]] for i in kept],
      "candidates": len(runs)}, best)
