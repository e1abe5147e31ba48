"""Tests for fusion.train: schedules, optimizers vs float64 numpy, mesh, resume, NaN."""
import functools
import json
import math
import os
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from fusion import sharding
from fusion import train

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------- independent references


def np_learning_rate(cfg: dict, step: int) -> float:
  """The documented schedule, in plain float64 Python."""
  warmup = cfg.get("warmup_steps", 0)
  total = cfg.get("total_steps")
  factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
  schedule = cfg.get("schedule", "constant")
  if schedule == "cosine":
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
  elif schedule == "step":
    passed = sum(step >= round(b * total) for b in cfg.get("boundaries", (0.5, 0.75)))
    factor *= cfg.get("decay_factor", 0.1) ** passed
  return cfg["learning_rate"] * factor


# Linear regression: params {"w": [D], "b": []}, loss mean((x w + b - y)^2).
REG_D, REG_POOL, REG_B = 3, 64, 16
_reg_rng = np.random.default_rng(0)
REG_X = _reg_rng.normal(size=(REG_POOL, REG_D)).astype(np.float32)
REG_Y = (REG_X @ np.array([1.5, -2.0, 0.5]) + 0.3 +
         0.1 * _reg_rng.normal(size=REG_POOL)).astype(np.float32)


def reg_batch(step: int) -> dict[str, np.ndarray]:
  idx = np.random.default_rng((1, step)).choice(REG_POOL, REG_B, replace=False)
  return {"x": REG_X[idx], "y": REG_Y[idx]}


def reg_loss(params, batch, rng):
  del rng
  residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return jnp.mean(residual ** 2), {}


def reg_init():
  return {"w": np.array([0.2, -0.1, 0.3], np.float32), "b": np.float32(-0.2)}


