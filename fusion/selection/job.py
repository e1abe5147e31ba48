"""The `select` job: rank every hub model on every task by every configured
transferability estimator, and measure how well each ranking predicts transfer.

Per task: cached frozen features of `select.split` (train800val200) for every
hub model, one score per (estimator, model), the model taxonomy (pairwise RSA,
hierarchical clustering, plots/taxonomy_<task>.png). Against ground truth (the
linear probe computed here, or the rows of an earlier job's results.json) each
estimator gets weighted Kendall tau, Spearman and top-1 regret per task and
their means: tables in results.md, plots/selection.png. Every score goes to
rankings.json.

Estimator entries. `select.estimators` names columns; each is a registry name
(fusion.selection.ESTIMATORS) or a variant described in `select.options[name]`:
  {"estimator": "<registry name>", "reference": "labels" | "model", **options}.
`reference` (RSA, DDS, CKA only) picks what the features are compared with: the
one-hot labels on `select.split`, or the reference CNN (reference.py) on its
probe split (val200, examples the CNN has not seen; hub features of that split
are extracted for these entries). Other keys are the estimator's own keyword
options, checked against its signature.

LEEP and NCE score a source classifier head's predictions: the softmax of each
model's `source_head` (fusion.hub: an HF checkpoint's classifier, the offline
hub's pre-training head) on its cached features of `select.split`. Models
without a head are left out of those estimators' rankings, named in
rankings.json (`no_source_head`) and results.md; their ranking metrics are over
the models with a head (at least 2, else the estimator is not ranked on that
task).
"""
import dataclasses
import inspect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm

import fusion
from fusion import experiment
from fusion import hub
from fusion import io
from fusion import methods
from fusion import report
from fusion import selection
from fusion.selection import ranking
from fusion.selection import reference as reference_lib
from fusion.selection import rsa

# Bump when a task's rankings (scores, reference, taxonomy) change meaning: the
# cache of rank_task_cached is keyed by it.
RANKINGS_VERSION = 1
REFERENCE_ESTIMATORS = ("rsa", "dds", "cka")
REFERENCES = ("labels", "model")
# Options the job fills in itself; configs may not set them.
JOB_OPTIONS = ("reference_features", "source_probs", "source_labels", "num_classes")
GROUND_TRUTHS = ("linear_probe", "none")  # or a path to a results.json
METRIC_TITLES = {
    "weighted_tau": "weighted Kendall tau (higher is better)",
    "spearman": "Spearman correlation (higher is better)",
    "top1_regret": "top-1 regret, points of test accuracy (lower is better)",
}


def default_config() -> ml_collections.ConfigDict:
  """`config.select` of the select job (embedded by configs/demo.py and vtab1k.py)."""
  return ml_collections.ConfigDict({
      "estimators": ("knn", "logme", "rsa", "rsa_reference", "dds", "dds_reference",
                     "cka", "leep", "nce", "nleep", "hscore", "shrinkage_hscore",
                     "transrate", "gbc", "sfda", "parc"),
      "options": {
          "knn": {"k": 1, "metric": "cosine"},
          "rsa_reference": {"estimator": "rsa", "reference": "model"},
          "dds": {"normalisation": "zscore", "function": "laplacian"},
          "dds_reference": {"estimator": "dds", "reference": "model",
                            "normalisation": "zscore", "function": "laplacian"},
          "cka": {"kernel": "linear"},
          "parc": {"pca_dim": 32},
      },
      "split": "train800val200",
      # "linear_probe": computed in this job (config.linear_probe); "none": rankings only;
      # else the path of an earlier job's results.json.
      "ground_truth": "linear_probe",
      "ground_truth_method": "linear_probe",
      "models_per_call": 8,  # models stacked into one vmapped call (same feature dim)
      "reference": reference_lib.default_config(),
      "taxonomy": {"enabled": True, "method": "average", "max_examples": 500},
  })


