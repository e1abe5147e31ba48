"""The one trainer: optax optimizers, jitted steps over a mesh, orbax, metrics.

Every method (linear probes, fine-tuning, gated fusion, routing, ...) trains
through `train`. Conventions:

* `loss_fn(params, batch, rng) -> (loss, aux)`, where `aux` is either
  - `metrics`: a dict of scalar metrics, or
  - `(metrics, new_params)`: `new_params` has the structure of `params` and
    carries updated non-trainable leaves (e.g. ResNet `batch_stats`).
  Which leaves the optimizer updates is the `trainable` mask of `train` (a
  pytree prefix of `params` with bool leaves). Default: every leaf except those
  under a key named `batch_stats` (BatchNorm running statistics, which
  `loss_fn` updates itself, e.g. `Backbone.features_train`); an explicit mask
  wins. Gradients are taken only w.r.t. trainable leaves; the optimizer never
  sees the others, so they neither decay nor move, and they take the values of
  `new_params` (or stay as they are). The trainable leaves of `new_params` are
  ignored.
* `batch_fn(step) -> pytree of host numpy arrays`, the global batch; it must be
  a deterministic function of the 0-based step so that a resumed run sees the
  same data. The step's rng is `jax.random.fold_in(state.rng, step)`.
* The learning rate (and weight decay) live in the optimizer state
  (`optax.inject_hyperparams`), so one compiled step serves a whole sweep. The
  compiled step is cached on (`loss_fn`, the rest of the optimizer config,
  mask, shardings): pass a module-level `loss_fn`, not a fresh closure per
  call, to reuse it.
* A non-finite loss or gradient raises `NonFiniteLossError` before any
  checkpoint of that state is written. Losses are checked at every step but
  fetched from the device only at log, eval and checkpoint steps, so the steps
  in between stay asynchronous.
"""
from collections.abc import Callable, Mapping
import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm_auto

from fusion import provenance
from fusion import sharding

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")
# Logged by the trainer itself; `loss_fn` metrics may not reuse these names.
RESERVED_METRICS = ("step", "run", "run_id", "loss", "learning_rate", "grad_norm",
                    "wall_time")

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient became NaN or infinite."""

  def __init__(self, message: str, *, step: int, loss: float):
    super().__init__(message)
    self.step = step
    self.loss = loss


# ----------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Validated optimizer settings; `parse_config` builds it from a config."""
  learning_rate: float
  optimizer: str = "sgd"
  schedule: str = "constant"
  warmup_steps: int = 0  # Linear warm-up, (step + 1) / warmup_steps.
  total_steps: int | None = None  # Needed by "cosine" and "step".
  boundaries: tuple[float, ...] = (0.5, 0.75)  # "step": fractions of total_steps.
  decay_factor: float = 0.1  # "step": multiplier at each boundary.
  momentum: float = 0.9  # sgd; 0 = plain SGD.
  nesterov: bool = False  # sgd
  b1: float = 0.9  # adamw
  b2: float = 0.999  # adamw
  eps: float = 1e-8  # adamw
  weight_decay: float = 0.0  # sgd: L2 added to the gradient; adamw: decoupled.
  grad_clip_norm: float | None = None  # Global-norm clipping; None or 0 = off.

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {self.optimizer!r}; valid: {OPTIMIZERS}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"Unknown schedule {self.schedule!r}; valid: {SCHEDULES}.")
    if not self.learning_rate >= 0:
      raise ValueError(f"learning_rate={self.learning_rate} must be >= 0.")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0.")
    if self.schedule != "constant" and not (self.total_steps or 0) > 0:
      raise ValueError(f"schedule={self.schedule!r} needs total_steps > 0, got "
                       f"{self.total_steps}.")
    if self.schedule == "step" and not all(0 <= b <= 1 for b in self.boundaries):
      raise ValueError(f"boundaries={self.boundaries} must be fractions of "
                       "total_steps in [0, 1].")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"momentum={self.momentum} must be in [0, 1).")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"b1={self.b1}, b2={self.b2} must be in [0, 1).")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay={self.weight_decay} must be >= 0.")
    if self.grad_clip_norm is not None and self.grad_clip_norm < 0:
      raise ValueError(f"grad_clip_norm={self.grad_clip_norm} must be > 0, or "
                       "None/0 for no clipping.")

  def static(self) -> "OptimizerConfig":
    """Everything the compiled step depends on (not the injected numbers)."""
    return dataclasses.replace(self, learning_rate=0.0, weight_decay=0.0)


