"""Transferability estimators from label statistics, class-conditional Gaussians
and linear discriminants: LEEP, N-LEEP, NCE, H-score, shrinkage H-score,
TransRate, GBC, SFDA and PARC.

Formulas and defaults follow the authors' code (thuml/LogME and
Transfer-Learning-Library `tllib/ranking`, TencentARC/SFDA, dbolya/parc,
google-research `stable_transfer/transferability`); every function's docstring
says where we deviate. Scale invariance (scaling all features by c > 0):
  H-score        invariant to any invertible linear map of the features;
  shrinkage H    invariant to a global scale (Ledoit-Wolf shrinks towards mu I);
  GBC            spherical: global scale; diagonal: each feature's scale (both
                 as long as class variances stay above the 1e-4 floor);
  PARC           global scale (PCA + z-scoring; not each feature's scale, which
                 turns the principal axes, even when pca_dim >= D);
  LEEP, NCE      do not look at the features;
  N-LEEP         only approximately (reg_covar is absolute);
  TransRate, SFDA  not invariant (fixed eps; exp(-5 lambda_max) shrinkage).
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion.selection import common

# ---------------------------------------------------------------- LEEP / NCE


def _check_source_probs(probs: Any, n: int, stacked: bool) -> jax.Array:
  p = np.asarray(probs)
  want = "[M, N, Z]" if stacked else "[N, Z]"
  if p.ndim != (3 if stacked else 2) or p.shape[-2] != n:
    raise ValueError(f"source_probs must have shape {want} with N={n}: the source head's "
                     f"class probabilities for each example; got shape {p.shape}.")
  p64 = p.astype(np.float64)
  if not np.all(np.isfinite(p64)) or p64.min() < 0:
    raise ValueError("source_probs must be finite and non-negative (probabilities, not "
                     "logits: pass jax.nn.softmax(logits, axis=-1)).")
  sums = p64.sum(-1)
  if np.abs(sums - 1).max() > 1e-3:
    raise ValueError(f"source_probs rows must sum to 1; they sum to values in "
                     f"[{sums.min():.4g}, {sums.max():.4g}]. Pass softmax probabilities.")
  return jnp.asarray(p, common.float_dtype())


def _leep_core(x: jax.Array, probs: jax.Array, labels: jax.Array, *, num_classes: int
               ) -> jax.Array:
  del x  # LEEP scores the source head, not the features
  return common.leep_from_probs(probs, labels, num_classes)


def leep(features: Any, labels: Any, *, source_probs: Any = None,
         num_classes: int | None = None) -> float:
  """LEEP (Nguyen et al. 2020): mean log of the expected empirical prediction
  sum_z P(y_i | z) theta(x_i)_z, with P(y | z) from the joint of labels and the
  source head's probabilities `source_probs` [N, Z] (required). The features are
  validated but not used."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  if source_probs is None:
    raise ValueError("leep needs source_probs=[N, Z]: the source classifier's "
                     "probabilities on these examples.")
  probs = _check_source_probs(source_probs, data.num_examples, stacked=False)
  return common.run_single(_leep_core, data.features, probs, data.labels,
                           num_classes=data.num_classes)


