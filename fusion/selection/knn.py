"""Leave-one-out k-nearest-neighbour accuracy of frozen features.

Mustafa et al., "Deep Ensembles for Low-Data Transfer Learning" (2020) rank
hub models by the kNN accuracy of their features on the task's train800val200
split, each example classified by its k nearest *other* examples.

Votes: the class with most of the k votes wins; a tie goes to the tied class
whose nearest member is closest. (Breaking ties by the smallest class id, as
scipy.stats.mode does, would make the score depend on how classes are numbered.)

Invariances: both metrics are invariant to scaling all features by one positive
constant; cosine is also invariant to scaling each example separately.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion.selection import common

METRICS = ("cosine", "l2")


def _knn_core(x: jax.Array, labels: jax.Array, *, num_classes: int, k: int,
              metric: str) -> jax.Array:
  n = x.shape[0]
  if metric == "cosine":
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), jnp.finfo(x.dtype).tiny)
    closeness = unit @ unit.T
  else:  # Negative squared L2 distance; same order as the distance.
    sq = jnp.sum(x * x, axis=1)
    closeness = 2 * x @ x.T - sq[:, None] - sq[None, :]
  closeness = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, closeness)  # leave one out
  _, neighbours = jax.lax.top_k(closeness, k)                            # nearest first
  votes = common.one_hot(labels[neighbours], num_classes, x.dtype)       # [N, k, C]
  counts = votes.sum(1)
  position = jnp.arange(k, dtype=x.dtype)[None, :, None]
  nearest = jnp.min(jnp.where(votes > 0, position, k), axis=1)          # [N, C]
  predictions = jnp.argmax(counts - nearest / (k + 1), axis=1)
  return jnp.mean((predictions == labels).astype(x.dtype))


def _check_options(k: int, metric: str, num_examples: int) -> None:
  common.check_choice("metric", metric, METRICS)
  if int(k) != k or not 1 <= k < num_examples:
    raise ValueError(f"k={k!r} must be an integer in [1, N-1] = [1, {num_examples - 1}].")


def knn_loo_accuracy(features: Any, labels: Any, *, k: int = 1, metric: str = "cosine",
                     num_classes: int | None = None) -> float:
  """Fraction of examples whose k nearest other examples vote for their label."""
  data = common.check_inputs(features, labels, num_classes=num_classes)
  _check_options(k, metric, data.num_examples)
  return common.run_single(_knn_core, data.features, data.labels,
                           num_classes=data.num_classes, k=int(k), metric=metric)


def knn_loo_accuracy_batched(feature_stack: Any, labels: Any, *, k: int = 1,
                             metric: str = "cosine", num_classes: int | None = None
                             ) -> np.ndarray:
  """knn_loo_accuracy of each model in a stack [M, N, D] -> [M]."""
  data = common.check_stack(feature_stack, labels, num_classes=num_classes)
  _check_options(k, metric, data.num_examples)
  return common.run_batched(_knn_core, data.features, data.labels,
                            num_classes=data.num_classes, k=int(k), metric=metric)