# ------------------------------------------------------------------ entries


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str                 # column / method suffix, e.g. "rsa_reference"
  estimator: str            # registry name, e.g. "rsa"
  options: dict[str, Any]   # the estimator's keyword options
  reference: str            # "labels" or "model"
  skipped: str | None = None  # why the entry cannot run at all (no such entry today)


def _keyword_options(fn) -> set[str]:
  params = inspect.signature(fn).parameters.values()
  return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def entries(cfg) -> list[Entry]:
  """The configured estimator entries, validated (nothing runs before this)."""
  names = list(cfg.estimators)
  if not names:
    raise ValueError("select.estimators is empty; name at least one of "
                     f"{sorted(selection.ESTIMATORS)}.")
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"select.estimators lists {duplicates} more than once.")
  all_options = cfg.get("options") or {}
  result = []
  for name in names:
    raw = all_options.get(name) or {}
    options = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    base = options.pop("estimator", name)
    if base not in selection.ESTIMATORS:
      raise ValueError(
          f"select.estimators entry {name!r} is estimator {base!r}, which is unknown; "
          f"registered: {sorted(selection.ESTIMATORS)} (a variant names one with "
          f"select.options.{name}.estimator).")
    reference = options.pop("reference", "labels")
    if reference not in REFERENCES:
      raise ValueError(f"select.options.{name}.reference={reference!r} is not one of "
                       f"{REFERENCES}.")
    if reference != "labels" and base not in REFERENCE_ESTIMATORS:
      raise ValueError(f"select.options.{name}.reference={reference!r}: only "
                       f"{REFERENCE_ESTIMATORS} compare with a reference; {base!r} does not.")
    valid = _keyword_options(selection.ESTIMATORS[base]) - set(JOB_OPTIONS)
    unknown = sorted(set(options) - valid)
    if unknown:
      raise ValueError(f"select.options.{name} has unknown option(s) {unknown} for "
                       f"estimator {base!r}; valid: {sorted(valid)} (plus 'estimator' "
                       "and, for rsa/dds/cka, 'reference').")
    result.append(Entry(name, base, options, reference))
  return result


# ------------------------------------------------------------------ scoring