_FLOAT_FIELDS = ("learning_rate", "decay_factor", "momentum", "b1", "b2", "eps",
                 "weight_decay")


def parse_config(config: Any, total_steps: int | None = None) -> OptimizerConfig:
  """An `OptimizerConfig` from a ConfigDict / mapping (or one already parsed).

  `total_steps` fills in `config.total_steps` when that is missing or None.
  """
  if isinstance(config, OptimizerConfig):
    values = dataclasses.asdict(config)
  else:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f"config must be a mapping or ConfigDict, got {type(config)}.")
    values = dict(config)
  valid = [f.name for f in dataclasses.fields(OptimizerConfig)]
  unknown = sorted(set(values) - set(valid))
  if unknown:
    raise ValueError(f"Unknown optimizer config keys {unknown}; valid: {valid}.")
  if "learning_rate" not in values:
    raise ValueError("The optimizer config needs a learning_rate.")
  if values.get("total_steps") is None and total_steps is not None:
    values["total_steps"] = total_steps
  for name in _FLOAT_FIELDS:
    if name in values:
      values[name] = float(values[name])
  for name in ("warmup_steps", "total_steps"):
    if values.get(name) is not None:
      values[name] = int(values[name])
  if "boundaries" in values:
    values["boundaries"] = tuple(float(b) for b in values["boundaries"])
  if not values.get("grad_clip_norm"):
    values["grad_clip_norm"] = None
  else:
    values["grad_clip_norm"] = float(values["grad_clip_norm"])
  if "nesterov" in values:
    values["nesterov"] = bool(values["nesterov"])
  return OptimizerConfig(**values)


def _lr_multiplier(cfg: OptimizerConfig, step) -> jax.Array:
  """Learning rate / peak learning rate at a 0-based step (jnp, traceable)."""
  step = jnp.asarray(step, jnp.int32)
  if cfg.warmup_steps:
    warmup = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / cfg.warmup_steps)
  else:
    warmup = jnp.float32(1.0)
  if cfg.schedule == "constant":
    return warmup
  if cfg.schedule == "cosine":
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = jnp.clip((step - cfg.warmup_steps).astype(jnp.float32) / span, 0.0, 1.0)
    return warmup * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  # "step": decay_factor ** (number of boundaries passed); boundary b starts
  # at step round(b * total_steps).
  passed = sum(jnp.int32(step >= round(b * cfg.total_steps)) for b in cfg.boundaries)
  return warmup * jnp.float32(cfg.decay_factor) ** passed


def make_schedule(config: Any, total_steps: int | None = None) -> Callable[[Any], jax.Array]:
  """step -> learning rate (warm-up included), as the optimizer applies it."""
  cfg = parse_config(config, total_steps)
  return lambda step: cfg.learning_rate * _lr_multiplier(cfg, step)


def _transform(learning_rate, weight_decay, *, cfg: OptimizerConfig):
  """The update rule; the two numbers come from the optimizer state."""
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.optimizer == "sgd":
    parts.append(optax.add_decayed_weights(weight_decay))
    if cfg.momentum:
      parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
  else:
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_schedule(
      lambda count: -learning_rate * _lr_multiplier(cfg, count)))
  return optax.chain(*parts)


@functools.lru_cache(maxsize=64)
def _injected(static_cfg: OptimizerConfig):
  return optax.inject_hyperparams(functools.partial(_transform, cfg=static_cfg),
                                  hyperparam_dtype=jnp.float32)


