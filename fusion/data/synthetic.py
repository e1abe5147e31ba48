"""TFDS builders for data made on this machine: offline tasks, no network.

Each builder is a `tfds.core.GeneratorBasedBuilder`, so offline tasks go
through exactly the same TFDS -> tf.data path as the VTAB-1k tasks. Importing
this module registers the builders with TFDS (`tfds.builder("digits")`).
Generation is deterministic: the same version always writes the same examples.

Layout: shared helpers first, then one section per builder.
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# ---------------------------------------------------------------- helpers


def upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, H, W] images to [N, size, size], float64.

  Pixel centres are aligned (half-pixel convention) and edges are clamped, so
  a constant image stays constant and the result is smooth.
  """
  images = np.asarray(images, np.float64)

  def axis_weights(in_size: int) -> np.ndarray:
    # [size, in_size] interpolation matrix for one axis.
    centres = (np.arange(size) + 0.5) * in_size / size - 0.5
    centres = np.clip(centres, 0, in_size - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = centres - lo
    weights = np.zeros((size, in_size))
    np.add.at(weights, (np.arange(size), lo), 1 - frac)
    np.add.at(weights, (np.arange(size), hi), frac)
    return weights

  rows = axis_weights(images.shape[1])
  cols = axis_weights(images.shape[2])
  return np.einsum("ih,nhw,jw->nij", rows, images, cols)


def to_rgb_uint8(images: np.ndarray, max_value: float) -> np.ndarray:
  """[N, H, W] values in [0, max_value] -> [N, H, W, 3] uint8 grey RGB."""
  scaled = np.clip(np.round(np.asarray(images) * (255.0 / max_value)), 0, 255)
  return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=-1)


# ----------------------------------------------------------------- digits

DIGITS_RESOLUTION = 32
DIGITS_SEED = 0
DIGITS_SPLIT_SIZES = {"train": 800, "validation": 200, "test": 797}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as ([N, 32, 32, 3] uint8, [N] int64), shuffled by seed.

  scikit-learn ships the 8x8 images (values 0..16), so nothing is downloaded.
  """
  from sklearn import datasets  # Only needed while generating.

  digits = datasets.load_digits()
  order = np.random.default_rng(DIGITS_SEED).permutation(len(digits.target))
  images = upsample_bilinear(digits.images[order], DIGITS_RESOLUTION)
  return to_rgb_uint8(images, max_value=16.0), digits.target[order].astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits, upsampled to 32x32 RGB."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "8x8 digits, bilinear to 32x32 RGB; 800/200/797 splits."}
  # TFDS derives this from the package and, for packages outside TFDS, needs
  # the `importlib_resources` backport to do so; stating it avoids that.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The 1797 8x8 handwritten digits of scikit-learn "
                     "(sklearn.datasets.load_digits), shuffled with a fixed "
                     "seed, upsampled bilinearly to 32x32 and replicated to "
                     "3 channels (0..16 scaled to 0..255)."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(DIGITS_RESOLUTION, DIGITS_RESOLUTION, 3)),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    images, labels = digits_arrays()
    generators, start = {}, 0
    for split, count in DIGITS_SPLIT_SIZES.items():
      indices = np.arange(start, start + count)
      generators[split] = self._generate_examples(images, labels, indices)
      start += count
    assert start == len(labels), (start, len(labels))
    return generators

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      # The key is the position in the seeded shuffle: stable across runs.
      yield int(i), {"image": images[i], "label": int(labels[i])}