def np_reg_train(cfg: dict, num_steps: int):
  """float64 SGD / AdamW on the regression problem; (params, losses, clipped?)."""
  p = {k: np.asarray(v, np.float64) for k, v in reg_init().items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  losses, clipped = [], False
  for t in range(num_steps):
    batch = {k: np.asarray(a, np.float64) for k, a in reg_batch(t).items()}
    r = batch["x"] @ p["w"] + p["b"] - batch["y"]
    losses.append(np.mean(r ** 2))
    g = {"w": 2 * batch["x"].T @ r / len(r), "b": 2 * np.mean(r)}
    norm = math.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    clip = cfg.get("grad_clip_norm")
    if clip and norm > clip:
      clipped = True
      g = {k: x * clip / norm for k, x in g.items()}
    lr, wd = np_learning_rate(cfg, t), cfg.get("weight_decay", 0.0)
    for k in p:
      if cfg["optimizer"] == "sgd":
        mom = cfg.get("momentum", 0.9)
        grad = g[k] + wd * p[k]
        m[k] = mom * m[k] + grad
        step = grad + mom * m[k] if cfg.get("nesterov") else m[k]
        p[k] = p[k] - lr * step
      else:
        b1, b2, eps = cfg["b1"], cfg["b2"], cfg["eps"]
        m[k] = b1 * m[k] + (1 - b1) * g[k]
        v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
        m_hat, v_hat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
        p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
  return p, losses, clipped


# Two Gaussian blobs, softmax regression with input dropout (uses the rng).
CLS_D, CLS_C, CLS_POOL, CLS_B = 4, 2, 256, 32
_cls_rng = np.random.default_rng(1)
CLS_Y = _cls_rng.integers(0, CLS_C, CLS_POOL).astype(np.int32)
_CLS_CENTRES = np.array([[2.0, -2.0, 1.0, 0.0], [-2.0, 2.0, -1.0, 0.0]])  # 3 sigma apart.
CLS_X = (_CLS_CENTRES[CLS_Y] + _cls_rng.normal(size=(CLS_POOL, CLS_D))).astype(np.float32)
CLS_CONFIG = {"optimizer": "sgd", "learning_rate": 0.5, "momentum": 0.9,
              "schedule": "cosine", "warmup_steps": 3, "total_steps": 12}


def cls_batch(step: int) -> dict[str, np.ndarray]:
  idx = np.random.default_rng((2, step)).choice(CLS_POOL, CLS_B, replace=False)
  return {"x": CLS_X[idx], "y": CLS_Y[idx]}


def cls_loss(params, batch, rng):
  keep = jax.random.bernoulli(rng, 0.9, batch["x"].shape)
  x = jnp.where(keep, batch["x"] / 0.9, 0.0)
  logits = x @ params["w"] + params["b"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def cls_init():
  return {"w": jnp.zeros((CLS_D, CLS_C)), "b": jnp.zeros((CLS_C,))}


def cls_accuracy(params) -> float:
  logits = CLS_X @ np.asarray(params["w"]) + np.asarray(params["b"])
  return float(np.mean(logits.argmax(-1) == CLS_Y))


def run_cls(workdir=None, *, num_steps=12, mesh=None, batch_fn=cls_batch, **kwargs):
  """The classifier run shared by the resume tests (and their subprocess)."""
  return train.train(loss_fn=cls_loss, params=cls_init(), batch_fn=batch_fn,
                     config=CLS_CONFIG, mesh=mesh or sharding.make_mesh(),
                     num_steps=num_steps, workdir=workdir, seed=3, **kwargs)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


@pytest.fixture(scope="module")
def uninterrupted_cls():
  return as_numpy(run_cls(checkpoint=False).params)


# ------------------------------------------------------------------- config


@pytest.mark.parametrize("cfg", [
    {"learning_rate": 0.3, "schedule": "cosine", "warmup_steps": 5, "total_steps": 40},
    {"learning_rate": 0.1, "schedule": "cosine", "total_steps": 7},
    {"learning_rate": 2.0, "schedule": "step", "boundaries": (0.25, 0.6, 0.9),
     "decay_factor": 0.3, "warmup_steps": 4, "total_steps": 40},
    {"learning_rate": 0.05, "warmup_steps": 6, "total_steps": 20},
])
def test_schedule_matches_numpy(cfg):
  got = np.asarray(train.make_schedule(cfg)(jnp.arange(cfg["total_steps"])))
  want = [np_learning_rate(cfg, s) for s in range(cfg["total_steps"])]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * cfg["learning_rate"])
  if cfg.get("warmup_steps"):  # The peak is reached exactly at the warm-up's end.
    np.testing.assert_allclose(got[cfg["warmup_steps"] - 1], cfg["learning_rate"], rtol=1e-6)


def test_config_errors_name_the_valid_values():
  with pytest.raises(ValueError, match=r"'adam'.*sgd.*adamw"):
    train.make_optimizer({"optimizer": "adam", "learning_rate": 0.1})
  with pytest.raises(ValueError, match=r"'linear'.*constant.*cosine.*step"):
    train.make_optimizer({"schedule": "linear", "learning_rate": 0.1})
  with pytest.raises(ValueError, match=r"warmup_step'.*warmup_steps"):
    train.make_optimizer({"learning_rate": 0.1, "warmup_step": 3})
  with pytest.raises(ValueError, match="total_steps"):
    train.make_optimizer({"learning_rate": 0.1, "schedule": "cosine"})
  with pytest.raises(ValueError, match="learning_rate"):
    train.make_optimizer({"optimizer": "sgd"})


def test_learning_rate_lives_in_the_optimizer_state():
  config = ml_collections.ConfigDict({"optimizer": "adamw", "learning_rate": 0.01,
                                      "weight_decay": 0.05, "grad_clip_norm": 0})
  state = train.make_optimizer(config).init({"w": jnp.ones(3)})
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.01)
  assert float(state.hyperparams["weight_decay"]) == pytest.approx(0.05)


# -------------------------------------------------- optimizers vs numpy float64


