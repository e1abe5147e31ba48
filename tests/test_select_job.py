"""The select job end to end on tiny models: rankings, the ground-truth
evaluation (computed here or read from an earlier results.json), the reference
CNN, and configs that fail before any work with a message that names them."""
import json
import os

import ml_collections
import numpy as np
import pytest
from scipy import stats

from fusion import config_lib
from fusion import main
from fusion import selection
from fusion.selection import job

import tiny_models

ARCHS = ("vit", "resnet", "dinov2")


def _select_config(specs, **select_overrides):
  select = job.default_config()
  select.estimators = ("knn", "logme", "rsa_reference", "leep")
  select.reference.steps = 30
  select.taxonomy.max_examples = 200
  select.update(select_overrides)
  return ml_collections.ConfigDict(dict(
      job="select", seed=0, tasks=("digits",), hub=specs, batch_size=64, num_devices=0,
      cache_dir="", linear_probe=config_lib.probe_config(learning_rates=(1e-2, 1e-1), steps=60),
      select=select))


@pytest.fixture(scope="module")
def hub_specs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  return [{"name": a, "path": tiny_models.save_tiny(a, root / a)} for a in ARCHS]


@pytest.fixture(scope="module")
def first_run(hub_specs, tmp_path_factory):
  home = tmp_path_factory.mktemp("home")
  os.environ["FUSION_HOME"] = str(home)  # Module scope: monkeypatch is per test.
  try:
    workdir = str(tmp_path_factory.mktemp("work"))
    markdown = main.run(_select_config(hub_specs), workdir)
  finally:
    del os.environ["FUSION_HOME"]
  return workdir, markdown, str(home)


