"""Greedy ensembles and soups: the selection rule against brute force, the
averages against numpy, the soup's order and acceptance rule, and the
ensemble methods end to end on tiny models through the suite."""
import itertools
import json
import os

import ml_collections
import numpy as np
import pytest

from fusion import config_lib
from fusion import main
from fusion import methods
from fusion import metrics
from fusion import predictions
from fusion.methods import ensemble
from fusion.methods import finetune
from fusion.methods import soup

import tiny_models


def _random_probs(rng, n, c, sharpness):
  logits = sharpness * rng.normal(size=(n, c))
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def _nll(probs_list, idx, labels):
  return metrics.nll_from_probs(np.mean([probs_list[i] for i in idx], axis=0), labels)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_selection_equals_brute_force_step_by_step(seed):
  rng = np.random.default_rng(seed)
  n, c, m = 30, 4, 4
  labels = rng.integers(0, c, n)
  # Candidates of mixed quality: some see the labels, some are noise.
  probs = [_random_probs(rng, n, c, 3.0) for _ in range(m)]
  for i in range(2):
    probs[i] = 0.5 * probs[i] + 0.5 * np.eye(c)[labels] * (rng.random((n, 1)) < 0.7) + 1e-3
    probs[i] /= probs[i].sum(1, keepdims=True)
  chosen = ensemble.greedy_select(probs, labels, max_size=3)
  # Each step: the multiset of that size with the lowest NLL among those that
  # add one candidate (repeats allowed) to the previous step's multiset.
  previous: tuple = ()
  for size in range(1, len(chosen) + 1):
    supersets = [s for s in itertools.combinations_with_replacement(range(m), size)
                 if all(s.count(i) >= previous.count(i) for i in set(previous))]
    best = min(supersets, key=lambda s: (_nll(probs, s, labels), s))
    assert tuple(sorted(chosen[:size])) == best
    previous = best
  # The stopping rule: below the cap, no addition lowers the NLL any more.
  current = _nll(probs, chosen, labels)
  if len(chosen) < 3:
    assert all(_nll(probs, chosen + [i], labels) >= current for i in range(m))
  # Size 1 is the best single candidate.
  assert chosen[0] == int(np.argmin([_nll(probs, [i], labels) for i in range(m)]))


def test_greedy_selection_repeats_a_candidate_when_that_lowers_the_nll():
  labels = np.array([0, 0, 0, 1])
  strong = np.array([[.65, .35], [.65, .35], [.65, .35], [.5, .5]])
  weak = np.array([[.5, .5], [.5, .5], [.5, .5], [.02, .98]])
  # The best mix is about 2:1, which greedy reaches by taking `strong` twice.
  chosen = ensemble.greedy_select([strong, weak], labels, max_size=10)
  nll = [_nll([strong, weak], chosen[:k], labels) for k in range(1, len(chosen) + 1)]
  assert chosen[0] == 0 and all(b < a for a, b in zip(nll, nll[1:]))
  assert chosen == [0, 1, 0]  # With replacement: `strong` again.
  assert ensemble.greedy_select([strong, weak], labels, max_size=1) == [0]


def test_average_is_the_mean_of_probabilities_with_multiplicities():
  rng = np.random.default_rng(0)
  labels = {"val200": rng.integers(0, 3, 5), "test": rng.integers(0, 3, 6)}
  results = [predictions.Result(predictions.Predictions(
      {s: rng.normal(size=(len(y), 3)) for s, y in labels.items()}, labels), (f"m{i}",), 1.0)
      for i in range(3)]
  out = ensemble.ensemble_result(results, [2, 0, 1], {})
  for split, y in labels.items():
    soft = [np.exp(r.predictions.logits[split]) / np.exp(r.predictions.logits[split]).sum(
        1, keepdims=True) for r in results]
    reference = (2 * soft[0] + soft[2]) / 3
    np.testing.assert_allclose(np.exp(out.predictions.logits[split]), reference, rtol=1e-6)
  assert out.members == ("m0", "m0", "m2") and out.inference_gflops == 2.0


def test_uniform_soup_averages_weights_exactly():
  rng = np.random.default_rng(1)
  trees = [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": {"c": rng.normal(size=4)}}
           for _ in range(3)]
  avg = soup.average_params(trees)
  np.testing.assert_allclose(avg["a"], np.mean([t["a"] for t in trees], 0), rtol=1e-6)
  np.testing.assert_array_equal(avg["b"]["c"], np.mean([t["b"]["c"] for t in trees], 0))
  assert avg["a"].dtype == np.float32


def test_greedy_soup_visits_best_first_and_keeps_what_does_not_lower_accuracy():
  # Ingredients are numbers; a soup's (accuracy, NLL) is a lookup of its mean.
  ingredients = [np.array(v) for v in (1.0, 2.0, 4.0, 8.0)]
  scores = {1.0: (0.5, 1.0), 2.0: (0.9, 0.4), 4.0: (0.7, 0.5), 8.0: (0.9, 0.3),
            5.0: (0.95, 0.2), 14 / 3: (0.95, 0.25), 15 / 4: (0.6, 0.9)}
  visited = []

  def val_score(p):
    visited.append(float(p))
    return scores[min(scores, key=lambda v: abs(v - float(p)))]

  result, kept = soup.greedy_soup(ingredients, val_score)
  # Best first: 8 (0.9, NLL 0.3) before 2 (0.9, NLL 0.4), then 4, then 1. {8, 2, 4}
  # ties {8, 2} at 0.95 and is kept ("does not drop"); adding 1 drops to 0.6.
  assert kept == [3, 1, 2]
  assert float(result) == pytest.approx(14 / 3)
  assert visited[4:] == pytest.approx([5.0, 14 / 3, 15 / 4])


