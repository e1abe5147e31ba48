"""Hub-Pathway: per-input routing through the hub, trained end to end.

After "Hub-Pathway: Transfer Learning from A Hub of Pre-trained Models" (Shu et
al., NeurIPS 2022), whose equations were not available to us; each choice is
configurable and built on the noisy top-k gating of Shazeer et al. (2017) and
V-MoE (`fusion.routing`):
- a generator (the thumbnail CNN of `fusion.routing`, or a linear gate on one
  hub model's cached features) gives logits over the M hub models; while
  training H = clean + eps * softplus(noise), eps ~ N(0, 1) (or a fixed std);
- the top k of H activate models for an input, their weights the softmax
  over all M kept at those k (V-MoE; or over the k, Shazeer et al.); each
  model's inputs go into a buffer of
  ceil(k * B * capacity_factor / M) slots (batch order; the overflow is dropped
  and counted, its gate weight falls back to a uniform prediction), so an input
  runs through its k models only, at training and at inference; at inference
  there are no buffers unless `eval_capacity_factor` is set: the generator
  routes the split, then each model runs on its own inputs (`predict_sparse`),
  so no input is dropped there (a router that prefers a few models for every
  input would otherwise lose most of the test set to overflow);
- each model has its own linear head; the output is the gate-weighted sum of
  the activated models' head probabilities;
- losses: cross-entropy of that output (task), the importance and load CV^2
  of the router (exploration), and each head's cross-entropy on exactly the
  inputs routed to it (exploitation), each with its weight.
`pathway` fine-tunes the hub models (their learning rate scaled by
`backbone_lr_multiplier`); they run in inference mode, BatchNorm statistics
frozen, because the empty slots of a buffer would skew batch statistics.
`pathway_frozen` trains the generator and heads on cached features.
VTAB-1k protocol: learning rate chosen on val200, retrained on train800val200.
"""
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion import experiment
from fusion import features as features_lib
from fusion import hub
from fusion import metrics
from fusion import predictions
from fusion import routing
from fusion import sharding
from fusion import train
from fusion.methods import linear_probe

MEMBERS = "hub"
GENERATORS = ("thumbnail",)  # Or the name of a hub model: a gate on its features.


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "k": 2,
      # Hub models it does not route through (names); (): every model of the hub.
      "exclude_models": (),
      "capacity_factor": 1.25,
      # At inference (val200, test): None: no buffers, each model runs on exactly
      # the inputs routed to it (predict_sparse), so none is dropped; a number:
      # ceil(k B f / M) slots, as in training, drops counted.
      "eval_capacity_factor": None,
      # "all": gate weights are the softmax over all M models, kept at the top k
      # (V-MoE; the router learns from the task loss even at k = 1); "top_k":
      # the softmax over the k chosen (Shazeer et al.).
      "gate_normalisation": "all",
      # "learned": Shazeer et al.'s noise std softplus(x W_noise), a second output
      # of the generator; "fixed": one std for every logit, `fixed_noise_std`
      # (None: V-MoE's 1 / M).
      "noise": "learned",
      "fixed_noise_std": None,
      "generator": "thumbnail",
      "thumbnail_size": 8,
      "generator_widths": (16, 32),
      "learning_rates": (0.01, 0.05),
      "steps": 100,
      "frozen_steps": 500,  # pathway_frozen: cheap steps on cached features.
      "batch_size": 64,
      # The heads are padded to a multiple of this many classes, the padding
      # masked out (`linear_probe.PAD_LOGIT`), so that the tasks of up to 16
      # classes share one compiled step per k: on a CPU, tracing and compiling a
      # fine-tuned pathway's step takes about 20 s. 1: no padding.
      "class_multiple": 16,
      "warmup_fraction": 0.1,
      "optimizer": {"optimizer": "sgd", "momentum": 0.9, "schedule": "cosine",
                    "weight_decay": 0.0, "grad_clip_norm": 1.0},
      "backbone_lr_multiplier": 1.0,
      "generator_lr_multiplier": 1.0,
      "loss_weights": {"task": 1.0, "importance": 0.1, "load": 0.1, "exploitation": 1.0},
  })


