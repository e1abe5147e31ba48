"""benchmarks/finetune.py at its smallest: it runs, its lines parse, MFU is in (0, 1]."""
import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "finetune.py")
NUMBER = r"([0-9.]+(?:e[+-]?[0-9]+)?)"
LINE = re.compile(
    rf"finetune resnet (\d+) devices?: {NUMBER} steps/s, {NUMBER} images/s, MFU {NUMBER} "
    rf"\(achieved {NUMBER} GFLOP/s / matmul ceiling {NUMBER} GFLOP/s; {NUMBER} GFLOP per step")
RATIO = re.compile(rf"2 devices / 1 device: {NUMBER}x steps/s, matmul ceiling {NUMBER}x")


def test_finetune_benchmark_smoke():
  batch = 4
  command = [sys.executable, SCRIPT, "--size", "tiny", "--batch_size", str(batch),
             "--steps", "2", "--warmup_steps", "1", "--repeats", "1",
             "--matmul_size", "64", "--devices", "1,2", "--timeout", "300"]
  try:
    out = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TQDM_DISABLE": "1"})
  except subprocess.TimeoutExpired:
    pytest.fail("benchmarks/finetune.py took over 600 s at its smallest settings")
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {int(m.group(1)): [float(x) for x in m.groups()[1:]]
          for m in map(LINE.search, out.stdout.splitlines()) if m}
  assert set(rows) == {1, 2}, out.stdout
  for devices, (steps, images, mfu, achieved, ceiling, step_gflop) in rows.items():
    assert steps > 0 and step_gflop > 0 and ceiling > 0, out.stdout
    assert images == pytest.approx(steps * batch, rel=0.02, abs=0.1)
    assert achieved == pytest.approx(steps * step_gflop, rel=0.02)
    assert 0 < mfu <= 1, out.stdout
    assert mfu == pytest.approx(achieved / ceiling, rel=0.02)
  assert rows[1][5] == rows[2][5]  # The model's FLOPs per step: one figure for both.
  ratio = RATIO.search(out.stdout)
  assert ratio, out.stdout
  assert float(ratio.group(1)) == pytest.approx(rows[2][0] / rows[1][0], rel=0.02)