@pytest.mark.parametrize("cfg", [
    {"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.01,
     "schedule": "cosine", "warmup_steps": 2, "total_steps": 6},
    {"optimizer": "sgd", "learning_rate": 0.2, "momentum": 0.8, "nesterov": True,
     "schedule": "step", "boundaries": (0.3, 0.6), "decay_factor": 0.5,
     "total_steps": 6, "grad_clip_norm": 0.5},
    {"optimizer": "adamw", "learning_rate": 0.05, "b1": 0.8, "b2": 0.95, "eps": 1e-6,
     "weight_decay": 0.1, "schedule": "cosine", "warmup_steps": 2, "total_steps": 6,
     "grad_clip_norm": 2.0},
], ids=["sgd_momentum", "sgd_nesterov_clip", "adamw_clip"])
def test_updates_match_numpy_reference(cfg, mesh, tmp_path):
  steps = cfg["total_steps"]
  state = train.train(loss_fn=reg_loss, params=reg_init(), batch_fn=reg_batch,
                      config=cfg, mesh=mesh, num_steps=steps, workdir=str(tmp_path),
                      log_every=1, checkpoint=False)
  want, losses, clipped = np_reg_train(cfg, steps)
  assert int(state.step) == steps
  for k in want:
    np.testing.assert_allclose(np.asarray(state.params[k]), want[k], rtol=2e-5, atol=2e-6)
  if cfg.get("grad_clip_norm"):
    assert clipped  # The clipping branch was exercised.
    unclipped, _, _ = np_reg_train({**cfg, "grad_clip_norm": None}, steps)
    assert not np.allclose(unclipped["w"], want["w"], atol=1e-3)
  # One metrics line per step: the loss before the update, the rate it used.
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  assert [line["step"] for line in lines] == list(range(1, steps + 1))
  np.testing.assert_allclose([line["loss"] for line in lines], losses, rtol=2e-5)
  np.testing.assert_allclose([line["learning_rate"] for line in lines],
                             [np_learning_rate(cfg, s) for s in range(steps)], rtol=1e-5)


# Regression on inputs centred by a running mean that loss_fn itself updates
# (as BatchNorm updates its statistics): SGD, momentum 0.5, weight decay 0.1.
STATS_CONFIG = {"optimizer": "sgd", "momentum": 0.5, "learning_rate": 0.1,
                "weight_decay": 0.1}


def np_centred_regression(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """float64 (w, running mean) after `num_steps`, the mean never optimized."""
  w, mean = np.full(REG_D, 0.1), np.zeros(REG_D)
  trace = np.zeros_like(w)
  for t in range(num_steps):
    x, y = (np.asarray(a, np.float64) for a in reg_batch(t).values())
    r = (x - mean) @ w - y
    trace = 0.5 * trace + 2 * (x - mean).T @ r / len(r) + 0.1 * w
    w, mean = w - 0.1 * trace, 0.8 * mean + 0.2 * x.mean(0)
  return w, mean


def test_trainable_mask_and_updated_state(mesh, tmp_path):
  """Frozen leaves skip the optimizer (no decay) but take loss_fn's new values."""
  def loss_fn(params, batch, rng):
    centred = batch["x"] - params["stats"]["mean"]
    loss = jnp.mean((centred @ params["w"] - batch["y"]) ** 2)
    mean = 0.8 * params["stats"]["mean"] + 0.2 * batch["x"].mean(0)
    metrics = {"mse": loss, "noise": jax.random.uniform(rng)}
    return loss, (metrics, {**params, "stats": {"mean": mean}})

  init = {"w": np.full(REG_D, 0.1, np.float32), "stats": {"mean": np.zeros(REG_D, np.float32)}}
  state = train.train(loss_fn=loss_fn, params=init, batch_fn=reg_batch, config=STATS_CONFIG,
                      mesh=mesh, num_steps=4, trainable={"w": True, "stats": False},
                      seed=11, workdir=str(tmp_path), log_every=1, checkpoint=False)
  w, mean = np_centred_regression(4)
  np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(state.params["stats"]["mean"]), mean,
                             rtol=2e-5, atol=2e-6)
  momentum = state.opt_state.inner_state[-2].trace
  assert momentum["stats"]["mean"] is None  # The optimizer never saw it.
  # The step's rng is fold_in(PRNGKey(seed), step).
  noise = [line["noise"] for line in read_jsonl(tmp_path / "metrics.jsonl")]
  want = [float(jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(11), t)))
          for t in range(4)]
  np.testing.assert_allclose(noise, want, rtol=1e-6)


