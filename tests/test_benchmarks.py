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


def test_pathway_benchmark_routes_the_demos_models_and_prints_each_k():
  out = _run("pathway.py", "--size", "tiny", "--steps", "2", "--repeats", "1",
             "--batch_size", "16", "--num_images", "32")
  # M = 8: the demo leaves the shift method's extra resnet_glyphs seeds out.
  assert re.search(r"^M=8 routed models .*: resnet_glyphs, resnet_shapes,", out, re.M), out
  assert "seed1, resnet_scenes" in out and "resnet_glyphs_seed" not in out, out
  for name in ("k=1", "k=2", "dense k=8"):
    assert re.search(rf"^pathway {name} \(M=8, batch 16, [0-9]+ slots per model\): "
                     rf"train step -?{NUMBER} ms; inference of 32 images {NUMBER} ms", out,
                     re.M), out
  for k, goal in ((1, "0.163"), (2, "0.325")):
    for what in ("train step", "inference"):
      assert re.search(rf"^k={k} / dense {what}: -?{NUMBER} \(goal <= 1.3 k / M = {goal}: "
                       rf"(met|not met); model slots {NUMBER} of dense\)", out, re.M), out
