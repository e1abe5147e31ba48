"""Gated fusion: a per-input mixture of the hub's frozen models, with a label-space head.

After Resheff, Lieder and Hope, "All Together Now! The Benefits of Adaptively
Fusing Pre-trained Deep Representations" (ICPRAM 2019). Every hub model's
features come from the cache (`ctx.features`): training touches only the gate
and the heads, never a backbone.

- The gate (`fusion.routing`) gives softmax weights over the M models per
  input: `gate="thumbnail"`, a miniature CNN on a `thumbnail_size` thumbnail of
  the image (cached by `features.extract_thumbnails`, [-1, 1]); or
  `gate="features"`, a linear layer on the concatenated standardised features.
- `level="feature"`: each model's standardised features go through their own
  Dense layer to a shared `width`; the gate-weighted sum of those is the fused
  representation, read by one linear head. `level="prediction"`: one linear
  head per model; output = log of the gate-weighted sum of their softmaxes.
- The label-space head (`label_head`): each class name, through `prompt`, is
  embedded by a pre-trained text encoder (`text_encoder`: "" = the offline
  all-MiniLM-L6-v2, else an HF BERT-family id or directory); the fused
  representation is projected into that space (a Dense layer without bias),
  and its logits are cosine similarities / a learned temperature
  (exp of a log-temperature). It is blended with the linear head in
  probability space, p = (1 - a) softmax(head) + a softmax(label), with a
  learned a = sigmoid(scalar) (`label_blend="learned"`) or a fixed one (a
  number in [0, 1]). At the prediction level each model has its own
  projection (the temperature and blend are shared) and the blend happens per
  model, before the gate mixes them.

Training: the one trainer, AdamW, `steps` steps at `batch_size`, a sweep over
`learning_rates` on train800 chosen by val200 accuracy (ties: lower NLL),
then the chosen rate retrained on train800val200 for test; features are
standardised per model with the statistics of the training split, batches
drawn as `linear_probe` draws them. The linear heads start at zero and the
gates' output layers too, so training starts from a uniform gate.
"""
import dataclasses
import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion import config_lib
from fusion import experiment
from fusion import features as features_lib
from fusion import hub
from fusion import metrics
from fusion import predictions
from fusion import routing
from fusion import train
from fusion.methods import linear_probe

MEMBERS = "hub"
VERSION = 1
LEVELS = ("feature", "prediction")
GATES = ("thumbnail", "features")
SPLITS = ("train800", "val200", "train800val200", "test")
PREDICT_CHUNK = 256  # Examples per forward pass at prediction time.


def default_config(label_head: bool = True, gate: str = "thumbnail") -> ml_collections.ConfigDict:
  """`moe`: thumbnail gate, feature level, label head with a learned blend."""
  config = config_lib.probe_config(learning_rates=(1e-3, 1e-2), steps=300)
  config.level = "feature"  # "feature" | "prediction".
  config.gate = gate  # "thumbnail" | "features".
  # 8x8 of the offline tasks' 32x32 images: on the CPU a 16x16 gate step costs ~6x
  # more (measured: 6 vs 38 ms a step at batch 256, 4 models). VTAB: 32 of 224.
  config.thumbnail_size = 8
  config.gate_widths = (16, 32)  # ThumbnailCNN conv widths.
  config.gate_hidden = 0  # FeatureGate: 0 = linear.
  config.width = 64  # Feature level: the shared width of the projected features.
  config.label_head = label_head
  config.label_blend = "learned"  # "learned", or a fixed weight in [0, 1].
  config.text_encoder = ""  # "": offline all-MiniLM-L6-v2; else an HF id or directory.
  config.prompt = "a photo of a {}."
  config.init_temperature = 0.1  # Of the cosine logits; learned from here.
  return config


def no_label_config() -> ml_collections.ConfigDict:
  """`moe_no_label`: `moe` without the label-space head."""
  return default_config(label_head=False)


def feature_gate_config() -> ml_collections.ConfigDict:
  """`feature_gate`: `moe_no_label` whose gate sees the features, not the thumbnail."""
  return default_config(label_head=False, gate="features")


def blend_of(value) -> float | None:
  """`label_blend` as None (learned) or a fixed weight in [0, 1]."""
  if isinstance(value, str) and value.strip().lower() == "learned":
    return None
  try:
    weight = float(value)
  except (TypeError, ValueError):
    weight = float("nan")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"label_blend={value!r} must be 'learned' or a number in [0, 1].")
  return weight