def stats_loss(params, batch, rng):
  """The centred regression with its running mean under a `batch_stats` key."""
  del rng
  stats = params["norm"]["batch_stats"]
  loss = jnp.mean(((batch["x"] - stats["mean"]) @ params["w"] - batch["y"]) ** 2)
  mean = 0.8 * stats["mean"] + 0.2 * batch["x"].mean(0)
  return loss, ({}, {**params, "norm": {"batch_stats": {"mean": mean}}})


def test_batch_stats_are_not_trainable_by_default(mesh):
  init = {"w": np.full(REG_D, 0.1, np.float32),
          "norm": {"batch_stats": {"mean": np.zeros(REG_D, np.float32)}}}
  run = lambda **kwargs: train.train(loss_fn=stats_loss, params=init, batch_fn=reg_batch,
                                     config=STATS_CONFIG, mesh=mesh, num_steps=4,
                                     checkpoint=False, **kwargs)
  state = run()  # The default mask.
  w, mean = np_centred_regression(4)
  np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(state.params["norm"]["batch_stats"]["mean"]), mean,
                             rtol=2e-5, atol=2e-6)  # loss_fn's values, not dropped.
  momentum = state.opt_state.inner_state[-2].trace
  assert momentum["norm"]["batch_stats"]["mean"] is None  # The optimizer never saw them.
  assert momentum["w"] is not None

  # An explicit mask wins: with everything trainable the optimizer owns the
  # statistics (gradient and decay) and loss_fn's values are ignored.
  state = run(trainable=True)
  assert jax.tree.leaves(state.opt_state.inner_state[-2].trace["norm"])
  assert not np.allclose(np.asarray(state.params["norm"]["batch_stats"]["mean"]), mean,
                         atol=1e-3)
  with pytest.raises(ValueError, match="batch_stats.*pass `trainable`"):
    train.train(loss_fn=stats_loss, params={"batch_stats": init["norm"]["batch_stats"]},
                batch_fn=reg_batch, config=STATS_CONFIG, mesh=mesh, num_steps=1)


class TinyBNNet(flax.linen.Module):
  """Two convs with BatchNorm (momentum 0.9, as HF's ResNet), pooled, a dense head."""

  @flax.linen.compact
  def __call__(self, images, train: bool):
    x = images
    for width in (8, 16):
      x = flax.linen.Conv(width, (3, 3), strides=(2, 2))(x)
      x = flax.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = flax.linen.relu(x)
    return flax.linen.Dense(BN_C)(x.mean(axis=(1, 2)))


# A 4-class toy task: a bright quadrant on noise, at an offset and scale far
# from the statistics the model starts with (mean 0, variance 1).
BN_C = 4


def bn_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % BN_C
  images = rng.normal(size=(n, 16, 16, 3))
  for c in range(BN_C):
    row, col = divmod(c, 2)
    images[labels == c, 8 * row:8 * row + 8, 8 * col:8 * col + 8] += 2.0
  return (3.0 + 2.0 * images).astype(np.float32), labels.astype(np.int32)


BN_TRAIN, BN_TEST = bn_images(256, 0), bn_images(128, 1)


