"""Every transferability estimator against an independent float64 numpy/scipy
reference written here from the papers' formulas and the authors' code.

The estimators run inside jax.enable_x64(True) for the 1e-5 comparisons; one
test per estimator also runs the default float32 path with a looser tolerance.
"""
import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from sklearn.cluster import KMeans
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances, laplacian_kernel
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler

from fusion import selection
from fusion.selection import common, estimators, knn, logme, rsa

N, D, C = 120, 16, 3
RTOL = 1e-5


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def make_task(seed=0, n=N, d=D, c=C, separation=1.0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  labels[:c] = np.arange(c)  # every class present
  centres = rng.normal(size=(c, d)) * separation
  features = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + centres[labels] + 0.3
  return features, labels


def source_probs(labels, seed=1, z=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(len(labels), z)) + 1.5 * np.eye(labels.max() + 1, z)[labels]
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


def one_hot(labels):
  return np.eye(labels.max() + 1)[labels]


def upper(m):
  return m[np.triu_indices(len(m), 1)]


def label_rdm(labels):
  # 1 - corr(one-hot) is two-valued; round away float noise so that ties stay ties.
  return np.round(1 - np.corrcoef(one_hot(labels)), 10)


# ------------------------------------------------------------------ references


def ref_knn(x, y, k, metric):
  correct = 0
  for i in range(len(x)):
    if metric == "cosine":
      dist = [1 - x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for j in range(len(x))]
    else:
      dist = [np.sum((x[i] - x[j]) ** 2) for j in range(len(x))]
    order = [j for j in np.argsort(dist, kind="stable") if j != i][:k]
    ranks = {}
    for rank, j in enumerate(order):
      ranks.setdefault(y[j], []).append(rank)
    # most votes; among tied classes, the one with the nearest member
    best = max(ranks, key=lambda c: (len(ranks[c]), -min(ranks[c])))
    correct += best == y[i]
  return correct / len(x)


def ref_logme(f, y):
  n, d = f.shape
  gram = f.T @ f
  evidences = []
  for c in np.unique(y):
    t = (y == c).astype(float)
    alpha, beta = 1.0, 1.0
    for _ in range(11):
      lam = alpha / beta
      inverse = np.linalg.inv(gram + lam * np.eye(d))
      m = inverse @ f.T @ t
      gamma = np.trace(gram @ inverse)
      m2, res2 = m @ m, np.sum((t - f @ m) ** 2)
      alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - lam) / lam <= 1e-3:
        break
    _, logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * gram)
    evidences.append((d / 2 * np.log(alpha) + n / 2 * np.log(beta) - logdet / 2
                      - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n)
  return np.mean(evidences)


def ref_rsa(x, labels, reference=None, normalisation="centering"):
  """The RSA release code (kshitijd20/RSA-CVPR19-release): features centred over
  the examples, RDM = 1 - Pearson between examples, Spearman between RDMs."""
  prep = {"none": lambda a: a, "centering": lambda a: a - np.mean(a, axis=0),
          "zscore": lambda a: StandardScaler().fit_transform(a)}[normalisation]
  ref = label_rdm(labels) if reference is None else 1 - np.corrcoef(prep(reference))
  return scipy.stats.spearmanr(upper(1 - np.corrcoef(prep(x))), upper(ref)).statistic


def ref_hsic_unbiased(k, l):
  """Song et al. (2012), eq. 5."""
  n = len(k)
  k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  ones = np.ones(n)
  return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))


def ref_cka(k, l, debiased=True):
  if debiased:
    return ref_hsic_unbiased(k, l) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l, l))
  h = np.eye(len(k)) - 1 / len(k)
  return np.trace(k @ h @ l @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h))


def ref_dds_matrix(x, normalisation, function):
  if normalisation == "centering":
    x = x - x.mean(0)
  elif normalisation == "zscore":
    x = StandardScaler().fit_transform(x)
  if function == "linear":
    return x @ x.T
  if function == "rbf":
    sq = euclidean_distances(x, squared=True)
    return np.exp(-sq / (2 * 0.5 ** 2 * np.median(sq)))
  if function == "laplacian":
    return laplacian_kernel(x)
  if function == "pearson":
    return 1 - np.corrcoef(x)
  if function == "euclidean":
    return euclidean_distances(x)
  return 1 - cosine_similarity(x)