def leep_batched(feature_stack: Any, labels: Any, *, source_probs: Any = None,
                 num_classes: int | None = None) -> np.ndarray:
  """leep of M models: features [M, N, D], source_probs [M, N, Z] -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  if source_probs is None:
    raise ValueError("leep_batched needs source_probs=[M, N, Z].")
  probs = _check_source_probs(source_probs, data.num_examples, stacked=True)
  if probs.shape[0] != data.features.shape[0]:
    raise ValueError(f"got {data.features.shape[0]} models' features but "
                     f"{probs.shape[0]} models' source_probs.")
  return common.run_batched(_leep_core, data.features, probs, data.labels, num_mapped=2,
                            num_classes=data.num_classes)


def _nce_core(x: jax.Array, source_labels: jax.Array, labels: jax.Array, *,
              num_classes: int, num_source_classes: int) -> jax.Array:
  del x
  n = labels.shape[0]
  joint = (common.one_hot(labels, num_classes).T
           @ common.one_hot(source_labels, num_source_classes)) / n     # P(y, z)
  marginal = joint.sum(0)                                             # P(z)
  conditional = joint / jnp.where(marginal > 0, marginal, 1)
  return jnp.sum(jnp.where(joint > 0, joint * jnp.log(jnp.where(joint > 0, conditional, 1)), 0))


def _source_labels(source_labels: Any, source_probs: Any, n: int, stacked: bool,
                   num_source_classes: int | None) -> tuple[jax.Array, int]:
  if (source_labels is None) == (source_probs is None):
    raise ValueError("nce needs exactly one of source_labels=[N] (the source head's "
                     "predicted classes) or source_probs=[N, Z] (argmax is taken).")
  if source_probs is not None:
    probs = np.asarray(_check_source_probs(source_probs, n, stacked))
    z, count = probs.argmax(-1), probs.shape[-1]
  else:
    z = np.asarray(source_labels)
    if z.ndim != (2 if stacked else 1) or z.shape[-1] != n:
      raise ValueError(f"source_labels must have shape {'[M, N]' if stacked else '[N]'} "
                       f"with N={n}; got {z.shape}.")
    if z.dtype == np.bool_ or not np.issubdtype(z.dtype, np.integer) or z.min() < 0:
      raise ValueError("source_labels must be non-negative integer class ids of the "
                       f"source task; got dtype {z.dtype}, min {z.min()}.")
    count = int(z.max()) + 1
  if num_source_classes is not None:
    if z.max() >= num_source_classes:
      raise ValueError(f"source labels reach {z.max()} but num_source_classes="
                       f"{num_source_classes}.")
    count = int(num_source_classes)
  return jnp.asarray(z.astype(np.int32)), count


def nce(features: Any, labels: Any, *, source_labels: Any = None, source_probs: Any = None,
        num_source_classes: int | None = None, num_classes: int | None = None) -> float:
  """NCE (Tran et al. 2019): -H(Y | Z), the negative conditional entropy of the
  target labels given the source head's hard predictions Z (`source_labels`, or
  argmax of `source_probs`). Features are validated but not used."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  z, count = _source_labels(source_labels, source_probs, data.num_examples, False,
                            num_source_classes)
  return common.run_single(_nce_core, data.features, z, data.labels,
                           num_classes=data.num_classes, num_source_classes=count)