def routed_models(config, backbones: Sequence[hub.Backbone]) -> list[hub.Backbone]:
  """The hub models it routes between: the hub but `config.exclude_models`."""
  names = config.get("exclude_models") or ()
  if isinstance(names, str):
    raise ValueError(f"pathway.exclude_models={names!r} must be a list of model names.")
  if not names:
    return list(backbones)
  hub_names = [b.name for b in backbones]
  unknown = sorted(set(names) - set(hub_names))
  if unknown:
    raise ValueError(f"pathway.exclude_models names {unknown}, which are not in the hub; "
                     f"its models: {hub_names}.")
  return [b for b in backbones if b.name not in set(names)]


def check_hub(config, backbones) -> None:
  """`pathway` and `pathway_frozen` (k = config.k) against the loaded hub."""
  check_config(config, len(routed_models(config, backbones)), int(config.k))


def check_hub_k1(config, backbones) -> None:
  check_config(config, len(routed_models(config, backbones)), 1)


def check_config(config, num_models: int, k: int) -> None:
  if num_models < 2:
    raise ValueError(f"Hub-Pathway routes between hub models and needs at least 2; got "
                     f"{num_models}.")
  routing.check_top_k(k, num_models)
  if config.gate_normalisation not in routing.GATE_NORMALISATIONS:
    raise ValueError(f"pathway.gate_normalisation={config.gate_normalisation!r} is not one "
                     f"of {routing.GATE_NORMALISATIONS}.")
  routing.capacity(k, int(config.batch_size), num_models, float(config.capacity_factor))
  _eval_slots(config, k, num_models)
  if not config.learning_rates:
    raise ValueError("pathway.learning_rates is empty; give at least one.")
  _noise(config, num_models)
  if any(float(w) < 0 for w in config.loss_weights.values()):
    raise ValueError(f"pathway.loss_weights must be >= 0; got {dict(config.loss_weights)}.")
  head_width(config, 2)


def head_width(config, num_classes: int) -> int:
  """The heads' number of outputs: num_classes rounded up to `class_multiple`."""
  return linear_probe.head_width(num_classes, config.get("class_multiple", 1),
                                 "pathway.class_multiple")


NOISES = ("learned", "fixed")


def _noise(config, num_models: int) -> str | float:
  """"learned", or the fixed noise std (> 0)."""
  noise = config.get("noise", "learned")
  if noise not in NOISES:
    raise ValueError(f"pathway.noise={noise!r} is not one of {NOISES}.")
  if noise == "learned":
    return noise
  value = config.get("fixed_noise_std")
  if value is None:
    return 1.0 / num_models
  try:
    std = float(value)
  except (TypeError, ValueError):
    std = float("nan")
  if not std > 0:  # The smooth load estimate divides by it.
    raise ValueError(f"pathway.fixed_noise_std={value!r} must be None (1 / M) or a "
                     "number > 0.")
  return std


def _eval_slots(config, k: int, num_models: int) -> int:
  """Buffer slots per model at inference; the whole batch when eval_capacity_factor is None."""
  batch_size = int(config.batch_size)
  factor = config.get("eval_capacity_factor")
  if factor is None:
    return batch_size
  try:
    factor = float(factor)
  except (TypeError, ValueError):
    raise ValueError(f"pathway.eval_capacity_factor={factor!r} must be None (no drops) or "
                     "a number > 0.") from None
  return routing.capacity(k, batch_size, num_models, factor)


# ------------------------------------------------------------------ the network


