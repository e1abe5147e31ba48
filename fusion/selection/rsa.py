"""Representation similarity: RSA, Duality Diagram Similarity (DDS) and CKA.

All three compare how two representations of the same probe examples relate the
examples to each other. As transferability estimators they compare a hub model's
features with a *reference* for the target task: a small model trained on the
task's train800 (pass its features as `reference_features`) or, by default, the
one-hot labels themselves.

RSA (Dwivedi & Roig, "Representation Similarity Analysis for Efficient Task
Taxonomy & Transfer Learning", CVPR 2019): the representational dissimilarity
matrix (RDM) of a representation is 1 - Pearson correlation between the feature
vectors of each pair of examples; two representations are compared by the
Spearman correlation of their RDMs' upper triangles. As in the authors' release
code (kshitijd20/RSA-CVPR19-release, create_taskonomy_RDMs_enc_final.py), each
representation's features are first centred over the examples (normalisation
"centering", the default); "zscore" also scales each feature to unit variance
(as dbolya/parc's RSA does) and "none" takes the RDM of the raw features. The
one-hot label RDM is two-valued (0 within a class, 1 + 1/(C-1) across), so we
build it exactly as the indicator [y_i != y_j], which has the same ranks; the
normalisation applies to features, not to labels.

DDS (Dwivedi et al., "Duality Diagram Similarity", ECCV 2020; conventions of
cvai-roig-lab/duality-diagram-similarity): normalise features (none, centring,
z-score), map them to an N x N matrix with a kernel (linear; RBF with bandwidth
0.5 x the median distance; Laplacian exp(-|x - y|_1 / D)) or a distance
(1 - Pearson, Euclidean, 1 - cosine), and compare the two matrices with debiased
CKA.

Debiased CKA (Kornblith et al. 2019, with the unbiased HSIC estimator of Song
et al. 2012): HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)), computed through
U-centred Gram matrices.

Invariances: RSA (centred, the default) is invariant to scaling all features by
one constant and to shifting every example by the same vector; with z-scoring
also to scaling each feature; without normalisation to scaling and shifting
each example's features instead;
CKA with a linear kernel to scaling all features by one constant and to
rotations; DDS with z-scoring to scaling each feature, and otherwise (linear,
RBF-median, Pearson, Euclidean, cosine) to scaling all features by a constant;
the Laplacian kernel's fixed 1/D bandwidth is not scale-invariant.
"""
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion.selection import common

NORMALISATIONS = ("none", "centering", "zscore")
KERNELS = ("linear", "rbf", "laplacian")
DISTANCES = ("pearson", "euclidean", "cosine")
DDS_FUNCTIONS = KERNELS + DISTANCES
RBF_THRESHOLD = 0.5  # bandwidth as a fraction of the median distance (the DDS code's value)


# ------------------------------------------------------------------ matrices


def rdm(x: jax.Array) -> jax.Array:
  """RSA dissimilarity matrix: 1 - Pearson correlation between examples."""
  return 1 - common.row_correlations(x)


def _squared_distances(x: jax.Array) -> jax.Array:
  sq = jnp.sum(x * x, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0, d2)


def _normalise(x: jax.Array, normalisation: str) -> jax.Array:
  if normalisation == "centering":
    return x - x.mean(0)
  if normalisation == "zscore":
    return common.zscore(x)
  return x


def dds_matrix(x: jax.Array, function: str) -> jax.Array:
  """The N x N kernel or distance matrix DDS compares, for normalised x."""
  if function == "linear":
    return x @ x.T
  if function == "rbf":
    d2 = _squared_distances(x)
    return jnp.exp(-d2 / (2 * RBF_THRESHOLD ** 2 * jnp.median(d2)))
  if function == "laplacian":  # scikit-learn's default gamma = 1 / D
    l1 = jax.lax.map(lambda row: jnp.sum(jnp.abs(x - row), axis=1), x, batch_size=64)
    return jnp.exp(-l1 / x.shape[1])
  if function == "pearson":
    return rdm(x)
  if function == "euclidean":
    return jnp.sqrt(_squared_distances(x))
  unit = x / jnp.linalg.norm(x, axis=1, keepdims=True)   # cosine
  return 1 - unit @ unit.T


def _center(gram: jax.Array, debiased: bool) -> jax.Array:
  n = gram.shape[0]
  if debiased:  # U-centring (Szekely & Rizzo 2014): <.,.> of two gives n(n-3) HSIC_u
    off = ~jnp.eye(n, dtype=bool)
    gram = jnp.where(off, gram, 0)
    means = gram.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    return jnp.where(off, gram - means[:, None] - means[None, :], 0)
  means = gram.mean(0)
  means = means - means.mean() / 2
  return gram - means[:, None] - means[None, :]


def cka_from_grams(gram_x: jax.Array, gram_y: jax.Array, debiased: bool = True) -> jax.Array:
  """CKA of two N x N symmetric matrices (debiased: unbiased HSIC estimator)."""
  cx, cy = _center(gram_x, debiased), _center(gram_y, debiased)
  return jnp.sum(cx * cy) / (jnp.linalg.norm(cx) * jnp.linalg.norm(cy))