def ref_leep(probs, y):
  n = len(y)
  joint = np.zeros((y.max() + 1, probs.shape[1]))
  for i in range(n):
    joint[y[i]] += probs[i] / n
  conditional = joint / joint.sum(0)
  return np.mean([np.log(probs[i] @ conditional[y[i]]) for i in range(n)])


def ref_nce(z, y):
  n = len(y)
  joint = {}
  for zi, yi in zip(z, y):
    joint[(yi, zi)] = joint.get((yi, zi), 0) + 1 / n
  marginal = {}
  for (_, zi), p in joint.items():
    marginal[zi] = marginal.get(zi, 0) + p
  return sum(p * np.log(p / marginal[zi]) for (_, zi), p in joint.items())


def ref_gmm_m_step(z, resp, reg=1e-6):
  """scikit-learn's _estimate_gaussian_parameters (full covariances) + reg_covar."""
  counts = resp.sum(0) + 10 * np.finfo(float).eps
  means = resp.T @ z / counts[:, None]
  covs = np.stack([(resp[:, j, None] * (z - means[j])).T @ (z - means[j]) / counts[j]
                   + reg * np.eye(z.shape[1]) for j in range(resp.shape[1])])
  return counts / counts.sum(), means, covs


def ref_gmm_posteriors(z, start, k, max_iter=100, tol=1e-3, reg=1e-6):
  """EM from one M-step on the hard assignment `start` [N]."""

  def log_joint(params):
    weights, means, covs = params
    return np.stack([np.log(weights[j]) + scipy.stats.multivariate_normal.logpdf(z, means[j], covs[j])
                     for j in range(k)], axis=1)

  params = ref_gmm_m_step(z, np.eye(k)[start], reg)
  bound = -np.inf
  for _ in range(max_iter):
    logp = log_joint(params)
    norm = scipy.special.logsumexp(logp, axis=1)
    params = ref_gmm_m_step(z, np.exp(logp - norm[:, None]), reg)
    change, bound = norm.mean() - bound, norm.mean()
    if abs(change) < tol:
      break
  logp = log_joint(params)
  return np.exp(logp - scipy.special.logsumexp(logp, axis=1, keepdims=True))


def ref_kmeans_plusplus(z, key, k):
  """scikit-learn's greedy k-means++ (_kmeans_plusplus) in numpy, fed the random
  draws that the jnp version takes from `key`: a uniform first example, then
  float32 uniforms for the 2 + ln(k) candidates of each further centre."""
  first_key, key = jax.random.split(jax.random.key(key))
  n, trials = len(z), 2 + int(np.log(k))
  centres = [z[int(jax.random.randint(first_key, (), 0, n, np.int32))]]
  closest = ((z - centres[0]) ** 2).sum(1)
  for c in range(1, k):
    draws = np.asarray(jax.random.uniform(jax.random.fold_in(key, c), (trials,), np.float32),
                       np.float64)
    candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws * closest.sum()), n - 1)
    d2 = np.minimum(closest, ((z[candidates][:, None] - z[None]) ** 2).sum(-1))
    best = np.argmin(d2.sum(1))
    centres.append(z[candidates[best]])
    closest = d2[best]
  return np.stack(centres)


def ref_kmeans_labels(z, key, k):
  """scikit-learn's KMeans (Lloyd, tol 1e-4, 300 iterations) from those seeds."""
  return KMeans(k, init=ref_kmeans_plusplus(z, key, k), n_init=1).fit(z).labels_


def ref_nleep(x, y, dims, components_per_class, key=0, init="kmeans"):
  z = PCA(n_components=dims, svd_solver="full").fit_transform(x)
  k = components_per_class * (y.max() + 1)
  if init == "kmeans":
    start = ref_kmeans_labels(z, key, k)
  else:  # "random_points": nearest of k examples drawn by jax.random.permutation
    points = z[np.asarray(jax.random.permutation(jax.random.key(key), len(x)))[:k]]
    start = np.argmin(((z[:, None] - points[None]) ** 2).sum(-1), axis=1)
  return ref_leep(ref_gmm_posteriors(z, start, k), y)


