"""colabs/quickstart.ipynb runs headless with nbclient, on a hub of tiny models:
the install cell finds fusion, the demo subset writes its table and plots, the
vtab1k dry run prints its plan, and the cells that need an accelerator do nothing."""
import json
import os

import nbformat
from nbclient import NotebookClient

import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "quickstart.ipynb")


def _texts(cell) -> str:
  """Everything a cell printed or displayed, as text."""
  out = []
  for o in cell.get("outputs", []):
    if "text" in o:
      out.append(o["text"])
    for kind in ("text/markdown", "text/plain"):
      if kind in o.get("data", {}):
        out.append(o["data"][kind])
  return "\n".join(out)


def test_quickstart_notebook_runs_headless(tmp_path, monkeypatch):
  hub = [{"name": a, "path": tiny_models.save_tiny(a, tmp_path / "hub" / a)}
         for a in ("vit", "resnet")]
  overrides = {"hub": hub, "offline_hub": None, "linear_probe.steps": 40,
               "linear_probe.learning_rates": [0.01, 0.1], "concat.steps": 40,
               "concat.learning_rates": [0.01, 0.1]}
  workdir = tmp_path / "work"
  # The kernel inherits this environment: the tiny hub, temporary caches, and one
  # CPU device (not the 8 simulated ones of conftest: the notebook shards nothing).
  monkeypatch.setenv("FUSION_QUICKSTART_OVERRIDES", json.dumps(overrides))
  monkeypatch.setenv("FUSION_QUICKSTART_WORKDIR", str(workdir))
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "colabs")}}).execute()

  code = [c for c in nb.cells if c.cell_type == "code"]
  texts = [_texts(c) for c in code]
  assert "already importable: nothing to install" in texts[0]
  # The results table, rendered as Markdown, and every plot, inline.
  table = next(c for c in code if "results.md" in c.source)
  assert any("text/markdown" in o.get("data", {}) and "| digits |" in o["data"]["text/markdown"]
             for o in table.outputs)
  plots = next(c for c in code if "plots" in c.source and "glob" in c.source)
  images = [o for o in plots.outputs if "image/png" in o.get("data", {})]
  assert images and len(images) == len(list((workdir / "plots").rglob("*.png")))
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert {r["method"] for r in rows} >= {"linear_probe", "nearest_centroid", "concat",
                                         "uniform_probe_avg"}
  assert {r.get("model") for r in rows if r["method"] == "linear_probe"} == {"vit", "resnet"}
  # The dry run's plan; the accelerator cells ran and did nothing.
  plan_cell = next(c for c in code if "dry_run = True" in c.source)
  assert "Dry run:" in _texts(plan_cell) and "cifar100" in _texts(plan_cell)
  assert not (workdir / "vtab1k_plan" / "rows.jsonl").exists()
  for cell in code:
    if "if ACCELERATOR" in cell.source:
      assert not _texts(cell), cell.source
