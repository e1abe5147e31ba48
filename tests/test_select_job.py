"""The select job end to end on tiny models: rankings, the ground-truth
evaluation (computed here or read from an earlier results.json), the reference
CNN, LEEP and NCE from the models' source heads, and configs that fail before
any work with a message that names them."""
import json
import os

from flax import traverse_util
import ml_collections
import numpy as np
import pytest
from scipy import special
from scipy import stats

from fusion import config_lib
from fusion import features
from fusion import hub
from fusion import main
from fusion import selection
from fusion.selection import job

import tiny_models

ARCHS = ("vit", "resnet", "dinov2")
# Source heads of 5 and 7 classes (two head sizes, one feature dim); dinov2 has none.
HEAD_CLASSES = {"vit": 5, "resnet": 7}


def _select_config(specs, **select_overrides):
  select = job.default_config()
  select.estimators = ("knn", "logme", "rsa_reference", "leep", "nce")
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
  return [{"name": a, "path": tiny_models.save_tiny(a, root / a,
                                                    num_labels=HEAD_CLASSES.get(a))}
          for a in ARCHS]


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
  assert set(digits["scores"]) == {"knn", "logme", "rsa_reference", "leep", "nce"}

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
  assert "| *oracle* |" in markdown
  assert "## linear_probe" in markdown and "## select/" not in markdown  # Picks: one table.


def test_leep_and_nce_score_the_source_heads(first_run, hub_specs, monkeypatch):
  workdir, markdown, home = first_run
  monkeypatch.setenv("FUSION_HOME", home)  # The job's cached features.
  from fusion.data import tasks
  task = tasks.get("digits")
  results = _read(workdir, "results.json")["rows"]
  truth = {r["model"]: r["test_accuracy"] for r in results if r["method"] == "linear_probe"}
  rankings = _read(workdir, "rankings.json")
  digits = rankings["tasks"]["digits"]
  assert digits["no_source_head"] == {"leep": ["dinov2"], "nce": ["dinov2"]}
  for name in ("leep", "nce"):
    assert f"`{name}` on digits: no source head for ['dinov2']; ranked among the 2 models " \
           "with one." in markdown
  headed = sorted(HEAD_CLASSES)
  for model in headed:
    backbone = hub.load(hub_specs[ARCHS.index(model)])
    fs = features.extract(backbone, task, "train800val200")
    # Source probabilities in float64 from the classifier as HF loads it (not
    # as fusion.hub reads it): `classifier` (ViT) or `params/classifier/1` (ResNet).
    _, params = tiny_models.load_hf(backbone.source, model, classifier=True)
    dense = {k[-1]: np.asarray(v, np.float64)
             for k, v in traverse_util.flatten_dict(params).items() if "classifier" in k}
    logits = fs.features.astype(np.float64) @ dense["kernel"] + dense["bias"]
    assert logits.shape == (1000, HEAD_CLASSES[model])
    probs = special.softmax(logits, axis=1)
    expected = {"leep": selection.ESTIMATORS["leep"](fs.features, fs.labels, source_probs=probs),
                "nce": selection.ESTIMATORS["nce"](fs.features, fs.labels,
                                                   source_labels=logits.argmax(1))}
    for name, value in expected.items():
      assert digits["scores"][name][model] == pytest.approx(value, rel=2e-6, abs=0), name
  evaluation = rankings["evaluation"]
  for name in ("leep", "nce"):
    assert sorted(digits["scores"][name]) == headed
    row, = [r for r in evaluation["rows"] if (r["estimator"], r["task"]) == (name, "digits")]
    scores = [digits["scores"][name][m] for m in headed]
    accuracy = [truth[m] for m in headed]
    assert row["num_models"] == 2
    # Ranked among the headed models only. (The random tiny heads predict one
    # class on every digit, so NCE is -H(Y) for both: a tie, NaN correlations.)
    assert row["spearman"] == pytest.approx(stats.spearmanr(scores, accuracy)[0], nan_ok=True)
    assert row["weighted_tau"] == pytest.approx(stats.weightedtau(scores, accuracy)[0],
                                                nan_ok=True)
    top = digits["rankings"][name][0]
    assert row["top1_regret"] == pytest.approx(100 * (max(accuracy) - truth[top]))
    pick, = [r for r in results if r["method"] == f"select/{name}"]
    assert pick["model"] == top and pick["regret"] == pytest.approx(row["top1_regret"])


def test_notes_name_the_models_without_a_head():
  per_task = {"t": {"scores": {"leep": {"a": 1.0, "b": 2.0}},
                    "no_source_head": {"leep": ["c"], "nce": ["a", "c"]}}}
  notes = job._notes([], per_task, "none", "train800val200")
  assert "- `leep` on t: no source head for ['c']; ranked among the 2 models with one." in notes
  assert ("- `nce` on t: no source head for ['a', 'c']; not ranked (fewer than 2 models "
          "have one).") in notes


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