def ref_nleep_sklearn(x, y, dims, components_per_class, random_state=0, key=None):
  """The published N-LEEP: scikit-learn's PCA and GaussianMixture (full
  covariances, k-means start: its own from `random_state`, or with key the
  parameters of the k-means start from ref_kmeans_labels), then LEEP."""
  z = PCA(n_components=dims, svd_solver="full").fit_transform(x)
  k = components_per_class * (y.max() + 1)
  start = {}
  if key is not None:
    weights, means, covs = ref_gmm_m_step(z, np.eye(k)[ref_kmeans_labels(z, key, k)])
    start = {"weights_init": weights, "means_init": means,
             "precisions_init": np.linalg.inv(covs)}
  gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, max_iter=100, tol=1e-3,
                        init_params="kmeans", random_state=random_state, **start).fit(z)
  return ref_leep(gmm.predict_proba(z), y)


def ref_hscore(f, y):
  covf = np.cov(f, rowvar=False)
  g = np.zeros_like(f)
  for c in np.unique(y):
    g[y == c] = f[y == c].mean(0)
  return np.trace(np.linalg.pinv(covf, rcond=1e-15) @ np.cov(g, rowvar=False))


def ref_shrinkage_hscore(f, y):
  f = f - f.mean(0)
  lw = LedoitWolf(assume_centered=False).fit(f)
  g = np.zeros_like(f)
  for c in np.unique(y):
    g[y == c] = f[y == c].mean(0)
  covg = np.cov(g, rowvar=False, bias=True)
  return np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * covg))


def ref_transrate(f, y, eps=1e-4):
  def rate(z):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]
  f = f - f.mean(0)
  return rate(f) - np.mean([rate(f[y == c]) for c in np.unique(y)])


def ref_gbc(f, y, gaussian_type):
  stats = {}
  for c in np.unique(y):
    stats[c] = (f[y == c].mean(0), np.maximum(f[y == c].var(0), 1e-4))
  total = 0.0
  for c1 in stats:
    for c2 in stats:
      if c1 == c2:
        continue
      (m1, v1), (m2, v2) = stats[c1], stats[c2]
      if gaussian_type == "spherical":
        v1, v2 = v1.mean(), v2.mean()
      avg = (v1 + v2) / 2
      distance = (np.sum((m1 - m2) ** 2 / avg) / 8
                  + 0.5 * np.sum(np.log(avg) - 0.5 * np.log(v1) - 0.5 * np.log(v2)))
      total += np.exp(-distance)
  return -total


def ref_sfda(x, y):
  """TencentARC/SFDA's algorithm, with its generalized eigenproblem."""
  classes = np.unique(y)
  priors = np.array([np.mean(y == c) for c in classes])

  def shrunk(cov, s):
    return (1 - s) * cov + s * np.trace(cov) / len(cov) * np.eye(len(cov))

  def fit_predict(x, s):
    means = np.stack([x[y == c].mean(0) for c in classes])
    sw = sum(p * np.cov(x[y == c].T, bias=True) for p, c in zip(priors, classes))
    if s is None:
      v = sw.sum(1)
      for _ in range(3):
        u = sw @ v / np.linalg.norm(sw @ v)
        v = sw @ u / np.linalg.norm(sw @ u)
      s = max(np.exp(-5 * v @ sw @ u), 1e-10)
    sb = shrunk(np.cov(x.T, bias=True), s) - shrunk(sw, s)
    _, vecs = scipy.linalg.eigh(sb, shrunk(sw, s))
    coef = means @ vecs @ vecs.T
    scores = x @ coef.T - 0.5 * np.diag(means @ coef.T) + np.log(priors)
    return scipy.special.softmax(scores, axis=1), s

  probs, s = fit_predict(x, None)
  probs = scipy.special.softmax(probs, axis=1)
  means = np.stack([x[y == c].mean(0) for c in classes])
  others = np.stack([(means.sum(0) - means[i]) / (len(classes) - 1) for i in range(len(classes))])
  mixed = x.copy()
  for i in range(len(x)):
    p = probs[i, y[i]]
    mixed[i] = p * x[i] + (1 - p) * others[y[i]]
  probs, _ = fit_predict(mixed, s)
  return np.mean(probs[np.arange(len(y)), y])


