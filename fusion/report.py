"""results.json, results.md tables and plots under a job's workdir.

Every method reports through the same rows: one dict per (task, method, model
or combination) with `task`, `category`, `method`, `model` (or `members`),
`test_accuracy` (a fraction), `test_nll`, `test_ece`, `inference_gflops`,
plus method-specific fields.
"""
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusion import io
from fusion import metrics
from fusion import provenance

REQUIRED_FIELDS = ("task", "category", "method", "test_accuracy", "test_nll",
                   "test_ece", "inference_gflops")
CATEGORY_ORDER = ("natural", "specialized", "structured")


# Wall-clock fields: they differ between two otherwise identical runs.
WALL_TIME_FIELDS = ("train_seconds",)
# Top-level keys of results.json that describe the run itself (date, run id):
# they differ between two otherwise identical runs.
RUN_KEYS = ("provenance",)

# Accuracy intervals: percentile bootstrap over the test examples.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def comparable(results: Mapping[str, Any]) -> dict[str, Any]:
  """results.json without what differs between two runs of the same config and
  seed (RUN_KEYS, and WALL_TIME_FIELDS in rows): two such runs give equal dicts."""
  out = {k: v for k, v in results.items() if k not in RUN_KEYS}
  out["rows"] = [{k: v for k, v in r.items() if k not in WALL_TIME_FIELDS}
                 for r in results.get("rows", ())]
  return out


def bootstrap_accuracy_interval(logits: np.ndarray, labels: np.ndarray,
                                resamples: int = BOOTSTRAP_RESAMPLES,
                                seed: int = BOOTSTRAP_SEED,
                                confidence: float = CONFIDENCE) -> list[float]:
  """[lo, hi]: the percentile bootstrap interval of top-1 accuracy over examples.

  Resampling the n examples with replacement and counting the correct ones is
  a Binomial(n, k/n) draw (k correct; each draw is correct with probability
  k/n, independently of the others), so the counts are drawn directly: the
  same distribution as resampling indices, at O(resamples) cost instead of
  O(resamples * n) (VTAB's dSprites test split has 73,728 examples). A fixed
  seed: the same predictions give the same interval.
  """
  if resamples < 1 or not 0 < confidence < 1:
    raise ValueError(f"resamples={resamples} must be >= 1 and confidence={confidence} "
                     "in (0, 1).")
  n = len(labels)
  if n == 0:
    raise ValueError("No examples: the bootstrap needs at least one.")
  k = round(metrics.accuracy(logits, labels) * n)  # Checks shapes and labels too.
  counts = np.random.default_rng(seed).binomial(n, k / n, size=resamples)
  tail = 100 * (1 - confidence) / 2
  lo, hi = np.percentile(counts / n, [tail, 100 - tail])
  return [float(lo), float(hi)]


def row(task, method: str, result, unit: str | None = None) -> dict[str, Any]:
  """The results row of one method's Result on one task.

  Test accuracy, NLL and ECE (and val200's, and those of any further split
  such as `test_shift`, keyed `shift_*`) come from the Result's logits
  through `fusion.metrics`; no method builds rows by hand. Test splits'
  accuracies also get their bootstrap interval, `<prefix>accuracy_ci` = [lo, hi].
  """
  p = result.predictions
  members = list(result.members)
  out: dict[str, Any] = {"task": task.name, "category": task.category, "method": method}
  if len(members) == 1:
    out["model"] = members[0]
  else:
    out["members"] = members
  for split in p.splits:
    prefix = {"val200": "val_", "test": "test_"}.get(split, split.removeprefix("test_") + "_")
    out.update(metrics.classification_metrics(p.logits[split], p.labels[split], prefix))
    if split != "val200":
      out[f"{prefix}accuracy_ci"] = bootstrap_accuracy_interval(p.logits[split],
                                                                p.labels[split])
  out.update(inference_gflops=float(result.inference_gflops),
             train_steps=int(result.train_steps),
             train_examples=int(result.train_examples),
             train_seconds=float(result.train_seconds))
  if unit is not None:
    out["unit"] = unit
  clashes = sorted(set(result.fields) & set(out))
  if clashes:
    raise ValueError(f"Method {method!r} returned fields {clashes} that the report computes "
                     "itself; rename them.")
  out.update(result.fields)
  return out