def _suite_config(specs, methods_, **overrides):
  ft = finetune.default_config()
  ft.learning_rates, ft.steps, ft.batch_size = (0.01, 0.05), (40,), 32
  ens = ensemble.default_config()
  ens.top_k = 2
  values = dict(job="suite", seed=0, tasks=("digits",), hub=specs, batch_size=64,
                num_devices=0, cache_dir="", predictions_dir="", methods=methods_,
                linear_probe=config_lib.probe_config(learning_rates=(1e-2,), steps=20),
                finetune=ft, ensemble=ens)
  return ml_collections.ConfigDict({**values, **overrides})


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  home = str(tmp_path_factory.mktemp("home"))
  os.environ["FUSION_HOME"] = home  # Module scope: monkeypatch is per test.
  specs = [{"name": a, "path": tiny_models.save_tiny(a, root / a)}
           for a in ("resnet", "vit", "dinov2")]
  workdir = str(tmp_path_factory.mktemp("work"))
  names = ("finetune", "ensemble", "finetune_best", "uniform_topk", "seed_ensemble",
           "uniform_soup", "greedy_soup")
  markdown = main.run(_suite_config(specs, names), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    rows = json.load(f)["rows"]
  yield specs, rows, markdown, home
  del os.environ["FUSION_HOME"]


def test_the_ensemble_methods_use_the_cached_fine_tunes(suite_run):
  specs, rows, markdown, home = suite_run
  cache = predictions.Cache(os.path.join(home, "predictions"))
  by_method = {}
  for r in rows:
    by_method.setdefault(r["method"], []).append(r)
  finetunes = {r["model"]: cache.load(r["unit"]) for r in by_method["finetune"]}
  greedy, = by_method["ensemble"]
  top = greedy["candidates"]
  assert top == greedy["ranking"][:2]
  # The members are the greedy choice on the fine-tunes' val200 predictions ...
  labels = finetunes[top[0]].predictions.labels["val200"]
  chosen = ensemble.greedy_select([metrics.softmax(finetunes[m].predictions.logits["val200"])
                                   for m in top], labels, 10)
  assert greedy["selection_order"] == [top[i] for i in chosen]
  # ... and its test predictions average their retrains' test predictions.
  members = greedy.get("members") or [greedy["model"]]
  test = np.mean([metrics.softmax(finetunes[m].predictions.logits["test"]) for m in members], 0)
  y = finetunes[top[0]].predictions.labels["test"]
  assert greedy["test_accuracy"] == pytest.approx(np.mean(test.argmax(1) == y))
  best, = by_method["finetune_best"]
  val = {m: (finetunes[m].predictions.logits["val200"].argmax(1) == labels).mean() for m in top}
  assert best["model"] == max(top, key=lambda m: (val[m], -top.index(m)))
  assert best["test_accuracy"] == pytest.approx(
      [r for r in by_method["finetune"] if r["model"] == best["model"]][0]["test_accuracy"])
  uniform, = by_method["uniform_topk"]
  assert sorted(uniform["members"]) == sorted(top)
  assert uniform["inference_gflops"] == pytest.approx(
      sum(r["inference_gflops"] for r in by_method["finetune"] if r["model"] in top))
  seeds, = by_method["seed_ensemble"]
  assert seeds["members"] == [greedy["ranking"][0]] * 2 and seeds["seeds"] == [0, 1]
  for name in ("uniform_soup", "greedy_soup"):
    row, = by_method[name]
    assert row["model"] == best["model"] and row["inference_gflops"] == best["inference_gflops"]
  assert "## All methods: test accuracy (%)" in markdown and "| seed_ensemble |" in markdown


@pytest.mark.parametrize("overrides, message", [
    ({"top_k": 4}, "top_k=4 is larger than the hub, which has 3 models"),
    ({"ranking": {"estimator": "bogus", "options": {}}}, "estimator='bogus' is unknown"),
])
def test_bad_ensemble_configs_are_named(suite_run, tmp_path, overrides, message):
  specs = suite_run[0]
  # The probes come first in plan order: the error must come before them.
  config = _suite_config(specs, ("linear_probe", "ensemble"))
  config.ensemble.update(overrides)
  with pytest.raises(ValueError, match=message):
    main.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "rows.jsonl")


def test_an_empty_sweep_grid_is_named(suite_run, tmp_path):
  config = _suite_config(suite_run[0], ("finetune",))
  config.finetune.learning_rates = ()
  with pytest.raises(ValueError, match="sweep grid is empty"):
    main.run(config, str(tmp_path))


def test_methods_share_the_ensemble_config():
  for name in ("finetune_best", "uniform_topk", "seed_ensemble", "greedy_all",
               "uniform_soup", "greedy_soup"):
    assert methods.get(name).config_key == "ensemble"
    assert methods.get(name).uses == ("finetune",)