@functools.lru_cache(maxsize=32)
def _network(encoders: tuple, generator: nn.Module, k: int, slots: int, num_classes: int,
             weights: tuple[float, float, float, float], normalisation: str = "all",
             noise: str | float = "learned"):
  """forward(params, batch, rng) -> (loss, aux): the pathway of one configuration.

  `encoders[m]` maps (params, inputs [C, ...]) -> features [C, D_m] (a hub
  model's forward, or the identity on cached features). `num_classes` is the
  heads' width; `params["class_mask"]` ([num_classes], 1 for the task's classes,
  0 for the padding; `head_width`), when there, masks the padding out.
  """
  num_models = len(encoders)
  w_task, w_importance, w_load, w_exploit = weights

  def forward(params, batch, rng):
    valid = batch["valid"].astype(jnp.float32)
    out = generator.apply(params["generator"], batch["gate_input"])
    clean = out[:, :num_models]
    std = routing.learned_noise_std(out[:, num_models:]) if noise == "learned" else noise
    noisy, noise_std = routing.noisy_logits(clean, std, rng)
    gates, _ = routing.top_k_gates(noisy, k, normalisation)
    dispatch, combine, dropped = routing.dispatch(gates, slots, batch["valid"])
    class_mask = params.get("class_mask")
    uniform = (1.0 / num_classes if class_mask is None else class_mask / class_mask.sum())
    probs = (1.0 - combine.sum((1, 2)))[:, None] * uniform  # Dropped weight: uniform.
    labels = jax.nn.one_hot(batch["label"], num_classes)
    exploit, filled = 0.0, 0.0
    shared = len(batch["inputs"]) == 1  # Fine-tuning: one image batch for every model.
    for m, encode in enumerate(encoders):
      x = jnp.einsum("bc,b...->c...", dispatch[:, m], batch["inputs"][0 if shared else m])
      logits = linear_probe.head_logits(params["heads"][m], encode(params["encoders"][m], x))
      logits = linear_probe.masked_logits(logits, class_mask)
      probs = probs + jnp.einsum("bc,ck->bk", combine[:, m], jax.nn.softmax(logits))
      slot_labels = jnp.einsum("bc,bk->ck", dispatch[:, m], labels)
      slot_filled = dispatch[:, m].sum(0)
      exploit += -jnp.sum(slot_filled * jnp.sum(slot_labels * jax.nn.log_softmax(logits), -1))
      filled += slot_filled.sum()
    log_probs = jnp.log(jnp.maximum(probs, 1e-30))
    task = -jnp.sum(valid * jnp.sum(labels * log_probs, -1)) / jnp.maximum(valid.sum(), 1)
    exploit = exploit / jnp.maximum(filled, 1.0)
    importance = routing.importance_loss(gates, valid)
    load = (routing.load_loss(clean, noisy, noise_std, k, valid) if rng is not None
            else jnp.zeros(()))
    loss = w_task * task + w_importance * importance + w_load * load + w_exploit * exploit
    aux = {"task_loss": task, "importance_loss": importance, "load_loss": load,
           "exploitation_loss": exploit, "dropped": dropped.astype(jnp.float32),
           "accuracy": jnp.sum(valid * (log_probs.argmax(-1) == batch["label"]))
                       / jnp.maximum(valid.sum(), 1)}
    return loss, aux, log_probs, dispatch.sum(-1)

  def loss_fn(params, batch, rng):
    loss, aux, _, _ = forward(params, batch, rng)
    return loss, aux

  def predict(params, batch):
    _, aux, log_probs, routed = forward(params, batch, None)
    return log_probs, routed, aux["dropped"]

  return loss_fn, predict


