"""Baselines over the whole hub for gated fusion, all on cached features.

- `best_probe`: the single linear probe with the best val200 accuracy (ties:
  lower val200 NLL, then hub order); its Predictions as they are.
- `uniform_probe_avg`: the uniform average of every probe's probabilities;
  its row also carries `probe_study` (each probe's test accuracy and the
  pairwise test agreement of their predictions), the empirical study of
  Resheff et al. (ICPRAM 2019) that `report.plot_agreement` draws.
- `concat`: one linear probe on every model's features concatenated
  (standardising per dimension, so the same as concatenating standardised
  features), with linear_probe's learning-rate sweep.

The per-model probes are the `linear_probe` units of `config.probe` (the job's
linear-probe settings in configs/demo.py), computed once and cached, so the
suite's linear_probe rows and these baselines share them.
"""
import ml_collections
import numpy as np

from fusion import config_lib
from fusion import experiment
from fusion import features as features_lib
from fusion import hub
from fusion import metrics
from fusion import predictions
from fusion.methods import linear_probe

MEMBERS = "hub"


def probes_config(probe=None) -> ml_collections.ConfigDict:
  """`probe`: the linear_probe config whose units are reused."""
  return ml_collections.ConfigDict({"probe": probe or config_lib.probe_config()})


def concat_config() -> ml_collections.ConfigDict:
  return config_lib.probe_config(learning_rates=(1e-3, 1e-2, 1e-1), steps=300)


def _probes(ctx, task, members, config, seed) -> dict[str, predictions.Result]:
  from fusion import methods  # The registry imports this module.
  return {b.name: methods.run_unit(ctx, "linear_probe", task, [b], config.probe, seed)[1]
          for b in members}


def _cost(results) -> dict[str, float]:
  """Training cost of the probes a baseline needs, summed."""
  return {"train_steps": sum(r.train_steps for r in results),
          "train_examples": sum(r.train_examples for r in results),
          "train_seconds": round(sum(r.train_seconds for r in results), 3)}


def best_probe(ctx, task, members, config, seed) -> predictions.Result:
  probes = _probes(ctx, task, members, config, seed)
  scores = {}
  for name, r in probes.items():
    p = r.predictions
    scores[name] = metrics.classification_metrics(p.logits["val200"], p.labels["val200"], "")
  order = list(probes)
  chosen = min(order, key=lambda n: (-scores[n]["accuracy"], scores[n]["nll"], order.index(n)))
  result = probes[chosen]
  return predictions.Result(
      result.predictions, members=(chosen,), inference_gflops=result.inference_gflops,
      **_cost(probes.values()),
      fields={"chosen_model": chosen,
              "probe_val_accuracy": {n: s["accuracy"] for n, s in scores.items()}})


def probe_study(probes: dict[str, predictions.Result]) -> dict:
  """Each probe's test accuracy and the pairwise agreement of their test predictions."""
  names = list(probes)
  logits = [probes[n].predictions.logits["test"] for n in names]
  labels = probes[names[0]].predictions.labels["test"]
  return {"models": names,
          "test_accuracy": [metrics.accuracy(z, labels) for z in logits],
          "test_agreement": [[1.0 - metrics.disagreement(a, b) for b in logits]
                             for a in logits]}


def uniform_probe_avg(ctx, task, members, config, seed) -> predictions.Result:
  probes = _probes(ctx, task, members, config, seed)
  first = next(iter(probes.values())).predictions
  logits = {}
  for split in first.splits:
    for r in probes.values():
      if not np.array_equal(r.predictions.labels[split], first.labels[split]):
        raise ValueError(f"{task.name}/{split}: the probes disagree on the labels.")
    probs = np.mean([metrics.softmax(r.predictions.logits[split]) for r in probes.values()], 0)
    logits[split] = np.log(np.maximum(probs, 1e-30))
  preds = predictions.Predictions(logits, {s: first.labels[s] for s in logits})
  return predictions.Result(
      preds, members=tuple(probes),
      inference_gflops=sum(r.inference_gflops for r in probes.values()),
      **_cost(probes.values()), fields={"probe_study": probe_study(probes)})


def concat(ctx, task, members, config, seed) -> predictions.Result:
  splits = {}
  for s in ("train800", "val200", "train800val200") + experiment.test_splits(task):
    sets = [ctx.features(b, task, s) for b in members]
    if not all(np.array_equal(sets[0].labels, fs.labels) for fs in sets):
      raise ValueError(f"{task.name}/{s}: the models' cached features disagree on the labels.")
    splits[s] = features_lib.FeatureSet(
        np.concatenate([fs.features for fs in sets], 1), sets[0].labels,
        "+".join(fs.fingerprint for fs in sets))
  preds, fields = linear_probe.probe(splits, task.num_classes, config, mesh=ctx.mesh,
                                     seed=seed, workdir=ctx.workdir,
                                     run_name=f"concat/{task.name}")
  dim = sum(b.feature_dim for b in members)
  return predictions.Result(
      preds, members=tuple(b.name for b in members),
      inference_gflops=sum(hub.inference_gflops(b) for b in members) +
      linear_probe.head_gflops(dim, task.num_classes),
      train_steps=fields.pop("train_steps"), train_examples=fields.pop("train_examples"),
      fields={**fields, "feature_dim": dim})
