"""Ranking evaluation (weighted tau, Spearman, top-1 regret, tables) and the RSA
model taxonomy (all-pairs similarity, clustering, dendrogram)."""
import itertools
import os

import jax
import numpy as np
import pytest
import scipy.stats

from fusion.selection import ranking, rsa


# ------------------------------------------------------------------ ranking


def ref_weighted_tau(x, y):
  """Vigna's (2015) weighted tau with hyperbolic weights 1/(r+1), ranks from
  decreasing x (ties broken by decreasing y), averaged with the roles swapped.
  Small O(n^2) formula; inputs here have no ties."""
  def one_side(x, y):
    order = np.lexsort((-y, -x))              # decreasing x, then y
    rank = np.empty(len(x), int)
    rank[order] = np.arange(len(x))
    weight = 1 / (rank + 1)
    num = den_x = den_y = 0.0
    for i, j in itertools.combinations(range(len(x)), 2):
      w = weight[i] + weight[j]
      sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
      num += w * sx * sy
      den_x += w * sx * sx
      den_y += w * sy * sy
    return num / np.sqrt(den_x * den_y)
  return (one_side(x, y) + one_side(y, x)) / 2


def test_rank_correlations_match_references():
  rng = np.random.default_rng(0)
  accuracies = rng.uniform(0.3, 0.9, 12)
  scores = accuracies * 5 + rng.normal(size=12) * 0.4
  np.testing.assert_allclose(ranking.weighted_tau(scores, accuracies),
                             ref_weighted_tau(accuracies, scores), rtol=1e-10)
  np.testing.assert_allclose(ranking.spearman(scores, accuracies),
                             scipy.stats.spearmanr(scores, accuracies).statistic, rtol=1e-12)
  assert ranking.weighted_tau(accuracies * 3 + 1, accuracies) == pytest.approx(1.0)
  assert ranking.spearman(-accuracies, accuracies) == pytest.approx(-1.0)


def test_top1_regret_in_points():
  accuracies = np.array([0.70, 0.85, 0.60, 0.80])
  assert ranking.top1_regret([0.1, 0.9, 0.3, 0.2], accuracies) == pytest.approx(0.0)
  assert ranking.top1_regret([0.1, 0.2, 0.3, 0.9], accuracies) == pytest.approx(5.0)
  assert ranking.top1_regret([0.1, 0.2, 0.9, 0.3], accuracies) == pytest.approx(25.0)


def test_ranking_table_rows_and_means():
  accuracies = {"cifar": {"a": 0.9, "b": 0.7, "c": 0.5},
                "dtd": {"a": 0.4, "b": 0.6, "c": 0.5}}
  scores = {"cifar": {"logme": {"a": 3.0, "b": 2.0, "c": 1.0},
                      "knn": {"a": 0.1, "b": 0.3, "c": 0.2}},
            "dtd": {"logme": {"a": 1.0, "b": 3.0, "c": 2.0},
                    "knn": {"a": 0.9, "b": 0.1, "c": 0.2}}}
  table = ranking.ranking_table(scores, accuracies)
  assert table["tasks"] == ["cifar", "dtd"]
  assert table["estimators"] == ["logme", "knn"]
  assert table["metrics"] == list(ranking.METRICS)
  rows = {(r["estimator"], r["task"]): r for r in table["rows"]}
  assert len(rows) == 4 and rows[("logme", "cifar")]["num_models"] == 3
  assert rows[("logme", "cifar")]["spearman"] == pytest.approx(1.0)
  assert rows[("logme", "dtd")]["top1_regret"] == pytest.approx(0.0)
  assert rows[("knn", "cifar")]["top1_regret"] == pytest.approx(20.0)
  assert rows[("knn", "dtd")]["top1_regret"] == pytest.approx(20.0)
  means = {m["estimator"]: m for m in table["mean"]}
  for estimator in ("logme", "knn"):
    for metric in ranking.METRICS:
      want = np.mean([rows[(estimator, t)][metric] for t in ("cifar", "dtd")])
      assert means[estimator][metric] == pytest.approx(want)
  assert means["logme"]["spearman"] > means["knn"]["spearman"]