def validate_config(config) -> None:
  linear_probe.validate_config(config)
  if config.level not in LEVELS:
    raise ValueError(f"Unknown level {config.level!r}; valid: {LEVELS}.")
  if config.gate not in GATES:
    raise ValueError(f"Unknown gate {config.gate!r}; valid: {GATES}.")
  size = config.thumbnail_size
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"thumbnail_size={size!r} must be a positive int (e.g. 8, 16, 32).")
  if not config.gate_widths or min(config.gate_widths) < 1:
    raise ValueError(f"gate_widths={tuple(config.gate_widths)} must be positive ints.")
  if int(config.gate_hidden) < 0 or int(config.width) < 1:
    raise ValueError(f"gate_hidden={config.gate_hidden} must be >= 0 and "
                     f"width={config.width} >= 1.")
  if config.label_head:
    blend_of(config.label_blend)
    if not config.init_temperature > 0:
      raise ValueError(f"init_temperature={config.init_temperature} must be > 0.")
    if config.prompt.count("{}") != 1:
      raise ValueError(f"prompt={config.prompt!r} needs exactly one '{{}}' for the class "
                       "name, e.g. 'a photo of a {}.'.")


# ------------------------------------------------------------- label space


def class_names(task) -> tuple[str, ...]:
  """The task's class names, or a clear error where it has none."""
  try:
    names = tuple(str(n) for n in task.class_names)
  except Exception as e:  # TFDS builders fail in many ways; all mean "no names".
    raise ValueError(
        f"Task {task.name!r} has no class names ({type(e).__name__}: {e}); the label-space "
        "head embeds one name per class. Give the Task `label_names`, or turn the head "
        "off (label_head=False, e.g. method moe_no_label).") from e
  if len(names) != task.num_classes or not all(n.strip() for n in names) or \
      len(set(names)) != len(names):
    raise ValueError(f"Task {task.name!r}: the label-space head needs {task.num_classes} "
                     f"distinct non-empty class names; got {names}.")
  return names


@functools.lru_cache(maxsize=4)
def text_encoder(spec: str = "") -> hub.Backbone:
  """The text encoder of `spec` ("" = the offline all-MiniLM-L6-v2), loaded once."""
  return hub.load({"path": spec or hub.text_encoder_dir(), "kind": "text",
                   "name": "text_encoder"})


@functools.lru_cache(maxsize=64)
def class_embeddings(names: tuple[str, ...], prompt: str = "a photo of a {}.",
                     encoder: str = "") -> np.ndarray:
  """[C, E] unit-norm embeddings of `prompt` filled with each name (_ read as space)."""
  texts = [prompt.replace("{}", n.replace("_", " ")) for n in names]
  emb = hub.embed_texts(text_encoder(encoder), texts, normalize=True)
  emb.setflags(write=False)  # Shared through the cache.
  return emb


def cosine_logits(v: jax.Array, class_emb: jax.Array, log_temperature: jax.Array) -> jax.Array:
  """cos(v, class_emb[c]) / exp(log_temperature): [B, E] x [C, E] -> [B, C]."""
  v = v * jax.lax.rsqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)
  e = class_emb * jax.lax.rsqrt(jnp.sum(class_emb * class_emb, -1, keepdims=True) + 1e-12)
  return (v @ e.T) * jnp.exp(-log_temperature)


def mix(log_probs: jax.Array, log_weights: jax.Array) -> jax.Array:
  """log sum_k w_k p_k over axis -2: [..., K, C] log-probs, [..., K] log-weights."""
  return jax.nn.logsumexp(log_probs + log_weights[..., None], axis=-2)


# ------------------------------------------------------------------- model


