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


def row(task, method: str, result, unit: str | None = None) -> dict[str, Any]:
  """The results row of one method's Result on one task.

  Test accuracy, NLL and ECE (and val200's, and those of any further split
  such as `test_shift`, keyed `shift_*`) come from the Result's logits
  through `fusion.metrics`; no method builds rows by hand.
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


def accuracy_table(rows: Sequence[Mapping[str, Any]], method: str | None = None,
                   value: str = "test_accuracy") -> str:
  """Markdown table, tasks x models, in percent, with category means.

  The best column per task is bold. Means are over the tasks of a category;
  'mean' is over all tasks (each task counts once).
  """
  rows = [r for r in rows if method is None or r["method"] == method]
  if not rows:
    return "(no results)\n"
  categories = {r["task"]: r["category"] for r in rows}
  tasks = _sort_tasks(categories)
  columns = list(dict.fromkeys(column_name(r) for r in rows))
  cell = {(r["task"], column_name(r)): float(r[value]) for r in rows}

  def fmt(v: float | None, bold: bool = False) -> str:
    if v is None or math.isnan(v):
      return "–"
    text = f"{100 * v:.1f}"
    return f"**{text}**" if bold else text

  lines = ["| task | category | " + " | ".join(columns) + " |",
           "|---|---|" + "---:|" * len(columns)]
  for t in tasks:
    values = [cell.get((t, c)) for c in columns]
    best = max(v for v in values if v is not None)
    lines.append(f"| {t} | {categories[t]} | " +
                 " | ".join(fmt(v, v == best) for v in values) + " |")
  groups = [(c, [t for t in tasks if categories[t] == c])
            for c in dict.fromkeys(categories[t] for t in tasks)]
  if len(groups) > 1 or len(tasks) > 1:
    groups.append(("mean", tasks))
  for name, members in groups:
    means = []
    for c in columns:
      vals = [cell[(t, c)] for t in members if (t, c) in cell]
      means.append(float(np.mean(vals)) if len(vals) == len(members) else None)
    label = f"*{name} mean*" if name != "mean" else "**mean**"
    lines.append(f"| {label} | | " + " | ".join(fmt(v) for v in means) + " |")
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


def methods_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str:
  """Markdown: tasks x methods test accuracy (%) with category means, then each
  method's mean inference GFLOPs per image and, for ensembles, their members."""
  picked = [r for r in pick_per_method(rows) if r["method"] in methods]
  picked.sort(key=lambda r: methods.index(r["method"]))
  table = accuracy_table([{**r, "model": r["method"]} for r in picked])
  columns = list(dict.fromkeys(r["method"] for r in picked))
  tasks_of = {m: {r["task"] for r in picked if r["method"] == m} for m in columns}
  common = set.intersection(*tasks_of.values()) if columns else set()
  if common and any(t != common for t in tasks_of.values()):
    means = [np.mean([r["test_accuracy"] for r in picked
                      if r["method"] == m and r["task"] in common]) for m in columns]
    table += (f"| *mean of the {len(common)} tasks every method ran* | | " +
              " | ".join(f"{100 * v:.1f}" for v in means) + " |\n")
  gflops = [np.mean([r["inference_gflops"] for r in picked if r["method"] == m])
            for m in columns]
  table += ("| *GFLOPs / image* | | " + " | ".join(f"{g:.4g}" for g in gflops) + " |\n")
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
