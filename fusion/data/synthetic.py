"""TFDS builders for data made on this machine: offline tasks, no network.

Each builder is a `tfds.core.GeneratorBasedBuilder`, so offline tasks go
through exactly the same TFDS -> tf.data path as the VTAB-1k tasks. Importing
this module registers the builders with TFDS:

  digits                        scikit-learn's handwritten digits (800/200/797)
  rendered_tasks/<task>         the tasks of `fusion.data.render.TASKS`
                                (800/200/2000, image + label + latent factors)
  rendered_sources/<source>     the hub's pre-training sources (20k+ each)

Generation is deterministic: the same version always writes the same examples.

Layout: shared helpers first, then one section per builder.
"""
from collections.abc import Mapping, Sequence
import dataclasses

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from fusion.data import render

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


# --------------------------------------------------------------- rendered
# The offline mini-VTAB tasks and the hub's pre-training sources, drawn by
# `fusion.data.render` (pure numpy). The builders only declare features and
# splits; one config per task / source.

RENDERED_VERSION = tfds.core.Version("1.0.0")
# Bump RENDERED_VERSION whenever render/ changes any rendered example.
RENDERED_RELEASE_NOTES = {"1.0.0": "First release: 32x32 RGB renders of fusion.data.render."}


@dataclasses.dataclass(eq=False)
class RenderedConfig(tfds.core.BuilderConfig):
  """One rendered data set: what to render, from which seed, how many.

  Attributes:
    dataset: a key of `render.TASKS` (RenderedTasks) or `render.SOURCES`
      (RenderedSources).
    seed: the render seed; examples depend only on (dataset, split, seed, index).
    split_sizes: split name -> number of examples.
  """
  dataset: str = ""
  seed: int = 0
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)


def _rendered_config(what: str, dataset: str, description: str, seed: int,
                     sizes: Mapping[str, int], defaults: Mapping[str, int],
                     name: str | None) -> RenderedConfig:
  """Checks the arguments; the name is the dataset's for its defaults, else says
  what differs (TFDS keys prepared data by builder, config name and version)."""
  if set(sizes) != set(defaults):
    raise ValueError(f"{what}: split_sizes must have exactly the splits "
                     f"{sorted(defaults)}, got {sorted(sizes)}.")
  for split, n in sizes.items():
    if not render.core.is_count(n) or n == 0:
      raise ValueError(f"{what}: split {split!r} needs a positive int size, got {n!r}.")
  if not render.core.is_count(seed):
    raise ValueError(f"{what}: seed must be a non-negative int, got {seed!r}.")
  sizes = {split: int(sizes[split]) for split in defaults}
  if name is None:
    name = dataset
    if seed != 0 or sizes != dict(defaults):
      name += f"_seed{seed}_" + "_".join(f"{s}{n}" for s, n in sizes.items())
  return RenderedConfig(name=name, version=RENDERED_VERSION,
                        release_notes=RENDERED_RELEASE_NOTES, description=description,
                        dataset=dataset, seed=int(seed), split_sizes=sizes)


def task_config(task: str, *, seed: int = 0, split_sizes: Mapping[str, int] | None = None,
                name: str | None = None) -> RenderedConfig:
  """Config of `RenderedTasks` for `render.TASKS[task]`.

  The registered configs (`rendered_tasks/<task>`) use seed 0 and the task's
  own split sizes; other seeds or sizes (e.g. tiny splits in tests) get a name
  that says so, e.g. "mixed_seed0_train6_validation3_test5".
  """
  spec = render.get_task(task)
  sizes = spec.split_sizes if split_sizes is None else split_sizes
  return _rendered_config(f"Task {task!r}", task, spec.description, seed, sizes,
                          spec.split_sizes, name)


def source_config(source: str, *, seed: int = 0, num_examples: int | None = None,
                  name: str | None = None) -> RenderedConfig:
  """Config of `RenderedSources` for `render.SOURCES[source]` (one "train" split)."""
  spec = render.get_source(source)
  n = spec.num_examples if num_examples is None else num_examples
  return _rendered_config(f"Source {source!r}", source, spec.description, seed,
                          {"train": n}, {"train": spec.num_examples}, name)


def rendered_features(class_names: Sequence[str],
                      spec: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
                      ) -> tfds.features.FeaturesDict:
  """image (PNG, lossless), label (ClassLabel) and every latent factor as a Tensor."""
  features = {
      "image": tfds.features.Image(shape=(render.core.IMAGE_SIZE,) * 2 + (3,)),
      "label": tfds.features.ClassLabel(names=list(class_names)),
  }
  for key, (dtype, shape) in spec.items():
    if key not in features:
      features[key] = tfds.features.Tensor(shape=shape, dtype=dtype)
  return tfds.features.FeaturesDict(features)


class _Rendered(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body: one split per `split_sizes` entry, examples in render order."""

  code_path = epath.Path(__file__)  # See Digits.

  def _spec(self) -> render.TaskSpec | render.Source:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    spec = self._spec()
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{spec.description} Rendered by fusion.data.render, seed "
                    f"{self.builder_config.seed}.",
        features=rendered_features(spec.class_names, spec.spec()),
        supervised_keys=("image", "label"),
        # File order = render order: example i of a split is
        # render_range(i, i + 1); render already shuffles classes per block.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes.items()}


class RenderedTasks(_Rendered):
  """The offline mini-VTAB tasks of `render.TASKS` (`rendered_tasks/<task>`)."""

  VERSION = RENDERED_VERSION
  RELEASE_NOTES = RENDERED_RELEASE_NOTES
  BUILDER_CONFIGS = [task_config(name) for name in render.TASKS]

  def _spec(self) -> render.TaskSpec:
    return render.get_task(self.builder_config.dataset)

  def _generate_examples(self, split: str, num_examples: int):
    return self._spec().render(split, seed=self.builder_config.seed,
                               num_examples=num_examples)


class RenderedSources(_Rendered):
  """The hub's pre-training sources of `render.SOURCES` (`rendered_sources/<source>`).

  The hub builder reads `render.SOURCES` as numpy directly; this builder
  serves the same examples to tf.data users.
  """

  VERSION = RENDERED_VERSION
  RELEASE_NOTES = RENDERED_RELEASE_NOTES
  BUILDER_CONFIGS = [source_config(name) for name in render.SOURCES]

  def _spec(self) -> render.Source:
    return render.get_source(self.builder_config.dataset)

  def _generate_examples(self, split: str, num_examples: int):
    del split  # Only "train".
    return self._spec().iterate(num_examples, seed=self.builder_config.seed)