class GatedFusion(nn.Module):
  """Per-model features (+ thumbnails) -> {"log_probs" [B, C], "gate" [B, M], "blend"}.

  `gate="fixed"` takes the gate weights as an input (an ablation, and how a
  test freezes the gate); class embeddings are an input too (constants).
  """
  num_classes: int
  num_models: int
  level: str = "feature"
  gate: str = "thumbnail"
  gate_widths: tuple[int, ...] = (16, 32)
  gate_hidden: int = 0
  width: int = 64
  label_head: bool = False
  label_blend: float | None = None  # None: learned.
  init_temperature: float = 0.1

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], thumbnails=None, class_emb=None,
               gate_weights=None) -> dict[str, jax.Array]:
    if len(xs) != self.num_models:
      raise ValueError(f"Expected features of {self.num_models} models, got {len(xs)}.")
    batch = xs[0].shape[0]
    if self.gate == "thumbnail":
      logits = routing.ThumbnailCNN(self.num_models, tuple(self.gate_widths),
                                    name="gate")(thumbnails)
    elif self.gate == "features":
      logits = routing.FeatureGate(self.num_models, self.gate_hidden,
                                   name="gate")(jnp.concatenate(xs, -1))
    elif self.gate == "fixed":
      logits = jnp.broadcast_to(jnp.log(gate_weights), (batch, self.num_models))
    else:
      raise ValueError(f"Unknown gate {self.gate!r}; valid: {GATES + ('fixed',)}.")
    weights = routing.dense_gate(logits)
    log_weights = jax.nn.log_softmax(logits, -1)

    if self.label_head:
      log_temperature = self.param(
          "log_temperature", lambda _: jnp.log(jnp.float32(self.init_temperature)))
      if self.label_blend is None:
        s = self.param("blend_logit", nn.initializers.zeros, ())
        log_a, log_1ma, blend = jax.nn.log_sigmoid(s), jax.nn.log_sigmoid(-s), jax.nn.sigmoid(s)
      else:
        blend = jnp.float32(self.label_blend)
        log_a, log_1ma = jnp.log(blend), jnp.log1p(-blend)

    def head(h, name):
      """Log-probs of one linear head (+ the label head, blended) on h."""
      z = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name=name)(h)
      lp = jax.nn.log_softmax(z, -1)
      if not self.label_head:
        return lp
      v = nn.Dense(class_emb.shape[-1], use_bias=False, name=f"label_proj{name[4:]}")(h)
      label_lp = jax.nn.log_softmax(cosine_logits(v, class_emb, log_temperature), -1)
      return mix(jnp.stack([lp, label_lp], -2), jnp.stack([log_1ma, log_a]))

    if self.level == "feature":
      projected = jnp.stack([nn.Dense(self.width, name=f"proj_{m}")(x)
                             for m, x in enumerate(xs)], -2)  # [B, M, W]
      fused = jnp.einsum("bm,bmw->bw", weights, projected)
      log_probs = head(fused, "head")
    elif self.level == "prediction":
      per_model = jnp.stack([head(x, f"head_{m}") for m, x in enumerate(xs)], -2)
      log_probs = mix(per_model, log_weights)  # [B, C]
    else:
      raise ValueError(f"Unknown level {self.level!r}; valid: {LEVELS}.")
    out = {"log_probs": log_probs, "gate": weights}
    if self.label_head:
      out["blend"] = blend
      out["temperature"] = jnp.exp(log_temperature)
    return out


def _inputs(model: GatedFusion, params, batch) -> dict[str, jax.Array]:
  consts = params["consts"]
  return model.apply({"params": params["params"]}, batch["x"], batch.get("thumbnails"),
                     consts.get("class_emb"), consts.get("gate_weights"))


@functools.lru_cache(maxsize=32)
def loss_fn_of(model: GatedFusion):
  """The trainer's loss_fn of `model`: one function per model, so one compiled step
  serves a whole learning-rate sweep."""
  def loss_fn(params, batch, rng):
    del rng
    log_probs = _inputs(model, params, batch)["log_probs"]
    loss = -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], -1))
    return loss, {"accuracy": jnp.mean(jnp.argmax(log_probs, -1) == batch["y"])}
  return loss_fn


@functools.lru_cache(maxsize=32)
def _apply_of(model: GatedFusion):
  return jax.jit(lambda params, batch: _inputs(model, params, batch))


# ---------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's inputs: each model's (raw) features, thumbnails, labels."""
  features: tuple[np.ndarray, ...]
  labels: np.ndarray
  thumbnails: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.labels)
    if any(len(f) != n for f in self.features) or (
        self.thumbnails is not None and len(self.thumbnails) != n):
      raise ValueError(f"Split inputs disagree on the number of examples: labels {n}, "
                       f"features {[len(f) for f in self.features]}, thumbnails "
                       f"{None if self.thumbnails is None else len(self.thumbnails)}.")


def model_of(config, num_classes: int, num_models: int, *, fixed_gate: bool = False
             ) -> GatedFusion:
  label = bool(config.label_head)
  return GatedFusion(
      num_classes=num_classes, num_models=num_models, level=config.level,
      gate="fixed" if fixed_gate else config.gate,
      gate_widths=tuple(int(w) for w in config.gate_widths),
      gate_hidden=int(config.gate_hidden), width=int(config.width), label_head=label,
      label_blend=blend_of(config.label_blend) if label else None,
      init_temperature=float(config.init_temperature))


def _standardized(train_split: Split, split: Split) -> dict[str, object]:
  """The model's inputs of `split`, standardised with `train_split`'s statistics."""
  xs = [linear_probe.Standardizer.fit(t)(x)
        for t, x in zip(train_split.features, split.features)]
  out = {"x": xs}
  if split.thumbnails is not None:
    out["thumbnails"] = np.asarray(split.thumbnails, np.float32)
  return out