def column_name(row: Mapping[str, Any]) -> str:
  if "model" in row:
    return str(row["model"])
  if "members" in row:
    return "+".join(row["members"])
  raise ValueError(f"Result row has neither 'model' nor 'members': {dict(row)}")


def check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
  for row in rows:
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
      raise ValueError(f"Result row {dict(row)} lacks fields {missing}.")
    column_name(row)


def _sort_tasks(tasks: Mapping[str, str]) -> list[str]:
  """Task names ordered by category (VTAB order), then by first appearance."""
  rank = {c: i for i, c in enumerate(CATEGORY_ORDER)}
  order = list(tasks)
  return sorted(order, key=lambda t: (rank.get(tasks[t], len(rank)), order.index(t)))


def _percent(v: float | None, ci: Sequence[float] | None = None, bold: bool = False) -> str:
  """`34.1 ±2.1` (percent; ± half the interval's width), bold number for the best."""
  if v is None or math.isnan(v):
    return "–"
  text = f"{100 * v:.1f}"
  text = f"**{text}**" if bold else text
  if ci is not None:
    text += f" ±{50 * (float(ci[1]) - float(ci[0])):.1f}"
  return text


def accuracy_table(rows: Sequence[Mapping[str, Any]], method: str | None = None,
                   value: str = "test_accuracy") -> str:
  """Markdown table, tasks x models, in percent, with category means.

  Rows without `value` are left out. A cell shows `value` ± half the width of
  the row's `<value>_ci` interval when it has one. The best column per task is
  bold. Category means are over the tasks of a category; 'mean' is over all
  tasks, each counting once (VTAB's score); 'mean of the category means'
  weighs the categories equally (as many later VTAB-1k papers report). A mean
  is shown only for a column with every task it averages.
  """
  rows = [r for r in rows if (method is None or r["method"] == method) and value in r]
  if not rows:
    return "(no results)\n"
  categories = {r["task"]: r["category"] for r in rows}
  tasks = _sort_tasks(categories)
  columns = list(dict.fromkeys(column_name(r) for r in rows))
  cell = {(r["task"], column_name(r)): float(r[value]) for r in rows}
  interval = {(r["task"], column_name(r)): r.get(f"{value}_ci") for r in rows}

  lines = ["| task | category | " + " | ".join(columns) + " |",
           "|---|---|" + "---:|" * len(columns)]
  for t in tasks:
    values = [cell.get((t, c)) for c in columns]
    best = max(v for v in values if v is not None)
    lines.append(f"| {t} | {categories[t]} | " + " | ".join(
        _percent(v, interval.get((t, c)), v == best) for v, c in zip(values, columns)) + " |")

  def mean(column: str, members: Sequence[str]) -> float | None:
    vals = [cell[(t, column)] for t in members if (t, column) in cell]
    return float(np.mean(vals)) if members and len(vals) == len(members) else None

  groups = [(c, [t for t in tasks if categories[t] == c])
            for c in dict.fromkeys(categories[t] for t in tasks)]
  means = {c: [mean(c, members) for _, members in groups] for c in columns}
  for i, (name, _) in enumerate(groups):
    lines.append(f"| *{name} mean* | | " +
                 " | ".join(_percent(means[c][i]) for c in columns) + " |")
  if len(groups) > 1 or len(tasks) > 1:
    lines.append("| **mean** | | " + " | ".join(_percent(mean(c, tasks)) for c in columns) +
                 " |")
  if len(groups) > 1:
    of_means = [None if None in means[c] else float(np.mean(means[c])) for c in columns]
    lines.append("| *mean of the category means* | | " +
                 " | ".join(_percent(v) for v in of_means) + " |")
  return "\n".join(lines) + "\n"