def make_optimizer(config: Any, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """The optimizer of `config`; learning_rate and weight_decay live in its state.

  Its state's `hyperparams["learning_rate"]` is the peak rate; the applied rate
  is that times the schedule's multiplier, so changing the number in the state
  (or building another optimizer that differs only in those numbers) reuses
  the compiled update.
  """
  cfg = parse_config(config, total_steps)
  return _injected(cfg.static())(learning_rate=cfg.learning_rate,
                                 weight_decay=cfg.weight_decay)


# --------------------------------------------------------------- train state


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Number of updates done; int32 scalar.
  params: Any  # All parameters, trainable or not.
  opt_state: Any  # Of the trainable leaves only (None at the others).
  rng: jax.Array  # Base raw key (uint32); step keys are fold_in(rng, step).


class _Hashable:
  """A pytree of hashable leaves (shardings, bools) as a cache key."""

  def __init__(self, tree):
    self.leaves, self.treedef = jax.tree.flatten(tree)
    self._key = (self.treedef, tuple(self.leaves))

  def tree(self):
    return jax.tree.unflatten(self.treedef, self.leaves)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Hashable) and self._key == other._key


NON_TRAINABLE_KEYS = ("batch_stats",)


def _key_name(key: Any) -> Any:
  if isinstance(key, jax.tree_util.DictKey):
    return key.key
  return getattr(key, "name", None)  # GetAttrKey (dataclasses, flax structs).


def _default_trainable(params: Any) -> Any:
  """The default mask: False under any key named in NON_TRAINABLE_KEYS."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(_key_name(k) in NON_TRAINABLE_KEYS for k in path), params)


def _full_mask(trainable: Any, params: Any) -> Any:
  """Broadcasts a prefix tree of bools onto params' structure (None: the default)."""
  if trainable is None:
    mask = _default_trainable(params)
    if jax.tree.leaves(mask) and not any(jax.tree.leaves(mask)):
      raise ValueError(f"Every parameter sits under {NON_TRAINABLE_KEYS}, which are "
                       "not trainable by default; pass `trainable` to train them.")
  else:
    try:
      mask = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub),
                          trainable, params)
    except ValueError as e:
      raise ValueError("`trainable` must be a pytree prefix of params with bool "
                       f"leaves: {e}") from e
  if not any(jax.tree.leaves(mask)):
    raise ValueError("`trainable` marks no parameter as trainable.")
  return mask


def _full_multipliers(lr_multiplier: Any, params: Any) -> Any:
  """Broadcasts a prefix tree of learning-rate multipliers onto params' structure."""
  if lr_multiplier is None:
    lr_multiplier = 1.0
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: float(m), sub),
                        lr_multiplier, params)
  except (ValueError, TypeError) as e:
    raise ValueError("`lr_multiplier` must be a pytree prefix of params with number "
                     f"leaves: {e}") from e
  if not all(math.isfinite(m) and m >= 0 for m in jax.tree.leaves(full)):
    raise ValueError(f"lr_multiplier values must be finite and >= 0; got "
                     f"{sorted(set(jax.tree.leaves(full)))}.")
  return full


def _partition(tree: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen) copies of `tree`, None at the other side's leaves."""
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, tree)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
  return trainable, frozen


def _combine(trainable: Any, frozen: Any, mask: Any) -> Any:
  return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen)


def _split_aux(aux: Any, params: Any) -> tuple[dict[str, jax.Array], Any]:
  if isinstance(aux, Mapping):
    metrics, new_params = aux, params
  elif isinstance(aux, tuple) and len(aux) == 2 and isinstance(aux[0], Mapping):
    metrics, new_params = aux
    if jax.tree.structure(new_params) != jax.tree.structure(params):
      raise ValueError("loss_fn returned new params whose structure differs from "
                       f"params: {jax.tree.structure(new_params)} vs "
                       f"{jax.tree.structure(params)}.")
  else:
    raise ValueError("loss_fn must return (loss, metrics) or "
                     f"(loss, (metrics, new_params)); got aux of type {type(aux)}.")
  for name, value in metrics.items():
    if name in RESERVED_METRICS:
      raise ValueError(f"loss_fn metric {name!r} clashes with the trainer's own "
                       f"{RESERVED_METRICS}; rename it.")
    if jnp.ndim(value) != 0:
      raise ValueError(f"loss_fn metric {name!r} has shape {jnp.shape(value)}; "
                       "metrics must be scalars.")
  return dict(metrics), new_params


