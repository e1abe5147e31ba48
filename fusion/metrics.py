"""Evaluation metrics on host numpy arrays: accuracy, NLL, ECE, disagreement.

All take `logits` [N, C] (unnormalised log-probabilities) or probabilities and
integer `labels` [N]; they are computed in float64 so that tables are exact.
"""
import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f"Expected scores [N, C] and labels [N]; got {scores.shape} "
                     f"and {labels.shape}.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("Scores contain NaN or inf.")
  if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
    raise ValueError(f"Labels must lie in [0, {scores.shape[1]}); got "
                     f"[{labels.min()}, {labels.max()}].")
  return scores, labels.astype(np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy as a fraction (works on logits or probabilities)."""
  logits, labels = _check(logits, labels)
  return float(np.mean(logits.argmax(axis=-1) == labels))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean negative log-likelihood of the labels under softmax(logits)."""
  logits, labels = _check(logits, labels)
  return float(-np.mean(log_softmax(logits)[np.arange(len(labels)), labels]))


def nll_from_probs(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
  """NLL of (e.g. ensemble-averaged) probabilities; eps keeps log finite."""
  probs, labels = _check(probs, labels)
  return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], eps))))


def ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
  """Expected calibration error of the top-1 confidence, equal-width bins.

  Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; ECE is the
  count-weighted mean |accuracy - confidence| over bins (Guo et al., 2017).
  """
  probs, labels = _check(probs, labels)
  confidence = probs.max(axis=-1)
  correct = probs.argmax(axis=-1) == labels
  bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  total = 0.0
  for b in range(num_bins):
    in_bin = bins == b
    if in_bin.any():
      total += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return float(total / len(labels))


def softmax(logits: np.ndarray) -> np.ndarray:
  return np.exp(log_softmax(logits))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           prefix: str = "test_") -> dict[str, float]:
  """Top-1 accuracy, NLL and 15-bin ECE of logits, keyed `<prefix>accuracy` etc."""
  return {
      f"{prefix}accuracy": accuracy(logits, labels),
      f"{prefix}nll": nll(logits, labels),
      f"{prefix}ece": ece(softmax(logits), labels),
  }


def disagreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
  """Fraction of inputs on which two models' top-1 predictions differ."""
  a, b = np.asarray(logits_a), np.asarray(logits_b)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"Expected two [N, C] arrays of one shape; got {a.shape}, {b.shape}.")
  return float(np.mean(a.argmax(-1) != b.argmax(-1)))


def _members(logits_list) -> list[np.ndarray]:
  arrays = [np.asarray(x, np.float64) for x in logits_list]
  if len(arrays) < 2:
    raise ValueError(f"Pairwise diversity needs at least 2 members; got {len(arrays)}.")
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1 or arrays[0].ndim != 2:
    raise ValueError(f"Expected members' logits [N, C] of one shape; got {sorted(shapes)}.")
  return arrays


def pairwise_disagreement(logits_list) -> float:
  """Mean over member pairs i < j of the fraction of inputs whose top-1 differs."""
  arrays = _members(logits_list)
  pairs = [(i, j) for i in range(len(arrays)) for j in range(i + 1, len(arrays))]
  return float(np.mean([disagreement(arrays[i], arrays[j]) for i, j in pairs]))


def pairwise_kl(logits_list) -> float:
  """Mean over ordered member pairs i != j of mean_n KL(p_i(x_n) || p_j(x_n)), in nats.

  Averaging both directions makes it the symmetrised KL, (KL(p||q) + KL(q||p)) / 2,
  averaged over unordered pairs.
  """
  logp = [log_softmax(a) for a in _members(logits_list)]
  kls = [np.mean(np.sum(np.exp(logp[i]) * (logp[i] - logp[j]), axis=-1))
         for i in range(len(logp)) for j in range(len(logp)) if i != j]
  return float(np.mean(kls))
