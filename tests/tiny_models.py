"""Tiny HF Flax models of every architecture, saved with `save_pretrained`.

    from tests import tiny_models   # or `import tiny_models` inside tests/
    directory = tiny_models.save_tiny("vit", tmp_path / "vit")
    backbone = hub.load(directory)

Every architecture `fusion.hub` supports, built with the real HF Flax
classes at toy sizes (hidden 16, one or two layers, 32x32 images; BERT with a
~100-token WordPiece vocabulary and its tokenizer) in well under a second
each. Weights are drawn at a 1/sqrt(fan-in) scale so features vary with the
input, and biases, norm scales and BatchNorm statistics sit away from their
init values, so a test can tell whether a layer norm, bias or running
average is really applied.
"""
import os
from typing import Any

import jax
import numpy as np

IMAGE_SIZE = 32
VISION_ARCHITECTURES = ("vit", "beit", "clip", "clip_vision_model", "dinov2", "resnet", "regnet")
TEXT_ARCHITECTURES = ("bert",)
ARCHITECTURES = VISION_ARCHITECTURES + TEXT_ARCHITECTURES
# hub feature_dim of each (CLIP: its projection_dim).
FEATURE_DIMS = {**dict.fromkeys(ARCHITECTURES, 16), "clip": 12}

_VIT_LIKE = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=32)
_CNN = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
_WORDS = ("the a an is are was of to in on and with for cat dog car bird plane red blue "
          "green small big photo picture image sky tree house ship truck frog horse deer").split()


def _config(arch: str, overrides: dict[str, Any]):
  import transformers as tf
  if arch == "vit":
    return tf.ViTConfig(**{**_VIT_LIKE, **overrides})
  if arch == "beit":
    # Drop-path rates rise linearly from 0 at the first layer: two layers.
    return tf.BeitConfig(**{**_VIT_LIKE, "num_hidden_layers": 2, "drop_path_rate": 0.3,
                            **overrides})
  if arch == "dinov2":
    # HF's Flax DINOv2 never applies its drop path (its layers leave
    # `deterministic` at True); dropout is what training mode changes.
    return tf.Dinov2Config(**{**_VIT_LIKE, "mlp_ratio": 2, "drop_path_rate": 0.2,
                              "hidden_dropout_prob": 0.1, **overrides})
  if arch == "clip_vision_model":
    return tf.CLIPVisionConfig(**{**_VIT_LIKE, **overrides})
  if arch == "clip":
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16)
    vision = {**_VIT_LIKE, **overrides.pop("vision_config", {})}
    return tf.CLIPConfig(text_config=text, vision_config=vision,
                         **{"projection_dim": 12, **overrides})
  if arch == "resnet":
    return tf.ResNetConfig(**{**_CNN, "layer_type": "basic", **overrides})
  if arch == "regnet":
    return tf.RegNetConfig(**{**_CNN, "groups_width": 4, "layer_type": "y", **overrides})
  if arch == "bert":
    return tf.BertConfig(**{"vocab_size": 0, "hidden_size": 16, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "intermediate_size": 32,
                            "max_position_embeddings": 64, "hidden_dropout_prob": 0.1,
                            **overrides})
  raise ValueError(f"Unknown tiny architecture {arch!r}; valid: {ARCHITECTURES}.")


_MODEL_CLASSES = {
    "vit": "FlaxViTModel", "beit": "FlaxBeitModel", "clip": "FlaxCLIPModel",
    "clip_vision_model": "FlaxCLIPVisionModel", "dinov2": "FlaxDinov2Model",
    "resnet": "FlaxResNetModel", "regnet": "FlaxRegNetModel", "bert": "FlaxBertModel",
}
# `save_tiny(..., num_labels=C)`: the HF image classifier of the architecture.
CLASSIFIER_CLASSES = {
    "vit": "FlaxViTForImageClassification", "beit": "FlaxBeitForImageClassification",
    "dinov2": "FlaxDinov2ForImageClassification",
    "resnet": "FlaxResNetForImageClassification",
    "regnet": "FlaxRegNetForImageClassification",
}