def _val_key(row: Mapping[str, Any]) -> tuple[float, float]:
  return (-float(row.get("val_accuracy", -np.inf)), float(row.get("val_nll", np.inf)))


def pick_per_method(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One row per (task, method): of a method with a row per model, the row with
  the best val200 accuracy (ties: lower val200 NLL), chosen without test data."""
  best: dict[tuple[str, str], Mapping[str, Any]] = {}
  for r in rows:
    key = (r["task"], r["method"])
    if key not in best or _val_key(r) < _val_key(best[key]):
      best[key] = r
  return [dict(r) for r in best.values()]


def _per_method(picked: Sequence[Mapping[str, Any]], columns: Sequence[str], key: str,
                tasks: set[str] | None = None) -> list[float]:
  """Each method's mean of `key` over its picked rows (of `tasks`, when given)."""
  return [float(np.mean([float(r[key]) for r in picked if r["method"] == m
                         and (tasks is None or r["task"] in tasks)])) for m in columns]


def _picked(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict]:
  picked = [r for r in pick_per_method(rows) if r["method"] in methods]
  picked.sort(key=lambda r: list(methods).index(r["method"]))
  return picked


def common_tasks(picked: Sequence[Mapping[str, Any]]) -> list[str]:
  """The tasks on which every method of `picked` has a row, in table order."""
  methods = list(dict.fromkeys(r["method"] for r in picked))
  ran = [{r["task"] for r in picked if r["method"] == m} for m in methods]
  common = set.intersection(*ran) if ran else set()
  return [t for t in _sort_tasks({r["task"]: r["category"] for r in picked}) if t in common]


def methods_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
                  value: str = "test_accuracy") -> str:
  """Markdown: tasks x methods accuracy (%, `value`) with intervals and category
  means; for test accuracy, then each method's mean inference GFLOPs per image
  and training compute per task and, for ensembles, their members.

  Methods with a row per model show the row with the best val200 accuracy
  (`pick_per_method`), its cost included.
  """
  picked = [r for r in _picked(rows, methods) if value in r]
  if not picked:
    return "(no results)\n"
  table = accuracy_table([{**r, "model": r["method"]} for r in picked], value=value)
  columns = list(dict.fromkeys(r["method"] for r in picked))
  common = common_tasks(picked)
  if common and len(common) < len({r["task"] for r in picked}):
    means = _per_method(picked, columns, value, set(common))
    table += (f"| *mean of the {len(common)} tasks every method ran* | | " +
              " | ".join(_percent(v) for v in means) + " |\n")
  if value != "test_accuracy":
    return table
  costs = (("GFLOPs / image", "inference_gflops", "{:.4g}"),
           ("optimizer steps / task", "train_steps", "{:,.0f}"),
           ("examples seen / task", "train_examples", "{:,.0f}"))
  for label, key, fmt in costs:
    if all(key in r for r in picked):
      table += (f"| *{label}* | | " +
                " | ".join(fmt.format(v) for v in _per_method(picked, columns, key)) + " |\n")
  # Ensembles that chose their members (a part of the hub, or repeats); not the
  # methods that use every hub model.
  hub_size = {t: max(len(set(r.get("members", ()))) for r in picked if r["task"] == t)
              for t in {r["task"] for r in picked}}
  ensembles = [r for r in picked if "members" in r and (
      len(set(r["members"])) < hub_size[r["task"]] or
      len(set(r["members"])) < len(r["members"]))]
  if ensembles:
    table += "\n| task | method | members (with repeats) |\n|---|---|---|\n"
    for r in ensembles:
      counts = {m: r["members"].count(m) for m in dict.fromkeys(r["members"])}
      listed = ", ".join(f"{m} x{c}" if c > 1 else m for m, c in counts.items())
      table += f"| {r['task']} | {r['method']} | {listed} |\n"
  return table


def interval_note(key: str) -> str:
  return ("`a ±h`: accuracy a (%) and h, half the width of its 95% percentile-bootstrap "
          f"interval over the test examples ({BOOTSTRAP_RESAMPLES:,} resamples, seed "
          f"{BOOTSTRAP_SEED}; results.json holds the interval [lo, hi] as `{key}`)")


