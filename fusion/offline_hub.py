"""The offline model hub: small HF Flax vision models pre-trained on this machine.

`build(config)` pre-trains every model of the recipe (`default_config()`) on
the procedural sources of `fusion.data.render`, saves each backbone with
`save_pretrained` (Flax weights, config.json, preprocessor_config.json) and
returns hub specs that `fusion.hub.load_hub` loads like any HF model. No
network, no GPU: the default recipe (11 models) builds in about 6 to 9 minutes on 2 CPU cores.

Layout, under `$FUSION_HOME/hub/<fingerprint of the recipe>/`:

  <name>/            a finished model: config.json, flax_model.msgpack,
                     source_head.npz (trained models: the pre-training head,
                     in fusion.hub's source-head format), preprocessor_config.json,
                     metrics.jsonl, hub_entry.json and COMPLETE (written last:
                     the sha256 of the weights and of the head).
  .work/<name>/      training in progress: orbax checkpoints, so a killed build
                     resumes mid-model; removed once the model is in place.
  manifest.json      one entry per model (architecture, source, paradigm,
                     seed, parameters, GFLOPs, pretext accuracy, build seconds).

A model is staged in a temporary directory and `os.replace`d into place only
when complete; a directory without a valid COMPLETE marker is rebuilt, never
trusted. The same recipe gives bit-identical weights (data, init and batch
order are pure functions of the recipe's seeds).

Paradigms:
  supervised  classify the source's labels (`union`: the labels of every
              source, one label space after another).
  rotation    self-supervised: predict which of 4 rotations (0/90/180/270
              degrees) was applied.
  random      no training: the architecture's own random init (a control).

The pre-training head is a separate Dense on the pooled features that
`fusion.hub` exposes for the architecture (e.g. ViT's CLS token, ResNet's
global average pool). It is saved next to the backbone as source_head.npz
(kernel [D, C], bias [C], label_names [C]: the source's class names, for
`union` "<source>/<class>" one source after another, for rotation the four
angles), so `hub.load` gives each trained model its `source_head`; the
random-init control has none.
"""
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

import fusion
from fusion import hub
from fusion import io
from fusion import sharding
from fusion import train
from fusion import workers as workers_lib

FORMAT_VERSION = 2  # Part of the fingerprint: bump when the build changes its output.
IMAGE_SIZE = 32
UNION = "union"
NO_SOURCE = "none"  # The source of a random-init control.
PARADIGMS = ("supervised", "rotation", "random")
MODEL_KEYS = ("name", "arch", "size", "source", "paradigm", "seed", "steps")
WEIGHTS = "flax_model.msgpack"
SOURCE_HEAD = hub.SOURCE_HEAD
ROTATION_LABELS = ("rotated_0", "rotated_90", "rotated_180", "rotated_270")
COMPLETE = "COMPLETE"
ENTRY = "hub_entry.json"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# arch -> (transformers model class, config class, model kwargs, config defaults).
# Sizes in a recipe override the defaults; every model sees 32x32 RGB images.
ARCHS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "vit": ("FlaxViTModel", "ViTConfig", {"add_pooling_layer": False},
            dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=96, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=192)),
    "dinov2": ("FlaxDinov2Model", "Dinov2Config", {},
               dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=96, num_hidden_layers=4,
                    num_attention_heads=4, mlp_ratio=2)),
    "beit": ("FlaxBeitModel", "BeitConfig", {},
             dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=96, num_hidden_layers=4,
                  num_attention_heads=4, intermediate_size=192, use_mean_pooling=True)),
    "resnet": ("FlaxResNetModel", "ResNetConfig", {},
               dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                    layer_type="basic")),
    "regnet": ("FlaxRegNetModel", "RegNetConfig", {},
               dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                    groups_width=16, layer_type="y")),
}
_CNNS = ("resnet", "regnet")


def _model(name, arch, source, paradigm, seed, steps, **size) -> dict[str, Any]:
  return dict(name=name, arch=arch, size=size, source=source, paradigm=paradigm,
              seed=seed, steps=steps)


