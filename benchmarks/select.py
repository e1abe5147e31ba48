"""Ranks a synthetic hub with kNN + LogME: fusion.selection (jit + vmap, float32)
beside a plain float64 numpy implementation of the same two estimators.

Each model's features (N examples x D dims) are generated from (seed, model
index) and streamed in chunks, so memory stays bounded whatever --num_models is.
Each implementation runs in its own child interpreter, so its peak RSS
(resource.getrusage) is its own. Before the timing table the script checks that
the two implementations agree on the first --check models (and exits 1 if not).

  python benchmarks/select.py                    # 1,000 models x 1,000 x 768
  python benchmarks/select.py --num_models 20    # quick
"""
import os
import sys

# This file is named select.py: drop its folder from sys.path so it does not
# shadow the standard library's `select` (which subprocess imports).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  num_models: int
  numpy_models: int
  num_examples: int
  dim: int
  num_classes: int
  chunk: int
  k: int
  logme_solver: str
  seed: int


# ------------------------------------------------------------------ synthetic hub


def make_labels(cfg: Config) -> np.ndarray:
  labels = np.random.default_rng(cfg.seed).integers(0, cfg.num_classes, cfg.num_examples)
  labels[:cfg.num_classes] = np.arange(cfg.num_classes)
  return labels.astype(np.int32)


def model_features(cfg: Config, model: int, labels: np.ndarray) -> np.ndarray:
  """Model `model`'s float32 features: class signal of a model-specific strength
  in a random low-dimensional subspace, plus isotropic noise."""
  rng = np.random.default_rng([cfg.seed, model])
  strength = rng.uniform(0.0, 3.0)
  centres = rng.standard_normal((cfg.num_classes, 32), dtype=np.float32)
  basis = rng.standard_normal((32, cfg.dim), dtype=np.float32) / np.sqrt(32)
  noise = rng.standard_normal((cfg.num_examples, cfg.dim), dtype=np.float32)
  return noise + strength * (centres[labels] @ basis)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------ numpy (float64)