def methods_sections(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]
                     ) -> list[tuple[str, str]]:
  """results.md sections of the suite: every method's test accuracy with its
  cost, then, where tasks have a shifted test split, the shift accuracy."""
  sections = [("All methods: test accuracy (%)",
               f"Test top-1 accuracy; {interval_note('test_accuracy_ci')}. Methods with "
               "a row per model show the model with the best val200 accuracy; best method "
               "per task in bold. Category means are over the tasks of a category; **mean** "
               "is over all tasks, each counting once, the VTAB score (Zhai et al., 2019); "
               "the mean of the category means weighs the categories equally, as "
               "many later VTAB-1k papers report it. Means carry no interval and are left "
               "out (–) for a method that did not run every task they average. Cost, "
               "averaged over the tasks a method ran: inference GFLOPs per image "
               "(everything inference runs), optimizer steps and training examples seen "
               "(every run of the unit counted: sweeps, retraining, members; a method with a "
               "row per model: the picked model's unit). Wall time is "
               "in results.json (`train_seconds`), not here: it differs between two runs."
               "\n\n" + methods_table(rows, methods))]
  if any("shift_accuracy" in r for r in rows if r["method"] in methods):
    sections.append(("All methods: shifted test split, accuracy (%)",
                     "Top-1 accuracy on `test_shift` (the test images under corruptions), "
                     f"for the tasks that have one; {interval_note('shift_accuracy_ci')}. "
                     "Same picks and means as above.\n\n" +
                     methods_table(rows, methods, value="shift_accuracy")))
  return sections


def write_results(workdir: str, rows: Sequence[Mapping[str, Any]],
                  sections: Sequence[tuple[str, str]] = (),
                  extra: Mapping[str, Any] | None = None,
                  table_methods: Sequence[str] | None = None,
                  sections_first: bool = False) -> str:
  """Writes results.json (`rows` + `extra`) and results.md; returns the markdown.

  results.md has a tasks x models accuracy table per method (those of
  `table_methods` only, when given: methods whose rows a section shows better)
  and the `sections`, (heading, markdown) pairs, after them or, with
  `sections_first`, before them.
  """
  check_rows(rows)
  payload = {"rows": list(rows), **(extra or {}), **provenance.results_fields()}
  io.write_json(os.path.join(workdir, "results.json"), payload)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  if table_methods is not None:
    methods = [m for m in methods if m in table_methods]
  tables = [f"\n## {method}\n\nTest top-1 accuracy (%) per model; best per task in "
            f"bold.\n\n" + accuracy_table(rows, method) for method in methods]
  extra_parts = [f"\n## {heading}\n\n{body}" for heading, body in sections]
  parts = ["# Results\n"] + (extra_parts + tables if sections_first else tables + extra_parts)
  markdown = "".join(parts)
  io.write_atomic(os.path.join(workdir, "results.md"), markdown)
  return markdown