def ref_parc(x, y, dims):
  """dbolya/parc: PCA always (feature_reduce, with its solver settings; the
  randomized solver is exact here, where dims + 10 >= D), z-score, RDMs, Spearman."""
  x = PCA(n_components=min(dims, len(x)), svd_solver="randomized", random_state=1919,
          iterated_power=1).fit_transform(x)
  x = StandardScaler().fit_transform(x)
  return scipy.stats.spearmanr(upper(1 - np.corrcoef(x)), upper(label_rdm(y))).statistic


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("k,metric", [(1, "cosine"), (4, "cosine"), (5, "l2")])
def test_knn_matches_reference(k, metric):
  x, y = make_task(0)
  got = knn.knn_loo_accuracy(x, y, k=k, metric=metric)
  assert got == pytest.approx(ref_knn(x, y, k, metric), abs=1e-12)
  assert 0.34 < got < 1  # class structure is found, but not perfectly


@pytest.mark.parametrize("solver", ["svd", "eigh"])
@pytest.mark.parametrize("n,d", [(N, D), (40, 64)])  # N >= D and N < D paths
def test_logme_matches_reference(n, d, solver):
  x, y = make_task(1, n=n, d=d)
  np.testing.assert_allclose(logme.logme(x, y, solver=solver), ref_logme(x, y), rtol=RTOL)


def test_logme_float32_is_accurate_on_ill_conditioned_features():
  # Gram condition number ~1e6: the SVD path keeps float32 LogME close to float64.
  x, y = make_task(15, n=200, d=24, separation=3.0)
  x = x * np.geomspace(1, 300, 24)
  with jax.enable_x64(False):
    got = logme.logme(x, y)
  np.testing.assert_allclose(got, ref_logme(x, y), rtol=2e-5)


def test_rsa_default_centres_features_like_the_release_code():
  """The published rule by default: features (and the reference model's) centred
  over the examples before the RDM. Offsets make centring matter here."""
  x, y = make_task(2)
  rng = np.random.default_rng(4)
  x = x + rng.normal(0, 2, D)
  reference = np.abs(x[:, :6] @ rng.normal(size=(6, 6))) + 1.0  # non-negative, like ReLU
  for ref in (None, reference):
    want = ref_rsa(x, y, ref)
    assert abs(want - ref_rsa(x, y, ref, normalisation="none")) > 0.01
    np.testing.assert_allclose(rsa.rsa(x, y, reference_features=ref), want, rtol=RTOL)
  np.testing.assert_allclose(rsa.rsa_batched(np.stack([x, 2 * x + 1]), y)[1],
                             ref_rsa(x, y), rtol=RTOL)


@pytest.mark.parametrize("normalisation", ["none", "centering", "zscore"])
def test_rsa_matches_reference(normalisation):
  x, y = make_task(2)
  reference, _ = make_task(3, d=6)
  np.testing.assert_allclose(rsa.rsa(x, y, normalisation=normalisation),
                             ref_rsa(x, y, normalisation=normalisation), rtol=RTOL)
  np.testing.assert_allclose(
      rsa.rsa(x, y, reference_features=reference, normalisation=normalisation),
      ref_rsa(x, y, reference, normalisation=normalisation), rtol=RTOL)


@pytest.mark.parametrize("normalisation,function", [
    ("zscore", "laplacian"), ("zscore", "linear"), ("zscore", "rbf"), ("zscore", "pearson"),
    ("zscore", "euclidean"), ("zscore", "cosine"), ("none", "laplacian"), ("centering", "rbf")])
def test_dds_matches_reference(normalisation, function):
  x, y = make_task(4)
  reference, _ = make_task(5, d=6)
  want = ref_cka(ref_dds_matrix(x, normalisation, function),
                 ref_dds_matrix(reference, normalisation, function))
  got = rsa.dds(x, y, reference_features=reference, normalisation=normalisation,
                function=function)
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_dds_and_cka_against_labels_match_reference():
  x, y = make_task(6)
  np.testing.assert_allclose(
      rsa.dds(x, y), ref_cka(ref_dds_matrix(x, "zscore", "laplacian"),
                             ref_dds_matrix(one_hot(y), "zscore", "laplacian")), rtol=RTOL)
  np.testing.assert_allclose(rsa.cka(x, y), ref_cka(x @ x.T, one_hot(y) @ one_hot(y).T),
                             rtol=RTOL)
  np.testing.assert_allclose(rsa.cka(x, y, debiased=False),
                             ref_cka(x @ x.T, one_hot(y) @ one_hot(y).T, debiased=False),
                             rtol=RTOL)