def _read(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def test_rankings_and_evaluation_agree_with_the_ground_truth(first_run):
  workdir, markdown, _ = first_run
  for name in ("results.json", "results.md", "rankings.json", "plots/selection.png",
               "plots/taxonomy_digits.png", "plots/linear_probe.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  rows = _read(workdir, "results.json")["rows"]
  truth = {r["model"]: r for r in rows if r["method"] == "linear_probe"}
  assert sorted(truth) == sorted(ARCHS)
  rankings = _read(workdir, "rankings.json")
  digits = rankings["tasks"]["digits"]
  assert set(digits["scores"]) == {"knn", "logme", "rsa_reference"}  # leep: no head
  assert rankings["estimators"]["leep"]["skipped"]

  accuracy = np.array([truth[m]["test_accuracy"] for m in ARCHS])
  for name in ("knn", "logme", "rsa_reference"):
    scores = np.array([digits["scores"][name][m] for m in ARCHS])
    assert digits["rankings"][name] == [ARCHS[i] for i in np.argsort(-scores, kind="stable")]
    row, = [r for r in rows if r["method"] == f"select/{name}"]
    top = digits["rankings"][name][0]
    # The row reports the chosen model's own ground-truth test metrics.
    assert row["model"] == top and row["test_accuracy"] == truth[top]["test_accuracy"]
    assert row["regret"] == pytest.approx(100 * (accuracy.max() - truth[top]["test_accuracy"]))
    assert row["spearman"] == pytest.approx(stats.spearmanr(scores, accuracy)[0])
    tau = stats.weightedtau(scores, accuracy)[0]
    assert row["weighted_tau"] == pytest.approx(tau)
  assert 0 <= digits["reference"]["probe_accuracy"] <= 1
  assert digits["reference"]["num_examples"] == 200  # val200: unseen by the reference
  similarity = np.array(digits["taxonomy"]["similarity"])
  assert similarity.shape == (3, 3) and np.allclose(np.diag(similarity), 1)
  assert "Model selection: weighted Kendall tau" in markdown
  assert "| *oracle* |" in markdown and "`leep` (leep): skipped" in markdown
  assert "## linear_probe" in markdown and "## select/" not in markdown  # Picks: one table.


def test_ground_truth_from_an_earlier_results_json(first_run, hub_specs, tmp_path,
                                                   monkeypatch):
  workdir, _, home = first_run
  monkeypatch.setenv("FUSION_HOME", home)  # Features come from the first run's cache.
  config = _select_config(hub_specs, estimators=("knn", "logme"),
                          ground_truth=os.path.join(workdir, "results.json"))
  main.run(config, str(tmp_path))
  rows = _read(str(tmp_path), "results.json")["rows"]
  assert {r["method"] for r in rows} == {"select/knn", "select/logme"}  # No probes retrained.
  before = {r["method"]: r for r in _read(workdir, "results.json")["rows"]}
  for row in rows:
    for key in ("model", "weighted_tau", "spearman", "regret", "test_accuracy"):
      assert row[key] == pytest.approx(before[row["method"]][key]), key


def test_an_estimator_that_returns_nan_is_left_out_not_fatal(first_run, hub_specs, tmp_path,
                                                             monkeypatch):
  workdir, _, home = first_run
  monkeypatch.setenv("FUSION_HOME", home)
  logme = selection.BATCHED["logme"]

  def nan_for_the_first_model(stack, labels, **options):
    scores = np.array(logme(stack, labels, **options))
    scores[0] = np.nan
    return scores

  monkeypatch.setitem(selection.BATCHED, "logme", nan_for_the_first_model)
  config = _select_config(hub_specs, estimators=("knn", "logme"),
                          ground_truth=os.path.join(workdir, "results.json"))
  config.seed = 1  # Not the cached rankings of the test above: these must be computed.
  markdown = main.run(config, str(tmp_path))
  digits = _read(str(tmp_path), "rankings.json")["tasks"]["digits"]
  assert set(digits["scores"]) == {"knn"}
  assert digits["failed"] == {"logme": [ARCHS[0]]}
  methods = {r["method"] for r in _read(str(tmp_path), "results.json")["rows"]}
  assert methods == {"select/knn"}
  assert f"`logme` on digits: NaN/inf scores for ['{ARCHS[0]}']" in markdown


@pytest.mark.parametrize("overrides, message", [
    (dict(estimators=()), "select.estimators is empty"),
    (dict(estimators=("knn", "knn")), r"lists \['knn'\] more than once"),
    (dict(estimators=("bogus",)), "'bogus', which is unknown"),
    (dict(estimators=("knn",), options={"knn": {"kk": 3}}), r"unknown option\(s\) \['kk'\]"),
    (dict(estimators=("logme",), options={"logme": {"reference": "model"}}),
     "only .* compare with a reference"),
    (dict(ground_truth="/no/such/results.json"), "neither one of"),
    (dict(models_per_call=0), "models_per_call=0 must be >= 1"),
    (dict(split="train"), "select.split='train' is not a split"),
])
def test_bad_select_configs_fail_before_any_work(overrides, message, tmp_path, monkeypatch):
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home"))
  specs = [{"name": "missing", "path": str(tmp_path / "no_model_here")}]
  with pytest.raises(ValueError, match=message):
    job.run(_select_config(specs, **overrides), str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "home")  # Nothing loaded, built or extracted.


def test_a_hub_of_one_model_cannot_be_ranked(hub_specs, tmp_path, monkeypatch):
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  with pytest.raises(ValueError, match="needs at least 2"):
    job.run(_select_config(hub_specs[:1]), str(tmp_path / "work"))


def test_a_rerun_takes_the_rankings_from_the_cache(first_run, hub_specs, tmp_path,
                                                   monkeypatch):
  workdir, _, home = first_run
  monkeypatch.setenv("FUSION_HOME", home)

  def recompute(*args):
    raise AssertionError("rank_task ran again although its result is cached")

  monkeypatch.setattr(job, "rank_task", recompute)
  main.run(_select_config(hub_specs), str(tmp_path))
  assert _read(str(tmp_path), "rankings.json") == _read(workdir, "rankings.json")
  assert os.path.exists(tmp_path / "plots" / "taxonomy_digits.png")
  # Another select config is another entry: computed, not served stale.
  with pytest.raises(AssertionError, match="ran again"):
    main.run(_select_config(hub_specs, split="val200"), str(tmp_path / "other"))