def init_params(model: GatedFusion, inputs, *, seed: int, class_emb=None,
                gate_weights=None) -> dict:
  """{"params": trainable, "consts": class embeddings / fixed gate weights}."""
  consts = {}
  if class_emb is not None:
    consts["class_emb"] = jnp.asarray(class_emb, jnp.float32)
  if gate_weights is not None:
    consts["gate_weights"] = jnp.asarray(gate_weights, jnp.float32)
  one = jax.tree.map(lambda a: np.asarray(a)[:1], inputs)
  variables = _init_of(model)(jax.random.PRNGKey(seed), one, consts)
  return {"params": variables["params"], "consts": consts}


@functools.lru_cache(maxsize=32)
def _init_of(model: GatedFusion):
  """Jitted init: one compilation instead of one per operation."""
  return jax.jit(lambda rng, one, consts: model.init(
      rng, one["x"], one.get("thumbnails"), consts.get("class_emb"),
      consts.get("gate_weights")))


def fit(model: GatedFusion, train_split: Split, *, learning_rate: float, config, mesh,
        seed: int, class_emb=None, gate_weights=None, workdir=None,
        run_name: str = "moe") -> tuple[dict, callable]:
  """Trains `model` on `train_split`: (params, predict(split) -> model outputs)."""
  inputs = _standardized(train_split, train_split)
  y = np.asarray(train_split.labels, np.int32)
  batch_size = linear_probe._batch_size(len(y), config, mesh)

  def batch_fn(step: int):
    # As linear_probe.fit_head draws them: a pure function of (seed, step).
    idx = np.random.default_rng((seed, step)).choice(len(y), batch_size, replace=False)
    return {**jax.tree.map(lambda a: a[idx], inputs), "y": y[idx]}

  params = init_params(model, inputs, seed=seed, class_emb=class_emb,
                       gate_weights=gate_weights)
  opt = config.optimizer.to_dict()
  opt.update(learning_rate=learning_rate, total_steps=config.steps)
  state = train.train(loss_fn=loss_fn_of(model), params=params, batch_fn=batch_fn,
                      config=opt, mesh=mesh, num_steps=config.steps,
                      trainable={"params": True, "consts": False}, workdir=workdir,
                      seed=seed, run_name=run_name, checkpoint=False, progress=False)
  params = jax.tree.map(np.asarray, state.params)
  apply = _apply_of(model)

  def predict(split: Split) -> dict[str, np.ndarray]:
    """Outputs on `split`, in chunks of one size (one compilation for every split)."""
    inputs = _standardized(train_split, split)
    n = len(split.labels)
    chunks = []
    for start in range(0, n, PREDICT_CHUNK):
      chunk = jax.tree.map(lambda a: a[start:start + PREDICT_CHUNK], inputs)
      size = len(chunk["x"][0])
      chunk = jax.tree.map(lambda a: np.pad(a, [(0, PREDICT_CHUNK - size)] +
                                            [(0, 0)] * (a.ndim - 1)), chunk)
      out = jax.tree.map(np.asarray, apply(params, chunk))
      chunks.append({k: v[:size] if np.ndim(v) else v for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) if np.ndim(chunks[0][k])
            else chunks[0][k] for k in chunks[0]}
  return params, predict


def best_of(sweep: Sequence[tuple[float, Mapping[str, float]]]) -> float:
  """The learning rate of the best val200 accuracy; ties: lower NLL, then lower rate."""
  if not sweep:
    raise ValueError("Empty learning-rate sweep.")
  return min(sweep, key=lambda s: (-s[1]["val_accuracy"], s[1]["val_nll"], s[0]))[0]