def networks(config, encoders: tuple, generator: nn.Module, k: int, num_classes: int):
  """(loss_fn with the training capacity, predict with the inference capacity) of a
  config, for a task of `num_classes` (heads of `head_width`: params from `_init`)."""
  num_models = len(encoders)
  num_classes = head_width(config, num_classes)
  w = config.loss_weights
  weights = (float(w.task), float(w.importance), float(w.load), float(w.exploitation))
  args = (weights, config.gate_normalisation, _noise(config, num_models))
  slots = routing.capacity(k, int(config.batch_size), num_models, float(config.capacity_factor))
  loss_fn, _ = _network(encoders, generator, k, slots, num_classes, *args)
  _, predict = _network(encoders, generator, k, _eval_slots(config, k, num_models),
                        num_classes, *args)
  return loss_fn, predict


def _hub_encoder(backbone: hub.Backbone):
  """params, images in [0, 1] -> features, in inference mode (see the module docstring)."""
  mean = np.asarray(backbone.preprocess.mean, np.float32)
  std = np.asarray(backbone.preprocess.std, np.float32)
  return _HubEncoder(hub.computation_twin(backbone), mean.tobytes(), std.tobytes())


class _HubEncoder:
  """A hashable encoder (per computation twin and normalisation), so compiled networks
  are reused."""

  def __init__(self, backbone, mean, std):
    self.backbone, self.key = backbone, (id(backbone), mean, std)
    self.mean = np.frombuffer(mean, np.float32)
    self.std = np.frombuffer(std, np.float32)

  def __call__(self, params, images):
    return self.backbone.features(params, (images - self.mean) / self.std)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _HubEncoder) and self.key == other.key


def _identity(params, x):
  del params
  return x


# ------------------------------------------------------------------ data