def test_leep_and_nce_match_reference():
  x, y = make_task(7)
  probs = source_probs(y)
  np.testing.assert_allclose(estimators.leep(x, y, source_probs=probs), ref_leep(probs, y),
                             rtol=RTOL)
  z = probs.argmax(1)
  np.testing.assert_allclose(estimators.nce(x, y, source_labels=z), ref_nce(z, y), rtol=RTOL)
  np.testing.assert_allclose(estimators.nce(x, y, source_probs=probs), ref_nce(z, y), rtol=RTOL)


# Shared by every N-LEEP test so that they compile one GMM.
NLEEP_OPTIONS = {"pca_dim": 8, "components_per_class": 2}


@pytest.mark.parametrize("init", ["kmeans", "random_points"])
def test_nleep_matches_reference(init):
  x, y = make_task(8, separation=0.7)  # Overlapping classes: N-LEEP well below 0.
  got = estimators.nleep(x, y, init=init, **NLEEP_OPTIONS)
  np.testing.assert_allclose(got, ref_nleep(x, y, 8, 2, init=init), rtol=RTOL)


def make_mixture_task(seed, separation, n=N, d=D, components_per_class=2, label_noise=0.2):
  """C=3 classes of `components_per_class` Gaussian clusters each, centred at
  +-separation on the axes of a 4-dim latent space, mapped to d dims; a share
  `label_noise` of labels is redrawn, so N-LEEP depends on the fitted clusters."""
  rng = np.random.default_rng(seed)
  k = 3 * components_per_class
  cluster = np.arange(n) % k
  labels = np.where(rng.random(n) < label_noise, rng.integers(0, 3, n), cluster % 3)
  centres = np.concatenate([np.eye(4), -np.eye(4)])[:k] * separation
  latent = rng.normal(size=(n, 4)) * rng.uniform(0.7, 1.3, 4) + centres[cluster]
  return latent @ rng.normal(size=(4, d)) + 0.05 * rng.normal(size=(n, d)), labels


def test_kmeans_matches_sklearn_from_the_same_seeds():
  """The k-means start: greedy k-means++ seeds as scikit-learn picks them (given
  the same random draws), then the labels of scikit-learn's KMeans from them."""
  x, _ = make_mixture_task(0, separation=1.5)  # overlapping: Lloyd takes many steps
  z = PCA(n_components=8, svd_solver="full").fit_transform(x)
  tol = 1e-4 * np.var(z, 0).mean()

  @jax.jit
  def seeds_and_labels(key):
    zj = jax.numpy.asarray(z)
    return (estimators.kmeans_plusplus(zj, key, 6),
            estimators.kmeans(zj, key, num_clusters=6, tol=tol))

  for key in range(3):
    seeds, labels = seeds_and_labels(jax.random.key(key))
    np.testing.assert_allclose(seeds, ref_kmeans_plusplus(z, key, 6), rtol=1e-12)
    np.testing.assert_array_equal(labels, ref_kmeans_labels(z, key, 6))


def test_lloyd_relocates_empty_clusters_like_sklearn():
  """Two initial centres far from every example: both clusters start empty, and
  each takes one of the examples farthest from their centres (scikit-learn's rule)."""
  x, _ = make_mixture_task(0, separation=1.5)
  z = PCA(n_components=8, svd_solver="full").fit_transform(x)
  centres = z[:6].copy()
  centres[4:] = [[100.0], [-100.0]]
  tol = 1e-4 * np.var(z, 0).mean()
  want = KMeans(6, init=centres, n_init=1).fit(z).labels_
  labels = jax.jit(estimators.lloyd)(z, centres, tol=tol)
  assert len(set(want.tolist())) == 6
  np.testing.assert_array_equal(labels, want)


def test_nleep_matches_sklearn_gaussian_mixture_on_separated_clusters():
  """Clusters far apart: scikit-learn's GaussianMixture(init_params='kmeans')
  finds one optimum whatever its random_state, and N-LEEP's default start does too."""
  x, y = make_mixture_task(0, separation=10.0)
  want = [ref_nleep_sklearn(x, y, 8, 2, random_state=seed) for seed in range(3)]
  np.testing.assert_allclose(want, want[0], rtol=1e-9)
  for key in range(3):
    np.testing.assert_allclose(estimators.nleep(x, y, key=key, **NLEEP_OPTIONS), want[0],
                               rtol=1e-6)


