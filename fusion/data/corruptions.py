"""ImageNet-C-style corruptions for the shifted test split (`test_shift`).

Offline tasks have a `test_shift` split: the examples of `test`, in the same
order with the same labels, each under one procedural corruption of
CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; `make_cifar_c.py` of
hendrycks/robustness, whose parameters are for 32x32 images like ours):

  index % 3 == 0   Gaussian noise   x + N(0, (c * 255)^2) per pixel and channel
  index % 3 == 1   Gaussian blur    Gaussian filter of standard deviation c
                                    pixels over height and width, edges
                                    replicated (skimage's mode "nearest"),
                                    truncated at 4 standard deviations
  index % 3 == 2   contrast         (x - m) * c + m, m the per-channel mean
                                    over the image

where `index` is the example's 0-based position in the test split and `c` the
corruption's parameter at the fixed severity (`SEVERITIES`). Each result is
clipped to [0, 255]. One corruption per image (rather than ImageNet-C's one
copy of the test set per corruption) keeps a single shifted split of the
test split's size, a third under each corruption.

The corruption works on the decoded float32 image in [0, 255] (after the
task's `image_fn` and the grey -> RGB tile), before resizing and
normalisation. It is a pure function of (image, index, severity, seed): the
noise comes from `tf.random.stateless_normal` seeded by (seed, index), never
from a global random state, so every load gives the same split.
"""
import dataclasses
import hashlib
import inspect
import sys

import tensorflow as tf

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")
# CIFAR-10-C's parameter of each corruption at severities 1..5.
SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # Noise std, fraction of 255.
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # Filter std in pixels.
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # Contrast factor.
}
BLUR_TRUNCATE = 4.0  # Kernel radius: int(truncate * sigma + 0.5), as scipy/skimage.
SHIFT_SPLIT = "test_shift"


def gaussian_noise(image: tf.Tensor, std: float, seed: tf.Tensor) -> tf.Tensor:
  """image + N(0, std^2) (std in [0, 255] units), clipped; `seed`: int32 [2]."""
  noise = tf.random.stateless_normal(tf.shape(image), seed=seed, dtype=tf.float32)
  return tf.clip_by_value(image + std * noise, 0.0, 255.0)


def _blur_matrix(size: tf.Tensor, sigma: float) -> tf.Tensor:
  """[size, size] matrix of the 1-D Gaussian filter with replicated edges."""
  radius = int(BLUR_TRUNCATE * sigma + 0.5)
  offsets = tf.range(-radius, radius + 1)
  weights = tf.exp(-0.5 * tf.cast(offsets, tf.float64) ** 2 / sigma ** 2)
  weights /= tf.reduce_sum(weights)
  # Output pixel i reads input pixel clip(i + k, 0, size - 1) with weight w[k].
  sources = tf.clip_by_value(tf.range(size)[:, None] + offsets[None, :], 0, size - 1)
  matrix = tf.reduce_sum(tf.one_hot(sources, size, dtype=tf.float64) *
                         weights[None, :, None], axis=1)
  return tf.cast(matrix, tf.float32)


def gaussian_blur(image: tf.Tensor, sigma: float) -> tf.Tensor:
  """Separable Gaussian filter over height and width of an [H, W, C] image."""
  shape = tf.shape(image)
  out = tf.einsum("ih,hwc->iwc", _blur_matrix(shape[0], sigma), image)
  out = tf.einsum("jw,iwc->ijc", _blur_matrix(shape[1], sigma), out)
  return tf.clip_by_value(out, 0.0, 255.0)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
  """(x - m) * factor + m with m the per-channel mean over the image, clipped."""
  mean = tf.reduce_mean(image, axis=(0, 1), keepdims=True)
  return tf.clip_by_value((image - mean) * factor + mean, 0.0, 255.0)


def _module_digest() -> str:
  """sha256 of this module's source: any change to a corruption changes it."""
  try:
    source = inspect.getsource(sys.modules[__name__])
  except (OSError, TypeError):  # No source (e.g. a zipped install).
    return "no-source"
  return hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Shift:
  """The corruption of a task's `test_shift` split (see the module docstring).

  Attributes:
    severity: 1..5, CIFAR-10-C's severity levels (`SEVERITIES`); fixed for
      every image.
    seed: base seed of the noise; example i's noise is seeded by (seed, i).
  """
  severity: int = 3
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.severity, int) or not 1 <= self.severity <= 5:
      raise ValueError(f"Shift severity must be an int in 1..5, got {self.severity!r}.")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 31:
      raise ValueError(f"Shift seed must be an int in [0, 2**31), got {self.seed!r}.")

  @property
  def params(self) -> dict[str, float]:
    """Each corruption's parameter at this severity."""
    return {name: SEVERITIES[name][self.severity - 1] for name in CORRUPTIONS}

  @property
  def fingerprint(self) -> str:
    """A key for what the corrupted images are (enters the features cache key)."""
    spec = {"corruptions": CORRUPTIONS, "severity": self.severity, "seed": self.seed,
            "params": self.params, "source": _module_digest()}
    return hashlib.sha256(repr(sorted(spec.items())).encode()).hexdigest()[:16]

  def corruption_of(self, index: int) -> str:
    """The name of the corruption that example `index` gets."""
    return CORRUPTIONS[index % len(CORRUPTIONS)]

  def __call__(self, image: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """The corrupted float32 [H, W, C] image in [0, 255] of example `index`."""
    image = tf.convert_to_tensor(image, tf.float32)
    index = tf.cast(index, tf.int64)
    params = self.params
    # Stateless seed (seed, index); indices past 2**31 wrap, which is fine.
    seed = tf.stack([tf.constant(self.seed, tf.int32),
                     tf.cast(index % (2 ** 31), tf.int32)])
    branches = [
        lambda: gaussian_noise(image, params["gaussian_noise"] * 255.0, seed),
        lambda: gaussian_blur(image, params["gaussian_blur"]),
        lambda: contrast(image, params["contrast"]),
    ]
    which = tf.cast(index % len(CORRUPTIONS), tf.int32)
    return tf.ensure_shape(tf.switch_case(which, branches), image.shape)