def nce_batched(feature_stack: Any, labels: Any, *, source_labels: Any = None,
                source_probs: Any = None, num_source_classes: int | None = None,
                num_classes: int | None = None) -> np.ndarray:
  """nce of M models: source_labels [M, N] or source_probs [M, N, Z] -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  z, count = _source_labels(source_labels, source_probs, data.num_examples, True,
                            num_source_classes)
  if z.shape[0] != data.features.shape[0]:
    raise ValueError(f"got {data.features.shape[0]} models' features but source "
                     f"predictions of {z.shape[0]} models.")
  return common.run_batched(_nce_core, data.features, z, data.labels, num_mapped=2,
                            num_classes=data.num_classes, num_source_classes=count)


# ---------------------------------------------------------------- N-LEEP


def _gmm_log_densities(z, means, covariances, log_weights):
  """log w_k + log N(z_i | mu_k, Sigma_k) -> [N, K]."""
  chol = jnp.linalg.cholesky(covariances)                               # [K, d, d]

  def one(mean, factor):
    solved = jax.scipy.linalg.solve_triangular(factor, (z - mean).T, lower=True)
    return -0.5 * jnp.sum(solved ** 2, axis=0) - jnp.sum(jnp.log(jnp.diag(factor)))

  d = z.shape[1]
  return jax.vmap(one, out_axes=1)(means, chol) - 0.5 * d * jnp.log(2 * jnp.pi) + log_weights


def _gmm_m_step(z, resp, reg_covar):
  counts = resp.sum(0) + 10 * jnp.finfo(z.dtype).eps                   # as scikit-learn
  means = resp.T @ z / counts[:, None]
  diff = z[None, :, :] - means[:, None, :]                              # [K, N, d]
  cov = jnp.einsum("kn,kni,knj->kij", resp.T, diff, diff) / counts[:, None, None]
  cov = cov + reg_covar * jnp.eye(z.shape[1], dtype=z.dtype)
  return means, cov, jnp.log(counts / counts.sum())


GMM_INITS = ("kmeans", "random_points")
KMEANS_MAX_ITER = 300   # scikit-learn's KMeans defaults
KMEANS_TOL = 1e-4


def _squared_distances(z: jax.Array, centres: jax.Array) -> jax.Array:
  """|z_i - c_k|^2 -> [N, K], expanded as scikit-learn computes it."""
  d2 = (jnp.sum(z * z, axis=1)[:, None] - 2 * z @ centres.T
        + jnp.sum(centres * centres, axis=1)[None, :])
  return jnp.maximum(d2, 0)


def kmeans_plusplus(z: jax.Array, key: jax.Array, num_clusters: int) -> jax.Array:
  """Greedy k-means++ seeding (scikit-learn's kmeans_plusplus) -> centres [K, d].

  The first centre is a uniformly drawn example; each further one is the best,
  by the resulting sum of squared distances to the nearest centre, of
  2 + floor(ln K) candidates drawn with probability proportional to that
  squared distance."""
  n = z.shape[0]
  trials = 2 + int(np.log(num_clusters))
  first_key, key = jax.random.split(key)
  first = z[jax.random.randint(first_key, (), 0, n, jnp.int32)]
  centres = jnp.zeros((num_clusters, z.shape[1]), z.dtype).at[0].set(first)
  closest = _squared_distances(z, first[None])[:, 0]

  def add_centre(c, state):
    centres, closest = state
    # float32 draws in either precision: float32 and float64 runs pick alike
    draws = jax.random.uniform(jax.random.fold_in(key, c), (trials,), jnp.float32)
    draws = draws.astype(z.dtype)
    candidates = jnp.minimum(jnp.searchsorted(jnp.cumsum(closest), draws * closest.sum()),
                             n - 1)
    d2 = jnp.minimum(closest[None, :], _squared_distances(z[candidates], z))    # [T, N]
    best = jnp.argmin(d2.sum(1))
    return centres.at[c].set(z[candidates[best]]), d2[best]

  centres, _ = jax.lax.fori_loop(1, num_clusters, add_centre, (centres, closest))
  return centres


def _lloyd_update(z: jax.Array, labels: jax.Array, d2: jax.Array, num_clusters: int
                  ) -> jax.Array:
  """New centres: the means of their examples. As in scikit-learn, an empty
  cluster takes the example farthest from its centre (the i-th empty cluster
  the i-th farthest), and a cluster left empty sits on the largest one."""
  onehot = jax.nn.one_hot(labels, num_clusters, dtype=z.dtype)
  counts, sums = onehot.sum(0), onehot.T @ z
  own = jnp.take_along_axis(d2, labels[:, None], axis=1)[:, 0]
  empty = (counts == 0) & (jnp.max(own) > 0)
  farthest = jax.lax.top_k(own, num_clusters)[1]
  moved = farthest[jnp.maximum(jnp.cumsum(empty) - 1, 0)]         # per cluster, if empty
  take = empty.astype(z.dtype)
  sums = sums.at[labels[moved]].add(-take[:, None] * z[moved])
  counts = counts.at[labels[moved]].add(-take)
  sums = jnp.where(empty[:, None], z[moved], sums)
  counts = jnp.where(empty, 1, counts)
  means = sums / jnp.where(counts > 0, counts, 1)[:, None]
  return jnp.where((counts > 0)[:, None], means, means[jnp.argmax(counts)])


def lloyd(z: jax.Array, centres: jax.Array, *, tol: jax.Array | float,
          max_iter: int = KMEANS_MAX_ITER) -> jax.Array:
  """Lloyd's k-means iterations from `centres` [K, d], as scikit-learn's KMeans
  (algorithm 'lloyd') runs them -> labels [N]: stop when no label changes, or
  when the squared shift of all centres is at most `tol` (absolute), or after
  `max_iter` iterations; the labels are those of the final centres."""
  num_clusters = centres.shape[0]

  def cond(state):
    step, _, _, done = state
    return (step < max_iter) & ~done

  def body(state):
    step, centres, previous, _ = state
    d2 = _squared_distances(z, centres)
    labels = jnp.argmin(d2, axis=1).astype(jnp.int32)
    new = _lloyd_update(z, labels, d2, num_clusters)
    done = jnp.all(labels == previous) | (jnp.sum((new - centres) ** 2) <= tol)
    return step + 1, new, labels, done

  start = (0, centres, jnp.full(z.shape[:1], -1, jnp.int32), jnp.asarray(False))
  _, centres, _, _ = jax.lax.while_loop(cond, body, start)
  return jnp.argmin(_squared_distances(z, centres), axis=1)


def kmeans(z: jax.Array, key: jax.Array, *, num_clusters: int, tol: jax.Array | float,
           max_iter: int = KMEANS_MAX_ITER) -> jax.Array:
  """k-means as scikit-learn's KMeans(n_init=1) with its defaults -> labels [N]:
  k-means++ seeding from `key` (kmeans_plusplus), then Lloyd iterations (lloyd).
  scikit-learn's `tol` is relative: pass 1e-4 x the mean variance of z's columns."""
  return lloyd(z, kmeans_plusplus(z, key, num_clusters), tol=tol, max_iter=max_iter)


def _random_points_labels(z: jax.Array, key: jax.Array, num_clusters: int) -> jax.Array:
  """Each example's nearest of `num_clusters` examples drawn without replacement."""
  start = z[jax.random.permutation(key, z.shape[0])[:num_clusters]]
  return jnp.argmin(jnp.sum((z[:, None, :] - start[None, :, :]) ** 2, axis=-1), axis=1)


def gmm_posteriors(z: jax.Array, start: jax.Array, *, num_components: int, max_iter: int,
                   tol: float, reg_covar: float) -> jax.Array:
  """Full-covariance Gaussian mixture fitted by EM; returns p(component | z_i).

  `start` [N] gives each example's initial component (for scikit-learn's
  init_params='kmeans', the k-means labels); one M-step on that hard assignment
  gives the starting parameters. EM then stops when the mean log-likelihood
  changes by less than `tol`, or after `max_iter` iterations (scikit-learn's
  rule); the posteriors come from a final E-step.
  """
  resp = jax.nn.one_hot(start, num_components, dtype=z.dtype)
  params = _gmm_m_step(z, resp, reg_covar)

  def cond(state):
    step, _, change, _ = state
    return (step < max_iter) & (jnp.abs(change) >= tol)

  def body(state):
    step, params, _, bound = state
    logp = _gmm_log_densities(z, *params)
    norm = jax.scipy.special.logsumexp(logp, axis=1)
    new_bound = norm.mean()
    params = _gmm_m_step(z, jnp.exp(logp - norm[:, None]), reg_covar)
    return step + 1, params, new_bound - bound, new_bound

  inf = jnp.asarray(jnp.inf, z.dtype)
  _, params, _, _ = jax.lax.while_loop(cond, body, (0, params, inf, -inf))
  logp = _gmm_log_densities(z, *params)
  return jnp.exp(logp - jax.scipy.special.logsumexp(logp, axis=1, keepdims=True))


def _nleep_core(x: jax.Array, keep_dims: jax.Array, labels: jax.Array, key: jax.Array, *,
                num_classes: int, pca_dim: int, num_components: int, max_iter: int,
                tol: float, reg_covar: float, init: str) -> jax.Array:
  # Dimensions past this model's own `keep_dims` are zeroed: every component
  # then has mean 0 and variance reg_covar there, which shifts all log densities
  # by the same constant and leaves the posteriors unchanged (so models with
  # different PCA sizes can share one vmapped computation). They add nothing to
  # k-means distances, and its tolerance averages the kept dimensions only.
  z = common.pca_project(x, pca_dim)
  z = jnp.where(jnp.arange(pca_dim) < keep_dims, z, 0)
  total_variance = jnp.sum(jnp.var(z, axis=0))
  if init == "kmeans":
    start = kmeans(z, key, num_clusters=num_components,
                   tol=KMEANS_TOL * total_variance / keep_dims)
  else:
    start = _random_points_labels(z, key, num_components)
  # In float32 a ridge far below eps x the data's variance is lost to rounding and
  # a collapsing component's Cholesky factor turns NaN: floor the ridge there.
  # (In float64 the floor is ~1e-15 x the variance: scikit-learn's reg_covar.)
  floor = 10 * jnp.finfo(z.dtype).eps * total_variance
  posteriors = gmm_posteriors(z, start, num_components=num_components, max_iter=max_iter,
                              tol=tol, reg_covar=jnp.maximum(reg_covar, floor))
  return common.leep_from_probs(posteriors, labels, num_classes)


def _nleep_options(data, features_per_model, pca_variance, pca_dim, components_per_class,
                   num_components, max_iter, tol, reg_covar, init, key):
  common.check_choice("init", init, GMM_INITS)
  d = data.features.shape[-1]
  if pca_dim is not None:
    if int(pca_dim) != pca_dim or not 1 <= pca_dim <= d:
      raise ValueError(f"pca_dim={pca_dim!r} must be an integer in [1, D={d}].")
    dims = [int(pca_dim)] * len(features_per_model)
  else:
    dims = [common.num_dims_for_variance(f, pca_variance) for f in features_per_model]
  if num_components is None:
    num_components = components_per_class * data.num_classes
  n = data.num_examples
  if int(num_components) != num_components or not 1 <= num_components <= n:
    raise ValueError(f"num_components={num_components!r} must be an integer in [1, N={n}] "
                     "(lower components_per_class for small probe sets).")
  if max_iter < 1 or tol <= 0 or reg_covar < 0:
    raise ValueError(f"need max_iter >= 1, tol > 0, reg_covar >= 0; got {max_iter}, "
                     f"{tol}, {reg_covar}.")
  if key is None or isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key or 0))
  static = dict(num_classes=data.num_classes, pca_dim=max(dims),
                num_components=int(num_components), max_iter=int(max_iter),
                tol=float(tol), reg_covar=float(reg_covar), init=init)
  return jnp.asarray(dims, jnp.int32), key, static


