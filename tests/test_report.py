import json
import os

import numpy as np
import pytest

from fusion import report


def _rows():
  rows = []
  acc = {("a", "m1"): 0.5, ("a", "m2"): 0.7, ("b", "m1"): 0.9, ("b", "m2"): 0.6,
         ("c", "m1"): 0.2, ("c", "m2"): 0.4}
  cats = {"a": "natural", "b": "natural", "c": "structured"}
  for (task, model), v in acc.items():
    rows.append({"task": task, "category": cats[task], "method": "linear_probe",
                 "model": model, "test_accuracy": v, "test_nll": 1.0,
                 "test_ece": 0.1, "inference_gflops": 0.01,
                 "extra": np.float32(3.0)})
  return rows, acc


def test_write_results(tmp_path):
  rows, acc = _rows()
  md = report.write_results(str(tmp_path), rows)
  payload = json.loads((tmp_path / "results.json").read_text())
  assert payload["rows"][0]["extra"] == 3.0
  assert len(payload["rows"]) == 6
  assert (tmp_path / "results.md").read_text() == md
  lines = md.splitlines()
  row_a = next(l for l in lines if l.startswith("| a |"))
  assert row_a == "| a | natural | 50.0 | **70.0** |"
  nat = next(l for l in lines if l.startswith("| *natural mean*"))
  assert f"{100 * np.mean([acc['a', 'm1'], acc['b', 'm1']]):.1f}" in nat
  overall = next(l for l in lines if l.startswith("| **mean**"))
  assert f"{100 * np.mean([0.5, 0.9, 0.2]):.1f}" in overall
  # Structured comes after natural regardless of row order.
  assert lines.index(row_a) < lines.index(next(l for l in lines if l.startswith("| c |")))


def test_table_methods_picks_the_tables_json_keeps_every_row(tmp_path):
  rows, _ = _rows()
  rows += [{**r, "method": "select/knn"} for r in rows[:2]]
  md = report.write_results(str(tmp_path), rows, [("Notes", "- a note\n")],
                            table_methods=("linear_probe",))
  assert "## linear_probe" in md and "## select/knn" not in md
  assert md.rstrip().endswith("- a note")
  assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 8
  md = report.write_results(str(tmp_path), rows, table_methods=())
  assert "| a |" not in md and "best per task" not in md


def test_missing_field_is_an_error(tmp_path):
  rows, _ = _rows()
  del rows[0]["test_nll"]
  with pytest.raises(ValueError, match="test_nll"):
    report.write_results(str(tmp_path), rows)
  assert not os.path.exists(tmp_path / "results.json")