def default_config(seed: int = 0) -> ml_collections.ConfigDict:
  """The recipe of the embedded hub: 11 models, about 6 to 9 minutes on 2 CPU cores.

  `seed` shifts every model's seed (the seed twins stay one apart).
  """
  config = ml_collections.ConfigDict()
  config.data_seed = 0  # Seed of the rendered source images.
  config.train_examples = 8192  # Per source; images [0, train_examples).
  config.eval_examples = 512  # Per source, held out: the next eval_examples images.
  config.batch_size = 128
  config.checkpoint_every = 100  # Steps; a killed build resumes from here.
  config.optimizer = ml_collections.ConfigDict(dict(
      optimizer="adamw", learning_rate=2e-3, weight_decay=0.05, schedule="cosine",
      warmup_steps=30, grad_clip_norm=1.0))
  config.models = (
      _model("resnet_glyphs", "resnet", "glyphs", "supervised", 0, 350),
      # Seed twins of resnet_glyphs (member 0): the source ensemble of the shift method.
      _model("resnet_glyphs_seed1", "resnet", "glyphs", "supervised", 1, 350),
      _model("resnet_glyphs_seed2", "resnet", "glyphs", "supervised", 2, 350),
      _model("resnet_glyphs_seed3", "resnet", "glyphs", "supervised", 3, 350),
      _model("resnet_shapes", "resnet", "shapes", "supervised", 0, 300),
      _model("dinov2_textures", "dinov2", "textures", "supervised", 0, 250),
      _model("dinov2_textures_seed1", "dinov2", "textures", "supervised", 1, 250),
      _model("resnet_scenes", "resnet", "scenes", "supervised", 0, 300),
      _model("vit_union", "vit", UNION, "supervised", 0, 500),
      _model("resnet_rotation", "resnet", UNION, "rotation", 0, 350),
      _model("vit_random", "vit", NO_SOURCE, "random", 0, 0),
  )
  config.models = tuple({**m, "seed": m["seed"] + seed} for m in config.models)
  return config


# ------------------------------------------------------------------ recipe


def _sources() -> dict[str, Any]:
  """render.SOURCES, imported on use: `fusion.data` brings TensorFlow along."""
  from fusion.data import render
  return render.SOURCES


def _recipe(config) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"The offline hub config must be a ConfigDict or mapping; got "
                     f"{type(config).__name__}.")
  return json.loads(json.dumps(config))  # Plain JSON types: tuples become lists.