def nleep(features: Any, labels: Any, *, pca_variance: float = 0.8,
          pca_dim: int | None = None, components_per_class: int = 5,
          num_components: int | None = None, max_iter: int = 100, tol: float = 1e-3,
          reg_covar: float = 1e-6, init: str = "kmeans", key: jax.Array | int | None = None,
          num_classes: int | None = None) -> float:
  """N-LEEP (Li et al., "Ranking Neural Checkpoints", 2021): LEEP with the source
  head replaced by a Gaussian mixture on PCA-reduced features.

  PCA keeps the smallest number of axes explaining more than `pca_variance` of
  the variance (or exactly `pca_dim`); the mixture has `components_per_class` x C
  full-covariance components (or `num_components`), fitted in jnp by EM (see
  gmm_posteriors; scikit-learn is not needed) as scikit-learn's GaussianMixture
  does. `init` picks its start: "kmeans" (default, GaussianMixture's
  init_params='kmeans', the published N-LEEP's): the labels of k-means with
  k-means++ seeding (see kmeans); "random_points": each example's nearest of
  `num_components` random examples (the default before issue #9; it often
  stops in a poorer local optimum, 0.05-0.35 nats lower). `key` (a PRNG key or
  an int seed) seeds either (default jax.random.key(0)). The draws are JAX's,
  not NumPy's: where k-means has several local optima, the score for one key
  can differ from scikit-learn's for one random_state as much as scikit-learn's
  own scores differ between random states. `reg_covar` is added to every
  covariance's diagonal; in float32 it is at least 10 eps x the total variance
  of the projected features, below which float32 cannot keep it.
  """
  data = common.check_inputs(features, labels, num_classes=num_classes)
  dims, key, static = _nleep_options(data, [data.features], pca_variance, pca_dim,
                                     components_per_class, num_components, max_iter, tol,
                                     reg_covar, init, key)
  return common.run_single(_nleep_core, data.features, dims[0], data.labels, key, **static)