@pytest.mark.parametrize("separation", [2.0, 1.0])
def test_nleep_matches_sklearn_gaussian_mixture_on_overlapping_clusters(separation):
  """Overlapping clusters: scikit-learn's own score moves with its random_state
  (by up to 0.06 nats here), so its GaussianMixture starts from the parameters
  of the same k-means start (same seeds, scikit-learn's KMeans)."""
  x, y = make_mixture_task(0, separation=separation)
  for key in range(2):
    np.testing.assert_allclose(estimators.nleep(x, y, key=key, **NLEEP_OPTIONS),
                               ref_nleep_sklearn(x, y, 8, 2, key=key), rtol=1e-6)


def test_nleep_kmeans_start_beats_random_points():
  """Where random points start two components in one cluster, EM stays stuck
  there: the old start scored 0.05-0.27 nats below the k-means one here."""
  x, y = make_mixture_task(0, separation=10.0)
  kmeans = [estimators.nleep(x, y, key=key, **NLEEP_OPTIONS) for key in range(5)]
  points = [estimators.nleep(x, y, key=key, init="random_points", **NLEEP_OPTIONS)
            for key in range(5)]
  np.testing.assert_allclose(kmeans, kmeans[0], rtol=1e-9)
  assert np.mean(kmeans) - np.mean(points) > 0.1
  assert all(k - p > 0.03 for k, p in zip(kmeans, points))


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
def test_pca_variance_rule_matches_sklearn(fraction):
  x, _ = make_task(16)
  want = PCA(n_components=fraction, svd_solver="full").fit(x).n_components_
  assert common.num_dims_for_variance(x, fraction) == want


def test_hscores_match_reference():
  x, y = make_task(9)
  np.testing.assert_allclose(estimators.hscore(x, y), ref_hscore(x, y), rtol=RTOL)
  np.testing.assert_allclose(estimators.shrinkage_hscore(x, y), ref_shrinkage_hscore(x, y),
                             rtol=RTOL)


def test_transrate_matches_reference():
  x, y = make_task(10)
  np.testing.assert_allclose(estimators.transrate(x, y), ref_transrate(x, y), rtol=RTOL)
  np.testing.assert_allclose(estimators.transrate(x, y, eps=0.5), ref_transrate(x, y, 0.5),
                             rtol=RTOL)


@pytest.mark.parametrize("gaussian_type", ["spherical", "diagonal"])
def test_gbc_matches_reference(gaussian_type):
  x, y = make_task(11, c=4)
  x[y == 3, 0] = 1.0  # a constant dimension within a class hits the 1e-4 variance floor
  np.testing.assert_allclose(estimators.gbc(x, y, gaussian_type=gaussian_type),
                             ref_gbc(x, y, gaussian_type), rtol=RTOL)


def test_sfda_matches_reference():
  x, y = make_task(12, separation=0.5)
  np.testing.assert_allclose(estimators.sfda(x, y), ref_sfda(x, y), rtol=RTOL)


@pytest.mark.parametrize("dims", [32, 16, 8])  # PCA always: also for pca_dim >= D = 16
def test_parc_matches_reference(dims):
  x, y = make_task(13)
  np.testing.assert_allclose(estimators.parc(x, y, pca_dim=dims), ref_parc(x, y, min(dims, D)),
                             rtol=RTOL)


def test_parc_runs_pca_when_pca_dim_exceeds_feature_dim():
  """The default pca_dim=32 > D: PCA (whitening, with the z-scoring) still runs,
  which moves the score measurably; on correlated features of unequal scales."""
  x, y = make_task(13)
  x = x @ np.random.default_rng(14).normal(size=(D, D))
  want = ref_parc(x, y, D)
  zscored_only = scipy.stats.spearmanr(upper(1 - np.corrcoef(StandardScaler().fit_transform(x))),
                                       upper(label_rdm(y))).statistic
  assert abs(want - zscored_only) > 0.01
  np.testing.assert_allclose(estimators.parc(x, y), want, rtol=RTOL)
  np.testing.assert_allclose(estimators.parc_batched(np.stack([x, 2 * x]), y), [want, want],
                             rtol=RTOL)


def test_parc_zeroes_axes_of_rank_deficient_features():
  """Constant and duplicated features: PCA to pca_dim >= D leaves axes of zero
  variance, which stay 0 (exact PCA) instead of z-scored rounding noise."""
  x, y = make_task(13)
  x[:, 12:] = x[:, :4] * 2.0
  x[:, 10] = 1.5
  rank = 11
  z = np.zeros((len(x), D))
  z[:, :rank] = StandardScaler().fit_transform(PCA(rank, svd_solver="full").fit_transform(x))
  want = scipy.stats.spearmanr(upper(1 - np.corrcoef(z)), upper(label_rdm(y))).statistic
  np.testing.assert_allclose(estimators.parc(x, y), want, rtol=RTOL)
  with jax.enable_x64(False):
    np.testing.assert_allclose(estimators.parc(x, y), want, rtol=1e-4)


