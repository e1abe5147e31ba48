"""Properties of every registered estimator: label-permutation invariance, the
scale invariances each method claims, separable beats shuffled labels, input
validation, and the vmapped batched path equal to the per-model path."""
import jax
import numpy as np
import pytest

from fusion import selection

# The same shapes and options as test_selection_references.py, so that the two
# modules share compilations.
N, D, C = 120, 16, 3
NAMES = sorted(selection.ESTIMATORS)


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def make_task(seed=0, separation=1.0, models=None):
  """Features with class structure ([N, D], or [models, N, D]) and labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, N)
  labels[:C] = np.arange(C)
  shape = (N, D) if models is None else (models, N, D)
  centres = rng.normal(size=(C, D)) * separation
  return rng.normal(size=shape) + centres[labels] + 0.2, labels


def source_probs(labels, seed=1, z=6, models=None, informative=1.5):
  rng = np.random.default_rng(seed)
  shape = (len(labels), z) if models is None else (models, len(labels), z)
  logits = rng.normal(size=shape) + informative * np.eye(C, z)[labels]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def options_for(name, labels, models=None):
  """Extra inputs: LEEP and NCE read a source head whose predictions carry
  information about the true labels."""
  if name in ("leep", "nce"):
    return {"source_probs": source_probs(labels, models=models)}
  if name == "nleep":
    return {"pca_dim": 8, "components_per_class": 2}
  return {}


def score(name, features, labels, **extra):
  return selection.ESTIMATORS[name](features, labels, **options_for(name, labels), **extra)


def test_registry_is_complete_and_consistent():
  assert set(NAMES) == {"knn", "logme", "rsa", "dds", "cka", "leep", "nleep", "nce", "hscore",
                        "shrinkage_hscore", "transrate", "gbc", "sfda", "parc"}
  assert set(selection.BATCHED) == set(selection.ESTIMATORS)
  assert selection.get("logme") is selection.ESTIMATORS["logme"]
  with pytest.raises(ValueError, match="unknown estimator 'lgome'"):
    selection.get("lgome")


@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_relabelling_classes(name):
  x, y = make_task(0)
  permutation = np.array([2, 0, 1])
  extra = options_for(name, y)
  # Keep the source head attached to the examples, not to the class ids.
  before = selection.ESTIMATORS[name](x, y, **extra)
  after = selection.ESTIMATORS[name](x, permutation[y], **extra)
  np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-12)
  # Class ids need not be contiguous either: {0, 1, 2} -> {3, 7, 9}.
  sparse = np.array([3, 7, 9])[y]
  np.testing.assert_allclose(selection.ESTIMATORS[name](x, sparse, **extra), before,
                             rtol=1e-9, atol=1e-12)


# (estimator, options, transform) for every scale invariance an estimator claims:
#   global   x -> 3.7 x            per_feature  x -> x * s_d (s_d >= 1)
#   per_example  x_i -> s_i x_i    linear       x -> x A, A invertible
#   shift    x_i -> x_i + b        (every example moved by one vector b)
# LogME, N-LEEP, TransRate and SFDA make no claim (eps / reg_covar / exp(-5
# lambda) are absolute); LEEP and NCE do not read the features at all.
_RNG = np.random.default_rng(42)
_PER_FEATURE = _RNG.uniform(1.0, 5.0, D)
_PER_EXAMPLE = _RNG.uniform(0.2, 5.0, (N, 1))
_LINEAR = _RNG.normal(size=(D, D)) + 3 * np.eye(D)
_SHIFT = _RNG.normal(0, 3, D)
TRANSFORMS = {
    "global": lambda x: 3.7 * x,
    "per_feature": lambda x: x * _PER_FEATURE,
    "per_example": lambda x: x * _PER_EXAMPLE,
    "linear": lambda x: x @ _LINEAR,
    "shift": lambda x: x + _SHIFT,
}
SCALE_INVARIANT = [
    ("knn", {"metric": "cosine", "k": 4}, "global"),
    ("knn", {"metric": "cosine", "k": 4}, "per_example"),
    ("knn", {"metric": "l2", "k": 5}, "global"),
    ("rsa", {}, "global"),
    ("rsa", {}, "shift"),   # centred over the examples (the default)
    ("rsa", {"normalisation": "none"}, "per_example"),
    ("rsa", {"normalisation": "zscore"}, "per_feature"),
    ("rsa", {"normalisation": "zscore"}, "shift"),
    ("cka", {}, "global"),
    ("dds", {}, "per_feature"),   # z-score + Laplacian
    ("dds", {"normalisation": "none", "function": "rbf"}, "global"),
    ("dds", {"normalisation": "centering", "function": "euclidean"}, "global"),
    ("dds", {"normalisation": "none", "function": "cosine"}, "per_example"),
    ("hscore", {}, "linear"),
    ("shrinkage_hscore", {}, "global"),
    ("gbc", {"gaussian_type": "spherical"}, "global"),
    ("gbc", {"gaussian_type": "diagonal"}, "per_feature"),
    ("parc", {}, "global"),
    ("parc", {}, "shift"),  # not per_feature: PCA runs (and turns the axes) even for D <= 32
    ("leep", {}, "linear"),
    ("nce", {}, "linear"),
]


@pytest.mark.parametrize("name,extra,transform", SCALE_INVARIANT)
def test_scale_invariance(name, extra, transform):
  x, y = make_task(1)
  before = score(name, x, y, **extra)
  after = score(name, TRANSFORMS[transform](x), y, **extra)
  np.testing.assert_allclose(after, before, rtol=1e-7, atol=1e-10)


def test_laplacian_dds_without_zscore_is_not_scale_invariant():
  # The counter-example that makes the claims above worth checking.
  x, y = make_task(1)
  options = {"normalisation": "none", "function": "laplacian"}
  assert abs(score("dds", x, y, **options) - score("dds", 3.7 * x, y, **options)) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_separable_features_beat_shuffled_labels(name):
  x, y = make_task(2, separation=2.0)
  shuffled = np.random.default_rng(3).permutation(y)
  extra = options_for(name, y)  # the source head still matches the true labels
  good = selection.ESTIMATORS[name](x, y, **extra)
  bad = selection.ESTIMATORS[name](x, shuffled, **extra)
  assert np.isfinite(good) and np.isfinite(bad)
  assert good > bad, (name, good, bad)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_per_model(name):
  stack, y = make_task(4, models=3)
  stack[1] *= 2.0  # models that differ in more than noise
  stack[2] = np.tanh(stack[2])
  extra = options_for(name, y, models=3)
  batched = selection.BATCHED[name](stack, y, **extra)
  assert batched.shape == (3,)
  for m in range(3):
    single_extra = {k: v[m] for k, v in extra.items() if isinstance(v, np.ndarray)}
    single_extra.update({k: v for k, v in extra.items() if not isinstance(v, np.ndarray)})
    np.testing.assert_allclose(batched[m], selection.ESTIMATORS[name](stack[m], y, **single_extra),
                               rtol=1e-7, atol=1e-10)


def test_batched_nleep_pads_models_with_different_pca_sizes():
  stack, y = make_task(11, models=2)
  low_rank = np.random.default_rng(12).normal(size=(N, 3)) @ np.random.default_rng(13).normal(
      size=(3, D))
  stack[1] = low_rank + 0.05 * stack[1]  # 80% of its variance in ~3 axes, model 0 needs ~10
  options = {"components_per_class": 2, "key": 5}
  dims = [selection.common.num_dims_for_variance(f, 0.8) for f in stack]
  assert dims[0] > dims[1]
  batched = selection.BATCHED["nleep"](stack, y, **options)
  for m in range(2):
    np.testing.assert_allclose(batched[m], selection.ESTIMATORS["nleep"](stack[m], y, **options),
                               rtol=1e-7)


def test_batched_with_shared_reference_and_source_labels():
  stack, y = make_task(5, models=2)
  reference = np.random.default_rng(6).normal(size=(N, 5)) + np.eye(C, 5)[y]
  got = selection.BATCHED["rsa"](stack, y, reference_features=reference)
  for m in range(2):
    np.testing.assert_allclose(got[m], selection.ESTIMATORS["rsa"](
        stack[m], y, reference_features=reference), rtol=1e-9)
  z = np.random.default_rng(7).integers(0, 4, (2, N))
  got = selection.BATCHED["nce"](stack, y, source_labels=z)
  for m in range(2):
    np.testing.assert_allclose(got[m], selection.ESTIMATORS["nce"](stack[m], y, source_labels=z[m]),
                               rtol=1e-9)


# ------------------------------------------------------------------ bad inputs


def _bad_inputs():
  x, y = make_task(8)
  nan = x.copy()
  nan[5, 3] = np.nan
  inf = x.copy()
  inf[7, 0] = -np.inf
  return {
      "one class": (x, np.zeros(N, np.int64), "at least 2 classes"),
      "nan": (nan, y, "NaN/inf"),
      "inf": (inf, y, "NaN/inf"),
      "constant": (np.full((N, D), 0.5), y, "constant over the"),
      "length": (x, y[:-1], f"{N} examples but labels have {N - 1}"),
      "features rank 1": (x[:, 0], y, r"features must have shape \[N, D\]"),
      "features rank 3": (x[None], y, r"features must have shape \[N, D\]"),
      "labels rank 2": (x, np.eye(C)[y].astype(np.int64), r"labels must have shape \[N\]"),
      "negative label": (x, np.where(y == 2, -1, y), r"labels must lie in \[0, inf\)"),
      "float labels": (x, y.astype(np.float32), "labels must be integer"),
      "bool labels": (x, y == 1, "labels must be integer"),
  }


BAD = _bad_inputs()


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name, case):
  features, labels, message = BAD[case]
  with pytest.raises(ValueError, match=message):
    selection.ESTIMATORS[name](features, labels, **options_for(name, make_task(8)[1]))


@pytest.mark.parametrize("name", NAMES)
def test_labels_beyond_num_classes_raise(name):
  x, y = make_task(8)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    selection.ESTIMATORS[name](x, y, num_classes=2, **options_for(name, y))


@pytest.mark.parametrize("name", NAMES)
def test_batched_bad_model_is_named(name):
  stack, y = make_task(9, models=3)
  stack[2, 4, 1] = np.nan
  with pytest.raises(ValueError, match="features of model 2 contain 1 NaN/inf"):
    selection.BATCHED[name](stack, y, **options_for(name, y, models=3))


def test_estimator_specific_bad_options():
  x, y = make_task(10)
  cases = [
      ("knn", {"k": N}, r"k=120 must be an integer in \[1, N-1\]"),
      ("knn", {"metric": "manhattan"}, "metric='manhattan' is not one of"),
      ("leep", {}, "leep needs source_probs"),
      ("leep", {"source_probs": np.ones((N, 4))}, "rows must sum to 1"),
      ("leep", {"source_probs": source_probs(y)[:-1]}, r"source_probs must have shape \[N, Z\]"),
      ("nce", {}, "exactly one of source_labels"),
      ("nce", {"source_labels": np.ones(N)}, "non-negative integer"),
      ("rsa", {"reference_features": x[:-1]}, r"reference_features must have shape \[N=120"),
      ("rsa", {"normalisation": "l2"}, "normalisation='l2' is not one of"),
      ("dds", {"function": "poly"}, "function='poly' is not one of"),
      ("dds", {"normalisation": "l2"}, "normalisation='l2' is not one of"),
      ("cka", {"kernel": "pearson"}, "kernel='pearson' is not one of"),
      ("gbc", {"gaussian_type": "full"}, "gaussian_type='full' is not one of"),
      ("nleep", {"num_components": 1000}, r"num_components=1000 must be an integer in \[1, N=120\]"),
      ("nleep", {"pca_variance": 1.5}, r"pca_variance must lie in \(0, 1\)"),
      ("nleep", {"init": "k-means++"}, r"init='k-means\+\+' is not one of"),
      ("transrate", {"eps": 0.0}, "eps must be > 0"),
      ("parc", {"pca_dim": 0}, "pca_dim must be a positive integer"),
  ]
  for name, options, message in cases:
    with pytest.raises(ValueError, match=message):
      selection.ESTIMATORS[name](x, y, **options)


# ------------------------------------------------------ kNN vote ties

# Two classes, k = 2: every example's two nearest others vote once for each
# class, so every prediction is a tie. Positions on a line (l2) or angles in
# degrees on the unit circle (cosine) give the same neighbour order.
#   model 0: 0, 1 (class 1) and 3, 4 (class 0): each example's nearest other is
#     of its own class: nearest-member rule 4/4 right; the smallest class id
#     (scipy.stats.mode's rule) gets the two class-1 examples wrong: 2/4.
#   model 1: 0, 1 (class 1) and 1.5, 10 (class 0): the nearest-member rule gets
#     0 and 10 right (2/4); 1.5 sees two class-1 votes (wrong under either rule),
#     and the smallest id gets only 10 right (1/4).
TIE_LABELS = np.array([1, 1, 0, 0])
TIE_POSITIONS = np.array([[0.0, 1.0, 3.0, 4.0], [0.0, 1.0, 1.5, 10.0]])
TIE_ACCURACY = np.array([1.0, 0.5])  # Smallest class id instead: [0.5, 0.25].


def _tie_features(metric):
  if metric == "l2":
    return TIE_POSITIONS[..., None]
  angles = np.deg2rad(TIE_POSITIONS)
  return np.stack([np.cos(angles), np.sin(angles)], axis=-1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_vote_ties_go_to_the_class_of_the_nearest_member(metric):
  knn = selection.ESTIMATORS["knn"]
  for features, want in zip(_tie_features(metric), TIE_ACCURACY):
    assert knn(features, TIE_LABELS, k=2, metric=metric) == want
    # Renaming the classes does not change who wins a tie.
    assert knn(features, 1 - TIE_LABELS, k=2, metric=metric) == want


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_batched_vote_ties_go_to_the_class_of_the_nearest_member(metric):
  batched = selection.BATCHED["knn"]
  np.testing.assert_array_equal(batched(_tie_features(metric), TIE_LABELS, k=2, metric=metric),
                                TIE_ACCURACY)
  np.testing.assert_array_equal(
      batched(_tie_features(metric), 1 - TIE_LABELS, k=2, metric=metric), TIE_ACCURACY)