def nleep_batched(feature_stack: Any, labels: Any, *, pca_variance: float = 0.8,
                  pca_dim: int | None = None, components_per_class: int = 5,
                  num_components: int | None = None, max_iter: int = 100,
                  tol: float = 1e-3, reg_covar: float = 1e-6, init: str = "kmeans",
                  key: jax.Array | int | None = None, num_classes: int | None = None
                  ) -> np.ndarray:
  """nleep of each model in a stack [M, N, D] (same key for every model) -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  dims, key, static = _nleep_options(data, list(data.features), pca_variance, pca_dim,
                                     components_per_class, num_components, max_iter, tol,
                                     reg_covar, init, key)
  return common.run_batched(_nleep_core, data.features, dims, data.labels, key,
                            num_mapped=2, **static)


# ---------------------------------------------------------------- H-scores


def _between_class(x: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Features replaced by their class mean, centred: rows of E[f | y] - E[f]."""
  means, _ = common.class_means(x, labels, num_classes)
  return means[labels] - x.mean(0)


def _trace_pinv_product(a: jax.Array, b: jax.Array, rcond: float | None) -> jax.Array:
  """tr(pinv(a) b) for symmetric PSD a: eigenvalues below rcond * max are dropped
  (default rcond: D x machine epsilon)."""
  evals, evecs = jnp.linalg.eigh(a)
  rcond = a.shape[0] * jnp.finfo(a.dtype).eps if rcond is None else rcond
  keep = evals > rcond * jnp.max(evals)
  projected = jnp.sum(evecs * (b @ evecs), axis=0)                     # diag(V^T b V)
  return jnp.sum(jnp.where(keep, projected / jnp.where(keep, evals, 1), 0))


def _hscore_core(x: jax.Array, labels: jax.Array, *, num_classes: int,
                 rcond: float | None) -> jax.Array:
  n = x.shape[0]
  xc = x - x.mean(0)
  g = _between_class(x, labels, num_classes)
  return _trace_pinv_product(xc.T @ xc / (n - 1), g.T @ g / (n - 1), rcond)