def bn_loss(params, batch, rng):
  """Training mode: batch statistics, and the updated running ones as new params."""
  del rng
  logits, updates = TinyBNNet().apply(params, batch["image"], train=True,
                                      mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, ({}, {**params, "batch_stats": updates["batch_stats"]})


def bn_batch(step: int) -> dict[str, np.ndarray]:
  index = np.random.default_rng((0, step)).choice(len(BN_TRAIN[1]), 32, replace=False)
  return {"image": BN_TRAIN[0][index], "label": BN_TRAIN[1][index]}


def bn_init() -> dict:
  """Variables drawn by numpy (XLA compiles flax's random init slowly): weights at
  a 1/sqrt(fan-in) scale, BatchNorm at identity with running mean 0, variance 1."""
  shapes = jax.eval_shape(lambda: TinyBNNet().init(jax.random.key(0), BN_TEST[0][:1],
                                                   train=False))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name or "bias" in name:
      value = np.ones(leaf.shape) if "'var'" in name else np.zeros(leaf.shape)
    elif "'scale'" in name:
      value = np.ones(leaf.shape)
    else:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_fine_tuned_batchnorm_model_predicts_with_its_new_statistics():
  """Fine-tuned with the default mask, a BatchNorm model's inference mode
  (running statistics) does as well as its training mode (batch statistics):
  the trainer kept the statistics loss_fn returned. With `batch_stats`
  trainable they stay at their init: 69% vs 100% here."""
  images, labels = BN_TEST
  init = bn_init()
  state = train.train(loss_fn=bn_loss, params=init, batch_fn=bn_batch,
                      config={"optimizer": "adamw", "learning_rate": 1e-2,
                              "schedule": "cosine"},
                      mesh=sharding.make_mesh(1), num_steps=60, checkpoint=False)
  params = as_numpy(state.params)
  predict = jax.jit(lambda p, x, train: TinyBNNet().apply(p, x, train=train,
                                                          mutable=["batch_stats"])[0],
                    static_argnums=2)
  batch_stats_mode = np.mean(np.asarray(predict(params, images, True)).argmax(-1) == labels)
  inference_mode = np.mean(np.asarray(predict(params, images, False)).argmax(-1) == labels)
  assert batch_stats_mode > 0.9, batch_stats_mode  # It learnt the task.
  assert abs(inference_mode - batch_stats_mode) <= 0.05, (inference_mode, batch_stats_mode)
  before = jax.tree.leaves(init["batch_stats"])
  after = jax.tree.leaves(params["batch_stats"])
  assert len(after) == len(before) == 4  # Mean and variance of two BatchNorms.
  for old, new in zip(before, after):
    assert np.abs(new - old).max() > 0.1


@pytest.mark.parametrize("loss_fn, match", [
    (lambda p, b, r: (reg_loss(p, b, r)[0], {"loss": 1.0}), "clashes"),
    (lambda p, b, r: (jnp.zeros(2), {}), "scalar"),
    (lambda p, b, r: (reg_loss(p, b, r)[0], {"err": jnp.zeros(3)}), "scalars"),
    (lambda p, b, r: reg_loss(p, b, r)[0], "pair"),
    (lambda p, b, r: (reg_loss(p, b, r)[0], ({}, {"w": p["w"]})), "structure"),
])
def test_bad_loss_fn_outputs_are_named(loss_fn, match, mesh):
  with pytest.raises(ValueError, match=match):
    train.train(loss_fn=loss_fn, params=reg_init(), batch_fn=reg_batch,
                config={"learning_rate": 0.1}, mesh=mesh, num_steps=1)


# ----------------------------------------------------------------- learning


def test_linear_classifier_learns_and_logs(mesh, tmp_path):
  evals = []

  def eval_fn(params):
    evals.append(cls_accuracy(params))
    return {"eval_accuracy": evals[-1]}

  params = cls_init()
  config = ml_collections.ConfigDict({"optimizer": "adamw", "learning_rate": 0.1,
                                      "schedule": "cosine", "warmup_steps": 5})
  state = train.train(loss_fn=cls_loss, params=params, batch_fn=cls_batch,
                      config=config, mesh=mesh, num_steps=60, workdir=str(tmp_path),
                      log_every=10, eval_fn=eval_fn, eval_every=20, run_name="probe/a",
                      metrics_file="logs/train.jsonl", checkpoint=False)
  assert not params["w"].is_deleted()  # Donation works on a copy.
  assert cls_accuracy(params) < 0.7 < 0.95 < cls_accuracy(state.params)

  lines = read_jsonl(tmp_path / "logs" / "train.jsonl")
  train_lines = [line for line in lines if "loss" in line]
  eval_lines = [line for line in lines if "eval_accuracy" in line]
  assert [line["step"] for line in train_lines] == [10, 20, 30, 40, 50, 60]
  for line in train_lines:
    assert set(line) == {"run", "step", "loss", "learning_rate", "grad_norm",
                         "accuracy", "wall_time"}
    assert line["run"] == "probe/a"
  assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
  assert train_lines[-1]["accuracy"] > train_lines[0]["accuracy"]
  assert [line["step"] for line in eval_lines] == [20, 40, 60]
  assert [line["eval_accuracy"] for line in eval_lines] == pytest.approx(evals)
  assert evals[-1] > 0.95


def read_events(logdir) -> list:
  """Every event of the TensorBoard files under `logdir`, through TensorFlow's reader
  (not the writer's library), file by file in name (creation) order."""
  tf = pytest.importorskip("tensorflow")
  files = sorted(os.listdir(logdir))
  assert files and all(f.startswith("events.out.tfevents.") for f in files), files
  return [e for f in files for e in tf.compat.v1.train.summary_iterator(os.path.join(logdir, f))]


def test_tensorboard_events_equal_the_jsonl_lines(mesh, tmp_path):
  run = functools.partial(run_cls, str(tmp_path), mesh=mesh, log_every=2, eval_every=4,
                          eval_fn=lambda params: {"eval_accuracy": cls_accuracy(params)},
                          run_name="probe/b c", checkpoint_every=100)
  run(num_steps=6)
  run()  # Resumes at step 6, appends the lines of steps 8 to 12.
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  logdir = tmp_path / "tensorboard" / "probe" / "b_c"
  assert train.tensorboard_dir(str(tmp_path / "metrics.jsonl"), "probe/b c") == str(logdir)
  events = read_events(logdir)
  scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}
  want = {(k, line["step"]): np.float32(v) for line in lines for k, v in line.items()
          if k not in ("run", "step", "wall_time")}
  assert {"loss", "learning_rate", "grad_norm", "accuracy", "eval_accuracy"} == {
      k for k, _ in want}
  assert sorted({s for _, s in want}) == [2, 4, 6, 8, 10, 12]
  assert scalars == want  # Same scalars at the same steps, as float32 (TensorBoard's).
  # The resumed run tells TensorBoard to drop what an earlier attempt logged past step 6.
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [6]
  # tensorboard=False: JSONL only.
  run_cls(str(tmp_path / "off"), mesh=mesh, num_steps=2, checkpoint=False, tensorboard=False)
  assert os.listdir(tmp_path / "off") == ["metrics.jsonl"]


