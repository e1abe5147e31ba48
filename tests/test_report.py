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