def ledoit_wolf_shrinkage(xc: jax.Array) -> jax.Array:
  """Ledoit-Wolf (2004) shrinkage intensity of centred data xc [N, D] towards
  mu I, mu = tr(S) / D, S = xc^T xc / N (scikit-learn's ledoit_wolf_shrinkage)."""
  n, d = xc.shape
  x2 = xc * xc
  trace_over_dims = jnp.sum(x2, axis=0) / n
  mu = jnp.sum(trace_over_dims) / d
  delta_ = jnp.sum((xc.T @ xc) ** 2) / n ** 2
  beta_ = jnp.sum(x2.T @ x2)
  beta = (beta_ / n - delta_) / (d * n)
  delta = (delta_ - 2 * mu * jnp.sum(trace_over_dims) + d * mu ** 2) / d
  beta = jnp.minimum(beta, delta)
  return jnp.where(beta == 0, 0.0, beta / jnp.where(delta == 0, 1, delta))


def _shrinkage_hscore_core(x: jax.Array, labels: jax.Array, *, num_classes: int,
                           rcond: float | None) -> jax.Array:
  n, d = x.shape
  xc = x - x.mean(0)
  alpha = ledoit_wolf_shrinkage(xc)
  cov = xc.T @ xc / n
  shrunk = (1 - alpha) * cov + alpha * jnp.trace(cov) / d * jnp.eye(d, dtype=x.dtype)
  g = _between_class(x, labels, num_classes)
  return _trace_pinv_product(shrunk, (1 - alpha) * (g.T @ g) / n, rcond)


def hscore(features: Any, labels: Any, *, rcond: float | None = None,
           num_classes: int | None = None) -> float:
  """H-score (Bao et al. 2019): tr(cov(f)^+ cov(E[f | y])), both covariances with
  1/(N-1) as in the authors' code; pinv drops eigenvalues below rcond x max."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  return common.run_single(_hscore_core, data.features, data.labels,
                           num_classes=data.num_classes, rcond=rcond)


def hscore_batched(feature_stack: Any, labels: Any, *, rcond: float | None = None,
                   num_classes: int | None = None) -> np.ndarray:
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  return common.run_batched(_hscore_core, data.features, data.labels,
                            num_classes=data.num_classes, rcond=rcond)


def shrinkage_hscore(features: Any, labels: Any, *, rcond: float | None = None,
                     num_classes: int | None = None) -> float:
  """Shrinkage H-score (Ibrahim et al. 2022): tr(S_a^-1 (1 - a) cov(E[f | y]))
  with S_a = (1 - a) S + a tr(S)/D I the Ledoit-Wolf estimate.

  Both covariances use 1/N (the maximum-likelihood convention Ledoit-Wolf is
  built on); code that pairs scikit-learn's LedoitWolf with np.cov's 1/(N-1)
  between-class covariance gets N/(N-1) times our value, the same ranking."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  return common.run_single(_shrinkage_hscore_core, data.features, data.labels,
                           num_classes=data.num_classes, rcond=rcond)


def shrinkage_hscore_batched(feature_stack: Any, labels: Any, *, rcond: float | None = None,
                             num_classes: int | None = None) -> np.ndarray:
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  return common.run_batched(_shrinkage_hscore_core, data.features, data.labels,
                            num_classes=data.num_classes, rcond=rcond)


# ---------------------------------------------------------------- TransRate


def _log_det_identity_plus(gram: jax.Array, scale: jax.Array) -> jax.Array:
  """log det(I + scale * gram) for PSD gram, via Cholesky."""
  matrix = jnp.eye(gram.shape[0], dtype=gram.dtype) + scale * gram
  return 2 * jnp.sum(jnp.log(jnp.diag(jnp.linalg.cholesky(matrix))))


def _transrate_core(x: jax.Array, labels: jax.Array, *, num_classes: int, eps: float
                    ) -> jax.Array:
  n = x.shape[0]
  z = x - x.mean(0)
  whole = 0.5 * _log_det_identity_plus(z.T @ z, 1 / (n * eps))

  def class_rate(c):  # classes one at a time: C x D x D at once could be large
    mask = (labels == c).astype(z.dtype)
    count = mask.sum()
    return 0.5 * _log_det_identity_plus((z * mask[:, None]).T @ z, 1 / (count * eps))

  per_class = jax.lax.map(class_rate, jnp.arange(num_classes))
  return whole - per_class.sum() / num_classes