def validate(config) -> dict[str, Any]:
  """The recipe as plain JSON types; ValueError naming any bad entry."""
  recipe = _recipe(config)
  needed = ("data_seed", "train_examples", "eval_examples", "batch_size",
            "checkpoint_every", "optimizer", "models")
  missing = [k for k in needed if k not in recipe]
  if missing:
    raise ValueError(f"Offline hub config lacks {missing}; see offline_hub.default_config().")
  for key in ("train_examples", "eval_examples", "batch_size", "checkpoint_every"):
    if not isinstance(recipe[key], int) or recipe[key] < 1:
      raise ValueError(f"Offline hub config: {key}={recipe[key]!r} must be an int >= 1.")
  train.parse_config(recipe["optimizer"], 1)  # Its own clear errors.
  if not recipe["models"]:
    raise ValueError("Offline hub config: `models` is empty; give at least one model.")
  names = []
  sources = (*_sources(), UNION)
  for entry in recipe["models"]:
    if not isinstance(entry, Mapping):
      raise ValueError(f"Offline hub model entries are dicts with keys {MODEL_KEYS}; "
                       f"got {entry!r}.")
    keys = set(entry)
    if keys != set(MODEL_KEYS):
      raise ValueError(f"Offline hub model {entry.get('name')!r}: missing keys "
                       f"{sorted(set(MODEL_KEYS) - keys)}, unknown keys "
                       f"{sorted(keys - set(MODEL_KEYS))}; valid keys: {MODEL_KEYS}.")
    name = entry["name"]
    where = f"Offline hub model {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f"Offline hub model name {name!r} must match {_NAME.pattern} "
                       "(it names a directory).")
    names.append(name)
    if entry["arch"] not in ARCHS:
      raise ValueError(f"{where}: unknown arch {entry['arch']!r}; valid: {sorted(ARCHS)}.")
    if entry["paradigm"] not in PARADIGMS:
      raise ValueError(f"{where}: unknown paradigm {entry['paradigm']!r}; valid: "
                       f"{PARADIGMS}.")
    if entry["paradigm"] == "random":
      if entry["source"] != NO_SOURCE or entry["steps"] != 0:
        raise ValueError(f"{where}: paradigm 'random' trains on nothing: it needs "
                         f"source={NO_SOURCE!r} and steps=0; got source="
                         f"{entry['source']!r}, steps={entry['steps']!r}.")
    else:
      if entry["source"] not in sources:
        raise ValueError(f"{where}: unknown source {entry['source']!r}; valid: "
                         f"{sorted(sources)} ({NO_SOURCE!r} only for paradigm 'random').")
      if not isinstance(entry["steps"], int) or entry["steps"] < 1:
        raise ValueError(f"{where}: steps={entry['steps']!r} must be an int >= 1 for "
                         f"paradigm {entry['paradigm']!r}.")
    if not isinstance(entry["seed"], int) or entry["seed"] < 0:
      raise ValueError(f"{where}: seed={entry['seed']!r} must be an int >= 0.")
    if not isinstance(entry["size"], Mapping):
      raise ValueError(f"{where}: size must be a dict of {entry['arch']} config "
                       f"fields; got {entry['size']!r}.")
    _hf_config(entry["arch"], entry["size"], where)  # Unknown fields fail here.
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Duplicate offline hub model names {duplicates} in {names}; "
                     "give each model a distinct name.")
  return recipe


