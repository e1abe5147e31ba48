"""Gates: per-input weights over the M models of a hub.

A gate maps an input to logits over the models; `dense_gate` turns them into
softmax weights (each row sums to 1). Two gate networks:

- `ThumbnailCNN`: a miniature CNN that sees only a small thumbnail of the
  image ([B, t, t, 3], e.g. 16x16), the gate of Resheff et al., "All Together
  Now! The Benefits of Adaptively Fusing Pre-trained Deep Representations"
  (ICPRAM 2019). Each width is a 3x3 conv + ReLU + 2x2 average pool; then a
  global average pool and a Dense layer to M logits.
- `FeatureGate`: a linear layer (or a one-hidden-layer MLP) on the
  concatenated standardised features of the models.

Both initialise their output layer at zero, so every gate starts uniform
(1/M per model) and learns to depart from it. Flax linen modules: compose them
into larger models (gated fusion, Hub-Pathway) or use them alone.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def dense_gate(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Softmax weights over the last axis (the models): [..., M], rows sum to 1."""
  if temperature <= 0:
    raise ValueError(f"Gate temperature must be > 0, got {temperature}.")
  return jax.nn.softmax(logits / temperature, axis=-1)


def conv_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """LeCun normal for a conv kernel [kh, kw, in, out], drawn as its [kh * kw * in, out]
  matrix: the same distribution (fan-in kh * kw * in), but XLA on the CPU compiles
  random draws of 4-D shapes about ten times slower than of 2-D ones."""
  fan_in = int(np.prod(shape[:-1]))
  return nn.initializers.lecun_normal()(key, (fan_in, shape[-1]), dtype).reshape(shape)


def _check_num_models(num_models: int) -> None:
  if num_models < 1:
    raise ValueError(f"A gate needs num_models >= 1, got {num_models}.")


class ThumbnailCNN(nn.Module):
  """Thumbnails [B, t, t, 3] -> gate logits [B, num_models].

  Attributes:
    num_models: M, the number of outputs.
    widths: channels of the conv layers, one 3x3 conv + ReLU + 2x2 average
      pool each (a pool is skipped once the map is 1x1).
  """
  num_models: int
  widths: Sequence[int] = (16, 32)

  @nn.compact
  def __call__(self, thumbnails: jax.Array) -> jax.Array:
    _check_num_models(self.num_models)
    if thumbnails.ndim != 4 or thumbnails.shape[-1] != 3:
      raise ValueError(f"ThumbnailCNN takes thumbnails [B, t, t, 3]; got shape "
                       f"{thumbnails.shape}.")
    x = thumbnails
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(int(width), (3, 3), padding="SAME", kernel_init=conv_kernel_init,
                          name=f"conv_{i}")(x))
      if x.shape[1] > 1 and x.shape[2] > 1:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_models, kernel_init=nn.initializers.zeros, name="out")(x)


class FeatureGate(nn.Module):
  """Concatenated features [B, D] -> gate logits [B, num_models].

  Attributes:
    num_models: M, the number of outputs.
    hidden: width of one ReLU hidden layer; 0: a linear gate.
  """
  num_models: int
  hidden: int = 0

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    _check_num_models(self.num_models)
    if features.ndim != 2:
      raise ValueError(f"FeatureGate takes features [B, D]; got shape {features.shape}.")
    x = features
    if self.hidden:
      x = nn.relu(nn.Dense(int(self.hidden), name="hidden")(x))
    return nn.Dense(self.num_models, kernel_init=nn.initializers.zeros, name="out")(x)
