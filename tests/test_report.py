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