def test_eight_devices_equal_one_device():
  results = []
  for mesh in (sharding.make_mesh(), sharding.make_mesh(1)):
    results.append(as_numpy(run_cls(mesh=mesh, checkpoint=False).params))
  for k in results[0]:
    np.testing.assert_allclose(results[0][k], results[1][k], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs a 2-device model axis")
def test_param_sharding_over_model_axis(uninterrupted_cls):
  mesh = sharding.make_mesh(model=2)
  spec = jax.sharding.PartitionSpec(None, sharding.MODEL)
  state = run_cls(mesh=mesh, checkpoint=False,
                  param_sharding={"w": spec, "b": jax.sharding.PartitionSpec()})
  assert state.params["w"].sharding.spec == spec
  momentum = state.opt_state.inner_state[-2].trace  # optax.trace's state.
  assert momentum["w"].sharding.spec == spec
  for k in uninterrupted_cls:
    np.testing.assert_allclose(np.asarray(state.params[k]), uninterrupted_cls[k],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- resume


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, uninterrupted_cls):
  workdir = str(tmp_path)
  first = run_cls(workdir, num_steps=5, checkpoint_every=100)  # Final save at 5.
  assert int(first.step) == 5
  seen = []

  def batch_fn(step):
    seen.append(step)
    return cls_batch(step)

  state = run_cls(workdir, batch_fn=batch_fn)
  assert seen == list(range(5, 12))  # Continued from the checkpoint.
  assert int(state.step) == 12
  for k in uninterrupted_cls:
    np.testing.assert_array_equal(np.asarray(state.params[k]), uninterrupted_cls[k])
  ckpts = ocp.CheckpointManager(train.default_checkpoint_dir(workdir))
  assert ckpts.all_steps() == [5, 12]
  # Another sweep point pointed at the same checkpoints is refused, not resumed.
  with pytest.raises(ValueError, match="learning_rate=0.5.*another run"):
    train.train(loss_fn=cls_loss, params=cls_init(), batch_fn=cls_batch,
                config={**CLS_CONFIG, "learning_rate": 0.1}, mesh=sharding.make_mesh(),
                num_steps=12, workdir=workdir)


_KILLED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {tests_dir!r})
import test_train as t
workdir = sys.argv[1]
ready = os.path.join(workdir, "checkpoints", "4")
def batch_fn(step):
  if step == 6:  # Die hard once the step-4 checkpoint is finalized.
    deadline = time.time() + 60
    while not os.path.isdir(ready) and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
  return t.cls_batch(step)
