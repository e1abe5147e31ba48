"""Shared pieces of the procedural renderers: seeding, registry types, drawing.

Determinism: examples are generated in blocks of `BLOCK_SIZE`. Block `b` of a
stream draws every random number it needs from
`np.random.default_rng([stream_id(stream), seed, b])`, so example `i` depends
only on (stream, seed, i): any range can be rendered alone, in any order, and
equals the same slice of a bigger render. `BLOCK_SIZE` is part of the data
format: changing it changes every image.

Images are float32 in [0, 1] while drawing and uint8 [N, 32, 32, 3] at the end.
Pixel coordinates: x to the right, y down, pixel centres at k + 0.5.
"""
import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np

IMAGE_SIZE = 32
BLOCK_SIZE = 256
CATEGORIES = ("natural", "specialized", "structured")
SPLITS = ("train", "validation", "test")
# VTAB-1k: 800 train + 200 validation examples; a test split of 2,000 keeps the
# standard error of an accuracy near 1 point.
DEFAULT_SPLIT_SIZES = {"train": 800, "validation": 200, "test": 2000}

Examples = dict[str, np.ndarray]
# Draws every factor of `n` examples from `rng` and renders them.
BlockFn = Callable[[np.random.Generator, int], Examples]


def stream_id(stream: str) -> int:
  """A stable 64-bit integer for a stream name (Python's hash() is salted)."""
  return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")


def block_rng(stream: str, seed: int, block: int) -> np.random.Generator:
  return np.random.default_rng([stream_id(stream), seed, block])