def test_ranking_bad_inputs():
  with pytest.raises(ValueError, match="fractions in"):
    ranking.top1_regret([1.0, 2.0], [85.0, 70.0])
  with pytest.raises(ValueError, match="same length"):
    ranking.spearman([1.0, 2.0, 3.0], [0.5, 0.6])
  with pytest.raises(ValueError, match="at least 2 models"):
    ranking.weighted_tau([1.0], [0.5])
  with pytest.raises(ValueError, match="finite"):
    ranking.spearman([np.nan, 1.0], [0.5, 0.6])
  with pytest.raises(ValueError, match="unknown ranking metrics"):
    ranking.evaluate([1.0, 2.0], [0.5, 0.6], metrics=("ndcg",))
  with pytest.raises(ValueError, match=r"missing scores: \['c'\]"):
    ranking.ranking_table({"t": {"e": {"a": 1.0, "b": 2.0}}},
                          {"t": {"a": 0.5, "b": 0.6, "c": 0.7}})
  with pytest.raises(ValueError, match="no ground-truth accuracies for tasks"):
    ranking.ranking_table({"t": {"e": {"a": 1.0}}}, {"u": {"a": 0.5}})


# ------------------------------------------------------------------ taxonomy


def hub(seed=0, n=40):
  """Two families of models: 0-2 share one latent space, 3-4 another (and have
  a different feature width)."""
  rng = np.random.default_rng(seed)
  latent_a, latent_b = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
  models = []
  for m in range(5):
    latent = latent_a if m < 3 else latent_b
    width = 8 if m < 3 else 10
    mix = rng.normal(size=(6, width))
    models.append(latent @ mix + 0.3 * rng.normal(size=(n, width)))
  return models


def test_similarity_matrix_matches_pairwise_spearman():
  """The RSA release code's taxonomy: each model's features centred over the
  examples, RDM = 1 - Pearson, Spearman between RDMs (uncentred on request)."""
  rng = np.random.default_rng(1)
  models = [f + rng.normal(0, 2, f.shape[1]) for f in hub()]  # offsets: centring matters
  upper = np.triu_indices(40, 1)
  for normalisation, prep in (("centering", lambda f: f - f.mean(0)), ("none", lambda f: f)):
    with jax.enable_x64(True):
      similarity = rsa.rsa_similarity_matrix(models, normalisation=normalisation)
    for i, j in itertools.combinations(range(5), 2):
      want = scipy.stats.spearmanr((1 - np.corrcoef(prep(models[i])))[upper],
                                   (1 - np.corrcoef(prep(models[j])))[upper]).statistic
      np.testing.assert_allclose(similarity[i, j], want, rtol=1e-9)
      assert similarity[j, i] == similarity[i, j]
    np.testing.assert_array_equal(np.diag(similarity), 1.0)
  with jax.enable_x64(True):
    np.testing.assert_array_equal(rsa.rsa_similarity_matrix(models),
                                  rsa.rsa_similarity_matrix(models, normalisation="centering"))
    centred = rsa.rsa_similarity_matrix(models)
  assert centred[0, 1] > centred[0, 3]


def test_clustering_recovers_families_and_dendrogram_is_written(tmp_path):
  similarity = rsa.rsa_similarity_matrix(hub())  # float32 default path
  linkage = rsa.cluster_models(similarity)
  assert linkage.shape == (4, 4)
  from scipy.cluster import hierarchy
  families = hierarchy.fcluster(linkage, 2, criterion="maxclust")
  assert len(set(families[:3])) == 1 and len(set(families[3:])) == 1
  assert families[0] != families[3]
  path = rsa.plot_dendrogram(similarity, [f"m{i}" for i in range(5)],
                             os.path.join(tmp_path, "plots", "taxonomy.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 1000


def test_taxonomy_bad_inputs(tmp_path):
  models = hub()
  with pytest.raises(ValueError, match="same N=40 probe examples"):
    rsa.rsa_similarity_matrix([models[0], models[1][:-1]])
  with pytest.raises(ValueError, match="at least 2 models"):
    rsa.rsa_similarity_matrix(models[:1])
  with pytest.raises(ValueError, match="normalisation='mean' is not one of"):
    rsa.rsa_similarity_matrix(models, normalisation="mean")
  with pytest.raises(ValueError, match="square"):
    rsa.cluster_models(np.ones((2, 3)))
  with pytest.raises(ValueError, match="method='nearest' is not one of"):
    rsa.cluster_models(np.eye(3), method="nearest")
  with pytest.raises(ValueError, match="got 2 names for 3 models"):
    rsa.plot_dendrogram(np.eye(3), ["a", "b"], os.path.join(tmp_path, "x.png"))
