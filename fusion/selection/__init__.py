"""Transferability estimators: rank hub models for a task from frozen features.

ESTIMATORS[name](features [N, D], labels [N] int, **options) -> float, higher
meaning "transfers better"; BATCHED[name](features [M, N, D], labels, **options)
-> np.ndarray [M] scores M models of one feature shape with one vmapped, jitted
call. Options each estimator needs beyond features (a source head's
probabilities, a reference model's features) are keyword arguments; see each
function's docstring. `ranking` evaluates scores against ground-truth accuracies.
"""
from collections.abc import Callable

from fusion.selection import common, estimators, knn, logme, ranking, rsa

ESTIMATORS: dict[str, Callable[..., float]] = {
    "knn": knn.knn_loo_accuracy,
    "logme": logme.logme,
    "rsa": rsa.rsa,
    "dds": rsa.dds,
    "cka": rsa.cka,
    "leep": estimators.leep,
    "nleep": estimators.nleep,
    "nce": estimators.nce,
    "hscore": estimators.hscore,
    "shrinkage_hscore": estimators.shrinkage_hscore,
    "transrate": estimators.transrate,
    "gbc": estimators.gbc,
    "sfda": estimators.sfda,
    "parc": estimators.parc,
}

BATCHED: dict[str, Callable] = {
    "knn": knn.knn_loo_accuracy_batched,
    "logme": logme.logme_batched,
    "rsa": rsa.rsa_batched,
    "dds": rsa.dds_batched,
    "cka": rsa.cka_batched,
    "leep": estimators.leep_batched,
    "nleep": estimators.nleep_batched,
    "nce": estimators.nce_batched,
    "hscore": estimators.hscore_batched,
    "shrinkage_hscore": estimators.shrinkage_hscore_batched,
    "transrate": estimators.transrate_batched,
    "gbc": estimators.gbc_batched,
    "sfda": estimators.sfda_batched,
    "parc": estimators.parc_batched,
}

# Estimators that read more than features and labels, and the option they need.
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "leep": ("source_probs",),
    "nce": ("source_labels", "source_probs"),   # one of the two
}


def get(name: str) -> Callable[..., float]:
  """The estimator registered as `name`."""
  if name not in ESTIMATORS:
    raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}.")
  return ESTIMATORS[name]


__all__ = ["ESTIMATORS", "BATCHED", "REQUIRED_OPTIONS", "get", "common", "estimators",
           "knn", "logme", "ranking", "rsa"]
