"""Shared pieces of the transferability estimators: input validation, jit/vmap
plumbing and small jnp numerics (PCA, ranks, correlations).

Conventions of every estimator core in this package:
  * arrays are positional, hyper-parameters keyword-only; keyword-only
    arguments are static under `jax.jit` (they pick shapes and code paths);
  * the computation runs in the default float dtype: float32, or float64 inside
    `jax.enable_x64(True)` (the tests use that to compare with float64 numpy);
  * labels reach the core compacted to 0..C-1 over the classes present.
"""
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_PASS_LABELS = "pass integer class ids of shape [N], e.g. np.asarray(labels, np.int32)"


def float_dtype() -> np.dtype:
  """float32, or float64 when x64 is enabled (e.g. inside jax.enable_x64(True))."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Validated estimator inputs.

  features: [N, D] (or [M, N, D] for a stack of models) in the default float dtype.
  labels: [N] int32, compacted to 0..num_classes-1 in the order of `classes`.
  classes: the original label values present, sorted.
  """
  features: jax.Array
  labels: jax.Array
  num_classes: int
  classes: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


def _as_numeric(x: Any, what: str) -> np.ndarray:
  """x as a host array of a numpy integer or float dtype (bfloat16/float16 ->
  float32, so that the checks below and the cast to the compute dtype work)."""
  x = np.asarray(x)
  if x.dtype in (np.float32, np.float64) or np.issubdtype(x.dtype, np.integer):
    return x
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(np.float32)
  raise ValueError(f"{what} must be a real numeric array; got dtype {x.dtype}.")


def _check_features(x: np.ndarray, what: str) -> None:
  """Finite and not constant over the examples; x is [N, D] numeric."""
  bad = ~np.isfinite(x)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(
        f"{what} contain {int(bad.sum())} NaN/inf value(s), first at example "
        f"{row}, dimension {col} (value {x[row, col]}). Pass finite features: drop "
        "the broken examples or re-extract them.")
  if x.shape[0] and np.all(np.ptp(x, axis=0) == 0):
    raise ValueError(
        f"{what} are constant over the {x.shape[0]} examples (zero variance in every "
        f"one of the {x.shape[1]} dimensions), so no estimator can tell classes apart. "
        "Check the feature extraction (e.g. a collapsed or untrained backbone).")