def transrate(features: Any, labels: Any, *, eps: float = 1e-4,
              num_classes: int | None = None) -> float:
  """TransRate (Huang et al. 2022): R(Z) - mean_c R(Z_c) with the coding rate
  R(Z) = 1/2 log det(I + Z^T Z / (n eps)); Z are the features centred over all
  examples, Z_c the rows of class c (n = their count)."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  if eps <= 0:
    raise ValueError(f"eps must be > 0; got {eps}.")
  return common.run_single(_transrate_core, data.features, data.labels,
                           num_classes=data.num_classes, eps=float(eps))


def transrate_batched(feature_stack: Any, labels: Any, *, eps: float = 1e-4,
                      num_classes: int | None = None) -> np.ndarray:
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  if eps <= 0:
    raise ValueError(f"eps must be > 0; got {eps}.")
  return common.run_batched(_transrate_core, data.features, data.labels,
                            num_classes=data.num_classes, eps=float(eps))


# ---------------------------------------------------------------- GBC

GAUSSIAN_TYPES = ("spherical", "diagonal")
VARIANCE_FLOOR = 1e-4


def _gbc_core(x: jax.Array, labels: jax.Array, *, num_classes: int, gaussian_type: str,
              pca_dim: int | None) -> jax.Array:
  if pca_dim is not None:
    x = common.pca_project(x, pca_dim)
  means, counts = common.class_means(x, labels, num_classes)
  diff = x - means[labels]
  onehot = common.one_hot(labels, num_classes, x.dtype)
  variances = jnp.maximum(onehot.T @ (diff * diff) / counts[:, None], VARIANCE_FLOOR)
  if gaussian_type == "spherical":
    variances = variances.mean(1, keepdims=True)                       # [C, 1]

  def coefficients(c):  # Bhattacharyya coefficients of class c with every class
    avg = (variances[c] + variances) / 2
    mahalanobis = jnp.sum((means[c] - means) ** 2 / avg, axis=1) / 8
    log_dets = jnp.sum(jnp.log(avg) - 0.5 * jnp.log(variances[c]) - 0.5 * jnp.log(variances),
                       axis=1)
    return jnp.exp(-(mahalanobis + 0.5 * log_dets))

  bc = jax.lax.map(coefficients, jnp.arange(num_classes))
  return -jnp.sum(jnp.where(jnp.eye(num_classes, dtype=bool), 0, bc))


def _check_gbc(gaussian_type, pca_dim, d):
  common.check_choice("gaussian_type", gaussian_type, GAUSSIAN_TYPES)
  if pca_dim is not None and (int(pca_dim) != pca_dim or not 1 <= pca_dim <= d):
    raise ValueError(f"pca_dim={pca_dim!r} must be None or an integer in [1, D={d}].")


def gbc(features: Any, labels: Any, *, gaussian_type: str = "spherical",
        pca_dim: int | None = None, num_classes: int | None = None) -> float:
  """GBC (Pandy et al. 2022): minus the sum over ordered pairs of distinct classes
  of the Bhattacharyya coefficient exp(-D_B) between per-class Gaussians with
  diagonal or spherical covariance (per-dimension variances, population, floored
  at 1e-4; spherical = their mean). Optional PCA to `pca_dim` first.

  As in the authors' code (google-research stable_transfer), the spherical
  log-determinant term is *not* multiplied by D."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  _check_gbc(gaussian_type, pca_dim, data.features.shape[-1])
  return common.run_single(_gbc_core, data.features, data.labels,
                           num_classes=data.num_classes, gaussian_type=gaussian_type,
                           pca_dim=pca_dim)


def gbc_batched(feature_stack: Any, labels: Any, *, gaussian_type: str = "spherical",
                pca_dim: int | None = None, num_classes: int | None = None) -> np.ndarray:
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  _check_gbc(gaussian_type, pca_dim, data.features.shape[-1])
  return common.run_batched(_gbc_core, data.features, data.labels,
                            num_classes=data.num_classes, gaussian_type=gaussian_type,
                            pca_dim=pca_dim)


# ---------------------------------------------------------------- SFDA


def _largest_eigenvalue(a: jax.Array, iterations: int = 3) -> jax.Array:
  """Power iteration as in the SFDA code (starting from the row sums)."""
  v = a.sum(1)
  u = v
  for _ in range(iterations):
    u = a @ v
    u = u / jnp.linalg.norm(u)
    v = a @ u
    v = v / jnp.linalg.norm(v)
  return v @ a @ u


