"""TFDS -> tf.data -> numpy batches (optionally sharded onto a mesh).

Preprocessing follows VTAB (task_adaptation `data_loader.preprocess_fn`): the
whole image is resized to resolution x resolution (bilinear, no crop, no
aspect-ratio preservation), scaled to [0, 1], then normalised per channel with
the backbone's mean/std. Images are NHWC float32, labels int32.

Callers pass the backbone's `preprocess.resolution/mean/std`, e.g.

  pre = backbone.preprocess
  for batch in pipeline.iterate_batches(task, "test", resolution=pre.resolution,
                                        mean=pre.mean, std=pre.std,
                                        batch_size=128, mesh=mesh): ...

Data access: offline tasks are generated locally on first use. A VTAB task's
TFDS dataset is downloaded and prepared on first use (`prepare`), which needs
the network (and, for resisc45 and diabetic_retinopathy, files downloaded by
hand); without it a `DatasetUnavailableError` says what to do.
"""
from collections.abc import Callable, Iterator, Sequence
import logging

from jax.sharding import Mesh
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fusion import sharding
from fusion.data import tasks as tasks_lib

Task = tasks_lib.Task
Batch = dict[str, np.ndarray]


DatasetUnavailableError = tasks_lib.DatasetUnavailableError


# ------------------------------------------------------------ preparation


