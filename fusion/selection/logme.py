"""LogME: log of the maximum evidence of a Bayesian linear model on the features.

You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning" (ICML 2021), with the fixed-point evidence maximisation of "Ranking and
Tuning Pre-trained Models" (You et al., 2021; thuml/LogME `_fit_fixed_point`).

For each class c, the target is the indicator y = [label == c] and the model is
y ~ N(F w, 1/beta), w ~ N(0, 1/alpha). Starting from alpha = beta = 1, repeat at
most 11 times:
  t = alpha / beta, gamma = sum_i s_i / (s_i + t),
  m2 = |m|^2, res2 = |y - F m|^2 with m = (F^T F + t I)^-1 F^T y,
  alpha = gamma / (m2 + 1e-5), beta = (N - gamma) / (res2 + 1e-5),
stopping once |alpha/beta - t| / t <= 1e-3. The evidence per example is
  [D/2 log alpha + N/2 log beta - 1/2 log det(alpha I + beta F^T F)
   - beta/2 res2 - alpha/2 m2 - N/2 log 2 pi] / N,
averaged over classes. Everything comes from one SVD of F (or, with solver="eigh",
an eigendecomposition of F^T F or F F^T), shared by all classes and vectorised
over them.

Difference from thuml's fixed-point code: log det runs over all D eigenvalues
of F^T F, zeros included, as the evidence formula says (thuml's ICML code does
the same; its fixed-point code drops zero eigenvalues when F is rank-deficient,
e.g. N < D). Full-rank N >= D features give identical numbers.

Invariances: label permutation. Scaling the features by c is absorbed by alpha
in exact arithmetic, but the 1e-5 terms and the stopping rule make LogME only
approximately scale-invariant, so we do not claim it.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion.selection import common

MAX_ITERATIONS = 11
TOLERANCE = 1e-3
EPSILON = 1e-5


SOLVERS = ("svd", "eigh")


def _spectrum(x: jax.Array, targets: jax.Array, solver: str
              ) -> tuple[jax.Array, jax.Array, jax.Array, int]:
  """Squared singular values s of F, the coordinates U^T y of the targets on its
  left singular vectors (zeroed where s is numerically 0), and |y - U U^T y|^2.
  Returns (s [k], U^T Y [k, C], residual [C], number of further zero eigenvalues
  of F^T F).

  The residual is computed from the residual vectors, not as |y|^2 - |U^T y|^2:
  that difference cancels catastrophically in float32 (|y|^2 ~ N_c, the residual
  ~ 1e-3 N_c for good features).

  "svd" factorises F itself (zero: singular values below numpy's matrix_rank
  tolerance). "eigh" diagonalises the smaller Gram matrix, several times faster
  on CPU, but the Gram squares the condition number: eigenvalues below
  10 x eps x the largest count as zero. In float32 that costs ~1e-5 relative on
  typical 768-d features and ~1e-2 once the Gram's condition number passes
  ~1e6; in float64 both solvers agree to ~1e-12."""
  n, d = x.shape
  if solver == "svd":
    u, sv, _ = jnp.linalg.svd(x, full_matrices=False)
    s, coords = sv ** 2, u.T @ targets
    # numpy.linalg.matrix_rank's tolerance on the singular values themselves
    valid = sv > jnp.max(sv) * max(n, d) * jnp.finfo(x.dtype).eps
    coords = jnp.where(valid[:, None], coords, 0)
    fitted = u @ coords
  elif n >= d:
    s, v = jnp.linalg.eigh(x.T @ x)
    valid = s > jnp.max(s) * 10 * jnp.finfo(x.dtype).eps
    root = jnp.sqrt(jnp.where(valid, s, 1))[:, None]
    coords = jnp.where(valid[:, None], v.T @ (x.T @ targets) / root, 0)   # U = F V / sqrt(s)
    fitted = x @ (v @ (coords / root))
  else:
    s, u = jnp.linalg.eigh(x @ x.T)
    valid = s > jnp.max(s) * 10 * jnp.finfo(x.dtype).eps
    coords = jnp.where(valid[:, None], u.T @ targets, 0)
    fitted = u @ coords
  residual = jnp.sum((targets - fitted) ** 2, axis=0)
  return jnp.where(valid, s, 0), coords, residual, d - min(n, d)


def _logme_core(x: jax.Array, labels: jax.Array, *, num_classes: int, solver: str
                ) -> jax.Array:
  n, d = x.shape
  targets = common.one_hot(labels, num_classes, x.dtype)             # [N, C]
  s, coords, outside, extra_zeros = _spectrum(x, targets, solver)  # outside: |y|^2 off span(F)
  s = s[:, None]                                                     # [k, 1]
  coords2 = coords ** 2                                              # [k, C]

  def update(alpha, beta):
    t = alpha / beta
    gamma = jnp.sum(s / (s + t), axis=0)
    m2 = jnp.sum(s * coords2 / (t + s) ** 2, axis=0)
    res2 = jnp.sum(coords2 / (1 + s / t) ** 2, axis=0) + outside
    return gamma / (m2 + EPSILON), (n - gamma) / (res2 + EPSILON), m2, res2, t

  def cond(state):
    step, *_, done = state
    return (step < MAX_ITERATIONS) & ~jnp.all(done)

  def body(state):
    step, alpha, beta, m2, res2, done = state
    new_alpha, new_beta, new_m2, new_res2, t = update(alpha, beta)
    keep = lambda old, new: jnp.where(done, old, new)  # classes that converged stay put
    converged = jnp.abs(new_alpha / new_beta - t) / t <= TOLERANCE
    return (step + 1, keep(alpha, new_alpha), keep(beta, new_beta), keep(m2, new_m2),
            keep(res2, new_res2), done | converged)

  ones = jnp.ones((num_classes,), x.dtype)
  state = (0, ones, ones, ones, ones, jnp.zeros((num_classes,), bool))
  _, alpha, beta, m2, res2, _ = jax.lax.while_loop(cond, body, state)
  log_det = jnp.sum(jnp.log(alpha + beta * s), axis=0) + extra_zeros * jnp.log(alpha)
  evidence = (d / 2 * jnp.log(alpha) + n / 2 * jnp.log(beta) - log_det / 2
              - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * jnp.log(2 * jnp.pi))
  return jnp.mean(evidence / n)


def logme(features: Any, labels: Any, *, solver: str = "svd",
          num_classes: int | None = None) -> float:
  """LogME score (mean over classes of the per-example log evidence).
  solver: "svd" (accurate in float32) or "eigh" (faster; see _spectrum)."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  common.check_choice("solver", solver, SOLVERS)
  return common.run_single(_logme_core, data.features, data.labels,
                           num_classes=data.num_classes, solver=solver)


def logme_batched(feature_stack: Any, labels: Any, *, solver: str = "svd",
                  num_classes: int | None = None) -> np.ndarray:
  """logme of each model in a stack [M, N, D] -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  common.check_choice("solver", solver, SOLVERS)
  return common.run_batched(_logme_core, data.features, data.labels,
                            num_classes=data.num_classes, solver=solver)