def _shrunk_lda_probs(x: jax.Array, labels: jax.Array, num_classes: int,
                      shrinkage: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Class probabilities of LDA with a shrunk within-class covariance.

  SFDA's code takes all D generalized eigenvectors V of (S_b, S_w') with
  V^T S_w' V = I, so its coefficients means V V^T equal means S_w'^-1: the
  between-class scatter cancels and we solve with S_w' directly."""
  n, d = x.shape
  means, counts = common.class_means(x, labels, num_classes)
  diff = x - means[labels]
  within = diff.T @ diff / n                        # sum_c prior_c * biased cov_c
  if shrinkage is None:
    shrinkage = jnp.maximum(jnp.exp(-5 * _largest_eigenvalue(within)), 1e-10)
  mu = jnp.trace(within) / d
  shrunk = (1 - shrinkage) * within + shrinkage * mu * jnp.eye(d, dtype=x.dtype)
  coef = jnp.linalg.solve(shrunk, means.T).T                            # [C, D]
  intercept = -0.5 * jnp.sum(means * coef, axis=1) + jnp.log(counts / n)
  return jax.nn.softmax(x @ coef.T + intercept, axis=1), shrinkage


def _sfda_core(x: jax.Array, labels: jax.Array, *, num_classes: int) -> jax.Array:
  probs, shrinkage = _shrunk_lda_probs(x, labels, num_classes, None)
  probs = jax.nn.softmax(probs, axis=1)           # SFDA "softens" the probabilities
  means, _ = common.class_means(x, labels, num_classes)
  others = (means.sum(0) - means) / (num_classes - 1)   # mean of the other classes' means
  own = jnp.take_along_axis(probs, labels[:, None], axis=1)
  mixed = own * x + (1 - own) * others[labels]     # ConfMix: harder examples
  probs, _ = _shrunk_lda_probs(mixed, labels, num_classes, shrinkage)
  return jnp.mean(jnp.take_along_axis(probs, labels[:, None], axis=1))


def sfda(features: Any, labels: Any, *, num_classes: int | None = None) -> float:
  """SFDA (Shao et al. 2022): regularised Fisher discriminant (shrinkage
  max(exp(-5 lambda_max(S_w)), 1e-10)), then ConfMix moves each example towards
  the other classes' mean by 1 - its softened own-class probability, refits with
  the same shrinkage and returns the mean own-class probability (no log, as in
  the authors' code)."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  return common.run_single(_sfda_core, data.features, data.labels,
                           num_classes=data.num_classes)


def sfda_batched(feature_stack: Any, labels: Any, *, num_classes: int | None = None
                 ) -> np.ndarray:
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  return common.run_batched(_sfda_core, data.features, data.labels,
                            num_classes=data.num_classes)


# ---------------------------------------------------------------- PARC


def _parc_core(x: jax.Array, labels: jax.Array, *, num_classes: int, pca_dim: int
               ) -> jax.Array:
  del num_classes
  evals, evecs = common.pca_spectrum(x)
  z = (x - x.mean(0)) @ evecs[:, :pca_dim]
  # Axes of rounding-level variance (features of rank < pca_dim) hold only noise,
  # which z-scoring would raise to unit variance: zero them (as exact PCA would).
  tiny = x.shape[1] * jnp.finfo(x.dtype).eps * evals[0]
  z = jnp.where(evals[:pca_dim] > tiny, z, 0)
  features_rdm = 1 - common.row_correlations(common.zscore(z))
  return common.spearman_with_label_rdm(features_rdm, labels)


def _parc_dim(pca_dim: int, n: int, d: int) -> int:
  if int(pca_dim) != pca_dim or pca_dim < 1:
    raise ValueError(f"pca_dim must be a positive integer; got {pca_dim!r}.")
  return int(min(pca_dim, n, d))


def parc(features: Any, labels: Any, *, pca_dim: int = 32, num_classes: int | None = None
         ) -> float:
  """PARC (Bolya et al. 2021): Spearman correlation between the RDM (1 - Pearson
  between examples) of the PCA-reduced (to min(pca_dim, N, D)), z-scored features
  and the RDM of the one-hot labels. Returned in [-1, 1] (the authors' code
  multiplies by 100).

  As in the authors' code (dbolya/parc, feature_reduce), PCA always runs, also
  when pca_dim >= D: the features are then turned onto their principal axes, and
  the z-scoring that follows whitens them. Exact PCA with scikit-learn's sign
  convention (the authors use randomized PCA, which is exact when
  min(pca_dim, N, D) + 10 >= D); axes whose variance is at rounding level
  (D x eps x the largest) are set to 0 rather than z-scored."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  dim = _parc_dim(pca_dim, *data.features.shape)
  return common.run_single(_parc_core, data.features, data.labels,
                           num_classes=data.num_classes, pca_dim=dim)


def parc_batched(feature_stack: Any, labels: Any, *, pca_dim: int = 32,
                 num_classes: int | None = None) -> np.ndarray:
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  dim = _parc_dim(pca_dim, *data.features.shape[1:])
  return common.run_batched(_parc_core, data.features, data.labels,
                            num_classes=data.num_classes, pca_dim=dim)
