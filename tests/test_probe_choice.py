"""The linear probe's learning-rate choice: the best val200 accuracy wins, even
against a lower NLL; among rates tied on accuracy, the lower val200 NLL wins.

The val200 labels of the first 10% of the examples are moved to the next
class, so every head that has learnt the blobs scores exactly 0.9 there (ties
at the top), while its NLL depends on how confident the learning rate made it:
overconfident heads pay a lot on the moved labels. A zero learning rate leaves
the zero-initialised head at uniform predictions: accuracy 1/4 (argmax of equal
logits is class 0), NLL log 4, lower than that of the overconfident head.
"""
import numpy as np
import pytest

from fusion import config_lib
from fusion import features as features_lib
from fusion import metrics
from fusion import sharding
from fusion.methods import linear_probe

NUM_CLASSES = 4
LEARNING_RATES = (0.0, 0.01, 0.1, 1.0)
CONFIG = dict(steps=100, batch_size=64)


def _blobs(rng, n, means, moved_fraction=0.0):
  labels = np.arange(n) % NUM_CLASSES
  x = means[labels] + 0.5 * rng.normal(size=(n, means.shape[1]))
  moved = int(round(moved_fraction * n))
  labels[:moved] = (labels[:moved] + 1) % NUM_CLASSES
  return features_lib.FeatureSet(x.astype(np.float32), labels.astype(np.int32), "blobs")


@pytest.fixture(scope="module")
def splits():
  rng = np.random.default_rng(0)
  means = 3.0 * rng.normal(size=(NUM_CLASSES, 8))
  return {"train800": _blobs(rng, 160, means), "val200": _blobs(rng, 80, means, 0.1),
          "train800val200": _blobs(rng, 240, means), "test": _blobs(rng, 80, means)}


def _probe(splits, learning_rates):
  config = config_lib.probe_config(learning_rates=learning_rates, **CONFIG)
  preds, fields = linear_probe.probe(splits, NUM_CLASSES, config, mesh=sharding.make_mesh(),
                                     seed=0)
  val = metrics.classification_metrics(preds.logits["val200"], preds.labels["val200"], "val_")
  return {**fields, **val}


@pytest.fixture(scope="module")
def val200(splits):
  """learning rate -> its val200 metrics, each from a sweep of that rate alone."""
  alone = {lr: _probe(splits, (lr,)) for lr in LEARNING_RATES}
  return {lr: {k: r[k] for k in ("val_accuracy", "val_nll")} for lr, r in alone.items()}


def test_the_best_val200_accuracy_wins_even_against_a_lower_nll(splits, val200):
  best, worst = 1.0, 0.0
  # The case: accuracy and NLL disagree, and the worse rate is listed last.
  assert val200[best]["val_accuracy"] == 0.9 and val200[worst]["val_accuracy"] == 0.25
  assert val200[best]["val_nll"] > val200[worst]["val_nll"] + 1.0
  result = _probe(splits, (best, worst))
  assert result["learning_rate"] == best
  assert result["sweep"] == {"1": 0.9, "0": 0.25}
  assert result["val_accuracy"] == 0.9
  assert result["val_nll"] == pytest.approx(val200[best]["val_nll"], rel=1e-9)


def test_accuracy_ties_go_to_the_lower_val200_nll(splits, val200):
  rates = (0.1, 1.0, 0.0, 0.01)  # Neither first nor last is the answer.
  tied = [lr for lr in rates if val200[lr]["val_accuracy"] == 0.9]
  assert tied == [0.1, 1.0, 0.01]  # Three-way tie at the top; 0.0 scores 0.25.
  nll = {lr: val200[lr]["val_nll"] for lr in tied}
  assert len(set(np.round(list(nll.values()), 3))) == 3  # Clearly different NLLs.
  want = min(tied, key=nll.get)
  assert want == 0.01 and nll[want] < min(nll[0.1], nll[1.0]) - 0.1
  result = _probe(splits, rates)
  assert result["learning_rate"] == want
  assert result["val_accuracy"] == 0.9
  assert result["val_nll"] == pytest.approx(nll[want], rel=1e-9)
  assert result["sweep"] == {"0.1": 0.9, "1": 0.9, "0": 0.25, "0.01": 0.9}
