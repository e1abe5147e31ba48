"""The reference model that RSA / DDS / CKA compare hub models with.

Dwivedi & Roig (CVPR 2019) rank pre-trained models by how similar their
representation of the target task's images is to that of a small model trained
on the target task itself. Ours:

  * a 3-layer CNN trained from pixels (32 x 32 by default) on the task's
    train800 with the project's trainer (AdamW, cosine decay, a few hundred
    steps: seconds on a CPU);
  * its representation is the hidden layer before the ReLU (RSA's 1 - Pearson
    needs variance inside each example's vector, and a post-ReLU vector can be
    all zeros), taken on val200: examples it was not trained on, so its RDM
    says how the task's structure generalises instead of restating the labels.

Why not a linear head on a hub model's features (cheaper still): the reference
would then favour the model it was built on and its relatives. A CNN from
pixels knows the task and none of the hub. Its val200 accuracy is reported next
to the rankings, so a reference that learnt little is visible.
"""
import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fusion import sharding
from fusion import train

MEAN = STD = (0.5, 0.5, 0.5)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "train_split": "train800",
      "probe_split": "val200",
      "resolution": 32,
      "width": 32,         # channels of the first conv; doubled at each of the next two
      "hidden": 64,        # the representation's dimension
      "steps": 300,
      "batch_size": 64,
      "learning_rate": 3e-3,
      "weight_decay": 1e-4,
  })


class SmallCNN(nn.Module):
  """Three strided 3x3 convs, global average pooling, a hidden dense layer."""
  num_classes: int
  width: int = 32
  hidden: int = 64

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pre-ReLU hidden representation [B, hidden], logits [B, num_classes])."""
    x = images
    for i in range(3):
      x = nn.relu(nn.Conv(self.width * 2 ** i, (3, 3), strides=(2, 2))(x))
    representation = nn.Dense(self.hidden)(x.mean(axis=(1, 2)))
    return representation, nn.Dense(self.num_classes)(nn.relu(representation))


@dataclasses.dataclass(frozen=True)
class Reference:
  features: np.ndarray      # [N, hidden] float32 on the probe split
  labels: np.ndarray        # [N] int32
  probe_accuracy: float     # the CNN's top-1 on the probe split


def _check(cfg) -> None:
  for key in ("resolution", "width", "hidden", "steps", "batch_size"):
    if int(cfg[key]) != cfg[key] or cfg[key] < 1:
      raise ValueError(f"select.reference.{key}={cfg[key]!r} must be a positive integer.")
  if cfg.train_split == cfg.probe_split:
    raise ValueError(f"select.reference.train_split and probe_split are both "
                     f"{cfg.train_split!r}; the reference is compared on examples it "
                     "was not trained on (e.g. train800 / val200).")


def train_reference(task, cfg, *, seed: int, workdir: str | None = None,
                    data_dir: str | None = None) -> Reference:
  """Trains the reference CNN on `cfg.train_split`; its representation of `cfg.probe_split`.

  It trains on one local device: splitting 64-example batches of a net this
  small over several devices only adds communication."""
  from fusion.data import pipeline  # Only here: the rest of selection runs without TF.

  _check(cfg)
  load = lambda split: pipeline.load_split(task, split, resolution=cfg.resolution, mean=MEAN,
                                           std=STD, data_dir=data_dir)
  train_images, train_labels = load(cfg.train_split)
  probe_images, probe_labels = load(cfg.probe_split)
  model = SmallCNN(task.num_classes, width=cfg.width, hidden=cfg.hidden)
  params = jax.jit(model.init)(jax.random.key(seed), train_images[:1])  # op by op: seconds

  def loss_fn(params, batch, rng):
    del rng
    _, logits = model.apply(params, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  mesh = sharding.make_mesh(1, devices=jax.local_devices())
  batch_size = min(int(cfg.batch_size), len(train_labels))
  batch_fn = pipeline.array_batch_fn(train_images, train_labels, batch_size=batch_size,
                                     seed=seed)
  optimizer = {"optimizer": "adamw", "learning_rate": cfg.learning_rate,
               "weight_decay": cfg.weight_decay, "schedule": "cosine"}
  state = train.train(loss_fn=loss_fn, params=params, batch_fn=batch_fn, config=optimizer,
                      mesh=mesh, num_steps=int(cfg.steps), workdir=workdir, seed=seed,
                      run_name=f"select/reference/{task.name}", checkpoint=False,
                      progress=False)
  trained = jax.tree.map(np.asarray, state.params)
  representation, logits = jax.jit(model.apply)(trained, probe_images)
  accuracy = float(np.mean(np.argmax(logits, -1) == probe_labels))
  logging.info("reference CNN for %s: %s accuracy %.1f%%", task.name, cfg.probe_split,
               100 * accuracy)
  return Reference(np.asarray(representation, np.float32), probe_labels.astype(np.int32),
                   accuracy)