def _reference_or_labels(reference: jax.Array | None, labels: jax.Array,
                         num_classes: int) -> jax.Array:
  if reference is None:
    return common.one_hot(labels, num_classes)
  return reference


# ------------------------------------------------------------------ cores


def _rsa_core(x: jax.Array, labels: jax.Array, reference: jax.Array | None = None, *,
              num_classes: int, normalisation: str) -> jax.Array:
  del num_classes  # labels enter through their RDM
  features_rdm = rdm(_normalise(x, normalisation))
  if reference is None:
    return common.spearman_with_label_rdm(features_rdm, labels)
  return common.spearman(common.upper_triangle(features_rdm),
                         common.upper_triangle(rdm(_normalise(reference, normalisation))))


def _dds_core(x: jax.Array, labels: jax.Array, reference: jax.Array | None = None, *,
              num_classes: int, normalisation: str, function: str) -> jax.Array:
  ref = _reference_or_labels(reference, labels, num_classes)
  mx = dds_matrix(_normalise(x, normalisation), function)
  my = dds_matrix(_normalise(ref, normalisation), function)
  return cka_from_grams(mx, my, debiased=True)


def _cka_core(x: jax.Array, labels: jax.Array, reference: jax.Array | None = None, *,
              num_classes: int, kernel: str, debiased: bool) -> jax.Array:
  ref = _reference_or_labels(reference, labels, num_classes)
  return cka_from_grams(dds_matrix(x, kernel), dds_matrix(ref, kernel), debiased)


def _min_examples(n: int, needed: int, what: str) -> None:
  if n < needed:
    raise ValueError(f"{what} needs at least {needed} examples; got {n}.")


def _prepare_reference(reference: Any, n: int) -> tuple[jax.Array, ...]:
  return () if reference is None else (common.check_reference(reference, n),)


# ------------------------------------------------------------------ estimators


def _check_rsa(normalisation: str, n: int) -> None:
  common.check_choice("normalisation", normalisation, NORMALISATIONS)
  _min_examples(n, 3, "RSA")


def rsa(features: Any, labels: Any, *, reference_features: Any = None,
        normalisation: str = "centering", num_classes: int | None = None) -> float:
  """Spearman correlation between the RDM of `features` and that of the reference
  (`reference_features` [N, D_ref], or the one-hot labels when None).

  normalisation, applied to the features and the reference features before
  their RDMs: "centering" (default) subtracts each feature's mean over the probe
  set, as the RSA authors' release code does; "zscore" also divides by its
  standard deviation (as PARC's code does); "none" uses the raw features (the
  default before issue #9)."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  _check_rsa(normalisation, data.num_examples)
  ref = _prepare_reference(reference_features, data.num_examples)
  return common.run_single(_rsa_core, data.features, data.labels, *ref,
                           num_classes=data.num_classes, normalisation=normalisation)


def rsa_batched(feature_stack: Any, labels: Any, *, reference_features: Any = None,
                normalisation: str = "centering", num_classes: int | None = None
                ) -> np.ndarray:
  """rsa of each model in a stack [M, N, D] against one shared reference -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  _check_rsa(normalisation, data.num_examples)
  ref = _prepare_reference(reference_features, data.num_examples)
  return common.run_batched(_rsa_core, data.features, data.labels, *ref,
                            num_classes=data.num_classes, normalisation=normalisation)


def _check_dds(normalisation: str, function: str, n: int) -> None:
  common.check_choice("normalisation", normalisation, NORMALISATIONS)
  common.check_choice("function", function, DDS_FUNCTIONS)
  _min_examples(n, 4, "Debiased CKA")


def dds(features: Any, labels: Any, *, reference_features: Any = None,
        normalisation: str = "zscore", function: str = "laplacian",
        num_classes: int | None = None) -> float:
  """Duality Diagram Similarity to the reference (`reference_features` or one-hot
  labels): debiased CKA of the two `function` matrices of the normalised inputs.
  normalisation: none | centering | zscore; function: linear | rbf | laplacian
  (kernels) or pearson | euclidean | cosine (distances)."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  _check_dds(normalisation, function, data.num_examples)
  ref = _prepare_reference(reference_features, data.num_examples)
  return common.run_single(_dds_core, data.features, data.labels, *ref,
                           num_classes=data.num_classes, normalisation=normalisation,
                           function=function)


def dds_batched(feature_stack: Any, labels: Any, *, reference_features: Any = None,
                normalisation: str = "zscore", function: str = "laplacian",
                num_classes: int | None = None) -> np.ndarray:
  """dds of each model in a stack [M, N, D] -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  _check_dds(normalisation, function, data.num_examples)
  ref = _prepare_reference(reference_features, data.num_examples)
  return common.run_batched(_dds_core, data.features, data.labels, *ref,
                            num_classes=data.num_classes, normalisation=normalisation,
                            function=function)