def _inputs(ctx, task, backbones, split: str, frozen: bool, config):
  """(per-model inputs, gate inputs, labels) of a split."""
  if frozen:
    fs = [ctx.features(b, task, split) for b in backbones]
    labels = fs[0].labels
    inputs = [f.features for f in fs]
  else:
    resolutions = {b.preprocess.resolution for b in backbones}
    if len(resolutions) > 1:
      raise ValueError(f"pathway fine-tunes the hub on one image batch; its models want "
                       f"resolutions {sorted(resolutions)}. Use pathway_frozen, or one "
                       "resolution.")
    raw = hub.Preprocess(resolutions.pop(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    images, labels = ctx.images(task, split, raw)
    inputs = [images]  # Shared by every model (see _network).
  if config.generator == "thumbnail":
    thumbs = features_lib.extract_thumbnails(task, split, int(config.thumbnail_size),
                                             cache_dir=ctx.config.get("cache_dir") or None)
    gate_input = thumbs.images
  else:
    gate_input = ctx.features(ctx.backbone(config.generator), task, split).features
  return inputs, np.asarray(gate_input, np.float32), np.asarray(labels, np.int32)


def _standardise(train_inputs, other_inputs, gate_train, gate_other, frozen, generator):
  """Feature inputs standardised with the training split's statistics."""
  fit = linear_probe.Standardizer.fit
  if frozen:
    norms = [fit(x) for x in train_inputs]
    train_inputs = [n(x) for n, x in zip(norms, train_inputs)]
    other_inputs = [[n(x) for n, x in zip(norms, xs)] for xs in other_inputs]
  if generator != "thumbnail":
    norm = fit(gate_train)
    gate_train, gate_other = norm(gate_train), [norm(g) for g in gate_other]
  return train_inputs, other_inputs, gate_train, gate_other


# ------------------------------------------------------------------ training


def generator_of(config, num_models: int) -> nn.Module:
  """Clean logits [B, M], then raw noise [B, M] when the noise is learned."""
  outputs = num_models * (2 if _noise(config, num_models) == "learned" else 1)
  if config.generator == "thumbnail":
    return routing.ThumbnailCNN(outputs, tuple(config.generator_widths))
  return routing.FeatureGate(outputs)


def _init(generator, gate_example, encoders_params, dims, num_classes, seed,
          width: int | None = None):
  """Initial params: zero heads `width` (default num_classes) wide, the padding
  masked out by a `class_mask` that never trains (`trainable`)."""
  width = num_classes if width is None else width
  return {"generator": generator.init(jax.random.PRNGKey(seed), gate_example[:1]),
          "heads": [{"kernel": np.zeros((d, width), np.float32),
                     "bias": np.zeros((width,), np.float32)} for d in dims],
          "encoders": encoders_params,
          "class_mask": linear_probe.class_mask(num_classes, width)}


def trainable(encoder_trainable: list) -> dict:
  """The trainer's mask of `_init`'s params: all but the class mask (and the
  encoders' leaves as given)."""
  return {"generator": True, "heads": True, "encoders": encoder_trainable,
          "class_mask": False}


def train_arrays(config, k: int, lr: float, steps: int, seed: int, mesh, encoders: tuple,
                 encoder_params: list, encoder_trainable: list, dims: Sequence[int],
                 num_classes: int, inputs: list, gate_input: np.ndarray, labels: np.ndarray,
                 workdir: str | None = None, run_name: str | None = None):
  """(trained params, predict) of a pathway on in-memory training arrays.

  `inputs`: one array per model (cached features), or one image array shared
  by every model; `encoder_trainable`: the trainer's mask of each encoder's params.
  """
  batch_size = int(config.batch_size)
  sharding.check_divisible(batch_size, mesh)
  generator = generator_of(config, len(encoders))
  loss_fn, predict = networks(config, encoders, generator, k, num_classes)
  params = _init(generator, gate_input, encoder_params, dims, num_classes, seed,
                 head_width(config, num_classes))

  def batch_fn(step):
    idx = np.random.default_rng((seed, step)).choice(len(labels), batch_size,
                                                     replace=len(labels) < batch_size)
    return {"inputs": [x[idx] for x in inputs], "gate_input": gate_input[idx],
            "label": labels[idx], "valid": np.ones(batch_size, bool)}

  opt = config.optimizer.to_dict()
  opt.update(learning_rate=lr, total_steps=steps,
             warmup_steps=int(round(config.warmup_fraction * steps)))
  state = train.train(
      loss_fn=loss_fn, params=params, batch_fn=batch_fn, config=opt, mesh=mesh,
      num_steps=steps, workdir=workdir, seed=seed,
      trainable=trainable(encoder_trainable),
      lr_multiplier={"generator": float(config.generator_lr_multiplier), "heads": 1.0,
                     "encoders": float(config.backbone_lr_multiplier), "class_mask": 1.0},
      run_name=run_name, checkpoint=False, progress=False)
  return jax.device_get(state.params), predict


def _fit(ctx, task, backbones, config, k, frozen, lr, steps, seed, train_split, eval_splits):
  """Trains on `train_split`; logits, routing and drops on each of `eval_splits`."""
  train_inputs, gate_train, train_labels = _inputs(ctx, task, backbones, train_split,
                                                   frozen, config)
  evals = [_inputs(ctx, task, backbones, s, frozen, config) for s in eval_splits]
  train_inputs, eval_inputs, gate_train, eval_gates = _standardise(
      train_inputs, [e[0] for e in evals], gate_train, [e[1] for e in evals], frozen,
      config.generator)
  encoders = tuple(_identity if frozen else _hub_encoder(b) for b in backbones)
  params, predict = train_arrays(
      config, k, lr, steps, seed, ctx.mesh, encoders=encoders,
      encoder_params=[{} if frozen else b.params for b in backbones],
      encoder_trainable=[{} if frozen else {c: c == "params" for c in b.params}
                         for b in backbones],
      dims=[b.feature_dim for b in backbones], num_classes=task.num_classes,
      inputs=train_inputs, gate_input=gate_train, labels=train_labels, workdir=ctx.workdir,
      run_name=f"pathway/{task.name}/k={k}{'/frozen' if frozen else ''}/{train_split}/"
               f"lr={lr:g}")
  batch_size = int(config.batch_size)
  if config.get("eval_capacity_factor") is None:  # No buffers: k models per input.
    return [predict_sparse(config, encoders, k, task.num_classes, params, inputs, gates_in,
                           labels, batch_size)
            for inputs, gates_in, (_, _, labels) in zip(eval_inputs, eval_gates, evals)]
  jitted = jax.jit(predict)
  return [predict_all(jitted, params, inputs, gates_in, labels, batch_size)
          for inputs, gates_in, (_, _, labels) in zip(eval_inputs, eval_gates, evals)]


def _classes(params) -> np.ndarray | slice:
  """The columns of the heads' outputs that are the task's classes."""
  if "class_mask" not in params:
    return slice(None)
  return np.flatnonzero(np.asarray(params["class_mask"]))


def predict_all(jitted, params, inputs, gate_input, labels, batch_size):
  """(log-probs [N, K], routed [N, M] 0/1, dropped routings) over a split, padded batches."""
  n = len(labels)
  classes = _classes(params)
  log_probs, routed, dropped = [], [], 0.0
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.minimum(idx, n - 1)
    batch = {"inputs": [x[idx] for x in inputs], "gate_input": gate_input[idx],
             "label": labels[idx], "valid": valid}
    lp, r, d = jitted(params, batch)
    log_probs.append(np.asarray(lp)[valid][:, classes])
    routed.append(np.asarray(r)[valid])
    dropped += float(d)
  return np.concatenate(log_probs), np.concatenate(routed), int(dropped), labels


@functools.lru_cache(maxsize=32)
def _router(generator: nn.Module, num_models: int, k: int, normalisation: str):
  """(generator params, gate inputs) -> (gates [B, M], top-k index [B, k]), noise off."""
  def route(params, gate_input):
    clean = generator.apply(params, gate_input)[:, :num_models]
    return routing.top_k_gates(clean, k, normalisation)
  return jax.jit(route)


@functools.lru_cache(maxsize=64)
def _expert(encode):
  """(encoder params, head, class mask or None, inputs) -> the head's probabilities on one
  model's features."""
  def expert(params, head, class_mask, x):
    logits = linear_probe.head_logits(head, encode(params, x))
    return jax.nn.softmax(linear_probe.masked_logits(logits, class_mask))
  return jax.jit(expert)


def _in_batches(fn, x: np.ndarray, batch_size: int):
  """fn over the rows of x in batches padded to `batch_size` (one compiled shape)."""
  n, outs = len(x), []
  for start in range(0, n, batch_size):
    out = fn(x[np.minimum(np.arange(start, start + batch_size), n - 1)])
    outs.append(jax.tree.map(lambda o: np.asarray(o)[:min(batch_size, n - start)], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def predict_sparse(config, encoders: tuple, k: int, num_classes: int, params, inputs,
                   gate_input, labels, batch_size: int):
  """(log-probs [N, K], routed [N, M] 0/1, dropped = 0, labels) of a split, each input
  run through its k chosen models only.

  The generator routes the split; then each model runs on just the inputs routed
  to it, in padded batches: no buffer, so nothing is dropped, and the compute is
  k models per input. It equals the buffered `predict` with buffers of the whole
  batch (`eval_capacity_factor=None`), which runs every model on every input.
  """
  num_models = len(encoders)
  classes = _classes(params)
  class_mask = params.get("class_mask")  # None: unpadded heads (`masked_logits`).
  route = _router(generator_of(config, num_models), num_models, k, config.gate_normalisation)
  gates, index = _in_batches(lambda g: route(params["generator"], g), gate_input, batch_size)
  gates = gates.astype(np.float64)
  # The weight of no model goes to a uniform prediction, as in the buffered path.
  probs = np.repeat((1.0 - gates.sum(1, keepdims=True)) / num_classes, num_classes, 1)
  routed = np.zeros_like(gates)
  for m, encode in enumerate(encoders):
    rows = np.flatnonzero((index == m).any(1))
    if not len(rows):
      continue
    x = inputs[0 if len(inputs) == 1 else m][rows]
    expert = _expert(encode)
    p_m = _in_batches(lambda xb: expert(params["encoders"][m], params["heads"][m],
                                        class_mask, xb), x, batch_size)
    probs[rows] += gates[rows, m, None] * p_m[:, classes]
    routed[rows, m] = 1.0
  return (np.log(np.maximum(probs, 1e-30)).astype(np.float32), routed.astype(np.float32),
          0, labels)


def _generator_gflops(config, gate_input, num_models) -> float:
  generator = generator_of(config, num_models)
  params = generator.init(jax.random.PRNGKey(0), gate_input[:1])
  compiled = jax.jit(generator.apply).lower(params, gate_input[:1]).compile()
  return hub._flops(compiled.cost_analysis()) / 1e9


def run(ctx, task, backbones: Sequence[hub.Backbone], config, seed: int, k: int,
        frozen: bool) -> predictions.Result:
  backbones = routed_models(config, backbones)
  check_config(config, len(backbones), k)
  if config.generator != "thumbnail":
    ctx.backbone(config.generator)  # Unknown names fail here.
  steps = int(config.frozen_steps if frozen else config.steps)
  sweep, best = [], None
  for lr in config.learning_rates:
    val, = _fit(ctx, task, backbones, config, k, frozen, float(lr), steps, seed,
                "train800", ("val200",))
    log_probs, _, _, labels = val
    score = (-metrics.accuracy(log_probs, labels), metrics.nll(log_probs, labels))
    sweep.append({"learning_rate": float(lr), "val_accuracy": -score[0]})
    if best is None or score < best[0]:
      best = (score, float(lr), val)
  _, lr, val = best
  tests = experiment.test_splits(task)
  outs = _fit(ctx, task, backbones, config, k, frozen, lr, steps, seed,
              "train800val200", tests)
  log_probs, routed, dropped, labels = outs[0]
  gflops = np.array([hub.inference_gflops(b) + linear_probe.head_gflops(
      b.feature_dim, task.num_classes) for b in backbones])
  gate_input = _inputs(ctx, task, backbones[:1], "val200", True, config)[1]
  generator_gflops = (_generator_gflops(config, gate_input, len(backbones))
                      if config.generator == "thumbnail" else
                      hub.inference_gflops(ctx.backbone(config.generator)))
  routing_matrix = [[float(routed[labels == c, m].mean()) if np.any(labels == c) else 0.0
                     for m in range(len(backbones))] for c in range(task.num_classes)]
  runs = len(config.learning_rates) + 1
  return predictions.Result(
      predictions.Predictions({"val200": val[0], **{s: o[0] for s, o in zip(tests, outs)}},
                              {"val200": val[3], **{s: o[3] for s, o in zip(tests, outs)}}),
      members=tuple(b.name for b in backbones),
      inference_gflops=float(generator_gflops + (routed * gflops).sum(1).mean()),
      train_steps=runs * steps, train_examples=runs * steps * int(config.batch_size),
      fields={"k": k, "frozen": frozen, "learning_rate": lr, "sweep": sweep,
              "models_per_input": float(routed.sum(1).mean()),
              "test_dropped": dropped, "routing_matrix": routing_matrix,
              "routing_models": [b.name for b in backbones],
              "capacity": routing.capacity(k, int(config.batch_size), len(backbones),
                                           float(config.capacity_factor)),
              "eval_capacity": _eval_slots(config, k, len(backbones))})


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  return run(ctx, task, members, config, seed, int(config.k), frozen=False)


def fit_k1(ctx, task, members, config, seed) -> predictions.Result:
  return run(ctx, task, members, config, seed, 1, frozen=False)


def fit_frozen(ctx, task, members, config, seed) -> predictions.Result:
  return run(ctx, task, members, config, seed, int(config.k), frozen=True)