def numpy_knn(f: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Leave-one-out kNN accuracy, cosine; ties go to the class with the nearest member."""
  unit = f / np.linalg.norm(f, axis=1, keepdims=True)
  similarity = unit @ unit.T
  np.fill_diagonal(similarity, -np.inf)
  neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  correct = 0
  for i, row in enumerate(neighbours):
    votes = labels[row]
    counts = np.bincount(votes, minlength=labels.max() + 1)
    tied = np.flatnonzero(counts == counts.max())
    first = {c: np.flatnonzero(votes == c)[0] for c in tied}
    correct += min(tied, key=lambda c: first[c]) == labels[i]
  return correct / len(labels)


def numpy_logme(f: np.ndarray, labels: np.ndarray) -> float:
  """LogME, fixed-point evidence maximisation (You et al. 2021), N >= D path."""
  n, d = f.shape
  sigma, v = np.linalg.eigh(f.T @ f)
  sigma = np.maximum(sigma, 0)
  evidences = []
  for c in range(labels.max() + 1):
    y = (labels == c).astype(np.float64)
    x = (v.T @ (f.T @ y)) / np.sqrt(sigma)                # U^T y
    x2 = x ** 2
    outside = y @ y - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(11):
      t = alpha / beta
      gamma = np.sum(sigma / (sigma + t))
      m2 = np.sum(sigma * x2 / (t + sigma) ** 2)
      res2 = np.sum(x2 / (1 + sigma / t) ** 2) + outside
      alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - t) / t <= 1e-3:
        break
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2 * res2
                - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
    evidences.append(evidence / n)
  return float(np.mean(evidences))


def run_numpy(cfg: Config) -> dict:
  labels = make_labels(cfg)
  knn, logme, scoring, generating = [], [], 0.0, 0.0
  for m in range(cfg.numpy_models):
    start = time.perf_counter()
    f = model_features(cfg, m, labels).astype(np.float64)
    generating += time.perf_counter() - start
    start = time.perf_counter()
    knn.append(numpy_knn(f, labels, cfg.k))
    logme.append(numpy_logme(f, labels))
    scoring += time.perf_counter() - start
  return dict(knn=knn, logme=logme, models=cfg.numpy_models, seconds=scoring,
              generate_seconds=generating, compile_seconds=0.0, peak_rss_mib=peak_rss_mib(),
              device="numpy float64 on CPU")


# ------------------------------------------------------------------ fusion.selection


def run_jax(cfg: Config) -> dict:
  import jax
  from fusion.selection import knn as knn_lib
  from fusion.selection import logme as logme_lib

  labels = make_labels(cfg)

  def chunk(start: int) -> np.ndarray:
    # The last chunk is padded with repeats so that every call has one shape
    # (one compilation); the extra scores are dropped.
    models = [min(m, cfg.num_models - 1) for m in range(start, start + cfg.chunk)]
    return np.stack([model_features(cfg, m, labels) for m in models])

  def score(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (knn_lib.knn_loo_accuracy_batched(stack, labels, k=cfg.k, metric="cosine"),
            logme_lib.logme_batched(stack, labels, solver=cfg.logme_solver))

  start = time.perf_counter()
  score(chunk(0))  # compile + first run
  compile_seconds = time.perf_counter() - start
  knn, logme, scoring, generating = [], [], 0.0, 0.0
  for first in range(0, cfg.num_models, cfg.chunk):
    start = time.perf_counter()
    stack = chunk(first)
    generating += time.perf_counter() - start
    start = time.perf_counter()
    k, l = score(stack)
    scoring += time.perf_counter() - start
    keep = min(cfg.chunk, cfg.num_models - first)
    knn.extend(k[:keep].tolist())
    logme.extend(l[:keep].tolist())
  return dict(knn=knn, logme=logme, models=cfg.num_models, seconds=scoring,
              generate_seconds=generating, compile_seconds=compile_seconds,
              peak_rss_mib=peak_rss_mib(),
              device=f"jax {jax.__version__} float32 on {jax.devices()[0].device_kind} "
                     f"({jax.default_backend()})")


RUNNERS = {"jax": run_jax, "numpy": run_numpy}


def in_child(side: str, cfg: Config) -> dict:
  """Runs one side in a fresh interpreter, so its peak RSS is its own."""
  process = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--_worker", side,
       "--_config", json.dumps(dataclasses.asdict(cfg))],
      stdout=subprocess.PIPE, check=False)
  if process.returncode:
    raise RuntimeError(f"the {side} side failed (exit code {process.returncode}).")
  return json.loads(process.stdout.decode().strip().splitlines()[-1])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_models", type=int, default=1000)
  parser.add_argument("--numpy_models", type=int, default=None,
                      help="models the numpy side scores (default: all; its rate is "
                           "what the ratio uses)")
  parser.add_argument("--num_examples", type=int, default=1000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--chunk", type=int, default=8, help="models per vmapped call")
  parser.add_argument("--k", type=int, default=1, help="neighbours for kNN")
  parser.add_argument("--logme_solver", choices=("svd", "eigh"), default="svd",
                      help="fusion's LogME factorisation (eigh: faster, less accurate in float32)")
  parser.add_argument("--check", type=int, default=3, help="models compared across sides")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--_worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
  parser.add_argument("--_config", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:
    print(json.dumps(RUNNERS[args._worker](Config(**json.loads(args._config)))))
    return 0
  numpy_models = min(args.numpy_models or args.num_models, args.num_models)
  if min(args.num_models, numpy_models, args.chunk, args.check) < 1:
    parser.error("--num_models, --numpy_models, --chunk and --check must be >= 1")
  cfg = Config(args.num_models, numpy_models, args.num_examples, args.dim, args.num_classes,
               args.chunk, args.k, args.logme_solver, args.seed)
  print(f"hub: {cfg.num_models} models x {cfg.num_examples} examples x {cfg.dim} dims, "
        f"{cfg.num_classes} classes; kNN (k={cfg.k}, cosine, leave-one-out) + LogME "
        f"(fusion: {cfg.logme_solver}; numpy: eigh of F^T F in float64)")

  jax_result = in_child("jax", cfg)
  numpy_result = in_child("numpy", cfg)

  check = min(args.check, numpy_models)
  knn_gap = np.max(np.abs(np.subtract(jax_result["knn"][:check], numpy_result["knn"][:check])))
  logme_rel = np.max(np.abs(np.subtract(jax_result["logme"][:check], numpy_result["logme"][:check]))
                     / np.abs(numpy_result["logme"][:check]))
  logme_allowed = 1e-4 if cfg.logme_solver == "svd" else 5e-3
  agree = knn_gap <= 2 / cfg.num_examples and logme_rel <= logme_allowed
  print(f"agreement on the first {check} models: max |kNN diff| = {knn_gap:.4g} "
        f"(allowed 2/N), max LogME rel. diff = {logme_rel:.2e} (allowed {logme_allowed:g}): "
        f"{'OK' if agree else 'MISMATCH'}")
  for name in ("knn", "logme"):
    ours = np.asarray(jax_result[name])
    top = np.argsort(-ours, kind="stable")[:5]
    line = (f"top-5 models by {name}: {top.tolist()} (scores {ours.min():.3f}..{ours.max():.3f})")
    if numpy_models == cfg.num_models:
      theirs = np.argsort(-np.asarray(numpy_result[name]), kind="stable")[:5]
      line += f"; numpy's top-5: {theirs.tolist()}"
    print(line)
  print(f"\n{'implementation':<48} {'models':>7} {'seconds':>9} {'models/s':>9} "
        f"{'peak RSS MiB':>13} {'compile s':>10}")
  rates = {}
  for name, r in (("fusion.selection (jit+vmap)", jax_result), ("numpy", numpy_result)):
    rates[name] = r["models"] / r["seconds"]
    print(f"{name + ': ' + r['device']:<48.48} {r['models']:>7} {r['seconds']:>9.2f} "
          f"{rates[name]:>9.2f} {r['peak_rss_mib']:>13.0f} {r['compile_seconds']:>10.2f}")
  speedup = rates["fusion.selection (jit+vmap)"] / rates["numpy"]
  memory = jax_result["peak_rss_mib"] / numpy_result["peak_rss_mib"]
  print(f"\nratio fusion/numpy: {speedup:.2f}x models/s, {memory:.2f}x peak RSS "
        f"(feature generation, not timed: {jax_result['generate_seconds']:.1f} s / "
        f"{numpy_result['generate_seconds']:.1f} s)")
  return 0 if agree else 1


if __name__ == "__main__":
  sys.exit(main())
