"""Linear probe: standardisation against numpy, the learning-rate sweep on
val200, the final head trained on train800val200 and scored on test."""
import numpy as np
import pytest

from fusion import config_lib
from fusion import features as features_lib
from fusion import metrics
from fusion.methods import linear_probe
from fusion import sharding

NUM_CLASSES = 4


def _blobs(rng, n, means, noise=0.5):
  labels = np.arange(n) % NUM_CLASSES
  x = means[labels] + noise * rng.normal(size=(n, means.shape[1]))
  # Scales that differ by orders of magnitude, as between real backbones.
  x = x * np.logspace(-2, 2, means.shape[1]) + 3.0
  return features_lib.FeatureSet(x.astype(np.float32), labels.astype(np.int32), "blobs")


def test_standardizer_matches_numpy_float64():
  x = np.random.default_rng(0).normal(3.0, 7.0, size=(50, 6))
  x[:, 2] = 1.5  # A constant dimension must not divide by zero.
  norm = linear_probe.Standardizer.fit(x.astype(np.float32))
  y = np.random.default_rng(1).normal(size=(9, 6))
  reference = (y - x.mean(0)) / np.where(x.std(0) > 1e-6, x.std(0), 1e-6)
  np.testing.assert_allclose(norm(y), reference, rtol=1e-5, atol=1e-5)


def test_head_logits_match_numpy_reference():
  rng = np.random.default_rng(2)
  params = {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)}
  x = rng.normal(size=(40, 5))
  np.testing.assert_allclose(linear_probe.logits_of(params, x),
                             x @ params["kernel"] + params["bias"], rtol=1e-12)


def test_probe_sweeps_on_val200_and_retrains_on_train800val200():
  rng = np.random.default_rng(0)
  means = 3.0 * rng.normal(size=(NUM_CLASSES, 8))
  # The final head must be fit on train800val200: there the classes sit at other
  # means, so a head fit on train800 alone would score near zero on test.
  moved = np.roll(means, 1, axis=0)
  splits = {"train800": _blobs(rng, 160, means), "val200": _blobs(rng, 80, means),
            "train800val200": _blobs(rng, 240, moved), "test": _blobs(rng, 200, moved)}
  config = config_lib.probe_config(learning_rates=(1e-4, 1e-1), steps=150, batch_size=64)
  preds, result = linear_probe.probe(splits, NUM_CLASSES, config, mesh=sharding.make_mesh(),
                                     seed=0)
  val = metrics.classification_metrics(preds.logits["val200"], preds.labels["val200"], "")
  test = metrics.classification_metrics(preds.logits["test"], preds.labels["test"], "")
  np.testing.assert_array_equal(preds.labels["test"], splits["test"].labels)

  assert set(result["sweep"]) == {"0.0001", "0.1"}
  best = max(result["sweep"].values())
  assert result["sweep"][f"{result['learning_rate']:g}"] == best == val["accuracy"]
  assert result["learning_rate"] == 0.1  # 150 steps at 1e-4 barely move a zero head.
  assert test["accuracy"] > 0.95
  assert test["nll"] < 0.5 and 0 <= test["ece"] < 0.2


def test_probe_rejects_an_empty_learning_rate_grid():
  config = config_lib.probe_config(learning_rates=())
  with pytest.raises(ValueError, match="learning_rates is empty"):
    linear_probe.probe({}, NUM_CLASSES, config, mesh=sharding.make_mesh(), seed=0)
