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


# ------------------------------------------------------------- noisy top-k
#
# Hub-Pathway's sparse routing, after the noisy top-k gating of Shazeer et al.
# (2017) and V-MoE (google-research/vmoe): H = clean + eps * softplus(raw
# noise), eps ~ N(0, 1) while training; the top k of H per input, softmax over
# those k; importance and load balance as squared coefficients of variation
# over the batch; each model's inputs dispatched into a buffer of fixed
# capacity, in batch order, the overflow dropped and counted.


def check_top_k(k: int, num_models: int) -> None:
  if not 1 <= k <= num_models:
    raise ValueError(f"Top-k routing needs 1 <= k <= M = {num_models} models; got k={k}.")


GATE_NORMALISATIONS = ("all", "top_k")


def top_k_gates(logits: jax.Array, k: int, normalisation: str = "top_k"
                ) -> tuple[jax.Array, jax.Array]:
  """(gates [B, M], top-k indices [B, k]): each row's top k models keep a weight, 0 elsewhere.

  "top_k" (Shazeer et al.): softmax over the k chosen logits. "all" (V-MoE):
  the softmax over all M logits, kept at the k chosen. With k = 1, "top_k"
  gives weight 1 whatever the logits, so the task loss sends the router no
  gradient; "all" does.
  """
  check_top_k(k, logits.shape[-1])
  if normalisation not in GATE_NORMALISATIONS:
    raise ValueError(f"Gate normalisation {normalisation!r} is not one of "
                     f"{GATE_NORMALISATIONS}.")
  values, index = jax.lax.top_k(logits, k)
  if normalisation == "top_k":
    weights = jax.nn.softmax(values, axis=-1)
  else:
    weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), index, axis=-1)
  gates = jnp.sum(jax.nn.one_hot(index, logits.shape[-1], dtype=logits.dtype)
                  * weights[..., None], axis=-2)
  return gates, index


def learned_noise_std(raw_noise: jax.Array) -> jax.Array:
  """Shazeer et al.'s noise scale softplus(x W_noise); a floor keeps the load estimate finite."""
  return jax.nn.softplus(raw_noise) + 1e-2


def noisy_logits(clean: jax.Array, noise_std: jax.Array | float, rng: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array]:
  """(H, noise std [B, M]): H = clean + eps * noise_std, eps ~ N(0, 1); no rng: clean.

  `noise_std`: per entry (`learned_noise_std`), or one number for every entry
  (V-MoE's fixed 1/M).
  """
  noise_std = jnp.broadcast_to(jnp.asarray(noise_std, clean.dtype), clean.shape)
  if rng is None:
    return clean, noise_std
  return clean + jax.random.normal(rng, clean.shape, clean.dtype) * noise_std, noise_std


def cv_squared(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Squared coefficient of variation (population variance / mean^2) of a vector."""
  x = x.astype(jnp.float32)
  return jnp.var(x) / (jnp.mean(x) ** 2 + eps)


def importance_loss(gates: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """CV^2 of each model's summed gate weight over the batch (Shazeer et al., eq. 6-7)."""
  if valid is not None:
    gates = gates * valid[:, None]
  return cv_squared(jnp.sum(gates, axis=0))


def load_loss(clean: jax.Array, noisy: jax.Array, noise_std: jax.Array, k: int,
              valid: jax.Array | None = None) -> jax.Array:
  """CV^2 of each model's smooth load: sum over the batch of P(model in the top k).

  P is Shazeer et al.'s estimate (their eq. 8-10): the probability, under a
  fresh draw of this input's noise for that model alone, that its noisy logit
  beats the k-th largest of the other noisy logits. Zero when k = M.
  """
  num_models = clean.shape[-1]
  if k >= num_models:
    return jnp.zeros((), jnp.float32)
  top = jax.lax.top_k(noisy, k + 1)[0]
  threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
  is_in = noisy > threshold_if_in
  normal = jax.scipy.stats.norm.cdf
  prob = jnp.where(is_in, normal((clean - threshold_if_in) / noise_std),
                   normal((clean - threshold_if_out) / noise_std))
  if valid is not None:
    prob = prob * valid[:, None]
  return cv_squared(jnp.sum(prob, axis=0))


def capacity(k: int, batch_size: int, num_models: int, capacity_factor: float) -> int:
  """Buffer slots per model: ceil(k * B * capacity_factor / M), at most B."""
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0.")
  return int(min(batch_size, np.ceil(k * batch_size * capacity_factor / num_models)))


def dispatch(gates: jax.Array, slots: int, valid: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dispatch [B, M, C] 0/1, combine [B, M, C] gate weights, dropped count).

  Input b routed to model m (gate > 0) takes the next free slot of m's buffer,
  in batch order; past `slots` it is dropped: its dispatch and combine
  entries are 0, and it counts in `dropped` (routings lost, not inputs).
  Shapes are static: `slots` is a Python int.
  """
  routed = gates > 0
  if valid is not None:
    routed = routed & valid[:, None].astype(bool)
  position = jnp.cumsum(routed.astype(jnp.int32), axis=0) - 1
  kept = routed & (position < slots)
  dispatch_ = jax.nn.one_hot(jnp.where(kept, position, -1), slots, dtype=gates.dtype)
  combine = dispatch_ * gates[..., None]
  dropped = jnp.sum(routed & ~kept)
  return dispatch_, combine, dropped
