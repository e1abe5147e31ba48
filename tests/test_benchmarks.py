"""benchmarks/*.py run end to end at their smallest settings and print their
ratio lines (smoke runs: the numbers themselves mean nothing at these sizes)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _run(script, *args, env=None):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": "", "TQDM_DISABLE": "1", **(env or {})})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_select_benchmark_agrees_with_numpy_and_prints_its_ratio():
  out = _run("select.py", "--num_models", "2", "--num_examples", "40", "--dim", "8",
             "--num_classes", "3", "--chunk", "2", "--check", "2")
  assert re.search(r"agreement on the first 2 models: .*: OK", out), out
  assert re.search(rf"ratio fusion/numpy: {NUMBER}x models/s, {NUMBER}x peak RSS", out), out


def test_extract_benchmark_prints_its_ratios(tmp_path):
  out = _run("extract.py", "--tiny", "--splits", "val200", "--num_images", "64",
             "--batch_size", "32", "--repeats", "1", env={"FUSION_HOME": str(tmp_path)})
  assert "vit (tiny), digits val200 (200 images), batch 32" in out, out
  assert re.search(rf"cached extract: +{NUMBER} images/s +\({NUMBER}x uncached\)", out), out
  assert re.search(rf"2 CPU devices: +{NUMBER} images/s +\({NUMBER}x 1 device", out), out