def check_labels(labels: Any, num_examples: int, num_classes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Validates labels; returns (labels compacted to 0..C-1, classes present)."""
  y = np.asarray(labels)
  if y.ndim != 1:
    hint = " (one-hot? pass labels.argmax(-1))" if y.ndim == 2 else ""
    raise ValueError(f"labels must have shape [N]; got shape {y.shape}{hint}: {_PASS_LABELS}.")
  if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids; got dtype {y.dtype}: {_PASS_LABELS}.")
  if y.shape[0] != num_examples:
    raise ValueError(f"features have {num_examples} examples but labels have {y.shape[0]}; "
                     "pass one label per feature row, in the same order.")
  if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
    raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
  upper = num_classes if num_classes is not None else None
  if y.size and (y.min() < 0 or (upper is not None and y.max() >= upper)):
    bounds = f"[0, {upper})" if upper is not None else "[0, inf)"
    raise ValueError(f"labels must lie in {bounds}; got values in [{y.min()}, {y.max()}]. "
                     "Map them to 0..num_classes-1 (or pass the right num_classes).")
  classes, compact = np.unique(y, return_inverse=True)
  if len(classes) < 2:
    raise ValueError(
        f"the task has {len(classes)} class(es) in these {num_examples} labels "
        f"({classes.tolist()}); transferability needs at least 2 classes. Pass a split "
        "that holds several classes (e.g. train800val200).")
  return compact.astype(np.int32), classes


def check_inputs(features: Any, labels: Any, *, num_classes: int | None = None) -> Inputs:
  """The one validator for a single model: features [N, D], labels [N] int."""
  x = _as_numeric(features, "features")
  if x.ndim != 2:
    hint = " (a stack of models goes to the *_batched functions)" if x.ndim == 3 else ""
    raise ValueError(f"features must have shape [N, D]; got shape {x.shape}{hint}.")
  y, classes = check_labels(labels, x.shape[0], num_classes)
  _check_features(x, "features")
  return Inputs(jnp.asarray(x, float_dtype()), jnp.asarray(y), len(classes), classes)


def check_stack(feature_stack: Any, labels: Any, *, num_classes: int | None = None) -> Inputs:
  """Like check_inputs for a stack [M, N, D] of models sharing one label set."""
  x = _as_numeric(feature_stack, "features")
  if x.ndim != 3:
    raise ValueError(f"a stack of model features must have shape [M, N, D]; got {x.shape}. "
                     "Models with different D go through the per-model functions.")
  y, classes = check_labels(labels, x.shape[1], num_classes)
  for m in range(x.shape[0]):
    _check_features(x[m], f"features of model {m}")
  return Inputs(jnp.asarray(x, float_dtype()), jnp.asarray(y), len(classes), classes)


def check_reference(reference: Any, num_examples: int, what: str = "reference_features"
                    ) -> jax.Array:
  """A second representation of the same examples (e.g. a reference model's features)."""
  r = _as_numeric(reference, what)
  if r.ndim != 2 or r.shape[0] != num_examples:
    raise ValueError(f"{what} must have shape [N={num_examples}, D_ref]; got {r.shape}. "
                     "Pass the reference model's features on the same examples, same order.")
  _check_features(r, what)
  return jnp.asarray(r, float_dtype())


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}.")


# ---------------------------------------------------------------- jit plumbing


def _static_names(core: Callable) -> tuple[str, ...]:
  params = inspect.signature(core).parameters.values()
  return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


@functools.cache
def jit_single(core: Callable) -> Callable:
  """jax.jit(core) with its keyword-only arguments static."""
  return jax.jit(core, static_argnames=_static_names(core))


@functools.cache
def jit_batched(core: Callable, num_mapped: int = 1) -> Callable:
  """jit(vmap(core)) over the leading axis of the first `num_mapped` arguments;
  the other positional arrays are shared by all models, keyword-only are static."""

  def run(*args, **static):
    mapped, shared = args[:num_mapped], args[num_mapped:]
    return jax.vmap(lambda *m: core(*m, *shared, **static))(*mapped)

  run.__name__ = f"batched_{core.__name__}"
  return jax.jit(run, static_argnames=_static_names(core))


def run_single(core: Callable, *args, **static) -> float:
  return float(jit_single(core)(*args, **static))


def run_batched(core: Callable, *args, num_mapped: int = 1, **static) -> np.ndarray:
  return np.asarray(jit_batched(core, num_mapped)(*args, **static), np.float64)


# ---------------------------------------------------------------- jnp numerics


def one_hot(labels: jax.Array, num_classes: int, dtype=None) -> jax.Array:
  return jax.nn.one_hot(labels, num_classes, dtype=dtype or float_dtype())


def class_means(x: jax.Array, labels: jax.Array, num_classes: int
                ) -> tuple[jax.Array, jax.Array]:
  """Per-class means [C, D] and counts [C] (labels compacted, every class present)."""
  onehot = one_hot(labels, num_classes, x.dtype)
  counts = onehot.sum(0)
  return onehot.T @ x / counts[:, None], counts


def pca_spectrum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues (descending) and eigenvectors [D, D] (columns) of the covariance
  of x, each eigenvector signed so that its largest-magnitude entry is positive
  (scikit-learn's convention, so projections are deterministic)."""
  xc = x - x.mean(0)
  evals, evecs = jnp.linalg.eigh(xc.T @ xc / x.shape[0])
  evals, evecs = evals[::-1], evecs[:, ::-1]
  pivot = jnp.argmax(jnp.abs(evecs), axis=0)
  signs = jnp.sign(evecs[pivot, jnp.arange(evecs.shape[1])])
  return jnp.maximum(evals, 0), evecs * jnp.where(signs == 0, 1, signs)


def pca_project(x: jax.Array, num_dims: int) -> jax.Array:
  """Centred projection of x [N, D] onto its top `num_dims` principal axes."""
  _, evecs = pca_spectrum(x)
  return (x - x.mean(0)) @ evecs[:, :num_dims]


@jax.jit
def _pca_eigenvalues(x: jax.Array) -> jax.Array:
  return pca_spectrum(x)[0]


def num_dims_for_variance(x: np.ndarray | jax.Array, fraction: float) -> int:
  """Smallest number of principal axes explaining more than `fraction` of the
  variance (scikit-learn's rule for PCA(n_components=fraction))."""
  if not 0 < fraction < 1:
    raise ValueError(f"pca_variance must lie in (0, 1); got {fraction}.")
  evals = np.asarray(_pca_eigenvalues(jnp.asarray(x)), np.float64)
  ratios = np.cumsum(evals) / evals.sum()
  return int(min(np.searchsorted(ratios, fraction, side="right") + 1, len(evals)))


def zscore(x: jax.Array) -> jax.Array:
  """Columns to zero mean, unit (population) variance; constant columns to 0."""
  xc = x - x.mean(0)
  std = jnp.sqrt((xc * xc).mean(0))
  return xc / jnp.where(std > 0, std, 1)


def row_correlations(x: jax.Array) -> jax.Array:
  """Pearson correlation between rows (examples) of x [N, D] -> [N, N]."""
  xc = x - x.mean(1, keepdims=True)
  xn = xc / jnp.linalg.norm(xc, axis=1, keepdims=True)
  return xn @ xn.T


def upper_triangle(matrix: jax.Array) -> jax.Array:
  """Entries above the diagonal of an [N, N] matrix, row by row."""
  rows, cols = np.triu_indices(matrix.shape[0], 1)  # static: N is a shape
  return matrix[rows, cols]


def rankdata(v: jax.Array) -> jax.Array:
  """1-based ranks with ties averaged (scipy.stats.rankdata's 'average').

  One argsort; each tie group's first and last sorted positions come from
  running max/min scans (two searchsorted passes would sort 2N values twice,
  ~5x slower on the N^2/2 entries of an RDM)."""
  n = v.shape[0]
  order = jnp.argsort(v)
  s = v[order]
  position = jnp.arange(n)
  differs = s[1:] != s[:-1]
  starts = jnp.concatenate([jnp.ones((1,), bool), differs])
  ends = jnp.concatenate([differs, jnp.ones((1,), bool)])
  first = jax.lax.cummax(jnp.where(starts, position, 0))
  last = jax.lax.cummin(jnp.where(ends, position, n), reverse=True)
  average = (first + last + 2).astype(float_dtype()) / 2
  return jnp.zeros((n,), float_dtype()).at[order].set(average)


def binary_ranks(b: jax.Array) -> jax.Array:
  """rankdata of a 0/1 vector without sorting: all zeros tie below all ones."""
  b = b.astype(bool)
  zeros = jnp.sum(~b).astype(float_dtype())
  ones = b.shape[0] - zeros
  return jnp.where(b, zeros + (ones + 1) / 2, (zeros + 1) / 2)


def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
  a = a - a.mean()
  b = b - b.mean()
  return (a @ b) / jnp.sqrt((a @ a) * (b @ b))


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  return pearson(rankdata(a), rankdata(b))


def spearman_with_label_rdm(rdm_values: jax.Array, labels: jax.Array) -> jax.Array:
  """Spearman correlation of an RDM's upper triangle with the label RDM's.

  The one-hot label RDM (1 - Pearson) is two-valued, 0 within a class and
  1 + 1/(C-1) across, so it ranks like the indicator [y_i != y_j]."""
  different = upper_triangle(labels[:, None] != labels[None, :])
  return pearson(rankdata(upper_triangle(rdm_values)), binary_ranks(different))


def leep_from_probs(probs: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """LEEP of dummy-label probabilities probs [N, Z] (rows sum to 1)."""
  n = probs.shape[0]
  joint = one_hot(labels, num_classes, probs.dtype).T @ probs / n     # P(y, z): [C, Z]
  marginal = joint.sum(0)                                             # P(z)
  conditional = joint / jnp.where(marginal > 0, marginal, 1)          # P(y | z)
  expected = jnp.sum(probs * conditional[labels], axis=1)             # sum_z P(y_i|z) p(z|x_i)
  return jnp.mean(jnp.log(expected))
