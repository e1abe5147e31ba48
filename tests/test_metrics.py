import math

import numpy as np
import pytest

from fusion import metrics


def _random_logits(seed, n=200, c=7):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, c)) * 3, rng.integers(0, c, size=n)


def _reference_ece(probs, labels, num_bins):
  # Per-example loop: place each confidence in its (lo, hi] bin.
  bins = [[] for _ in range(num_bins)]
  for p, y in zip(probs, labels):
    conf = max(p)
    for b in range(num_bins):
      lo, hi = b / num_bins, (b + 1) / num_bins
      if (lo < conf <= hi) or (b == 0 and conf == 0.0):
        bins[b].append((conf, int(np.argmax(p)) == y))
        break
  err = 0.0
  for members in bins:
    if members:
      conf = sum(m[0] for m in members) / len(members)
      acc = sum(m[1] for m in members) / len(members)
      err += len(members) * abs(acc - conf)
  return err / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_reference(seed):
  logits, labels = _random_logits(seed)
  probs = []
  for row in logits:
    e = [math.exp(v - max(row)) for v in row]
    probs.append([v / sum(e) for v in e])
  probs = np.array(probs)
  ref_nll = -np.mean([math.log(probs[i][labels[i]]) for i in range(len(labels))])
  ref_acc = np.mean([int(np.argmax(r)) == y for r, y in zip(logits, labels)])
  assert metrics.accuracy(logits, labels) == pytest.approx(ref_acc)
  assert metrics.nll(logits, labels) == pytest.approx(ref_nll, rel=1e-12)
  assert metrics.nll_from_probs(probs, labels) == pytest.approx(ref_nll, rel=1e-9)
  assert metrics.ece(probs, labels) == pytest.approx(_reference_ece(probs, labels, 15), abs=1e-12)
  m = metrics.classification_metrics(logits, labels)
  assert set(m) == {"test_accuracy", "test_nll", "test_ece"}


def test_ece_of_perfectly_calibrated_and_overconfident():
  labels = np.array([0, 1] * 50)
  onehot = np.eye(2)[labels]
  assert metrics.ece(onehot, labels) == 0.0
  wrong = np.eye(2)[1 - labels]
  assert metrics.ece(wrong, labels) == pytest.approx(1.0)


def test_disagreement():
  a = np.eye(3)[[0, 1, 2, 0]]
  b = np.eye(3)[[0, 2, 2, 1]]
  assert metrics.disagreement(a, b) == 0.5


@pytest.mark.parametrize("bad", ["nan", "shape", "label"])
def test_bad_input(bad):
  logits, labels = _random_logits(0, n=10, c=3)
  if bad == "nan":
    logits[0, 0] = np.nan
  elif bad == "shape":
    labels = labels[:5]
  else:
    labels[0] = 3
  with pytest.raises(ValueError):
    metrics.nll(logits, labels)