# The default float32 path agrees with the float64 reference to float32-ish accuracy.
FLOAT32_CASES = {
    "knn": (lambda x, y, o: ref_knn(x, y, 1, "cosine"), 0.0, 1.0 / N),
    "logme": (lambda x, y, o: ref_logme(x, y), 1e-4, 0),
    "rsa": (lambda x, y, o: ref_rsa(x, y), 1e-4, 0),
    "dds": (lambda x, y, o: ref_cka(ref_dds_matrix(x, "zscore", "laplacian"),
                                    ref_dds_matrix(one_hot(y), "zscore", "laplacian")), 1e-4, 0),
    "cka": (lambda x, y, o: ref_cka(x @ x.T, one_hot(y) @ one_hot(y).T), 1e-4, 0),
    "leep": (lambda x, y, o: ref_leep(o["source_probs"], y), 1e-5, 0),
    "nleep": (lambda x, y, o: ref_nleep(x, y, 8, 2), 1e-3, 0),
    "nce": (lambda x, y, o: ref_nce(o["source_probs"].argmax(1), y), 1e-5, 0),
    "hscore": (lambda x, y, o: ref_hscore(x, y), 1e-4, 0),
    "shrinkage_hscore": (lambda x, y, o: ref_shrinkage_hscore(x, y), 1e-4, 0),
    "transrate": (lambda x, y, o: ref_transrate(x, y), 1e-4, 0),
    "gbc": (lambda x, y, o: ref_gbc(x, y, "spherical"), 1e-4, 0),
    "sfda": (lambda x, y, o: ref_sfda(x, y), 1e-4, 0),
    "parc": (lambda x, y, o: ref_parc(x, y, D), 1e-4, 0),
}


@pytest.mark.parametrize("name", sorted(selection.ESTIMATORS))
def test_float32_default_close_to_reference(name):
  assert set(FLOAT32_CASES) == set(selection.ESTIMATORS)
  x, y = make_task(14)
  options = {"source_probs": source_probs(y)} if name in ("leep", "nce") else {}
  options = NLEEP_OPTIONS if name == "nleep" else options
  reference, rtol, atol = FLOAT32_CASES[name]
  want = reference(x, y, options)
  with jax.enable_x64(False):
    got = selection.ESTIMATORS[name](x, y, **options)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("scale", [3.0, 10.0])
def test_float32_nleep_stays_finite_with_many_small_components(scale):
  """Components of few points, features of large scale: float32 drops a 1e-6 ridge
  and the Cholesky factor turned NaN (seen on the offline hub); the floor keeps it."""
  x, y = make_task(15, n=300, c=10, separation=2.0)
  x = x * scale
  options = {"pca_dim": 6, "components_per_class": 5}
  want = ref_nleep(x, y, 6, 5)
  with jax.enable_x64(False):
    got = estimators.nleep(x.astype(np.float32), y, **options)
  np.testing.assert_allclose(got, want, rtol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_ranks_with_ties_match_scipy(seed):
  """Spearman's ranks: many ties (as in an RDM's upper triangle) averaged like scipy."""
  rng = np.random.default_rng(seed)
  v = rng.integers(0, 7, 300).astype(np.float64)  # ~43 copies of each value
  v[:5] = rng.normal(size=5)  # and a few singletons
  np.testing.assert_allclose(common.rankdata(v), scipy.stats.rankdata(v), rtol=1e-12)
  b = rng.random(300) < 0.3
  np.testing.assert_allclose(common.binary_ranks(b), scipy.stats.rankdata(b), rtol=1e-12)
  labels = rng.integers(0, 4, 40)
  rdm = rng.random((40, 40))
  rdm = rdm + rdm.T
  iu = np.triu_indices(40, 1)
  label_rdm = (labels[:, None] != labels[None, :]).astype(float)
  want = scipy.stats.spearmanr(rdm[iu], label_rdm[iu])[0]
  assert float(common.spearman_with_label_rdm(rdm, labels)) == pytest.approx(want, rel=RTOL)