def fingerprint(config) -> str:
  """sha256 (16 hex digits) of the recipe: its cache directory's name."""
  recipe = validate(config)
  text = json.dumps({"format": FORMAT_VERSION, "recipe": recipe}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def hub_dir(config) -> str:
  """$FUSION_HOME/hub/<fingerprint>: where `build(config)` puts the hub."""
  return os.path.join(fusion.fusion_home(), "hub", fingerprint(config))


# ------------------------------------------------------------- architectures


def _hf_config(arch: str, size: Mapping[str, Any], where: str = "offline hub"):
  import transformers
  _, config_class, _, defaults = ARCHS[arch]
  cls = getattr(transformers, config_class)
  reference = cls()
  unknown = sorted(k for k in size if not hasattr(reference, k))
  if unknown:
    raise ValueError(f"{where}: unknown {config_class} fields {unknown} in size.")
  return cls(**{**defaults, **size})


@functools.lru_cache(maxsize=16)
def _architecture(arch: str, size_json: str):
  """(HF model wrapper without weights, a Backbone template) of an arch + size."""
  import transformers
  model_class, _, kwargs, _ = ARCHS[arch]
  config = _hf_config(arch, json.loads(size_json))
  extra = {"input_shape": (1, IMAGE_SIZE, IMAGE_SIZE, 3)} if arch in _CNNS else {}
  model = getattr(transformers, model_class)(config, _do_init=False, **kwargs, **extra)
  spec = hub.ARCHITECTURES[config.model_type]
  preprocess = hub.Preprocess(IMAGE_SIZE, spec.mean, spec.std)
  template = hub.Backbone(name=arch, module=model.module, params=None,
                          preprocess=preprocess, feature_dim=0, kind=hub.VISION,
                          architecture=spec.architecture, source="offline_hub")
  return model, template


@functools.lru_cache(maxsize=16)
def _init_fn(arch: str, size_json: str) -> Callable[[jax.Array], Any]:
  model, _ = _architecture(arch, size_json)
  shape = (1, IMAGE_SIZE, IMAGE_SIZE, 3) if arch in _CNNS else model.input_shape
  return jax.jit(lambda rng: model.init_weights(rng, shape))


def init_variables(arch: str, size: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """The architecture's own random init: the backbone's variables (numpy)."""
  params = _init_fn(arch, json.dumps(size, sort_keys=True))(jax.random.PRNGKey(seed))
  params = jax.tree.map(np.asarray, dict(params))
  return params if arch in _CNNS else {"params": params}


def _normalise(images: jax.Array, preprocess: hub.Preprocess) -> jax.Array:
  mean = jnp.asarray(preprocess.mean, jnp.float32)
  std = jnp.asarray(preprocess.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


@functools.lru_cache(maxsize=16)
def _loss_fn(arch: str, size_json: str, num_classes: int) -> train.LossFn:
  """Cross-entropy of a Dense head on the hub's pooled features (cached per arch)."""
  _, template = _architecture(arch, size_json)
  head = nn.Dense(num_classes)

  def loss_fn(params, batch, rng):
    images = _normalise(batch["image"], template.preprocess)
    feats, backbone = template.features_train(params["backbone"], images, rng)
    logits = head.apply(params["head"], feats)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"accuracy": accuracy}, {"backbone": backbone, "head": params["head"]})

  return loss_fn


@functools.lru_cache(maxsize=16)
def _predict_fn(arch: str, size_json: str, num_classes: int) -> Callable:
  _, template = _architecture(arch, size_json)
  head = nn.Dense(num_classes)

  def predict(params, images):
    feats = template.features(params["backbone"], _normalise(images, template.preprocess))
    return jnp.argmax(head.apply(params["head"], feats), -1)

  return jax.jit(predict)


# -------------------------------------------------------------------- data


@functools.lru_cache(maxsize=16)
def _render(source: str, start: int, stop: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  data = _sources()[source].render_range(start, stop, seed)
  return data["image"], data["label"].astype(np.int32)


def source_data(source: str, split: str, recipe: Mapping[str, Any]
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """(images uint8 [N,32,32,3], labels int32 [N], num_classes) of a source.

  `split` "train" is images [0, train_examples) of each source, "heldout"
  the next eval_examples. `union` concatenates every source, labels offset
  so that the label spaces follow one another.
  """
  n_train, n_eval = recipe["train_examples"], recipe["eval_examples"]
  start, stop = (0, n_train) if split == "train" else (n_train, n_train + n_eval)
  names = list(_sources()) if source == UNION else [source]
  images, labels, offset = [], [], 0
  for name in names:
    x, y = _render(name, start, stop, recipe["data_seed"])
    images.append(x)
    labels.append(y + offset)
    offset += _sources()[name].num_classes
  return np.concatenate(images), np.concatenate(labels), offset


def rotate(images: np.ndarray, k: np.ndarray) -> np.ndarray:
  """Each image [H, W, C] rotated by k * 90 degrees counter-clockwise."""
  out = np.empty_like(images)
  for quarter in range(4):
    rows = k == quarter
    out[rows] = np.rot90(images[rows], quarter, axes=(1, 2))
  return out


def pretext_batch(images: np.ndarray, labels: np.ndarray, paradigm: str,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The (image, target) pairs a paradigm trains on."""
  if paradigm == "rotation":
    k = rng.integers(0, 4, len(images)).astype(np.int32)
    return {"image": rotate(images, k), "label": k}
  return {"image": images, "label": labels}


def num_pretext_classes(paradigm: str, num_labels: int) -> int:
  return 4 if paradigm == "rotation" else num_labels


def pretext_label_names(source: str, paradigm: str) -> tuple[str, ...]:
  """Names of the pretext classes: the source's (`union`: "<source>/<class>"
  of every source in turn, as `source_data` offsets them) or the 4 rotations."""
  if paradigm == "rotation":
    return ROTATION_LABELS
  if source == UNION:
    return tuple(f"{name}/{c}" for name, s in _sources().items() for c in s.class_names)
  return tuple(_sources()[source].class_names)


def heldout_pretext(entry: Mapping[str, Any], recipe: Mapping[str, Any]
                    ) -> dict[str, np.ndarray]:
  """The held-out (image, target) pairs `pretext_accuracy` is measured on."""
  images, labels, _ = source_data(entry["source"], "heldout", recipe)
  return pretext_batch(images, labels, entry["paradigm"],
                       np.random.default_rng((entry["seed"], 2**31)))


def make_batch_fn(images: np.ndarray, labels: np.ndarray, *, paradigm: str,
                  batch_size: int, seed: int) -> Callable[[int], dict[str, np.ndarray]]:
  """step -> batch: a pure function of (seed, step), so a resumed run sees the same data."""
  def batch_fn(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((seed, step))
    idx = rng.choice(len(images), batch_size, replace=False)
    return pretext_batch(images[idx], labels[idx], paradigm, rng)
  return batch_fn


# ------------------------------------------------------------ one model


def is_complete(directory: str) -> bool:
  """Whether `directory` holds a finished model: COMPLETE matches its weights
  (and its source head, where it lists one)."""
  try:
    with open(os.path.join(directory, COMPLETE)) as f:
      marker = json.load(f)
    return (os.path.isfile(os.path.join(directory, ENTRY)) and WEIGHTS in marker and
            set(marker) <= {WEIGHTS, SOURCE_HEAD} and
            all(marker[name] == io.sha256_file(os.path.join(directory, name))
                for name in marker))
  except (OSError, ValueError, AttributeError, TypeError):
    return False


def _read_entry(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, ENTRY)) as f:
    return json.load(f)


def _pretext_accuracy(params, entry, recipe, predict) -> float:
  batch = heldout_pretext(entry, recipe)
  correct = 0
  for start in range(0, len(batch["label"]), 256):
    pred = predict(params, batch["image"][start:start + 256])
    correct += int(np.sum(np.asarray(pred) == batch["label"][start:start + 256]))
  return correct / len(batch["label"])


def _pretrain(entry: Mapping[str, Any], recipe: Mapping[str, Any], variables,
              work: str, mesh) -> tuple[Any, Any, float | None]:
  """(trained backbone variables, head params {"kernel", "bias"} or None for
  the random control, held-out pretext accuracy); checkpoints in `work`."""
  if entry["paradigm"] == "random":
    return variables, None, None
  size_json = json.dumps(entry["size"], sort_keys=True)
  images, labels, num_labels = source_data(entry["source"], "train", recipe)
  num_classes = num_pretext_classes(entry["paradigm"], num_labels)
  _, template = _architecture(entry["arch"], size_json)
  feature_dim = jax.eval_shape(
      template.features, variables,
      jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)).shape[-1]
  head = nn.Dense(num_classes).init(jax.random.PRNGKey(entry["seed"] + 1),
                                    jnp.zeros((1, feature_dim), jnp.float32))
  params = {"backbone": variables, "head": jax.tree.map(np.asarray, head)}
  trainable = {"backbone": {k: k == "params" for k in variables}, "head": True}
  batch_fn = make_batch_fn(images, labels, paradigm=entry["paradigm"],
                           batch_size=recipe["batch_size"], seed=entry["seed"])
  state = train.train(
      loss_fn=_loss_fn(entry["arch"], size_json, num_classes), params=params,
      batch_fn=batch_fn, config=recipe["optimizer"], mesh=mesh, num_steps=entry["steps"],
      workdir=work, seed=entry["seed"], trainable=trainable, run_name=entry["name"],
      checkpoint=True, checkpoint_dir=os.path.join(work, "checkpoints"),
      checkpoint_every=recipe["checkpoint_every"], max_to_keep=1, progress=True)
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  accuracy = _pretext_accuracy(params, entry, recipe,
                               _predict_fn(entry["arch"], size_json, num_classes))
  return params["backbone"], params["head"]["params"], accuracy


def _save(entry, variables, head, directory: str) -> None:
  """save_pretrained + preprocessor_config.json of the backbone into `directory`,
  and the pre-training head (if any) as source_head.npz."""
  import transformers
  model, template = _architecture(entry["arch"], json.dumps(entry["size"], sort_keys=True))
  params = variables if entry["arch"] in _CNNS else variables["params"]
  model.save_pretrained(directory, params=params)
  if head is not None:
    names = pretext_label_names(entry["source"], entry["paradigm"])
    with open(os.path.join(directory, SOURCE_HEAD), "wb") as f:
      np.savez(f, kernel=np.asarray(head["kernel"], np.float32),
               bias=np.asarray(head["bias"], np.float32), label_names=np.asarray(names, str))
  pre = template.preprocess
  transformers.ViTImageProcessor(
      do_resize=True, size={"height": pre.resolution, "width": pre.resolution},
      image_mean=list(pre.mean), image_std=list(pre.std)).save_pretrained(directory)


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def build_model(entry: Mapping[str, Any], recipe: Mapping[str, Any], root: str,
                mesh) -> dict[str, Any]:
  """Builds one model into `root/<name>` (resuming from `root/.work/<name>`)."""
  name = entry["name"]
  target = os.path.join(root, name)
  work = os.path.join(root, ".work", name)
  os.makedirs(work, exist_ok=True)
  seconds_file = os.path.join(work, "seconds.json")  # Time of earlier, killed attempts.
  earlier = 0.0
  if os.path.isfile(seconds_file):
    with open(seconds_file) as f:
      earlier = float(json.load(f)["seconds"])
  t0 = time.time()
  try:
    variables = init_variables(entry["arch"], entry["size"], entry["seed"])
    variables, head, accuracy = _pretrain(entry, recipe, variables, work, mesh)
    staging = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
      _save(entry, variables, head, staging)
      if os.path.isfile(os.path.join(work, "metrics.jsonl")):
        shutil.copy(os.path.join(work, "metrics.jsonl"), staging)
      backbone = hub.load({"name": name, "path": staging})  # The real loader.
      result = {
          **{k: entry[k] for k in ("name", "arch", "source", "paradigm", "seed", "steps")},
          "size": dict(entry["size"]),
          "architecture": backbone.architecture,
          "feature_dim": backbone.feature_dim,
          "parameters": _count(backbone.params.get("params", backbone.params)),
          "inference_gflops": hub.inference_gflops(backbone),
          "pretext_accuracy": accuracy,
          "source_head_classes": (None if backbone.source_head is None
                                  else backbone.source_head.num_classes),
          "build_seconds": round(earlier + time.time() - t0, 2),
      }
      io.write_atomic(os.path.join(staging, ENTRY), json.dumps(result, indent=1))
      checked = [WEIGHTS] + ([SOURCE_HEAD] if head is not None else [])
      io.write_atomic(os.path.join(staging, COMPLETE), json.dumps(
          {f: io.sha256_file(os.path.join(staging, f)) for f in checked}))
      if is_complete(target):  # Another process finished it meanwhile: keep theirs.
        shutil.rmtree(staging)
        result = _read_entry(target)
      else:
        if os.path.exists(target):  # Untrusted leftovers.
          shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  except BaseException:
    io.write_atomic(seconds_file, json.dumps({"seconds": earlier + time.time() - t0}))
    raise
  shutil.rmtree(work, ignore_errors=True)
  return result


# -------------------------------------------------------------------- hub


def _specs(recipe, root) -> list[dict[str, str]]:
  return [{"name": m["name"], "path": os.path.join(root, m["name"])} for m in recipe["models"]]


def _build_one(job) -> str:
  """A worker's job: one model of the recipe, built into `root` (see build_model)."""
  entry, recipe, root = job
  try:
    directory = os.path.join(root, entry["name"])
    if os.path.exists(directory) and not is_complete(directory):
      logging.warning("Rebuilding %s: incomplete or corrupt.", directory)
      shutil.rmtree(directory)
    if not is_complete(directory):
      build_model(entry, recipe, root, sharding.make_mesh())
  except Exception as e:
    raise workers_lib.job_error(f"offline hub model {entry['name']!r}", e) from e
  return entry["name"]


def _build_in_workers(recipe, root: str, workers: int) -> None:
  """Builds the recipe's unfinished models in `workers` processes, the most
  pre-training steps first; `build`'s own loop then finds them complete."""
  todo = [m for m in recipe["models"] if not is_complete(os.path.join(root, m["name"]))]
  if workers < 2 or len(todo) < 2:
    return
  todo.sort(key=lambda m: -m["steps"])  # Stable: recipe order among equals.
  jobs = [(entry, recipe, root) for entry in todo]
  processes = min(workers, len(jobs))
  with workers_lib.pool(processes) as pool, tqdm.tqdm(
      total=len(jobs), desc=f"offline hub: models in {processes} processes",
      unit="model") as bar:
    for name in pool.imap_unordered(_build_one, jobs):
      bar.set_postfix(model=name)
      bar.update()


def build(config, workers: int = 1) -> list[dict[str, str]]:
  """Builds the hub of `config` (or finds it built); its specs, in recipe order.

  Finished models are kept: an interrupted build resumes with the first
  unfinished model, from its last checkpoint. `workers` > 1 (the job's
  `config.workers`) builds the unfinished models in that many processes first;
  the weights and the manifest (but for `build_seconds`) are the same.
  """
  recipe = validate(config)
  root = hub_dir(config)
  manifest = os.path.join(root, MANIFEST)
  names = [m["name"] for m in recipe["models"]]
  if os.path.isfile(manifest) and all(is_complete(os.path.join(root, n)) for n in names):
    return _specs(recipe, root)
  os.makedirs(root, exist_ok=True)
  io.write_atomic(os.path.join(root, "recipe.json"), json.dumps(recipe, indent=1))
  _build_in_workers(recipe, root, workers_lib.check(workers))
  mesh = sharding.make_mesh()
  entries = []
  bar = tqdm.tqdm(recipe["models"], desc="offline hub", unit="model")
  for entry in bar:
    directory = os.path.join(root, entry["name"])
    bar.set_postfix(model=entry["name"])
    if is_complete(directory):
      entries.append(_read_entry(directory))
      continue
    if os.path.exists(directory):
      logging.warning("Rebuilding %s: incomplete or corrupt.", directory)
      shutil.rmtree(directory)
    entries.append(build_model(entry, recipe, root, mesh))
  bar.close()
  for leftover in os.listdir(root):  # Of builds killed mid-save.
    if leftover == ".work" or leftover.startswith(".tmp-"):
      shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
  io.write_atomic(manifest, json.dumps(
      {"fingerprint": os.path.basename(root), "format": FORMAT_VERSION,
       "recipe": recipe, "models": entries}, indent=1))
  return _specs(recipe, root)


def load_manifest(config) -> dict[str, Any]:
  """manifest.json of the built hub of `config`."""
  with open(os.path.join(hub_dir(config), MANIFEST)) as f:
    return json.load(f)


def manifest_table(entries: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: one row per model of the manifest."""
  def pct(v):
    return "–" if v is None else f"{100 * v:.1f}"
  lines = ["| model | architecture | source | paradigm | seed | steps | parameters | "
           "GFLOPs/image | pretext accuracy (%) | build seconds |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for e in entries:
    lines.append(f"| {e['name']} | {e['architecture']} | {e['source']} | {e['paradigm']} | "
                 f"{e['seed']} | {e['steps']} | {e['parameters']:,} | "
                 f"{e['inference_gflops']:.4f} | {pct(e['pretext_accuracy'])} | "
                 f"{e['build_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def run(config, workdir: str) -> str:
  """The build_hub job: builds the hub; manifest.json and results.md in `workdir`."""
  hub_config = config.offline_hub if config.get("offline_hub") is not None else config
  t0 = time.time()
  specs = build(hub_config, workers=config.get("workers") or 1)
  seconds = time.time() - t0
  manifest = load_manifest(hub_config)
  markdown = (f"# Offline hub\n\n{len(specs)} models in `{hub_dir(hub_config)}` "
              f"(this call: {seconds:.1f} s).\n\n" + manifest_table(manifest["models"]))
  io.write_atomic(os.path.join(workdir, MANIFEST), json.dumps(manifest, indent=1))
  io.write_atomic(os.path.join(workdir, "results.md"), markdown)
  return markdown