def _make_step(loss_fn: LossFn, cfg: OptimizerConfig, mask: Any, multipliers: Any):
  optimizer = _injected(cfg)(learning_rate=0.0, weight_decay=0.0)  # Numbers: state.
  scale = _partition(multipliers, mask)[0]
  scaled = any(m != 1.0 for m in jax.tree.leaves(scale))

  def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    trainable, frozen = _partition(state.params, mask)

    def objective(trainable):
      out = loss_fn(_combine(trainable, frozen, mask), batch, rng)
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("loss_fn must return a pair (loss, aux).")
      if jnp.ndim(out[0]) != 0:
        raise ValueError(f"loss_fn's loss has shape {jnp.shape(out[0])}; it must "
                         "be a scalar (average over the batch).")
      return out

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    metrics, new_params = _split_aux(aux, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    if scaled:  # Scaling the final update scales that subtree's learning rate.
      updates = jax.tree.map(lambda u, m: u * m, updates, scale)
    trainable = optax.apply_updates(trainable, updates)
    params = _combine(trainable, _partition(new_params, mask)[1], mask)
    learning_rate = (state.opt_state.hyperparams["learning_rate"] *
                     _lr_multiplier(cfg, state.step))
    metrics = {"loss": loss, "learning_rate": learning_rate,
               "grad_norm": optax.tree.norm(grads), **metrics}
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step_fn


@functools.lru_cache(maxsize=32)
def _compiled_step(loss_fn: LossFn, cfg: OptimizerConfig, mask: _Hashable,
                   multipliers: _Hashable, state_shardings: _Hashable,
                   mesh: jax.sharding.Mesh):
  step_fn = _make_step(loss_fn, cfg, mask.tree(), multipliers.tree())
  return jax.jit(step_fn,
                 in_shardings=(state_shardings.tree(), sharding.batch_sharded(mesh)),
                 out_shardings=(state_shardings.tree(), sharding.replicated(mesh)),
                 donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _compiled_init(cfg: OptimizerConfig, mask: _Hashable, param_shardings: _Hashable,
                   opt_shardings: _Hashable):
  """(params, learning_rate, weight_decay) -> (copy of params, optimizer state)."""
  def init(params, learning_rate, weight_decay):
    # A real copy: the step donates the state, and device_put alone may alias
    # the caller's buffers, which the first step would then free.
    params = jax.tree.map(jnp.copy, params)
    optimizer = _injected(cfg)(learning_rate=learning_rate, weight_decay=weight_decay)
    return params, optimizer.init(_partition(params, mask.tree())[0])
  return jax.jit(init, out_shardings=(param_shardings.tree(), opt_shardings.tree()))


def _param_shardings(param_sharding: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for params: replicated by default; PartitionSpecs allowed."""
  if param_sharding is None:
    return jax.tree.map(lambda _: sharding.replicated(mesh), params)
  def to_named(s, sub):
    if isinstance(s, jax.sharding.PartitionSpec):
      s = jax.sharding.NamedSharding(mesh, s)
    if not isinstance(s, jax.sharding.NamedSharding):
      raise ValueError(f"param_sharding leaves must be NamedSharding or "
                       f"PartitionSpec, got {s!r}.")
    return jax.tree.map(lambda _: s, sub)
  return jax.tree.map(to_named, param_sharding, params,
                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def _state_shardings(optimizer, trainable_params, trainable_shardings, mesh) -> Any:
  rep = sharding.replicated(mesh)
  opt_shape = jax.eval_shape(optimizer.init, trainable_params)
  return optax.tree_map_params(optimizer, lambda _, s: s, opt_shape,
                               trainable_shardings, transform_non_params=lambda _: rep)


def _put_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """The global host batch onto the mesh, split on `data` (multi-host safe)."""
  target = sharding.batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("batch_fn returned a scalar entry; every entry needs a "
                       "leading batch dimension.")
    sharding.check_divisible(x.shape[0], mesh)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

  return jax.tree.map(put, batch)


# ------------------------------------------------------------------ the loop


def _check_finite(window: list[dict[str, np.ndarray]], first_step: int,
                  cfg: OptimizerConfig, run_name: str | None,
                  manager: ocp.CheckpointManager | None) -> None:
  for offset, metrics in enumerate(window):
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(grad_norm):
      continue
    step = first_step + offset
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    run = f" of run {run_name!r}" if run_name else ""
    last = manager.latest_step() if manager is not None else None
    saved = (f"the last good checkpoint is step {last}" if last is not None
             else "no checkpoint was written")
    raise NonFiniteLossError(
        f"Non-finite {what} at step {step}{run} (batch_fn({step}), learning rate "
        f"{float(metrics['learning_rate']):g}). Training stopped; {saved}. Try a "
        f"lower learning_rate (peak now {cfg.learning_rate:g}), gradient clipping "
        f"(grad_clip_norm, now {cfg.grad_clip_norm}), or a longer warm-up "
        f"(warmup_steps, now {cfg.warmup_steps}).", step=step, loss=loss)


def _check_same_hyperparams(state: TrainState, cfg: OptimizerConfig, where) -> None:
  """A checkpoint of another run (e.g. another sweep point) must not be resumed."""
  for name in ("learning_rate", "weight_decay"):
    saved = float(state.opt_state.hyperparams[name])
    if saved != float(np.float32(getattr(cfg, name))):
      raise ValueError(f"The checkpoint in {where} was trained with {name}={saved:g}, "
                       f"the config says {getattr(cfg, name):g}: it belongs to another "
                       "run. Give each run its own run_name or checkpoint_dir.")


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _safe_part(name: str) -> str:
  name = re.sub(r"[^A-Za-z0-9._=-]", "_", name)
  return "_" if name in (".", "..") else name  # Never climb out of the directory.


def tensorboard_dir(metrics_path: str, run_name: str | None = None) -> str:
  """<directory of metrics_path>/tensorboard/<run_name>: TensorBoard shows each
  run_name (its '/' parts as folders, odd characters replaced) as its own run."""
  parts = [_safe_part(p) for p in (run_name or "train").split("/") if p]
  return os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "tensorboard",
                      *(parts or ["train"]))


class _TensorBoard:
  """The JSONL metrics lines as TensorBoard scalar events (tensorboardX: no TensorFlow)."""

  def __init__(self, logdir: str, start_step: int):
    try:
      import tensorboardX  # Imported here: only runs that log need it.
    except ImportError as e:
      raise ImportError("fusion.train writes TensorBoard events with tensorboardX, which is "
                        "not installed: pip install tensorboardX (setup.py lists it), or "
                        "pass tensorboard=False.") from e
    # purge_step: a resumed run hides the events an earlier attempt logged past
    # its last checkpoint, as the JSONL lines are appended again from there.
    # Event files are named by the second they open in: a unique suffix keeps a
    # run resumed within that second from overwriting the earlier attempt's.
    self.writer = tensorboardX.SummaryWriter(logdir, purge_step=start_step or None,
                                             filename_suffix=f".{time.time_ns()}")

  def write(self, record: Mapping[str, Any]) -> None:
    for key, value in record.items():
      if key not in ("run", "step", "wall_time") and isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, global_step=record["step"])

  def close(self) -> None:
    self.writer.close()


def default_checkpoint_dir(workdir: str, run_name: str | None = None) -> str:
  """<workdir>/checkpoints[/<run_name with odd characters replaced>]."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if run_name:
    path = os.path.join(path, re.sub(r"[^A-Za-z0-9._=-]", "_", run_name))
  return path


def train(*, loss_fn: LossFn, params: Any, batch_fn: Callable[[int], Any],
          config: Any, mesh: jax.sharding.Mesh, num_steps: int,
          workdir: str | None = None, seed: int = 0, trainable: Any = None,
          lr_multiplier: Any = None, param_sharding: Any = None,
          eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
          eval_every: int | None = None, log_every: int = 50,
          metrics_file: str = "metrics.jsonl", run_name: str | None = None,
          checkpoint: bool = True, checkpoint_dir: str | None = None,
          checkpoint_every: int = 1000, max_to_keep: int | None = 2,
          progress: bool = True, tensorboard: bool = True) -> TrainState:
  """Trains `params` for `num_steps` updates; resumes from the latest checkpoint.

  Args:
    loss_fn: (params, batch, rng) -> (loss, metrics | (metrics, new_params)).
    params: initial parameters (not modified; the trainer works on a copy).
    batch_fn: step -> global batch (pytree of host arrays), deterministic.
    config: optimizer config (see `OptimizerConfig`); total_steps defaults to
      num_steps.
    mesh: the device mesh; batches are split on its `data` axis.
    num_steps: train until state.step == num_steps.
    workdir: where metrics and checkpoints go; None: neither is written.
    seed: base rng seed of a fresh run (a resumed run keeps its saved key).
    trainable: pytree prefix of params with bool leaves; False leaves are not
      optimized (see the module docstring). Default (None): everything but the
      subtrees under a key named `batch_stats`, whose new values come from
      `loss_fn`'s new_params. An explicit mask (e.g. True) wins.
    lr_multiplier: pytree prefix of params with number leaves (default 1):
      each trainable leaf's update is scaled by its multiplier, i.e. its
      learning rate (warm-up and schedule included) is multiplied by it.
    param_sharding: pytree prefix of params with NamedSharding/PartitionSpec
      leaves; default replicated. The optimizer state follows it.
    eval_fn: params -> dict of scalars, run every `eval_every` steps and at the
      end, logged as its own line.
    log_every: a metrics line (means over the steps since the last line) every
      this many steps and at the end.
    metrics_file: JSONL file, relative to workdir (or absolute); lines carry
      `run: run_name` when given, so several runs can share one file.
    tensorboard: also write each metrics line's scalars as TensorBoard events
      under `tensorboard_dir(metrics file, run_name)`, i.e. beside the JSONL file.
    run_name: tag for metrics lines, the progress bar and the default
      checkpoint directory.
    checkpoint: whether to checkpoint (needs workdir or checkpoint_dir).
    checkpoint_dir: default `default_checkpoint_dir(workdir, run_name)`.
    checkpoint_every: save interval in steps; the last step is always saved.
    progress: show a progress bar (callers running many short fits show their own).
    max_to_keep: checkpoints kept (None: all).

  Returns:
    The final TrainState (arrays on the mesh).
  """
  if num_steps < 0:
    raise ValueError(f"num_steps={num_steps} must be >= 0.")
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1.")
  if log_every < 1:
    raise ValueError(f"log_every={log_every} must be >= 1.")
  if eval_fn is not None and not (eval_every or 0) >= 1:
    raise ValueError(f"eval_fn needs eval_every >= 1, got {eval_every}.")
  cfg = parse_config(config, num_steps)
  static_cfg = cfg.static()
  optimizer = _injected(static_cfg)(learning_rate=0.0, weight_decay=0.0)
  mask = _full_mask(trainable, params)
  multipliers = _full_multipliers(lr_multiplier, params)
  rep = sharding.replicated(mesh)

  # Shardings of the whole state, then the state: fresh or restored.
  param_shardings = _param_shardings(param_sharding, params, mesh)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
  abstract_trainable, _ = _partition(abstract_params, mask)
  opt_shardings = _state_shardings(optimizer, abstract_trainable,
                                   _partition(param_shardings, mask)[0], mesh)
  state_shardings = TrainState(step=rep, params=param_shardings,
                               opt_state=opt_shardings, rng=rep)

  manager = None
  if checkpoint and (checkpoint_dir or workdir):
    manager = ocp.CheckpointManager(
        os.path.abspath(checkpoint_dir or default_checkpoint_dir(workdir, run_name)),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             save_interval_steps=checkpoint_every))
  try:
    latest = manager.latest_step() if manager is not None else None
    if latest is not None:
      if latest > num_steps:
        raise ValueError(f"{manager.directory} holds a checkpoint at step {latest}, "
                         f"past num_steps={num_steps}; use another checkpoint_dir "
                         f"or num_steps >= {latest}.")
      abstract_state = TrainState(
          step=jax.ShapeDtypeStruct((), jnp.int32),
          params=abstract_params,
          opt_state=jax.eval_shape(optimizer.init, abstract_trainable),
          rng=jax.eval_shape(jax.random.PRNGKey, seed))  # Shape depends on the impl.
      abstract_state = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          abstract_state, state_shardings)
      state = manager.restore(latest, args=ocp.args.StandardRestore(abstract_state))
      _check_same_hyperparams(state, cfg, manager.directory)
    else:
      init = _compiled_init(static_cfg, _Hashable(mask), _Hashable(param_shardings),
                            _Hashable(opt_shardings))
      state_params, opt_state = init(jax.device_put(params, param_shardings),
                                     np.float32(cfg.learning_rate),
                                     np.float32(cfg.weight_decay))
      state = TrainState(step=jax.device_put(np.int32(0), rep), params=state_params,
                         opt_state=opt_state,
                         rng=jax.device_put(jax.random.PRNGKey(seed), rep))
    return _loop(state, loss_fn=loss_fn, batch_fn=batch_fn, cfg=cfg, mesh=mesh,
                 num_steps=num_steps, mask=mask, multipliers=multipliers,
                 state_shardings=state_shardings,
                 manager=manager, checkpoint_every=checkpoint_every, workdir=workdir,
                 metrics_file=metrics_file, run_name=run_name, log_every=log_every,
                 eval_fn=eval_fn, eval_every=eval_every, progress=progress,
                 tensorboard=tensorboard)
  finally:
    if manager is not None:
      manager.wait_until_finished()  # Good checkpoints finish even on errors.
      manager.close()


def _loop(state: TrainState, *, loss_fn, batch_fn, cfg, mesh, num_steps, mask,
          multipliers, state_shardings, manager, checkpoint_every, workdir, metrics_file,
          run_name, log_every, eval_fn, eval_every, progress, tensorboard) -> TrainState:
  start = int(state.step)
  if start == num_steps:
    return state
  step_fn = _compiled_step(loss_fn, cfg.static(), _Hashable(mask), _Hashable(multipliers),
                           _Hashable(state_shardings), mesh)
  # jaxlib 0.9.2's CPU runtime can deadlock with several multi-device steps in
  # flight (seen: 7 of 8 simulated devices waiting in a step's all-reduce, the
  # launcher blocked before the 8th): on a multi-device CPU mesh, one at a time.
  one_at_a_time = mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
  main_process = jax.process_index() == 0
  metrics_path = None
  if main_process and (workdir or os.path.isabs(metrics_file)):
    metrics_path = os.path.join(workdir or "", metrics_file)
    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
  # Which run wrote a line: reruns into one workdir append to the same file.
  run_id = provenance.run_id()
  tag = {**({"run_id": run_id} if run_id else {}), **({"run": run_name} if run_name else {})}
  events = (_TensorBoard(tensorboard_dir(metrics_path, run_name), start)
            if metrics_path and tensorboard else None)
  # Else TQDM_DISABLE decides.
  bar_kwargs = {} if main_process and progress else {"disable": True}
  # leave=False: a finished run's bar goes, under the caller's (the suite's) one.
  bar = tqdm_auto.tqdm(total=num_steps, initial=start, desc=run_name or "train",
                       unit="step", leave=False, **bar_kwargs)
  t0 = time.time()
  pending: list[dict[str, jax.Array]] = []  # On device, not yet checked.
  to_log: list[dict[str, np.ndarray]] = []  # Checked, not yet logged.
  try:
    for step in range(start, num_steps):
      state, metrics = step_fn(state, _put_batch(batch_fn(step), mesh))
      if one_at_a_time:
        jax.block_until_ready(metrics)
      pending.append(metrics)
      bar.update(1)
      done = step + 1
      last = done == num_steps
      # Our own interval, not manager.should_save, which also saves the first step.
      save = manager is not None and (last or done % checkpoint_every == 0)
      log = last or done % log_every == 0
      evaluate = eval_fn is not None and (last or done % eval_every == 0)
      if not (save or log or evaluate):
        continue
      window = jax.device_get(pending)
      _check_finite(window, done - len(window), cfg, run_name, manager)
      pending = []
      to_log.extend(window)
      if log:
        means = {k: float(np.mean([m[k] for m in to_log])) for k in to_log[0]}
        record = {**tag, "step": done, "loss": means.pop("loss"),
                  "learning_rate": float(to_log[-1]["learning_rate"]),
                  **{k: v for k, v in means.items() if k != "learning_rate"},
                  "wall_time": time.time() - t0}
        to_log = []
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if metrics_path:
          _append_jsonl(metrics_path, record)
        if events is not None:
          events.write(record)
      if evaluate:
        results = jax.device_get(dict(eval_fn(state.params)))
        record = {**tag, "step": done, **{k: float(v) for k, v in results.items()},
                  "wall_time": time.time() - t0}
        if metrics_path:
          _append_jsonl(metrics_path, record)
        if events is not None:
          events.write(record)
      if save:
        manager.save(done, args=ocp.args.StandardSave(state), force=True)
  finally:
    bar.close()
    if events is not None:
      events.close()
  return state