t.run_cls(workdir, batch_fn=batch_fn, checkpoint_every=4)
"""


def test_killed_process_resumes(tmp_path, uninterrupted_cls):
  workdir = str(tmp_path)
  script = _KILLED_RUN.format(tests_dir=TESTS_DIR)
  proc = subprocess.run([sys.executable, "-c", script, workdir], capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(TESTS_DIR))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert ocp.CheckpointManager(train.default_checkpoint_dir(workdir)).all_steps() == [4]
  seen = []

  def batch_fn(step):
    seen.append(step)
    return cls_batch(step)

  state = run_cls(workdir, batch_fn=batch_fn, checkpoint_every=4)
  assert seen == list(range(4, 12))
  for k in uninterrupted_cls:
    np.testing.assert_array_equal(np.asarray(state.params[k]), uninterrupted_cls[k])


# --------------------------------------------------------------------- NaN


def test_nan_loss_raises_and_leaves_no_nan_checkpoint(tmp_path):
  workdir = str(tmp_path)

  def poisoned(step):
    batch = cls_batch(step)
    batch["x"] = batch["x"] * (np.nan if step == 5 else 1.0)
    return batch

  with pytest.raises(FloatingPointError) as info:
    run_cls(workdir, batch_fn=poisoned, checkpoint_every=2, max_to_keep=None)
  error = info.value
  assert isinstance(error, train.NonFiniteLossError)
  assert error.step == 5 and math.isnan(error.loss)
  for phrase in ("step 5", "learning_rate", "grad_clip_norm", "checkpoint is step 4"):
    assert phrase in str(error)
  assert ocp.CheckpointManager(train.default_checkpoint_dir(workdir)).all_steps() == [2, 4]
  # The latest checkpoint is finite: a run to step 4 just restores it.
  state = run_cls(workdir, num_steps=4, batch_fn=poisoned)
  assert int(state.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# -------------------------------------------------------------- compilation

_TRACES = []


def _counting_reg_loss(params, batch, rng):
  _TRACES.append(1)  # Runs only while jax traces the step.
  return reg_loss(params, batch, rng)


def test_learning_rate_sweep_compiles_once(mesh, tmp_path):
  _TRACES.clear()
  for lr in (0.01, 0.05, 0.2):
    cfg = {"optimizer": "sgd", "learning_rate": lr, "momentum": 0.9,
           "schedule": "cosine", "warmup_steps": 2, "total_steps": 6}
    state = train.train(loss_fn=_counting_reg_loss, params=reg_init(),
                        batch_fn=reg_batch, config=cfg, mesh=mesh, num_steps=6,
                        workdir=str(tmp_path), run_name=f"lr={lr}", log_every=4)
    want, losses, _ = np_reg_train(cfg, 6)  # Each run used its own rate.
    np.testing.assert_allclose(np.asarray(state.params["w"]), want["w"], rtol=2e-5,
                               atol=2e-6)
    # Lines at steps 4 and 6 (the end), each the mean over its window.
    lines = [line for line in read_jsonl(tmp_path / "metrics.jsonl")
             if line["run"] == f"lr={lr}"]
    assert [line["step"] for line in lines] == [4, 6]
    np.testing.assert_allclose([line["loss"] for line in lines],
                               [np.mean(losses[:4]), np.mean(losses[4:])], rtol=2e-5)
  assert len(_TRACES) == 1
  assert len(os.listdir(tmp_path / "checkpoints")) == 3  # One directory per run.