def test_heatmap(tmp_path):
  rows, _ = _rows()
  path = tmp_path / "plots" / "h.png"
  report.plot_heatmap(rows, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("num_tasks", [1, 19])
def test_plots_fit_their_labels_from_one_task_to_nineteen(num_tasks, tmp_path):
  """No 'Tight layout not applied' (a one-task heatmap was cropped), and cell
  numbers readable: white on dark cells, black on light ones."""
  import warnings
  from fusion.selection import job as select_job
  tasks = [f"a_long_task_name_{i}" for i in range(num_tasks)]
  models = ["resnet_glyphs", "dinov2_textures_seed1"]
  rows = [{"task": t, "category": "natural", "method": "m", "model": m,
           "test_accuracy": 0.1 + 0.8 * (i % 2), "test_nll": 1.0, "test_ece": 0.1,
           "inference_gflops": 0.01} for t in tasks for i, m in enumerate(models)]
  estimators = ["knn", "logme"]
  table = {"tasks": tasks, "estimators": estimators, "metrics": ["weighted_tau",
                                                                "top1_regret"],
           "rows": [{"estimator": e, "task": t, "weighted_tau": 0.5, "top1_regret": 30.0}
                    for e in estimators for t in tasks],
           "mean": [{"estimator": e, "weighted_tau": 0.5, "top1_regret": 30.0}
                    for e in estimators]}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # matplotlib's layout warning fails the test.
    report.plot_heatmap(rows, str(tmp_path / "heat.png"), method="m")
    select_job.plot_selection(table, str(tmp_path / "select.png"))
  assert (tmp_path / "heat.png").stat().st_size > 0


def test_cell_text_reads_on_its_cell():
  from matplotlib.figure import Figure
  ax = Figure().add_subplot()
  regret = ax.imshow(np.array([[0.0, 40.0]]), cmap="viridis_r", vmin=0)
  assert report.text_color(regret, 40.0) == "white"  # viridis_r's dark end.
  assert report.text_color(regret, 0.0) == "black"
  diverging = ax.imshow(np.array([[-1.0, 1.0]]), cmap="RdYlGn", vmin=-1, vmax=1)
  assert report.text_color(diverging, 0.0) == "black"
  assert report.text_color(diverging, -1.0) == "white"


# ------------------------------------------------------------ bootstrap intervals


def _predictions(n, accuracy, classes=4, seed=0):
  """Logits whose argmax is right on round(accuracy * n) of n examples."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  right = rng.permutation(n) < round(accuracy * n)
  predicted = np.where(right, labels, (labels + 1) % classes)
  return np.eye(classes)[predicted] * 3 + rng.normal(size=(n, classes)) * 0.1, labels


def _index_bootstrap(correct, resamples, seed, confidence=0.95):
  """The textbook percentile bootstrap, float64: resample the examples' indices."""
  rng = np.random.default_rng(seed)
  correct = np.asarray(correct, np.float64)
  n = len(correct)
  means = np.array([correct[rng.integers(0, n, n)].mean() for _ in range(resamples)])
  tail = 100 * (1 - confidence) / 2
  return np.percentile(means, [tail, 100 - tail])


@pytest.mark.parametrize("n,accuracy", [(500, 0.7), (2000, 0.093), (797, 0.985)])
def test_bootstrap_interval_matches_resampling_the_examples(n, accuracy):
  logits, labels = _predictions(n, accuracy)
  correct = logits.argmax(-1) == labels
  got = report.bootstrap_accuracy_interval(logits, labels, resamples=4000, seed=1)
  want = _index_bootstrap(correct, 4000, seed=2)
  # Two Monte Carlo estimates of the same quantiles: close, not equal.
  np.testing.assert_allclose(got, want, atol=0.006)
  # Many resamples: the quantiles of Binomial(n, k/n) / n, to one example.
  scipy_stats = pytest.importorskip("scipy.stats")
  k = correct.sum()
  exact = scipy_stats.binom.ppf([0.025, 0.975], n, k / n) / n
  got = report.bootstrap_accuracy_interval(logits, labels, resamples=200_000, seed=3)
  np.testing.assert_allclose(got, exact, atol=1.0 / n)
  assert got[0] < k / n < got[1]


def test_bootstrap_interval_is_fixed_by_the_seed():
  logits, labels = _predictions(300, 0.6)
  a = report.bootstrap_accuracy_interval(logits, labels)
  assert a == report.bootstrap_accuracy_interval(logits, labels)
  few = [report.bootstrap_accuracy_interval(logits, labels, resamples=5, seed=s)
         for s in (0, 1)]
  assert few[0] != few[1]
  assert report.bootstrap_accuracy_interval(*_predictions(50, 1.0)) == [1.0, 1.0]
  with pytest.raises(ValueError, match="at least one"):
    report.bootstrap_accuracy_interval(np.zeros((0, 3)), np.zeros(0, int))
  with pytest.raises(ValueError, match="confidence=1.5"):
    report.bootstrap_accuracy_interval(logits, labels, confidence=1.5)


def test_row_carries_the_intervals_of_the_test_splits():
  from types import SimpleNamespace
  from fusion import predictions
  val, test, shift = _predictions(200, 0.5, seed=1), _predictions(900, 0.8), _predictions(
      900, 0.4, seed=2)
  result = predictions.Result(
      predictions.Predictions({"val200": val[0], "test": test[0], "test_shift": shift[0]},
                              {"val200": val[1], "test": test[1], "test_shift": shift[1]}),
      members=("m",), inference_gflops=0.5, train_steps=3, train_examples=30)
  task = SimpleNamespace(name="t", category="natural")
  r = report.row(task, "probe", result)
  assert r["test_accuracy_ci"] == report.bootstrap_accuracy_interval(*test)
  assert r["shift_accuracy_ci"] == report.bootstrap_accuracy_interval(*shift)
  assert r["test_accuracy_ci"][0] < r["test_accuracy"] == 0.8 < r["test_accuracy_ci"][1]
  assert "val_accuracy_ci" not in r
  assert report.row(task, "probe", result) == r  # The same predictions, the same row.


def test_comparable_drops_what_differs_between_runs():
  a = {"rows": [{"task": "t", "test_accuracy": 0.5, "train_seconds": 1.0}],
       "provenance": {"date": "x"}, "other": 1}
  b = {"rows": [{"task": "t", "test_accuracy": 0.5, "train_seconds": 2.0}],
       "provenance": {"date": "y"}, "other": 1}
  assert report.comparable(a) == report.comparable(b) != report.comparable(
      {**b, "other": 2})
  assert a["rows"][0]["train_seconds"] == 1.0  # Not modified.


# ------------------------------------------------------------ the methods table


def _method_rows():
  """Two methods on three tasks (m2 not on c), a shifted split on a."""
  cats = {"a": "natural", "b": "specialized", "c": "structured"}
  acc = {("a", "m1"): 0.50, ("b", "m1"): 0.90, ("c", "m1"): 0.20,
         ("a", "m2"): 0.70, ("b", "m2"): 0.60}
  rows = []
  for (task, method), v in acc.items():
    rows.append({"task": task, "category": cats[task], "method": method, "model": "x",
                 "test_accuracy": v, "test_accuracy_ci": [v - 0.02, v + 0.03],
                 "test_nll": 1.0, "test_ece": 0.1, "val_accuracy": 0.5,
                 "inference_gflops": {"m1": 0.01, "m2": 0.1}[method],
                 "train_steps": {"a": 100, "b": 200, "c": 600}[task],
                 "train_examples": {"a": 6400, "b": 12800, "c": 38400}[task],
                 "train_seconds": 1.0})
  rows[0].update(shift_accuracy=0.4, shift_accuracy_ci=[0.35, 0.45])
  return rows


def _line(markdown, start):
  return next(l for l in markdown.splitlines() if l.startswith(start))


def _cells(markdown, start):
  return [c.strip() for c in _line(markdown, start).strip("|").split("|")]


def test_methods_table_has_intervals_means_and_costs():
  rows = _method_rows()
  md = report.methods_table(rows, ["m1", "m2"])
  assert _line(md, "| a |") == "| a | natural | 50.0 ±2.5 | **70.0** ±2.5 |"
  # VTAB's mean is over tasks; the mean of the category means weighs categories.
  assert _line(md, "| **mean** |") == f"| **mean** | | {100 * np.mean([0.5, 0.9, 0.2]):.1f} | – |"
  assert _line(md, "| *mean of the category means*") == (
      f"| *mean of the category means* | | {100 * np.mean([0.5, 0.9, 0.2]):.1f} | – |")
  assert _line(md, "| *mean of the 2 tasks") == "| *mean of the 2 tasks every method ran* | | 70.0 | 65.0 |"
  assert _line(md, "| *GFLOPs") == "| *GFLOPs / image* | | 0.01 | 0.1 |"
  assert _line(md, "| *optimizer steps") == "| *optimizer steps / task* | | 300 | 150 |"
  assert _line(md, "| *examples seen") == "| *examples seen / task* | | 19,200 | 9,600 |"
  sections = report.methods_sections(rows, ["m1", "m2"])
  assert [h for h, _ in sections] == ["All methods: test accuracy (%)",
                                      "All methods: shifted test split, accuracy (%)"]
  shift = sections[1][1]
  assert _line(shift, "| a |") == "| a | natural | **40.0** ±5.0 |"
  assert "| b |" not in shift and "GFLOPs" not in shift
  assert "±" in sections[0][1].split("\n\n")[0]  # The caption says what ± is.
  assert len(report.methods_sections([r for r in rows if "shift_accuracy" not in r],
                                     ["m1", "m2"])) == 1


def test_mean_of_category_means_differs_from_the_task_mean(tmp_path):
  rows, acc = _rows()  # natural: a, b; structured: c.
  md = report.accuracy_table(rows, "linear_probe")
  want = np.mean([np.mean([acc["a", "m1"], acc["b", "m1"]]), acc["c", "m1"]])
  assert _cells(md, "| *mean of the category means*")[2] == f"{100 * want:.1f}"
  assert _cells(md, "| **mean**")[2] == f"{100 * np.mean([0.5, 0.9, 0.2]):.1f}"


# ------------------------------------------------------------ plots


def _dominated(i, costs, values):
  return any(costs[j] <= costs[i] and values[j] >= values[i] and
             (costs[j] < costs[i] or values[j] > values[i]) for j in range(len(costs)))


def test_pareto_front_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(50):
    n = int(rng.integers(1, 30))
    costs = rng.choice([0.1, 0.2, 0.5, 1.0, 2.0], n).tolist()  # Ties in cost.
    values = rng.integers(0, 10, n).astype(float).tolist()  # Ties in value.
    front = report.pareto_front(costs, values)
    keep = [i for i in range(n) if not _dominated(i, costs, values)]
    # Of exact duplicates the front keeps the first.
    keep = [i for i in keep if (costs[i], values[i]) not in
            {(costs[j], values[j]) for j in keep if j < i}]
    assert sorted(front) == keep
    assert [costs[i] for i in front] == sorted(costs[i] for i in front)
  assert report.pareto_front([1.0, 2.0, 3.0], [0.5, 0.4, 0.6]) == [0, 2]


def _many_rows(num_tasks, num_methods):
  rng = np.random.default_rng(num_tasks)
  cats = ("natural", "specialized", "structured")
  rows = []
  for t in range(num_tasks):
    for m in range(num_methods):
      v = float(rng.uniform(0.1, 0.9))
      rows.append({"task": f"task_{t}", "category": cats[t % 3], "method": f"method_{m}",
                   "model": "x", "test_accuracy": v, "test_accuracy_ci": [v - 0.03, v + 0.02],
                   "test_nll": 1.0, "test_ece": 0.1,
                   "inference_gflops": float(10 ** rng.uniform(-3, 0))})
  return rows


@pytest.mark.parametrize("num_tasks,num_methods", [(1, 3), (19, 21)])
def test_cost_plots_from_one_task_to_nineteen(tmp_path, num_tasks, num_methods):
  rows = _many_rows(num_tasks, num_methods)
  names = [f"method_{m}" for m in range(num_methods)]
  for name, plot in (("mean.png", report.plot_accuracy_vs_gflops),
                     ("tasks.png", report.plot_accuracy_vs_gflops_per_task)):
    assert plot(rows, names, str(tmp_path / name))
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A method that costs nothing stays on the plot: a linear GFLOPs axis.
  styles = {"a": report._style(0), "b": report._style(1)}
  for cost, scale in ((0.0, "linear"), (0.5, "log")):
    ax = report._figure(3, 3).add_subplot()
    label = report._cost_panel(ax, [("a", cost, 0.5, None), ("b", 1.0, 0.6, [0.5, 0.7])],
                               styles, 7)
    assert ax.get_xscale() == scale and label.endswith("(log)") == (scale == "log")
  # No task that every method ran: no mean plot, the per-task one still.
  rows = [r for r in rows if r["method"] != "method_0"]
  rows.append({**rows[0], "method": "method_0", "task": "other"})
  assert not report.plot_accuracy_vs_gflops(rows, names, str(tmp_path / "none.png"))
  assert not (tmp_path / "none.png").exists()


def test_plots_section_links_only_the_plots_made(tmp_path):
  (tmp_path / "plots").mkdir()
  (tmp_path / "plots" / "a.png").write_bytes(b"x")
  (tmp_path / "plots" / "t1.png").write_bytes(b"x")
  md = report.plots_section(str(tmp_path), [
      ("A", [("a.png", "plots/a.png")]), ("Missing", [("m", "plots/m.png")]),
      ("Per task", [("t1", "plots/t1.png"), ("t2", "plots/t2.png")])],
      embed=("alt", "plots/a.png"))
  assert md == ("![alt](plots/a.png)\n\n- A: [a.png](plots/a.png)\n"
                "- Per task: [t1](plots/t1.png)\n")
  assert report.plots_section(str(tmp_path), []) == "(no plots)\n"