def _random_params(shapes, seed: int):
  """Weights at a 1/sqrt(fan-in) scale; vectors offset from their init value.

  HF's own inits (std 0.01-0.02) leave toy models nearly constant in their
  input. Biases, norm scales and BatchNorm statistics move off 0 / 1 so a
  missing layer norm or running average shows. Drawn from shapes alone:
  no (slow, op-by-op) random init of the model.
  """
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  leaves = []
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) >= 2:
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    elif name.endswith("['var']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['scale']"):
      value = 1.0 + rng.normal(0.0, 0.1, leaf.shape)
    else:
      value = rng.normal(0.0, 0.1, leaf.shape)
    leaves.append(value.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _save_preprocessor(arch: str, directory: str, resolution: int) -> None:
  import transformers as tf
  if arch == "vit":
    proc = tf.ViTImageProcessor(size={"height": resolution, "width": resolution})
  elif arch == "beit":
    proc = tf.BeitImageProcessor(size={"height": resolution, "width": resolution},
                                 do_center_crop=False)
  elif arch in ("clip", "clip_vision_model"):
    proc = tf.CLIPImageProcessor(size={"shortest_edge": resolution},
                                 crop_size={"height": resolution, "width": resolution})
  elif arch == "dinov2":
    proc = tf.BitImageProcessor(size={"shortest_edge": resolution + 8},
                                crop_size={"height": resolution, "width": resolution},
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
  else:  # resnet, regnet
    proc = tf.ConvNextImageProcessor(size={"shortest_edge": resolution},
                                     image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225])
  proc.save_pretrained(directory)


def _save_tokenizer(directory: str) -> int:
  import transformers as tf
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *letters,
                              *("##" + c for c in letters), *".,!?'"]))
  vocab_file = os.path.join(directory, "vocab.txt")
  with open(vocab_file, "w") as f:
    f.write("\n".join(vocab) + "\n")
  tf.BertTokenizerFast(vocab_file=vocab_file, model_max_length=48).save_pretrained(directory)
  return len(vocab)


def save_tiny(arch: str, directory: str | os.PathLike, seed: int = 0, *,
              preprocessor: bool = True, safe_serialization: bool = False,
              num_labels: int | None = None, max_shard_size: str | None = None,
              **overrides: Any) -> str:
  """Builds a tiny `arch` model, saves it (+ processor/tokenizer) to `directory`.

  `overrides` go to the HF config. `preprocessor=False` leaves out
  preprocessor_config.json (vision); `safe_serialization=True` writes
  model.safetensors (Flax format) instead of flax_model.msgpack.
  `num_labels=C` saves the architecture's `...ForImageClassification` (a
  C-way classifier on top, class names "class_0", ...) instead of the base model;
  `max_shard_size` (e.g. "20KB") shards flax_model.msgpack.
  """
  import transformers as tf
  if arch not in ARCHITECTURES:
    raise ValueError(f"Unknown tiny architecture {arch!r}; valid: {ARCHITECTURES}.")
  if num_labels is not None:
    if arch not in CLASSIFIER_CLASSES:
      raise ValueError(f"No tiny image classifier for {arch!r}; valid: "
                       f"{sorted(CLASSIFIER_CLASSES)}.")
    overrides.update(num_labels=num_labels,
                     id2label={i: f"class_{i}" for i in range(num_labels)},
                     label2id={f"class_{i}": i for i in range(num_labels)})
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  overrides = dict(overrides)
  if arch == "bert":
    overrides.setdefault("vocab_size", _save_tokenizer(directory))
  config = _config(arch, overrides)
  classes = _MODEL_CLASSES if num_labels is None else CLASSIFIER_CLASSES
  model_class = getattr(tf, classes[arch])
  kwargs = {}
  if arch in ("resnet", "regnet"):  # Their wrappers default to 224x224 at init.
    kwargs["input_shape"] = (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  model = model_class(config, _do_init=False, **kwargs)
  params = _random_params(model.params_shape_tree, seed)
  extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(directory, params=params, safe_serialization=safe_serialization,
                        **extra)
  if preprocessor and arch not in TEXT_ARCHITECTURES:
    image_size = getattr(getattr(config, "vision_config", config), "image_size", IMAGE_SIZE)
    _save_preprocessor(arch, directory, image_size)
  return directory


def load_hf(directory: str | os.PathLike, arch: str, classifier: bool = False):
  """(HF wrapper model, its params), for reference forward passes;
  `classifier=True`: the architecture's `...ForImageClassification`."""
  import transformers as tf
  classes = CLASSIFIER_CLASSES if classifier else _MODEL_CLASSES
  model, params = getattr(tf, classes[arch]).from_pretrained(
      os.fspath(directory), _do_init=False)  # No random init at 224x224.
  return model, params


def save_pytorch_format(directory: str | os.PathLike) -> str:
  """Rewrites a saved tiny vit / resnet as PyTorch-format model.safetensors.

  Without torch: Flax names and layouts mapped the way transformers' PyTorch
  -> Flax converter maps them back (Dense kernels transposed, convolution
  kernels HWIO -> OIHW, norm `scale` -> `weight`, BatchNorm `mean` / `var`
  -> `running_mean` / `running_var`). The Flax weights file is removed.
  """
  from flax.serialization import msgpack_restore
  from flax.traverse_util import flatten_dict
  from safetensors.numpy import save_file
  directory = os.fspath(directory)
  path = os.path.join(directory, "flax_model.msgpack")
  with open(path, "rb") as f:
    flat = flatten_dict(msgpack_restore(f.read()))
  state = {}
  for key, value in flat.items():
    key = key[1:] if key[0] in ("params", "batch_stats") else key
    *module, leaf = key
    value = np.asarray(value)
    if leaf == "kernel":
      leaf, value = "weight", (value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1))
    elif leaf == "scale":
      leaf = "weight"
    elif leaf in ("mean", "var"):
      leaf = "running_" + leaf
    state[".".join([*module, leaf])] = np.ascontiguousarray(value)
  save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  os.remove(path)
  return directory