def is_count(value) -> bool:
  """Whether `value` is a non-negative int (numpy ints too, bools not)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _check_count(name: str, value: int) -> None:
  if not is_count(value):
    raise ValueError(f"{name} must be a non-negative int, got {value!r}.")


def _check_range(start: int, stop: int, seed: int) -> None:
  for name, value in (("start", start), ("stop", stop), ("seed", seed)):
    _check_count(name, value)
  if stop < start:
    raise ValueError(f"stop ({stop}) must be >= start ({start}).")


Spec = dict[str, tuple[np.dtype, tuple[int, ...]]]


@functools.lru_cache(maxsize=None)
def block_spec(block_fn: BlockFn) -> Spec:
  """{key: (dtype, shape of one example)} of what `block_fn` returns.

  Learnt from a one-example render (milliseconds), so a TFDS builder can declare
  its features without rendering a whole block.
  """
  return {k: (v.dtype, v.shape[1:]) for k, v in block_fn(np.random.default_rng(0), 1).items()}


def render_blocks(block_fn: BlockFn, stream: str, start: int, stop: int,
                  seed: int) -> Examples:
  """Examples [start, stop) of `stream`: whole blocks rendered, then sliced."""
  _check_range(start, stop, seed)
  first, last = start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)
  if start == stop:
    return {k: np.zeros((0,) + shape, dtype) for k, (dtype, shape) in
            block_spec(block_fn).items()}
  parts = [block_fn(block_rng(stream, seed, b), BLOCK_SIZE) for b in range(first, last)]
  lo = start - first * BLOCK_SIZE
  return {k: np.concatenate([p[k] for p in parts])[lo:lo + stop - start]
          for k in parts[0]}


def iterate_examples(render_range: Callable[[int, int], Examples], num_examples: int,
                     chunk: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """(index, example) one at a time, rendering `chunk` examples at once.

  Arguments are checked at the call; examples are rendered as they are consumed.
  """
  _check_count("num_examples", num_examples)
  if not isinstance(chunk, (int, np.integer)) or chunk <= 0 or chunk % BLOCK_SIZE:
    raise ValueError(f"chunk must be a positive multiple of BLOCK_SIZE={BLOCK_SIZE}, "
                     f"got {chunk!r}.")

  def examples():
    for start in range(0, num_examples, chunk):
      batch = render_range(start, min(num_examples, start + chunk))
      for offset in range(len(batch["image"])):
        yield start + offset, {k: v[offset] for k, v in batch.items()}

  return examples()


@dataclasses.dataclass(frozen=True)
class Source:
  """A pre-training data set: `source(num_examples, seed)` -> dict of arrays.

  The dict holds `image` uint8 [N, 32, 32, 3], `label` int32 [N] and the latent
  factors (one array per factor, first axis N).
  """
  name: str
  class_names: tuple[str, ...]
  block_fn: BlockFn
  description: str
  num_examples: int = 20_000  # Suggested pre-training size.

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def stream(self) -> str:
    return f"source/{self.name}"

  def render_range(self, start: int, stop: int, seed: int = 0) -> Examples:
    """Examples [start, stop): equal to the same slice of any longer render."""
    return render_blocks(self.block_fn, self.stream, start, stop, seed)

  def spec(self) -> Spec:
    """{key: (dtype, shape of one example)} of the rendered arrays."""
    return block_spec(self.block_fn)

  def __call__(self, num_examples: int, seed: int = 0) -> Examples:
    return self.render_range(0, num_examples, seed)

  def iterate(self, num_examples: int | None = None, seed: int = 0,
              chunk: int = 4 * BLOCK_SIZE) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index, example) pairs for a TFDS builder's _generate_examples."""
    n = self.num_examples if num_examples is None else num_examples
    _check_count("seed", seed)
    return iterate_examples(lambda a, b: self.render_range(a, b, seed), n, chunk)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A downstream task. Labels are a function of the rendered factors.

  Each split is its own seed stream (`task/<name>/<split>`), disjoint from every
  source stream, so no test image is ever a pre-training image.
  """
  name: str
  category: str  # "natural" | "specialized" | "structured"
  class_names: tuple[str, ...]
  block_fn: BlockFn
  label_fn: Callable[[Mapping[str, np.ndarray]], np.ndarray]
  description: str
  split_sizes: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))

  def __post_init__(self):
    if self.category not in CATEGORIES:
      raise ValueError(f"Task {self.name!r}: category {self.category!r} is not one of "
                       f"{CATEGORIES}.")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def stream(self, split: str) -> str:
    if split not in self.split_sizes:
      raise ValueError(f"Task {self.name!r} has no split {split!r}; splits: "
                       f"{sorted(self.split_sizes)}.")
    return f"task/{self.name}/{split}"

  def render_range(self, split: str, start: int, stop: int, seed: int = 0) -> Examples:
    """Examples [start, stop) of `split` with their `label` (any range, any order)."""
    out = render_blocks(self.block_fn, self.stream(split), start, stop, seed)
    out["label"] = np.asarray(self.label_fn(out), np.int32)
    return out

  def spec(self) -> Spec:
    """{key: (dtype, shape of one example)} of `render_range`'s arrays."""
    return {**block_spec(self.block_fn), "label": (np.dtype(np.int32), ())}

  def render(self, split: str, seed: int = 0, chunk: int = 4 * BLOCK_SIZE,
             num_examples: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (index, example) for the split's `split_sizes[split]` examples."""
    self.stream(split)  # Validates the split name before anything is rendered.
    n = self.split_sizes[split] if num_examples is None else num_examples
    _check_count("seed", seed)
    return iterate_examples(lambda a, b: self.render_range(split, a, b, seed), n, chunk)


# ----------------------------------------------------------------------------
# Labels.


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
  """Labels whose counts differ by at most one, in random order."""
  return rng.permutation(np.arange(n) % num_classes).astype(np.int32)


def uniform_bin(values: np.ndarray, low: float, high: float, num_bins: int) -> np.ndarray:
  """Index of the equal-width bin of [low, high) that holds each value."""
  t = (np.asarray(values, np.float64) - low) / (high - low)
  return np.clip(np.floor(t * num_bins), 0, num_bins - 1).astype(np.int32)


def sample_in_bins(rng: np.random.Generator, bins: np.ndarray, low: float, high: float,
                   num_bins: int) -> np.ndarray:
  """Uniform values inside the given equal-width bins of [low, high)."""
  width = (high - low) / num_bins
  return low + (bins + rng.uniform(0.0, 1.0, len(bins))) * width


# ----------------------------------------------------------------------------
# Colours and compositing.

# Orthonormal basis of the plane orthogonal to grey (1, 1, 1): hue directions.
_CHROMA = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.array(
    [[math.sqrt(2.0)], [math.sqrt(6.0)]])


def colours(rng: np.random.Generator, lightness: np.ndarray,
            max_saturation: float = 0.45) -> np.ndarray:
  """[N, 3] colours of the given mean lightness with a random hue."""
  n = len(lightness)
  hue = rng.uniform(0.0, 2 * np.pi, n)
  sat = rng.uniform(0.0, max_saturation, n)
  chroma = (np.cos(hue)[:, None] * _CHROMA[0] + np.sin(hue)[:, None] * _CHROMA[1])
  return np.clip(lightness[:, None] + sat[:, None] * chroma, 0.0, 1.0).astype(np.float32)


def contrasting_colours(rng: np.random.Generator, n: int,
                        min_contrast: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
  """(background, foreground) colours whose lightness differs by >= min_contrast.

  Both are independent of any label, so mean colour carries no class signal.
  """
  light_bg = rng.uniform(0.0, 1.0, n)
  light_fg = (light_bg + rng.uniform(min_contrast, 1.0 - min_contrast, n)) % 1.0
  return colours(rng, light_bg), colours(rng, light_fg)


def pixel_grid(size: int = IMAGE_SIZE, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) [S, S] sample positions in output-pixel units, S = size * supersample."""
  c = ((np.arange(size * supersample) + 0.5) / supersample).astype(np.float32)
  return c[None, :], c[:, None]


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """Box filter [N, H, W, ...] by `factor` (supersampling -> anti-aliasing)."""
  if factor == 1:
    return images
  n, h, w = images.shape[:3]
  return images.reshape(n, h // factor, factor, w // factor, factor,
                        *images.shape[3:]).mean(axis=(2, 4))


def composite(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """Paints `colour` [N, 3] (or [N, H, W, 3]) over `canvas` [N, H, W, 3] with alpha [N, H, W]."""
  if colour.ndim == 2:
    colour = colour[:, None, None, :]
  a = alpha[..., None]
  return canvas * (1.0 - a) + colour * a


def coverage(signed_distance: np.ndarray, pixel: float = 1.0) -> np.ndarray:
  """Anti-aliased coverage of a shape from its signed distance (negative inside)."""
  return np.clip(0.5 - signed_distance / pixel, 0.0, 1.0)


def gradient_background(rng: np.random.Generator, base: np.ndarray,
                        strength: float = 0.2) -> np.ndarray:
  """[N, 32, 32, 3] `base` colour with a random linear shading ramp."""
  n = len(base)
  angle = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32)
  amount = rng.uniform(0.0, strength, n).astype(np.float32)
  x, y = pixel_grid()
  ramp = ((x - 16.0) * np.cos(angle)[:, None, None] + (y - 16.0) *
          np.sin(angle)[:, None, None]) / 16.0  # In [-1.4, 1.4].
  return np.clip(base[:, None, None, :] + (amount[:, None, None] * ramp)[..., None], 0, 1)


def draw_clutter(rng: np.random.Generator, canvas: np.ndarray, max_lines: int,
                 max_blobs: int) -> np.ndarray:
  """Random lines and elliptic blobs of random colours (background clutter)."""
  n = len(canvas)
  x, y = pixel_grid()
  num_lines = rng.integers(0, max_lines + 1, n)
  num_blobs = rng.integers(0, max_blobs + 1, n)
  canvas = canvas.copy()
  for k in range(max_blobs):
    cx, cy, a, b, t = (rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]
                       for lo, hi in ((0, 32), (0, 32), (1.5, 6), (1.5, 6), (0, np.pi)))
    colour = colours(rng, rng.uniform(0, 1, n))
    i = np.flatnonzero(k < num_blobs)  # Only the images that have a k-th blob.
    dx, dy = x - cx[i], y - cy[i]
    cos, sin = np.cos(t[i]), np.sin(t[i])
    rho = np.sqrt(((dx * cos + dy * sin) / a[i]) ** 2 + ((dy * cos - dx * sin) / b[i]) ** 2)
    canvas[i] = composite(canvas[i], coverage((rho - 1.0) * np.minimum(a[i], b[i])), colour[i])
  for k in range(max_lines):
    cx, cy, t, width = (rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]
                        for lo, hi in ((0, 32), (0, 32), (0, np.pi), (0.6, 1.6)))
    colour = colours(rng, rng.uniform(0, 1, n))
    i = np.flatnonzero(k < num_lines)
    dist = np.abs((x - cx[i]) * np.sin(t[i]) - (y - cy[i]) * np.cos(t[i]))
    canvas[i] = composite(canvas[i], coverage(dist - width[i] / 2), colour[i])
  return canvas


def finish(rng: np.random.Generator, canvas: np.ndarray, max_noise: float) -> np.ndarray:
  """Adds Gaussian pixel noise of a random strength and quantises to uint8."""
  n = len(canvas)
  sigma = rng.uniform(0.0, max_noise, n).astype(np.float32)[:, None, None, None]
  noisy = canvas + sigma * rng.standard_normal(canvas.shape, dtype=np.float32)
  return np.round(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8)


def smooth_noise(rng: np.random.Generator, n: int, cells: int, size: int) -> np.ndarray:
  """[n, size, size] periodic value noise with `cells` random values per side."""
  t = (np.arange(size) + 0.5) / size * cells - 0.5
  i0 = np.floor(t).astype(int)
  w = t - i0
  w = w * w * (3 - 2 * w)  # Smoothstep: no visible grid creases.
  m = np.zeros((size, cells), np.float32)
  np.add.at(m, (np.arange(size), i0 % cells), 1 - w)
  np.add.at(m, (np.arange(size), (i0 + 1) % cells), w)
  grid = rng.uniform(0.0, 1.0, (n, cells, cells)).astype(np.float32)
  return np.einsum("ij,njk,lk->nil", m, grid, m, optimize=True)


# ----------------------------------------------------------------------------
# Sprites: a mask atlas drawn once, then scaled / rotated / moved per example.


def atlas_pyramid(atlas: np.ndarray, levels: int = 3) -> list[np.ndarray]:
  """Box-filtered copies at 1, 1/2, 1/4, ... resolution (a mip-map), zero-padded."""
  out = [atlas.astype(np.float32)]
  for _ in range(levels - 1):
    out.append(downsample(out[-1][..., None], 2)[..., 0])
  return [np.pad(a, ((0, 0), (1, 1), (1, 1))) for a in out]


def warp_sprites(pyramid: list[np.ndarray], index: np.ndarray, cx: np.ndarray,
                 cy: np.ndarray, size: np.ndarray, angle: np.ndarray,
                 supersample: int = 1) -> np.ndarray:
  """[N, 32, 32] alpha of atlas sprites placed in the image.

  The atlas box of sprite `index` spans `size` pixels, turned by `angle`
  (radians, clockwise on screen since y points down) about its centre, which
  lands at pixel (cx, cy). Bilinear sampling on the mip level whose texel
  spacing is closest to one sample (one to two texels per sample) keeps small
  sprites from aliasing without supersampling.
  """
  n = len(index)
  side0 = pyramid[0].shape[-1] - 2
  x, y = pixel_grid(IMAGE_SIZE, supersample)
  spacing = side0 / (np.asarray(size, np.float32) * supersample)
  level = np.clip(np.floor(np.log2(np.maximum(spacing, 1e-6))), 0, len(pyramid) - 1)
  out = np.zeros((n, IMAGE_SIZE * supersample, IMAGE_SIZE * supersample), np.float32)
  cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
  for lv in range(len(pyramid)):
    rows = np.flatnonzero(level == lv)
    if not len(rows):
      continue
    atlas = pyramid[lv]
    side = atlas.shape[-1] - 2
    width = side + 2
    dx = x - cx[rows, None, None].astype(np.float32)
    dy = y - cy[rows, None, None].astype(np.float32)
    c, s = cos[rows, None, None], sin[rows, None, None]
    scale = (side / size[rows]).astype(np.float32)[:, None, None]
    # Inverse rotation, then into texel coordinates (+1 for the zero border).
    u = np.clip((c * dx + s * dy) * scale + (side / 2 + 0.5), 0, side + 1 - 1e-3)
    v = np.clip((c * dy - s * dx) * scale + (side / 2 + 0.5), 0, side + 1 - 1e-3)
    u0, v0 = u.astype(np.int32), v.astype(np.int32)  # Floor: u, v >= 0.
    fu, fv = u - u0, v - v0
    i00 = (index[rows, None, None] * (width * width) + v0 * width + u0).ravel()
    flat = atlas.ravel()
    shape = u.shape
    p00, p01 = flat[i00].reshape(shape), flat[i00 + 1].reshape(shape)
    p10, p11 = flat[i00 + width].reshape(shape), flat[i00 + width + 1].reshape(shape)
    top = p00 + (p01 - p00) * fu
    out[rows] = top + (p10 + (p11 - p10) * fu - top) * fv
  return downsample(out[..., None], supersample)[..., 0]


def mask_atlas(inside_fns: list[Callable[[np.ndarray, np.ndarray], np.ndarray]],
               side: int = 64, supersample: int = 4) -> np.ndarray:
  """[K, side, side] coverage of shapes given as inside(x, y) over [-1, 1]^2."""
  s = side * supersample
  c = (np.arange(s) + 0.5) / s * 2 - 1
  x, y = np.meshgrid(c, c)
  masks = np.stack([fn(x, y).astype(np.float32) for fn in inside_fns])
  return downsample(masks[..., None], supersample)[..., 0]