def plot_heatmap(rows: Sequence[Mapping[str, Any]], path: str, method: str | None = None,
                 value: str = "test_accuracy", title: str = "") -> None:
  """A tasks x models heatmap of `value` (percent), saved as PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = [r for r in rows if method is None or r["method"] == method]
  tasks = _sort_tasks({r["task"]: r["category"] for r in rows})
  columns = list(dict.fromkeys(column_name(r) for r in rows))
  grid = np.full((len(tasks), len(columns)), np.nan)
  for r in rows:
    grid[tasks.index(r["task"]), columns.index(column_name(r))] = 100 * float(r[value])
  # A Figure of its own, not pyplot: the caller's backend (inline plots in a
  # notebook) stays as it is. Room for the labels, so one task is not cropped.
  fig = Figure(figsize=(2.2 + 0.9 * len(columns) + label_room(tasks),
                        1.4 + 0.45 * len(tasks) + label_room(columns)))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  im = ax.imshow(grid, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
  ax.set_yticks(range(len(tasks)), tasks)
  for (i, j), v in np.ndenumerate(grid):
    if not np.isnan(v):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
              color=text_color(im, v))
  fig.colorbar(im, ax=ax, label=f"{value} (%)")
  ax.set_title(title or (method or value))
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)


def label_room(labels: Sequence[str], inches_per_char: float = 0.07) -> float:
  """Inches that the longest tick label takes (45-degree labels about as much)."""
  return inches_per_char * max((len(str(label)) for label in labels), default=0)


def text_color(image, value: float) -> str:
  """Black or white, whichever reads on the cell's colour in `image`'s colormap."""
  r, g, b, _ = image.cmap(image.norm(value))
  return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _figure(width: float, height: float):
  """A Figure of its own with an Agg canvas (never pyplot's global backend)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _annotated(ax, grid: np.ndarray, rows: Sequence[str], columns: Sequence[str],
               fmt: str, **imshow):
  im = ax.imshow(grid, aspect="auto", **imshow)
  ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  for (i, j), v in np.ndenumerate(grid):
    if np.isfinite(v):
      ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6,
              color=text_color(im, v))
  return im


def _save(fig, path: str) -> None:
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)


