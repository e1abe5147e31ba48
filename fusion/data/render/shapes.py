"""dSprites-style sprites: the `shapes` source and the `shapes_location` /
`shapes_orientation` structured tasks.

Factors: shape, scale in [0.5, 1] (diameter 7..14 px), orientation in [0, 2pi),
x and y in [0, 1] (centre at 5 + 22 * x pixels, as dSprites normalises
positions), colours. Background gradient and pixel noise of random strength.
"""
import functools
from collections.abc import Callable

import numpy as np
from matplotlib import path as mpath

from fusion.data.render import core

MAX_DIAMETER = 14.0  # Pixels at scale 1.
POSITION_LOW, POSITION_SPAN = 5.0, 22.0  # Centre pixel = LOW + SPAN * x.
NUM_POSITION_BINS = 16  # VTAB's dSprites location / orientation tasks use 16.
NUM_ORIENTATION_BINS = 16


def _polygon(points) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  def inside(x, y):
    poly = mpath.Path(np.asarray(points, np.float64))
    return poly.contains_points(np.stack([x.ravel(), y.ravel()], 1)).reshape(x.shape)
  return inside


def _heart(x, y):
  t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
  hx = 16 * np.sin(t) ** 3
  hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
  pts = np.stack([hx, hy + 2.5], 1) / 17.5  # Fits the unit disc (y down).
  return _polygon(pts)(x, y)


def _star(x, y):
  t = -np.pi / 2 + np.arange(10) * np.pi / 5
  r = np.where(np.arange(10) % 2 == 0, 0.95, 0.42)
  return _polygon(np.stack([r * np.cos(t), r * np.sin(t)], 1))(x, y)


# Every shape fits the disc of radius 0.95 of the [-1, 1] box (the scale is that
# disc's diameter). The last four have no rotational symmetry, so their
# orientation is defined over the whole turn.
SHAPES = {
    "square": lambda x, y: (np.abs(x) < 0.66) & (np.abs(y) < 0.66),
    "ellipse": lambda x, y: (x / 0.95) ** 2 + (y / 0.55) ** 2 < 1,
    "cross": lambda x, y: ((np.abs(x) < 0.3) & (np.abs(y) < 0.9)) |
                          ((np.abs(y) < 0.3) & (np.abs(x) < 0.9)),
    "star": _star,
    "heart": _heart,
    "triangle": _polygon([(0, -0.95), (0.62, 0.75), (-0.62, 0.75)]),
    "arrow": _polygon([(-0.9, -0.18), (0.15, -0.18), (0.15, -0.6), (0.92, 0),
                       (0.15, 0.6), (0.15, 0.18), (-0.9, 0.18)]),
    "crescent": lambda x, y: ((x ** 2 + y ** 2) < 0.9 ** 2) &
                             (((x - 0.4) ** 2 + (y + 0.15) ** 2) > 0.68 ** 2),
}
SHAPE_NAMES = tuple(SHAPES)
ASYMMETRIC_SHAPES = ("heart", "triangle", "arrow", "crescent")


@functools.lru_cache(maxsize=1)
def shape_pyramid() -> list[np.ndarray]:
  return core.atlas_pyramid(core.mask_atlas(list(SHAPES.values())))


def render_shapes(rng: np.random.Generator, n: int, shapes: tuple[str, ...],
                  position_bins: np.ndarray | None = None,
                  orientation_bins: np.ndarray | None = None) -> core.Examples:
  """Sprites with balanced shapes; given x / orientation bins are filled uniformly."""
  shape = np.array([SHAPE_NAMES.index(s) for s in shapes])[
      core.balanced_labels(rng, n, len(shapes))].astype(np.int32)
  scale = rng.uniform(0.5, 1.0, n).astype(np.float32)
  if orientation_bins is None:
    orientation = rng.uniform(0.0, 2 * np.pi, n)
  else:
    orientation = core.sample_in_bins(rng, orientation_bins, 0.0, 2 * np.pi,
                                      NUM_ORIENTATION_BINS)
  if position_bins is None:
    x = rng.uniform(0.0, 1.0, n)
  else:
    x = core.sample_in_bins(rng, position_bins, 0.0, 1.0, NUM_POSITION_BINS)
  y = rng.uniform(0.0, 1.0, n)
  x, y, orientation = (v.astype(np.float32) for v in (x, y, orientation))
  bg, fg = core.contrasting_colours(rng, n, min_contrast=0.25)
  canvas = core.gradient_background(rng, bg, strength=0.25)
  alpha = core.warp_sprites(shape_pyramid(), shape, POSITION_LOW + POSITION_SPAN * x,
                            POSITION_LOW + POSITION_SPAN * y, MAX_DIAMETER * scale,
                            orientation)
  canvas = core.composite(canvas, alpha, fg)
  return dict(image=core.finish(rng, canvas, 0.1), shape=shape, scale=scale,
              orientation=orientation, x=x, y=y, fg_colour=fg, bg_colour=bg)


def position_bin(x: np.ndarray) -> np.ndarray:
  """x in [0, 1] -> one of 16 equal-width bins (VTAB's dSprites location label)."""
  return core.uniform_bin(x, 0.0, 1.0, NUM_POSITION_BINS)


def orientation_bin(orientation: np.ndarray) -> np.ndarray:
  """Orientation in [0, 2pi) -> one of 16 equal-width bins."""
  return core.uniform_bin(np.mod(orientation, 2 * np.pi), 0.0, 2 * np.pi,
                          NUM_ORIENTATION_BINS)


def _source_block(rng: np.random.Generator, n: int) -> core.Examples:
  out = render_shapes(rng, n, SHAPE_NAMES)
  return dict(out, label=out["shape"])


SHAPES_SOURCE = core.Source(
    name="shapes",
    class_names=SHAPE_NAMES,
    block_fn=_source_block,
    description=("dSprites-like: 8 shapes x scale x orientation x position, random "
                 "contrasting colours, background ramp, pixel noise. Label: the shape."))


def _location_block(rng: np.random.Generator, n: int) -> core.Examples:
  return render_shapes(rng, n, SHAPE_NAMES,
                       position_bins=core.balanced_labels(rng, n, NUM_POSITION_BINS))


def _orientation_block(rng: np.random.Generator, n: int) -> core.Examples:
  return render_shapes(rng, n, ASYMMETRIC_SHAPES,
                       orientation_bins=core.balanced_labels(rng, n, NUM_ORIENTATION_BINS))


SHAPES_LOCATION = core.TaskSpec(
    name="shapes_location",
    category="structured",
    class_names=tuple(f"x{k}" for k in range(NUM_POSITION_BINS)),
    block_fn=_location_block,
    label_fn=lambda f: position_bin(f["x"]),
    description="Horizontal position of the sprite, 16 bins (VTAB dSprites location).")

# Only shapes without rotational symmetry: for a square the angles 0 and 90 deg
# are the same image, which would make the label unknowable, not hard.
SHAPES_ORIENTATION = core.TaskSpec(
    name="shapes_orientation",
    category="structured",
    class_names=tuple(f"{k * 360 / NUM_ORIENTATION_BINS:g}-"
                      f"{(k + 1) * 360 / NUM_ORIENTATION_BINS:g}deg"
                      for k in range(NUM_ORIENTATION_BINS)),
    block_fn=_orientation_block,
    label_fn=lambda f: orientation_bin(f["orientation"]),
    description=("Orientation of an asymmetric sprite (heart, triangle, arrow, "
                 "crescent), 16 bins of 22.5 deg (VTAB dSprites orientation)."))
