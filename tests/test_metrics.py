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


def _binned_ece(confidence, correct, num_bins, right_closed):
  """Count-weighted mean |accuracy - confidence| over equal-width bins, float64:
  bins (lo, hi] (the docstring's rule) or, to show the case tells them apart,
  [lo, hi) with a confidence of exactly 1 in the last bin."""
  confidence = np.asarray(confidence, np.float64)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    if right_closed:
      in_bin = (confidence > lo) & (confidence <= hi)
    else:
      in_bin = (confidence >= lo) & ((confidence < hi) | (b == num_bins - 1))
    if in_bin.any():
      total += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return total / len(confidence)


def _edge_case(num_bins, num_classes):
  """Per bin: a top-1 confidence exactly on its upper edge k / num_bins (exact in
  float64: (k / num_bins) * num_bins == k) and one mid-bin, (k - 1/2) / num_bins,
  one right and one wrong. Bins (lo, hi] pair them (accuracy 1/2); bins [lo, hi)
  would pair each edge with the mid-bin one above it, right with right and wrong
  with wrong."""
  rows, labels = [], []
  for k in range(num_bins // num_classes + 2, num_bins + 1):
    for top, right in ((k / num_bins, k % 2 == 0), ((k - 0.5) / num_bins, k % 2 == 1)):
      row = np.full(num_classes, (1 - top) / (num_classes - 1))
      row[0] = top
      rows.append(row)
      labels.append(0 if right else 1)
  return np.array(rows), np.array(labels)


@pytest.mark.parametrize("num_bins, num_classes", [(4, 3), (15, 2), (15, 10)])
def test_ece_puts_a_confidence_on_a_bin_edge_in_the_bin_below(num_bins, num_classes):
  probs, labels = _edge_case(num_bins, num_classes)
  confidence = probs.max(1)
  assert np.all(probs.argmax(1) == 0)
  assert np.sum(confidence * num_bins == np.round(confidence * num_bins)) >= 2  # On edges.
  correct = labels == 0
  want = _binned_ece(confidence, correct, num_bins, right_closed=True)
  other = _binned_ece(confidence, correct, num_bins, right_closed=False)
  assert abs(want - other) > 0.1  # The two conventions disagree here.
  assert metrics.ece(probs, labels, num_bins=num_bins) == pytest.approx(want, abs=1e-12)
  assert want == pytest.approx(_reference_ece(probs, labels, num_bins), abs=1e-12)


def test_ece_of_half_confident_mistakes_and_three_quarter_confident_hits():
  """Two bins: conf 0.5 (wrong) sits in (0, 0.5], conf 0.75 (right) in (0.5, 1]:
  ECE = (2 * 0.5 + 2 * 0.25) / 4. One shared bin would give |1/2 - 5/8| = 1/8."""
  probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.75, 0.25], [0.25, 0.75]])
  labels = np.array([1, 1, 0, 1])
  assert metrics.ece(probs, labels, num_bins=2) == 0.375


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