def _hub_features(ctx, task, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """{model: features [N, D]} and the labels all models share."""
  feats, labels = {}, None
  backbones = ctx.backbones
  for backbone in backbones:
    fs = ctx.features(backbone, task, split)
    if labels is None:
      labels = fs.labels
    elif not np.array_equal(fs.labels, labels):
      raise ValueError(f"task {task.name!r}, split {split!r}: the cached features of "
                       f"{backbone.name!r} list other labels (or another order) than those "
                       f"of {backbones[0].name!r}; clear the feature cache and re-extract.")
    feats[backbone.name] = fs.features
  return feats, labels


def source_probs(head, features: np.ndarray) -> np.ndarray:
  """[N, C] float64 softmax of a fusion.hub.SourceHead on features [N, D]."""
  logits = (np.asarray(features, np.float64) @ np.asarray(head.kernel, np.float64)
            + np.asarray(head.bias, np.float64))
  logits -= logits.max(axis=-1, keepdims=True)
  probs = np.exp(logits)
  return probs / probs.sum(axis=-1, keepdims=True)


def score_models(entry: Entry, feats: Mapping[str, np.ndarray], labels: np.ndarray, *,
                 num_classes: int, reference: np.ndarray | None = None,
                 probs: Mapping[str, np.ndarray] | None = None,
                 models_per_call: int = 8) -> dict[str, float]:
  """{model: score} of one estimator entry. Models with the same feature
  dimension (and, with `probs` {model: source_probs [N, C]}, the same source
  class count C) are stacked, `models_per_call` at a time, into one vmapped call."""
  batched = selection.BATCHED[entry.estimator]
  extra = dict(entry.options, num_classes=num_classes)
  if entry.reference == "model":
    extra["reference_features"] = reference
  groups: dict[tuple[int, ...], list[str]] = {}
  for model, f in feats.items():
    key = (np.shape(f)[-1],) + (() if probs is None else (np.shape(probs[model])[-1],))
    groups.setdefault(key, []).append(model)
  scores = {}
  for models in groups.values():
    for start in range(0, len(models), models_per_call):
      chunk = models[start:start + models_per_call]
      if probs is not None:
        extra["source_probs"] = np.stack([probs[m] for m in chunk])
      try:
        values = batched(np.stack([feats[m] for m in chunk]), labels, **extra)
      except ValueError as e:
        raise ValueError(f"estimator {entry.name!r} on models {chunk} (model i of the "
                         f"message is {chunk}[i]): {e}") from e
      scores.update(zip(chunk, map(float, values)))
  return {m: scores[m] for m in feats}


def _taxonomy(feats: Mapping[str, np.ndarray], cfg) -> dict[str, Any]:
  """Pairwise RSA of all models on at most max_examples evenly spaced examples."""
  n = len(next(iter(feats.values())))
  count = min(n, int(cfg.max_examples))
  index = np.linspace(0, n - 1, count).round().astype(int)
  similarity = rsa.rsa_similarity_matrix([f[index] for f in feats.values()])
  linkage = rsa.cluster_models(similarity, cfg.method)
  return {"models": list(feats), "num_examples": count, "similarity": similarity.tolist(),
          "linkage": linkage.tolist(), "method": cfg.method}


def rank_task(ctx, task, entry_list: Sequence[Entry], workdir: str) -> dict[str, Any]:
  """Scores, rankings, reference and taxonomy of one task (rankings.json's part)."""
  cfg = ctx.config.select
  active = [e for e in entry_list if not e.skipped]
  feats, labels = _hub_features(ctx, task, cfg.split)
  out: dict[str, Any] = {"category": task.category, "split": cfg.split,
                         "num_examples": int(len(labels)), "scores": {}, "rankings": {}}
  heads = {b.name: b.source_head for b in ctx.backbones}
  no_head = [m for m in feats if heads[m] is None]
  probs = None  # {model: source_probs}, computed once for every head estimator
  needs_reference = [e for e in active if e.reference == "model"]
  probe = None
  if needs_reference:
    ref = reference_lib.train_reference(task, cfg.reference, seed=ctx.seed, workdir=workdir)
    probe_feats, probe_labels = _hub_features(ctx, task, cfg.reference.probe_split)
    if not np.array_equal(probe_labels, ref.labels):
      raise ValueError(f"task {task.name!r}: the reference CNN's {cfg.reference.probe_split} "
                       "labels differ from those of the cached hub features; clear the "
                       "feature cache and re-extract.")
    probe = (probe_feats, probe_labels, ref.features)
    out["reference"] = {"split": cfg.reference.probe_split,
                        "num_examples": int(len(probe_labels)),
                        "probe_accuracy": ref.probe_accuracy}
  for entry in tqdm.tqdm(active, desc=f"select {task.name}", unit="estimator", leave=False):
    if entry.reference == "model":
      f, y, r = probe
    else:
      f, y, r = feats, labels, None
    entry_probs = None
    if entry.estimator in selection.REQUIRED_OPTIONS:  # LEEP, NCE: models with a head
      if no_head:
        out.setdefault("no_source_head", {})[entry.name] = no_head
      if probs is None:
        probs = {m: source_probs(heads[m], feats[m]) for m in feats if heads[m] is not None}
      if len(probs) < 2:
        continue  # Nothing to rank; the note says so.
      f, entry_probs = {m: f[m] for m in probs}, probs
    try:
      scores = score_models(entry, f, y, num_classes=task.num_classes, reference=r,
                            probs=entry_probs, models_per_call=int(cfg.models_per_call))
    except ValueError as e:
      raise ValueError(f"task {task.name!r}: {e}") from e
    failed = sorted(m for m, v in scores.items() if not math.isfinite(v))
    if failed:  # A numerical failure of one estimator must not sink the whole job.
      logging.warning("task %r: estimator %r scored %s as NaN/inf; it is left out of this "
                      "task's evaluation.", task.name, entry.name, failed)
      out.setdefault("failed", {})[entry.name] = failed
      continue
    out["scores"][entry.name] = scores
    # Ties go to the model whose name sorts first, as in ranking.top1_regret
    # (evaluation_table lists models sorted): the pick and its regret agree.
    out["rankings"][entry.name] = sorted(scores, key=lambda m: (-scores[m], m))
  if cfg.taxonomy.enabled:
    out["taxonomy"] = _taxonomy(feats, cfg.taxonomy)
  return out


def _head_fingerprint(backbone) -> str | None:
  head = backbone.source_head
  return None if head is None else hub.tree_fingerprint(
      {"kernel": head.kernel, "bias": head.bias})


def _cache_entry(ctx, task) -> tuple[str, dict[str, Any], str]:
  """(key, inputs, path) of a task's rankings in the cache under $FUSION_HOME."""
  cfg = ctx.config.select
  inputs = {"version": RANKINGS_VERSION, "task": task.fingerprint, "seed": ctx.seed,
            "models": [[b.name, hub.params_fingerprint(b), _head_fingerprint(b)]
                       for b in ctx.backbones],
            "select": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
            "batch_size": ctx.config.get("batch_size")}
  key = io.sha256_json(inputs)[:32]
  return key, inputs, os.path.join(fusion.fusion_home(), "rankings", key + ".json")


def cached_rankings(ctx, task) -> dict[str, Any] | None:
  """The task's cached `rank_task` output; None when missing or unreadable."""
  key, _, path = _cache_entry(ctx, task)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
    return stored["result"] if stored.get("key") == key else None
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("Recomputing the unreadable rankings cache entry %s: %s", path, e)
    return None


def rank_task_cached(ctx, task, entry_list: Sequence[Entry], workdir: str) -> dict[str, Any]:
  """`rank_task`, computed once per (task, hub, select config, seed) under $FUSION_HOME."""
  cfg = ctx.config.select
  out = cached_rankings(ctx, task)
  if out is None:
    out = rank_task(ctx, task, entry_list, workdir)
    key, inputs, path = _cache_entry(ctx, task)
    io.write_json(path, {"key": key, "inputs": inputs, "result": out})
  if "taxonomy" in out:
    rsa.plot_dendrogram(out["taxonomy"]["similarity"], out["taxonomy"]["models"],
                        os.path.join(workdir, "plots", f"taxonomy_{task.name}.png"),
                        method=cfg.taxonomy.method,
                        title=f"Model taxonomy on {task.name} (RSA, {cfg.split})")
  return out


# ------------------------------------------------------------------ ground truth


def _check_ground_truth(cfg) -> None:
  gt = cfg.ground_truth
  if gt in GROUND_TRUTHS:
    return
  if not isinstance(gt, str) or not gt:
    raise ValueError(f"select.ground_truth={gt!r} must be one of {GROUND_TRUTHS} or the "
                     "path of an earlier job's results.json.")
  if not os.path.isfile(gt):
    raise ValueError(f"select.ground_truth={gt!r} is neither one of {GROUND_TRUTHS} nor an "
                     "existing file; pass the results.json of a linear_probe (or "
                     "fine-tuning) job.")


def _rows_from_file(path: str, method: str) -> list[dict]:
  try:
    with open(path) as f:
      rows = json.load(f)["rows"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"select.ground_truth={path!r} is not a results.json with 'rows' "
                     f"({type(e).__name__}: {e}).") from e
  chosen = [r for r in rows if r.get("method") == method]
  if not chosen:
    methods = sorted({str(r.get("method")) for r in rows})
    raise ValueError(f"{path} has no rows of select.ground_truth_method={method!r}; its "
                     f"methods: {methods}.")
  return chosen


def _ground_truth_index(rows: Sequence[Mapping[str, Any]], tasks, models: Sequence[str],
                        source: str) -> dict[tuple[str, str], Mapping[str, Any]]:
  index = {}
  for row in rows:
    if "model" in row:
      index[(row["task"], row["model"])] = row
  missing = [(t.name, m) for t in tasks for m in models if (t.name, m) not in index]
  if missing:
    raise ValueError(f"the ground truth ({source}) has no test accuracy for (task, model) "
                     f"{missing}; it must cover every hub model on every task.")
  return index


def evaluation_table(per_task: Mapping[str, Any],
                     accuracies: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
  """ranking.ranking_table of rank_task's results, each (task, estimator)
  against the models it scored (LEEP / NCE: those with a source head)."""
  rows = []
  for task, v in per_task.items():
    for name, scores in v["scores"].items():
      truth = {task: {m: accuracies[task][m] for m in scores}}
      rows.extend(ranking.ranking_table({task: {name: scores}}, truth)["rows"])
  metrics = list(ranking.METRICS)
  estimators = list(dict.fromkeys(r["estimator"] for r in rows))
  mean = []
  for name in estimators:
    mine = [r for r in rows if r["estimator"] == name]
    mean.append({"estimator": name, "num_tasks": len(mine),
                 **{m: float(np.mean([r[m] for r in mine])) for m in metrics}})
  return {"metrics": metrics, "tasks": list(per_task), "estimators": estimators,
          "rows": rows, "mean": mean}


# ------------------------------------------------------------------ report


def _order(table: Mapping[str, Any]) -> list[str]:
  """Estimators by mean weighted tau (best first), else as configured."""
  mean = {m["estimator"]: m for m in table["mean"]}
  key = "weighted_tau" if "weighted_tau" in table["metrics"] else table["metrics"][0]
  sign = 1 if key == "top1_regret" else -1
  return sorted(table["estimators"], key=lambda e: sign * mean[e][key])


def metric_table(table: Mapping[str, Any], metric: str) -> str:
  """Markdown: estimators x tasks (+ mean) of one metric, best per column bold."""
  tasks, order = table["tasks"], _order(table)
  cell = {(r["estimator"], r["task"]): r[metric] for r in table["rows"]}
  cell.update({(m["estimator"], "mean"): m[metric] for m in table["mean"]})
  pick = min if metric == "top1_regret" else max
  fmt = "{:.1f}" if metric == "top1_regret" else "{:.3f}"
  lines = ["| estimator | " + " | ".join(tasks) + " | **mean** |",
           "|---|" + "---:|" * (len(tasks) + 1)]
  for estimator in order:
    values = []
    for column in [*tasks, "mean"]:
      v = cell.get((estimator, column))
      column_values = [cell[(e, column)] for e in order if (e, column) in cell]
      text = "–" if v is None or math.isnan(v) else fmt.format(v)
      bold = v is not None and not math.isnan(v) and v == pick(column_values)
      values.append(f"**{text}**" if bold else text)
    lines.append(f"| {estimator} | " + " | ".join(values) + " |")
  return "\n".join(lines) + "\n"


def picks_table(per_task: Mapping[str, Any], estimator_names: Sequence[str],
                accuracies: Mapping[str, Mapping[str, float]] | None) -> str:
  """Markdown: each estimator's top-1 model per task (with its test accuracy)."""
  tasks = list(per_task)
  lines = ["| estimator | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]

  def cell(task, model):
    if accuracies is None:
      return model
    return f"{model} ({100 * accuracies[task][model]:.1f})"

  if accuracies is not None:
    best = [max(accuracies[t], key=accuracies[t].get) for t in tasks]
    lines.append("| *oracle* | " + " | ".join(cell(t, m) for t, m in zip(tasks, best)) + " |")
  for name in estimator_names:
    picks = [cell(t, per_task[t]["rankings"][name][0]) if name in per_task[t]["rankings"]
             else "–" for t in tasks]
    lines.append(f"| {name} | " + " | ".join(picks) + " |")
  return "\n".join(lines) + "\n"


def plot_selection(table: Mapping[str, Any], path: str) -> str:
  """Heatmaps estimators x (tasks + mean), one panel per ranking metric."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  order, columns = _order(table), [*table["tasks"], "mean"]
  cell = {(r["estimator"], r["task"]): r for r in table["rows"]}
  cell.update({(m["estimator"], "mean"): m for m in table["mean"]})
  metrics = table["metrics"]
  # One panel per metric, stacked: 19 tasks side by side three times would not read.
  panel = 1.0 + 0.35 * len(order) + report.label_room(columns)
  fig = Figure(figsize=(2.5 + 0.6 * len(columns) + report.label_room(order),
                        len(metrics) * panel))
  FigureCanvasAgg(fig)
  for i, metric in enumerate(metrics):
    ax = fig.add_subplot(len(metrics), 1, i + 1)
    grid = np.array([[cell[(e, c)][metric] if (e, c) in cell else np.nan for c in columns]
                     for e in order], np.float64)
    if metric == "top1_regret":
      image = ax.imshow(grid, cmap="viridis_r", aspect="auto", vmin=0)
    else:
      image = ax.imshow(grid, cmap="RdYlGn", aspect="auto", vmin=-1, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(order)), order)
    for (r, c), v in np.ndenumerate(grid):
      if not np.isnan(v):
        ax.text(c, r, f"{v:.1f}" if metric == "top1_regret" else f"{v:.2f}",
                ha="center", va="center", fontsize=7, color=report.text_color(image, v))
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(METRIC_TITLES[metric].split(" (")[0], fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def _notes(entry_list, per_task, source: str, split: str) -> str:
  lines = [f"- Scores from frozen features of `{split}`; ground truth: {source}."]
  for e in entry_list:
    if e.skipped:
      lines.append(f"- `{e.name}` ({e.estimator}): {e.skipped}.")
  for task, v in per_task.items():
    for name, models in v.get("failed", {}).items():
      lines.append(f"- `{name}` on {task}: NaN/inf scores for {models}; left out (–) of "
                   "that task.")
    for name, models in v.get("no_source_head", {}).items():
      if name in v["scores"]:
        ranked = f"; ranked among the {len(v['scores'][name])} models with one"
      elif name not in v.get("failed", {}):
        ranked = "; not ranked (fewer than 2 models have one)"
      else:
        ranked = ""
      lines.append(f"- `{name}` on {task}: no source head for {models}{ranked}.")
  accuracy = {t: v["reference"]["probe_accuracy"] for t, v in per_task.items()
              if "reference" in v}
  if accuracy:
    listed = ", ".join(f"{t} {100 * a:.1f}%" for t, a in accuracy.items())
    lines.append(f"- `*_reference` entries compare with a small CNN trained on train800 "
                 f"(fusion/selection/reference.py), on val200; its val200 accuracy: {listed}.")
  if any("taxonomy" in v for v in per_task.values()):
    lines.append("- Model taxonomy (pairwise RSA, hierarchical clustering): "
                 + ", ".join(f"plots/taxonomy_{t}.png" for t, v in per_task.items()
                             if "taxonomy" in v) + ".")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ job


def check_config(config) -> None:
  """Clear errors for a select config that cannot run, before any work."""
  if config.get("select") is None:
    raise ValueError("config.select is missing; embed fusion.selection.job.default_config().")
  cfg = config.select
  entries(cfg)
  _check_ground_truth(cfg)
  if cfg.ground_truth == "linear_probe" and config.get("linear_probe") is None:
    raise ValueError("select.ground_truth='linear_probe' trains linear probes here and needs "
                     "config.linear_probe (fusion.config_lib.probe_config()); or pass the "
                     "results.json of an earlier linear_probe job.")
  if int(cfg.models_per_call) < 1:
    raise ValueError(f"select.models_per_call={cfg.models_per_call!r} must be >= 1.")
  for task in experiment.load_tasks(config.tasks):
    if cfg.split not in task.splits:
      raise ValueError(f"select.split={cfg.split!r} is not a split of task {task.name!r}; "
                       f"valid: {sorted(task.splits)}.")


def evaluate(ctx, task_list, gt_rows, workdir: str, source: str
             ) -> tuple[list[dict], list[tuple[str, str]]]:
  """Ranks the hub on every task; scores the rankings against `gt_rows` (or None).

  Writes rankings.json and plots/ under `workdir`; returns the select/<estimator>
  rows (each estimator's pick with its ground-truth metrics) and the results.md
  sections.
  """
  cfg = ctx.config.select
  entry_list = entries(cfg)
  if len(ctx.backbones) < 2:
    raise ValueError(f"the select job ranks models and needs at least 2 in the hub; got "
                     f"{ctx.model_names}.")
  models = ctx.model_names
  per_task = {task.name: rank_task_cached(ctx, task, entry_list, workdir)
              for task in task_list}

  rows: list[dict] = []
  active = [e.name for e in entry_list if not e.skipped]
  sections = []
  table = accuracies = None
  if gt_rows is not None:
    index = _ground_truth_index(gt_rows, task_list, models, source)
    accuracies = {t.name: {m: float(index[(t.name, m)]["test_accuracy"]) for m in models}
                  for t in task_list}
    table = evaluation_table(per_task, accuracies)
    for r in table["rows"]:
      scores = per_task[r["task"]]["scores"][r["estimator"]]
      top = per_task[r["task"]]["rankings"][r["estimator"]][0]
      truth = index[(r["task"], top)]
      rows.append({"task": r["task"], "category": per_task[r["task"]]["category"],
                   "method": f"select/{r['estimator']}", "model": top,
                   **{k: truth[k] for k in ("test_accuracy", "test_nll", "test_ece",
                                            "inference_gflops")},
                   "weighted_tau": r["weighted_tau"], "spearman": r["spearman"],
                   "regret": r["top1_regret"], "scores": scores})
    for metric in table["metrics"]:
      sections.append((f"Model selection: {METRIC_TITLES[metric]}", metric_table(table, metric)))
    plot_selection(table, os.path.join(workdir, "plots", "selection.png"))
  sections.append(("Model selection: top-1 pick per estimator" +
                   (" (its test accuracy, %)" if accuracies else ""),
                   picks_table(per_task, active, accuracies)))
  sections.append(("Model selection: notes", _notes(entry_list, per_task, source, cfg.split)))

  rankings = {
      "split": cfg.split, "ground_truth": source, "models": models,
      "estimators": {e.name: {"estimator": e.estimator, "options": e.options,
                              "reference": e.reference, "skipped": e.skipped}
                     for e in entry_list},
      "tasks": per_task, "evaluation": table,
  }
  io.write_json(os.path.join(workdir, "rankings.json"), rankings)
  logging.info("select: ranked %d models on %d tasks with %d estimators", len(models),
               len(task_list), len(active))
  return rows, sections


def run(config, workdir: str) -> str:
  """The select job; writes rankings.json, results.json, results.md and plots/."""
  check_config(config)
  cfg = config.select
  task_list = experiment.load_tasks(config.tasks, config.get("data_dir"))
  gt_rows, source = None, "none (rankings only)"
  if cfg.ground_truth not in GROUND_TRUTHS:  # read it before the expensive part
    gt_rows = _rows_from_file(cfg.ground_truth, cfg.ground_truth_method)
    source = f"`{cfg.ground_truth_method}` rows of {cfg.ground_truth}"
  ctx = experiment.Context.create(config, workdir)
  rows: list[dict] = []
  if cfg.ground_truth == "linear_probe":
    for task in task_list:
      for backbone in ctx.backbones:
        key, result = methods.run_unit(ctx, "linear_probe", task, [backbone])
        rows.append({**report.row(task, "linear_probe", result, unit=key),
                     **experiment.preprocess_fields([backbone])})
    gt_rows = list(rows)
    report.plot_heatmap(gt_rows, os.path.join(workdir, "plots", "linear_probe.png"),
                        method="linear_probe", title="Linear probe test accuracy (%)")
    source = "linear probes trained in this job"
  select_rows, sections = evaluate(ctx, task_list, gt_rows, workdir, source)
  # Each select/<estimator> row is the estimator's pick; the picks table shows them.
  return report.write_results(workdir, rows + select_rows, sections,
                              table_methods=("linear_probe",))