def prepare(task: Task, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The task's builder with its data prepared (a no-op once it is).

  Offline tasks are generated on this machine. VTAB tasks are downloaded by
  TFDS, which needs the network the first time.
  """
  builder = tasks_lib.make_builder(task, data_dir)
  if task.folder is None and not builder.is_prepared():  # tfds.ImageFolder reads files.
    if task.offline:
      logging.info("Generating offline dataset %s in %s.", task.tfds_name,
                   builder.data_dir)
      builder.download_and_prepare()
    else:
      logging.info("Downloading and preparing %s in %s (needs the network).",
                   task.tfds_name, builder.data_dir)
      try:
        builder.download_and_prepare()
      except Exception as e:  # Network, manual files, disk: all end here.
        raise DatasetUnavailableError(unavailable_message(task, builder, e)) from e
  _check_source_sizes(task, builder)
  return builder


def unavailable_message(task: Task, builder: tfds.core.DatasetBuilder,
                        error: Exception) -> str:
  """Why a task's data could not be had, and the ways out: prepare it elsewhere
  and point data_dir at it, fetch manual files, or use the offline tasks."""
  root = str(builder.data_dir_root)  # TFDS's manual_dir is <root>/downloads/manual.
  manual = tasks_lib.MANUAL_DOWNLOADS.get(task.name)
  how = (f"it needs a manual download: put {manual} in {root}/downloads/manual/, then rerun"
         if manual else f"prepare it where there is network access (`tfds build "
         f"{task.tfds_name.split(':')[0]} --data_dir DIR`) and rerun with "
         f"--config.data_dir=DIR or TFDS_DATA_DIR=DIR")
  cause = " ".join(f"{type(error).__name__}: {error}".split())[:300]
  offline = ", ".join(map(repr, tasks_lib.OFFLINE_TASKS))
  return (f"Task {task.name!r} needs the TFDS dataset {task.tfds_name!r}, not prepared in "
          f"{builder.data_dir} and not downloadable here ({cause}). Either {how}; or use "
          f"the offline tasks generated here ({offline}) or a folder of your images "
          "(tasks=/path/to/folder).")


def _check_source_sizes(task: Task, builder: tfds.core.DatasetBuilder) -> None:
  """The slice indices only mean VTAB's splits for the sizes they came from."""
  splits = builder.info.splits
  if not splits:  # Unknown before generation (and under tfds.testing.mock_data).
    return
  for split, expected in task.source_sizes.items():
    actual = splits[split].num_examples if split in splits else None
    if actual != expected:
      raise ValueError(
          f"Task {task.name!r}: TFDS {builder.name} {builder.version} has "
          f"{actual} examples in {split!r}, but the VTAB-1k slices "
          f"{dict(task.splits)} were computed for {expected}. Use the TFDS "
          f"version the task names ({task.tfds_name}).")


def _split_spec(task: Task, split: str) -> str:
  return task.split_spec(split)  # A clear error for unknown or missing splits.


def num_examples(task: Task, split: str, data_dir: str | None = None) -> int:
  """Number of examples in `task`'s `split` (prepares the data if needed)."""
  spec = _split_spec(task, split)
  builder = prepare(task, data_dir)
  if builder.info.splits:
    return int(builder.info.splits[spec].num_examples)
  # Split sizes unknown (mocked builders): count what the reader yields.
  ds = builder.as_dataset(split=spec, decoders={task.image_key: tfds.decode.SkipDecoding()})
  count = int(ds.cardinality())
  if count < 0:
    count = int(ds.reduce(0, lambda n, _: n + 1))
  return count


# ---------------------------------------------------------- preprocessing


def _check_args(resolution: int, mean, std,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  if not isinstance(resolution, (int, np.integer)) or resolution < 1:
    raise ValueError(f"resolution must be a positive int, got {resolution!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  stats = []
  for name, value in (("mean", mean), ("std", std)):
    array = np.asarray(value, np.float32).reshape(-1)
    if array.size not in (1, 3):
      raise ValueError(f"{name} must be one value or one per RGB channel, got {value!r}.")
    stats.append(np.broadcast_to(array, (3,)))
  mean, std = stats
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise ValueError(f"mean must be finite and std positive and finite; got "
                     f"mean={mean!r}, std={std!r}.")
  return mean, std


def preprocess_fn(task: Task, image_feature: tfds.features.FeatureConnector, *,
                  resolution: int, mean: np.ndarray, std: np.ndarray,
                  shift: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None
                  ) -> Callable[..., dict[str, tf.Tensor]]:
  """TFDS example (image still encoded) -> {"image", "label"}.

  With `shift` (the `test_shift` split) the function takes (index, example),
  index the example's position in its split, and corrupts the decoded RGB
  image with `shift(image, index)` before resizing.
  """
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)

  def fn(example, index=None):
    image = image_feature.decode_example(example[task.image_key])
    image = tf.cast(image, tf.float32)
    if task.image_fn is not None:
      image = task.image_fn(image)
    if image.shape[-1] == 1:  # smallNORB, dSprites: grey -> RGB, as VTAB.
      image = tf.tile(image, [1, 1, 3])
    if shift is not None:
      image = shift(image, index)
    image = tf.image.resize(image, (resolution, resolution), method="bilinear")
    image = (image / 255.0 - mean) / std
    label = tf.cast(task.label_fn(example), tf.int32)
    return {"image": tf.ensure_shape(image, (resolution, resolution, 3)),
            "label": tf.ensure_shape(label, ())}

  if shift is None:
    return fn
  return lambda index, example: fn(example, index)


def make_dataset(task: Task, split: str, *, resolution: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, shuffle: bool = False,
                 seed: int = 0, repeat: bool = False, drop_remainder: bool = False,
                 data_dir: str | None = None) -> tf.data.Dataset:
  """Batched tf.data of {"image": [B, R, R, 3] float32, "label": [B] int32}.

  Deterministic: the same arguments give the same batches in the same order.
  With `shuffle`, examples are reshuffled every epoch from `seed`; with
  `repeat`, the data cycles forever. The last batch may be smaller unless
  `drop_remainder`. `test_shift` (tasks with a `shift`) reads the examples of
  `test` and corrupts example i (its position in the split) with
  `task.shift(image, i)`.
  """
  mean, std = _check_args(resolution, mean, std, batch_size)
  spec = _split_spec(task, split)
  builder = prepare(task, data_dir)
  # Files are read one after the other (TFDS interleaves 16 by default), so
  # examples come in split-string order: train800val200 = train800, val200.
  # Images are decoded after shuffling, so the buffer holds encoded bytes.
  ds = builder.as_dataset(split=spec, shuffle_files=False,
                          read_config=tfds.ReadConfig(interleave_cycle_length=1),
                          decoders={task.image_key: tfds.decode.SkipDecoding()})
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  shift = task.shift if split == tasks_lib.SHIFT_SPLIT else None
  if shift is not None:  # (index in the split, example): the corruption's seed.
    ds = ds.enumerate()
  if shuffle:
    ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(preprocess_fn(task, builder.info.features[task.image_key],
                            resolution=resolution, mean=mean, std=std, shift=shift),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- batches


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads a batch with zeros to `batch_size` and adds `mask` (True = real)."""
  size = len(batch["label"])
  if size > batch_size:
    raise ValueError(f"Batch of {size} examples exceeds batch_size={batch_size}.")
  out = {}
  for key, value in batch.items():
    padding = np.zeros((batch_size - size,) + value.shape[1:], value.dtype)
    out[key] = np.concatenate([value, padding])
  out["mask"] = np.arange(batch_size) < size
  return out


def _check_mesh(batch_size: int, mesh) -> None:
  if mesh is not None:
    try:
      sharding.check_divisible(batch_size, mesh)
    except ValueError as e:
      raise ValueError(f"batch_size={batch_size}: {e}") from None


def _host_or_mesh_batches(ds: tf.data.Dataset, batch_size: int,
                          mesh: Mesh | None) -> Iterator[dict]:
  for batch in ds.as_numpy_iterator():
    batch = pad_batch(batch, batch_size)  # Full batches just gain the mask.
    yield sharding.shard_batch(batch, mesh) if mesh is not None else batch


def iterate_batches(task: Task, split: str, *, resolution: int, mean: Sequence[float],
                    std: Sequence[float], batch_size: int, data_dir: str | None = None,
                    mesh: Mesh | None = None) -> Iterator[dict]:
  """One pass over `split` in order, for evaluation and feature extraction.

  Yields {"image": [B, R, R, 3] float32, "label": [B] int32, "mask": [B] bool}.
  Every example appears exactly once: the last partial batch is padded with
  zeros to `batch_size` and its padding is masked out (mask False). With a
  `mesh` the arrays are jax arrays split over its `data` axis (`batch_size`
  must be divisible by it); otherwise numpy. Arguments are checked, and the
  data prepared, when called; batches are read as they are consumed.
  """
  _check_mesh(batch_size, mesh)
  ds = make_dataset(task, split, resolution=resolution, mean=mean, std=std,
                    batch_size=batch_size, data_dir=data_dir)
  return _host_or_mesh_batches(ds, batch_size, mesh)


def train_batches(task: Task, split: str, *, resolution: int, mean: Sequence[float],
                  std: Sequence[float], batch_size: int, seed: int = 0,
                  data_dir: str | None = None, mesh: Mesh | None = None
                  ) -> Iterator[dict]:
  """Endless shuffled full batches of `split` (deterministic from `seed`).

  Each epoch is reshuffled (buffer of 10k examples: an exact shuffle of the
  VTAB-1k training splits). Yields {"image", "label", "mask" (all True)} like `iterate_batches`. For a
  step-addressable stream (what `fusion.train.train`'s `batch_fn` wants, so
  that a resumed run sees the same data), use `load_split` + `array_batch_fn`.
  """
  _check_mesh(batch_size, mesh)
  ds = make_dataset(task, split, resolution=resolution, mean=mean, std=std,
                    batch_size=batch_size, shuffle=True, seed=seed, repeat=True,
                    drop_remainder=True, data_dir=data_dir)
  return _host_or_mesh_batches(ds, batch_size, mesh)


def load_split(task: Task, split: str, *, resolution: int, mean: Sequence[float],
               std: Sequence[float], batch_size: int = 256,
               data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The whole split in memory: (images [N, R, R, 3] float32, labels [N] int32).

  Meant for small splits (VTAB-1k's 800/200/1000 examples): N x R x R x 3 x 4
  bytes, e.g. 600 MB for 1000 images at 224.
  """
  images, labels = [], []
  for batch in make_dataset(task, split, resolution=resolution, mean=mean, std=std,
                            batch_size=batch_size, data_dir=data_dir).as_numpy_iterator():
    images.append(batch["image"])
    labels.append(batch["label"])
  if not images:
    return (np.zeros((0, resolution, resolution, 3), np.float32), np.zeros((0,), np.int32))
  return np.concatenate(images), np.concatenate(labels)


def array_batch_fn(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                   seed: int = 0) -> Callable[[int], Batch]:
  """step -> the step's shuffled batch of in-memory arrays (pure, resumable).

  The stream is the concatenation of per-epoch permutations (epoch e shuffled
  by `np.random.default_rng([seed, e])`), cut into consecutive batches of
  `batch_size`; a batch may span two epochs. Same (seed, step), same batch.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  n = len(labels)
  if n == 0 or len(images) != n:
    raise ValueError(f"Need as many images as labels, at least one; got "
                     f"{len(images)} images and {n} labels.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")

  def epoch_order(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

  def batch_fn(step: int) -> Batch:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    index = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      index[chosen] = epoch_order(int(epoch))[offsets[chosen]]
    return {"image": images[index], "label": labels[index],
            "mask": np.ones(batch_size, bool)}

  return batch_fn