def _check_cka(kernel: str, debiased: bool, n: int) -> None:
  common.check_choice("kernel", kernel, KERNELS)
  _min_examples(n, 4 if debiased else 2, "CKA")


def cka(features: Any, labels: Any, *, reference_features: Any = None,
        kernel: str = "linear", debiased: bool = True, num_classes: int | None = None
        ) -> float:
  """CKA between `features` and the reference (`reference_features` or one-hot
  labels); debiased (unbiased HSIC) by default. kernel: linear | rbf | laplacian."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  _check_cka(kernel, debiased, data.num_examples)
  ref = _prepare_reference(reference_features, data.num_examples)
  return common.run_single(_cka_core, data.features, data.labels, *ref,
                           num_classes=data.num_classes, kernel=kernel,
                           debiased=bool(debiased))


def cka_batched(feature_stack: Any, labels: Any, *, reference_features: Any = None,
                kernel: str = "linear", debiased: bool = True,
                num_classes: int | None = None) -> np.ndarray:
  """cka of each model in a stack [M, N, D] -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  _check_cka(kernel, debiased, data.num_examples)
  ref = _prepare_reference(reference_features, data.num_examples)
  return common.run_batched(_cka_core, data.features, data.labels, *ref,
                            num_classes=data.num_classes, kernel=kernel,
                            debiased=bool(debiased))


# ------------------------------------------------------------------ hub taxonomy


@functools.partial(jax.jit, static_argnames="normalisation")
def _standardised_rdm_ranks(x: jax.Array, normalisation: str) -> jax.Array:
  """Ranks of the RDM's upper triangle, centred and scaled to unit norm, so the
  Spearman correlation of two models is the dot product of their vectors."""
  ranks = common.rankdata(common.upper_triangle(rdm(_normalise(x, normalisation))))
  ranks = ranks - ranks.mean()
  return ranks / jnp.linalg.norm(ranks)


def rsa_similarity_matrix(features: Sequence[Any], *, normalisation: str = "centering"
                          ) -> np.ndarray:
  """RSA (Spearman of RDMs) between every pair of M models -> [M, M].

  features: one [N, D_m] array per model, all on the same N probe examples (D_m
  may differ). Each model's features are normalised as in `rsa` (default: centred
  over the examples, as the RSA authors' taxonomy code does). Memory grows as
  M * N^2 / 2, so use a probe set of a few hundred examples for large hubs."""
  if len(features) < 2:
    raise ValueError(f"need features of at least 2 models; got {len(features)}.")
  common.check_choice("normalisation", normalisation, NORMALISATIONS)
  vectors, n = [], None
  for m, f in enumerate(features):
    f = np.asarray(f)
    if f.ndim != 2 or (n is not None and f.shape[0] != n):
      raise ValueError(f"model {m}: features must be [N, D] on the same N={n} probe "
                       f"examples as model 0; got shape {f.shape}.")
    n = f.shape[0]
    _min_examples(n, 3, "RSA")
    vectors.append(_standardised_rdm_ranks(
        common.check_reference(f, n, f"features of model {m}"), normalisation))
  stacked = jnp.stack(vectors)
  similarity = np.array(stacked @ stacked.T, np.float64)
  np.fill_diagonal(similarity, 1.0)
  return similarity


def cluster_models(similarity: Any, method: str = "average") -> np.ndarray:
  """scipy hierarchical clustering of models from an [M, M] similarity matrix
  (distance = 1 - similarity); returns the (M-1) x 4 linkage matrix."""
  from scipy.cluster import hierarchy
  from scipy.spatial import distance

  s = np.asarray(similarity, np.float64)
  if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
    raise ValueError(f"similarity must be a square [M, M] matrix with M >= 2; got {s.shape}.")
  if not np.all(np.isfinite(s)) or not np.allclose(s, s.T, atol=1e-6):
    raise ValueError("similarity must be finite and symmetric.")
  common.check_choice("method", method,
                      ("single", "complete", "average", "weighted", "centroid", "median", "ward"))
  d = np.clip(1.0 - (s + s.T) / 2, 0.0, None)
  np.fill_diagonal(d, 0.0)
  return hierarchy.linkage(distance.squareform(d, checks=False), method=method)


def plot_dendrogram(similarity: Any, names: Sequence[str], path: str, *,
                    method: str = "average", title: str = "Model taxonomy (RSA)") -> str:
  """Writes a dendrogram of the models (PNG, Agg backend) to `path`; returns it."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from scipy.cluster import hierarchy

  linkage = cluster_models(similarity, method)
  if len(names) != linkage.shape[0] + 1:
    raise ValueError(f"got {len(names)} names for {linkage.shape[0] + 1} models.")
  fig = Figure(figsize=(max(6.0, 0.35 * len(names)), 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  hierarchy.dendrogram(linkage, labels=list(names), ax=ax, leaf_rotation=90)
  ax.set_ylabel("1 - similarity")
  ax.set_title(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