def fit_predict_splits(splits: Mapping[str, Split], num_classes: int, config, *,
                       mesh, seed: int, class_emb=None, gate_weights=None,
                       workdir=None, run_name: str = "moe"
                       ) -> tuple[predictions.Predictions, dict, dict]:
  """Sweep on train800 / val200, retrain on train800val200, predict test.

  Returns (Predictions, fields, test outputs of the final model).
  """
  validate_config(config)
  num_models = len(splits["train800"].features)
  model = model_of(config, num_classes, num_models, fixed_gate=gate_weights is not None)
  if model.label_head and class_emb is None:
    raise ValueError("The label-space head needs class embeddings.")
  kwargs = dict(config=config, mesh=mesh, seed=seed, workdir=workdir,
                class_emb=class_emb if model.label_head else None,
                gate_weights=gate_weights)
  val = splits["val200"]
  sweep, val_logits = [], {}
  for lr in config.learning_rates:
    _, predict = fit(model, splits["train800"], learning_rate=lr,
                     run_name=f"{run_name}/lr={lr:g}", **kwargs)
    val_logits[lr] = predict(val)["log_probs"]
    sweep.append((lr, metrics.classification_metrics(val_logits[lr], val.labels, "val_")))
  lr = best_of(sweep)
  _, predict = fit(model, splits["train800val200"], learning_rate=lr,
                   run_name=f"{run_name}/final", **kwargs)
  test = predict(splits["test"])
  shifted = {s: predict(splits[s])["log_probs"] for s in ("test_shift",) if s in splits}
  preds = predictions.Predictions(
      {"val200": val_logits[lr], "test": test["log_probs"], **shifted},
      {"val200": val.labels, **{s: splits[s].labels for s in ("test", *shifted)}})
  batch = functools.partial(linear_probe._batch_size, config=config, mesh=mesh)
  fields = {"learning_rate": lr,
            "sweep": {f"{r:g}": m["val_accuracy"] for r, m in sweep},
            "train_steps": (len(sweep) + 1) * config.steps,
            "train_examples": config.steps * (
                len(sweep) * batch(len(splits["train800"].labels)) +
                batch(len(splits["train800val200"].labels)))}
  return preds, fields, test


def head_gflops(model: GatedFusion, inputs: Mapping[str, object], class_emb=None) -> float:
  """GFLOPs of the gate and heads for one input, from XLA's cost analysis (nothing runs)."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + np.shape(a)[1:], np.float32),
                     inputs)
  consts = {} if class_emb is None else {"class_emb": jnp.asarray(class_emb, jnp.float32)}
  params = jax.eval_shape(_init_of(model), jax.random.PRNGKey(0), one, consts)["params"]
  cost = jax.jit(lambda p, b: _inputs(model, p, b)).lower(
      {"params": params, "consts": consts}, one).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0)) / 1e9


def run_name_of(config, task_name: str) -> str:
  """e.g. moe[thumbnail,feature,label]/digits: metrics lines of variants kept apart."""
  parts = [config.gate, config.level] + (["label"] if config.label_head else [])
  return f"moe[{','.join(parts)}]/{task_name}"


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  validate_config(config)
  if len(members) < 2:
    raise ValueError(f"Gated fusion needs a hub of at least 2 models; got "
                     f"{[b.name for b in members]}. With one model, use linear_probe.")
  class_emb = None
  if config.label_head:
    class_emb = class_embeddings(class_names(task), config.prompt, config.text_encoder)
  splits = {}
  for s in SPLITS[:3] + experiment.test_splits(task):
    sets = [ctx.features(b, task, s) for b in members]
    thumbnails = None
    if config.gate == "thumbnail":
      th = features_lib.extract_thumbnails(
          task, s, int(config.thumbnail_size), batch_size=ctx.config.get("batch_size", 64),
          cache_dir=ctx.config.get("cache_dir") or None)
      sets_labels = [fs.labels for fs in sets] + [th.labels]
      thumbnails = th.images
    else:
      sets_labels = [fs.labels for fs in sets]
    if not all(np.array_equal(sets_labels[0], l) for l in sets_labels):
      raise ValueError(f"{task.name}/{s}: the models' cached features (and thumbnails) "
                       "disagree on the labels; their caches hold different examples.")
    splits[s] = Split(tuple(fs.features for fs in sets), sets[0].labels, thumbnails)

  names = [b.name for b in members]
  preds, fields, test = fit_predict_splits(
      splits, task.num_classes, config, mesh=ctx.mesh, seed=seed, class_emb=class_emb,
      workdir=ctx.workdir, run_name=run_name_of(config, task.name))
  fields["gate_mean_weight"] = dict(zip(names, map(float, test["gate"].mean(0))))
  if config.label_head:
    fields["label_blend_weight"] = float(test["blend"])
    fields["label_temperature"] = float(test["temperature"])
  model = model_of(config, task.num_classes, len(members))
  inputs = {"x": splits["test"].features}
  if splits["test"].thumbnails is not None:
    inputs["thumbnails"] = splits["test"].thumbnails
  gflops = (sum(hub.inference_gflops(b) for b in members) +
            head_gflops(model, inputs, class_emb if model.label_head else None))
  return predictions.Result(preds, members=tuple(names), inference_gflops=gflops,
                            train_steps=fields.pop("train_steps"),
                            train_examples=fields.pop("train_examples"), fields=fields)