def plot_gate_weights(rows: Sequence[Mapping[str, Any]], path: str) -> bool:
  """Tasks x models heatmaps of `gate_mean_weight` (the gate's mean weight per
  model over test inputs), one panel per gated method. False: no such rows."""
  rows = [r for r in rows if r.get("gate_mean_weight")]
  if not rows:
    return False
  methods = list(dict.fromkeys(r["method"] for r in rows))
  tasks = _sort_tasks({r["task"]: r["category"] for r in rows})
  models = list(dict.fromkeys(m for r in rows for m in r["gate_mean_weight"]))
  fig = _figure(1.5 + (0.55 * len(models) + 1.2) * len(methods), 1.6 + 0.35 * len(tasks))
  for k, method in enumerate(methods):
    grid = np.full((len(tasks), len(models)), np.nan)
    for r in rows:
      if r["method"] == method:
        for m, w in r["gate_mean_weight"].items():
          grid[tasks.index(r["task"]), models.index(m)] = float(w)
    ax = fig.add_subplot(1, len(methods), k + 1)
    im = _annotated(ax, grid, tasks, models, ".2f", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_title(f"{method}: mean gate weight", fontsize=8)
    fig.colorbar(im, ax=ax)
  _save(fig, path)
  return True


def plot_agreement(rows: Sequence[Mapping[str, Any]], path: str) -> bool:
  """Per task, models x models: the pairwise agreement of the linear probes'
  test predictions, each probe's test accuracy on the diagonal (rows with
  `probe_study`, from uniform_probe_avg). False: no such rows."""
  studies = {}
  for r in rows:
    if r.get("probe_study"):
      studies.setdefault(r["task"], (r["category"], r["probe_study"]))
  if not studies:
    return False
  tasks = _sort_tasks({t: c for t, (c, _) in studies.items()})
  columns = min(4, len(tasks))
  lines = -(-len(tasks) // columns)
  size = max(len(s["models"]) for _, s in studies.values())
  fig = _figure(columns * (1.5 + 0.45 * size), lines * (1.3 + 0.45 * size))
  for k, task in enumerate(tasks):
    study = studies[task][1]
    grid = 100 * np.array(study["test_agreement"], float)
    np.fill_diagonal(grid, 100 * np.array(study["test_accuracy"], float))
    ax = fig.add_subplot(lines, columns, k + 1)
    _annotated(ax, grid, study["models"], study["models"], ".0f", cmap="magma",
               vmin=0.0, vmax=100.0)
    ax.set_title(f"{task}: agreement (%), diagonal: accuracy", fontsize=8)
  _save(fig, path)
  return True


def plot_study(rows: Sequence[Mapping[str, Any]], plots_dir: str) -> list[str]:
  """The gated-fusion study's plots that `rows` can make: gate_weights.png, agreement.png."""
  made = []
  for name, plot in (("gate_weights.png", plot_gate_weights),
                     ("agreement.png", plot_agreement)):
    if plot(rows, os.path.join(plots_dir, name)):
      made.append(os.path.join(plots_dir, name))
  return made


def plot_routing(rows: Sequence[Mapping[str, Any]], plots_dir: str) -> list[str]:
  """routing_<method>_<task>.png: classes x models, the fraction of each class's
  test inputs that a routed method (Hub-Pathway) runs through each model."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  paths = []
  for r in rows:
    if "routing_matrix" not in r:
      continue
    grid = np.asarray(r["routing_matrix"], np.float64)
    models = r.get("routing_models") or [str(i) for i in range(grid.shape[1])]
    fig = Figure(figsize=(1.5 + 0.6 * len(models), 1.2 + 0.25 * len(grid)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_yticks(range(len(grid)), [str(c) for c in range(len(grid))])
    ax.set_ylabel("class")
    ax.set_title(f"{r['method']} on {r['task']}: inputs routed to each model", fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction of the class's test inputs")
    fig.tight_layout()
    path = os.path.join(plots_dir, f"routing_{r['method']}_{r['task']}.png")
    os.makedirs(plots_dir, exist_ok=True)
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths


# ------------------------------------------------------------------ cost plots


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
  """Indices of the points that no other point beats, by increasing cost.

  A point is beaten when another costs no more and scores at least as much,
  one of the two strictly; of exact duplicates, the first is kept.
  """
  order = sorted(range(len(costs)), key=lambda i: (costs[i], -values[i], i))
  front, best = [], -math.inf
  for i in order:
    if values[i] > best:
      front.append(i)
      best = values[i]
  return front


_MARKERS = "osD^vP*X<>"


def _style(i: int) -> dict[str, Any]:
  """Marker and colour of the i-th method: 10 colours x 10 markers, distinct to 100."""
  import matplotlib
  return {"color": matplotlib.colormaps["tab10"](i % 10),
          "marker": _MARKERS[(i // 10) % len(_MARKERS)]}


def _cost_panel(ax, points: Sequence[tuple[str, float, float, Sequence[float] | None]],
                styles: Mapping[str, dict], fontsize: float) -> str:
  """(method, GFLOPs, accuracy, interval or None) points, GFLOPs on a log scale
  (linear if one is 0), the Pareto front as a staircase (what the best method
  at most that cost reaches). Returns the x label."""
  for name, cost, acc, ci in points:
    yerr = None if ci is None else [[100 * (acc - ci[0])], [100 * (ci[1] - acc)]]
    ax.errorbar([cost], [100 * acc], yerr=yerr, linestyle="none", markersize=5,
                elinewidth=0.8, capsize=2, label=name, **styles[name])
  front = pareto_front([p[1] for p in points], [p[2] for p in points])
  xs = [points[i][1] for i in front]
  ys = [100 * points[i][2] for i in front]
  log = min(p[1] for p in points) > 0
  ax.step(xs + [xs[-1] * 1.5 if log else xs[-1]], ys + [ys[-1]], where="post", color="0.4",
          linewidth=1, linestyle="--", zorder=0, label="_front")
  ax.set_xscale("log" if log else "linear")
  ax.grid(True, which="major", linewidth=0.3)
  ax.tick_params(labelsize=fontsize)
  return "inference GFLOPs per image" + (" (log)" if log else "")


def plot_accuracy_vs_gflops(rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
                            path: str) -> bool:
  """Test accuracy against inference GFLOPs per image, one point per method: the
  mean over the tasks every method ran, the Pareto front drawn, Pareto-optimal
  methods named. False: no task that every method ran."""
  picked = _picked(rows, methods)
  common = common_tasks(picked)
  if not common:
    return False
  columns = list(dict.fromkeys(r["method"] for r in picked))
  accs = _per_method(picked, columns, "test_accuracy", set(common))
  costs = _per_method(picked, columns, "inference_gflops", set(common))
  styles = {m: _style(i) for i, m in enumerate(columns)}
  fig = _figure(7.5, 4.8)
  ax = fig.add_subplot()
  points = list(zip(columns, costs, accs, [None] * len(columns)))
  xlabel = _cost_panel(ax, points, styles, 8)
  for i in pareto_front(costs, accs):
    ax.annotate(columns[i], (costs[i], 100 * accs[i]), xytext=(4, 4),
                textcoords="offset points", fontsize=7)
  every = len(common) == len({r["task"] for r in picked})
  ax.set_title(f"Mean over {'all ' if every else ''}{len(common)} task"
               f"{'s' if len(common) > 1 else ''}"
               f"{'' if every else ' that every method ran'}; dashed: Pareto front",
               fontsize=9)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_ylabel("test accuracy (%)", fontsize=8)
  ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5),
            ncol=1 + len(columns) // 24, frameon=False)
  _save(fig, path)
  return True


def plot_accuracy_vs_gflops_per_task(rows: Sequence[Mapping[str, Any]],
                                     methods: Sequence[str], path: str) -> bool:
  """Small multiples, one panel per task: each method's test accuracy (with its
  bootstrap interval) against its inference GFLOPs, the task's Pareto front;
  one legend. False: no rows."""
  picked = _picked(rows, methods)
  if not picked:
    return False
  tasks = _sort_tasks({r["task"]: r["category"] for r in picked})
  columns = list(dict.fromkeys(r["method"] for r in picked))
  styles = {m: _style(i) for i, m in enumerate(columns)}
  ncols = min(4, len(tasks))
  nrows = -(-len(tasks) // ncols)
  legend_rows = -(-len(columns) // 6)
  fig = _figure(0.75 + 3.1 * ncols, 0.95 + 2.5 * nrows + 0.2 * legend_rows)
  by_task = {t: [r for r in picked if r["task"] == t] for t in tasks}
  for k, task in enumerate(tasks):
    ax = fig.add_subplot(nrows, ncols, k + 1)
    xlabel = _cost_panel(ax, [(r["method"], float(r["inference_gflops"]),
                               float(r["test_accuracy"]), r.get("test_accuracy_ci"))
                              for r in by_task[task]], styles, 6.5)
    ax.set_title(f"{task} ({by_task[task][0]['category']})", fontsize=8)
    if k % ncols == 0:
      ax.set_ylabel("test accuracy (%)", fontsize=7)
    if k >= len(tasks) - ncols:
      ax.set_xlabel(xlabel, fontsize=7)
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], linestyle="none", markersize=5, **styles[m]) for m in columns]
  fig.legend(handles=handles, labels=columns, loc="lower center", ncol=min(6, len(columns)),
             fontsize=7, frameon=False)
  # Fixed margins in inches, room for the legend under the panels: tight_layout
  # would draw the whole figure once more (half the time of 19 panels).
  width, height = fig.get_size_inches()
  fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, top=1 - 0.3 / height,
                      bottom=(0.65 + 0.2 * legend_rows) / height, wspace=0.25, hspace=0.5)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  return True


def plots_section(workdir: str, items: Sequence[tuple[str, Sequence[tuple[str, str]]]],
                  embed: tuple[str, str] | None = None) -> str:
  """results.md's list of plots: `items` are (caption, [(label, path), ...]);
  paths that do not exist are left out, and so is an item left with none.
  `embed`: (alt text, path) of a plot shown inline above the list. Paths are
  relative to `workdir`."""
  def rel(path: str) -> str:
    return os.path.relpath(os.path.join(workdir, path), workdir).replace(os.sep, "/")

  lines = []
  if embed and os.path.exists(os.path.join(workdir, embed[1])):
    lines += [f"![{embed[0]}]({rel(embed[1])})", ""]
  for caption, links in items:
    present = [(label, rel(p)) for label, p in links if os.path.exists(os.path.join(workdir, p))]
    if present:
      lines.append(f"- {caption}: " + ", ".join(f"[{label}]({p})" for label, p in present))
  return "\n".join(lines) + "\n" if lines else "(no plots)\n"
