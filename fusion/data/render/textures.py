"""Procedural textures: the `textures` source (23 classes) and the
`novel_textures` specialized task (10 families the source never draws).

A texture is a scalar field in [0, 1] drawn at 2x resolution (anti-aliasing),
mapped between two random contrasting colours, shaded by a random ramp and
noised. Colours, phases and offsets are random per image, so neither mean colour
nor the position of a feature tells the class: only the pattern does.
"""
import math
from collections.abc import Callable

import numpy as np

from fusion.data.render import core

_SS = 2  # Supersampling factor.
_AA = 1.0 / _SS  # One sample, in pixels: the width of anti-aliased edges.
Field = Callable[[np.random.Generator, int], np.ndarray]  # -> [n, 64, 64] in [0, 1]


def _u(rng, n, low, high):
  return rng.uniform(low, high, n).astype(np.float32)[:, None, None]


def _frame(angle: np.ndarray, centre=(16.0, 16.0)):
  """Per-image rotated coordinates about `centre` (u along `angle`, v across), in
  pixels."""
  x, y = core.pixel_grid(core.IMAGE_SIZE, _SS)
  x, y = x - centre[0], y - centre[1]
  c, s = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
  return x * c + y * s, -x * s + y * c


def _stripes(t: np.ndarray, period, duty) -> np.ndarray:
  """Anti-aliased square wave: 1 on the first `duty` fraction of each period."""
  phase = np.mod(t, period)
  on = duty * period
  inside = np.minimum(phase, on - phase)
  outside = np.minimum(phase - on, period - phase)
  return core.coverage(-np.where(phase < on, inside, -outside), _AA)


def _lines(distance: np.ndarray, width) -> np.ndarray:
  return core.coverage(np.abs(distance) - width / 2, _AA)


def _normalise(f: np.ndarray) -> np.ndarray:
  lo = f.min(axis=(1, 2), keepdims=True)
  hi = f.max(axis=(1, 2), keepdims=True)
  return (f - lo) / np.maximum(hi - lo, 1e-6)


def _fractal(rng, n, octaves=(2, 4, 8, 16)) -> np.ndarray:
  size = core.IMAGE_SIZE * _SS
  return _normalise(sum(core.smooth_noise(rng, n, c, size) / c for c in octaves))


# --- Source families ----------------------------------------------------------


def grating(angle_deg: float, cycles: tuple[float, float]) -> Field:
  def field(rng, n):
    angle = np.deg2rad(angle_deg) + _u(rng, n, -np.deg2rad(8), np.deg2rad(8))
    u, _ = _frame(angle)
    freq = _u(rng, n, *cycles) / core.IMAGE_SIZE
    return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + _u(rng, n, 0, 2 * np.pi))
  return field


def checker(angle_deg: float) -> Field:
  def field(rng, n):
    angle = np.deg2rad(angle_deg) + _u(rng, n, -np.deg2rad(8), np.deg2rad(8))
    u, v = _frame(angle)
    cell = _u(rng, n, 3.0, 6.0)
    a = _stripes(u + _u(rng, n, 0, 12), 2 * cell, 0.5)
    b = _stripes(v + _u(rng, n, 0, 12), 2 * cell, 0.5)
    return a + b - 2 * a * b  # Soft XOR.
  return field


def dot_lattice(rng, n):
  u, v = _frame(_u(rng, n, 0, np.pi / 2))
  spacing = _u(rng, n, 5.0, 8.0)
  du = np.mod(u + _u(rng, n, 0, 8), spacing) - spacing / 2
  dv = np.mod(v + _u(rng, n, 0, 8), spacing) - spacing / 2
  radius = spacing * _u(rng, n, 0.2, 0.32)
  return core.coverage(np.sqrt(du ** 2 + dv ** 2) - radius, _AA)


def random_dots(rng, n):
  x, y = core.pixel_grid(core.IMAGE_SIZE, _SS)
  count = rng.integers(15, 36, n)
  out = np.zeros((n, 64, 64), np.float32)
  for k in range(35):
    cx, cy, r = _u(rng, n, -1, 33), _u(rng, n, -1, 33), _u(rng, n, 1.0, 1.8)
    dot = core.coverage(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r, _AA)
    out = np.maximum(out, dot * (k < count)[:, None, None])
  return out


def white_noise(rng, n):
  return np.repeat(np.repeat(rng.uniform(0, 1, (n, 32, 32)).astype(np.float32), 2, 1), 2, 2)


def smooth_noise(rng, n):
  return _normalise(core.smooth_noise(rng, n, int(rng.integers(3, 6)), 64))


def fractal_noise(rng, n):
  return _fractal(rng, n)


def thin_lines(rng, n):
  u, _ = _frame(_u(rng, n, 0, np.pi))
  return _stripes(u + _u(rng, n, 0, 8), _u(rng, n, 4.0, 7.0), _u(rng, n, 0.15, 0.25))


def waves(rng, n):
  u, v = _frame(_u(rng, n, 0, 2 * np.pi))
  bend = _u(rng, n, 1.5, 3.0) * np.sin(2 * np.pi * u / _u(rng, n, 10.0, 16.0))
  return 0.5 + 0.5 * np.sin(2 * np.pi * (v + bend) / _u(rng, n, 4.0, 6.0))


def rings(rng, n):
  x, y = core.pixel_grid(core.IMAGE_SIZE, _SS)
  r = np.sqrt((x - _u(rng, n, -8, 40)) ** 2 + (y - _u(rng, n, -8, 40)) ** 2)
  return 0.5 + 0.5 * np.cos(2 * np.pi * r / _u(rng, n, 4.0, 7.0) + _u(rng, n, 0, 6.3))


def rays(rng, n):
  x, y = core.pixel_grid(core.IMAGE_SIZE, _SS)
  theta = np.arctan2(y - _u(rng, n, 4, 28), x - _u(rng, n, 4, 28))
  spokes = rng.integers(6, 13, n).astype(np.float32)[:, None, None]
  return 0.5 + 0.5 * np.cos(spokes * theta + _u(rng, n, 0, 6.3))


def plaid(rng, n):
  u, v = _frame(_u(rng, n, 0, np.pi / 2))
  a = np.sin(2 * np.pi * u * _u(rng, n, 3, 5) / 32 + _u(rng, n, 0, 6.3))
  b = np.sin(2 * np.pi * v * _u(rng, n, 3, 5) / 32 + _u(rng, n, 0, 6.3))
  return 0.5 + 0.25 * (a + b)


def line_grid(angle_deg: float) -> Field:
  def field(rng, n):
    angle = np.deg2rad(angle_deg) + _u(rng, n, -np.deg2rad(8), np.deg2rad(8))
    u, v = _frame(angle)
    period, duty = _u(rng, n, 5.0, 8.0), _u(rng, n, 0.15, 0.25)
    return np.maximum(_stripes(u + _u(rng, n, 0, 8), period, duty),
                      _stripes(v + _u(rng, n, 0, 8), period, duty))
  return field


def blobs(rng, n):
  f = _normalise(core.smooth_noise(rng, n, int(rng.integers(4, 7)), 64))
  return np.clip((f - 0.5) * 8 + 0.5, 0, 1)


# --- Novel families (specialized task only) -----------------------------------


def _voronoi_edges(points_x: np.ndarray, points_y: np.ndarray, width) -> np.ndarray:
  """Edges of the Voronoi cells of per-image points [n, K] (K may be padded w/ inf)."""
  x, y = core.pixel_grid(core.IMAGE_SIZE, _SS)
  n = len(points_x)
  d1 = np.full((n, 64, 64), np.inf, np.float32)
  d2 = np.full((n, 64, 64), np.inf, np.float32)
  for k in range(points_x.shape[1]):
    d = np.sqrt((x - points_x[:, k, None, None]) ** 2 + (y - points_y[:, k, None, None]) ** 2)
    d2 = np.minimum(d2, np.maximum(d1, d))
    d1 = np.minimum(d1, d)
  return core.coverage((d2 - d1) / 2 - width / 2, _AA)


def cells(rng, n):
  count = rng.integers(6, 15, n)
  px = rng.uniform(-4, 36, (n, 14)).astype(np.float32)
  py = rng.uniform(-4, 36, (n, 14)).astype(np.float32)
  px[np.arange(14)[None] >= count[:, None]] = 1e4  # Unused points far away.
  return _voronoi_edges(px, py, _u(rng, n, 0.8, 1.4))


def hexagons(rng, n):
  """Edges of a hexagonal tiling: the nearest centre comes from two offset
  rectangular lattices; the distance to the cell edge from its hexagonal norm."""
  u, v = _frame(_u(rng, n, 0, np.pi / 3))
  side = _u(rng, n, 8.0, 12.0)  # Distance between neighbouring centres.
  height = side * math.sqrt(3)
  u, v = u + _u(rng, n, 0, 8), v + _u(rng, n, 0, 8)
  qa = (u - np.round(u / side) * side, v - np.round(v / height) * height)
  ub, vb = u - side / 2, v - height / 2
  qb = (ub - np.round(ub / side) * side, vb - np.round(vb / height) * height)
  nearer_a = qa[0] ** 2 + qa[1] ** 2 < qb[0] ** 2 + qb[1] ** 2
  qu, qv = np.where(nearer_a, qa[0], qb[0]), np.where(nearer_a, qa[1], qb[1])
  norm = np.maximum(np.abs(qu), np.abs(0.5 * qu + math.sqrt(3) / 2 * qv))
  norm = np.maximum(norm, np.abs(0.5 * qu - math.sqrt(3) / 2 * qv))
  return _lines(side / 2 - norm, _u(rng, n, 0.9, 1.5))


def spiral(rng, n):
  x, y = core.pixel_grid(core.IMAGE_SIZE, _SS)
  dx, dy = x - _u(rng, n, 10, 22), y - _u(rng, n, 10, 22)
  arms = rng.integers(1, 4, n).astype(np.float32)[:, None, None]
  turn = np.where(rng.uniform(0, 1, n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
  r, theta = np.sqrt(dx ** 2 + dy ** 2), np.arctan2(dy, dx)
  return 0.5 + 0.5 * np.cos(turn * arms * theta + 2 * np.pi * r / _u(rng, n, 4.0, 7.0))


def concentric_squares(rng, n):
  u, v = _frame(_u(rng, n, 0, np.pi / 2), (_u(rng, n, 8, 24), _u(rng, n, 8, 24)))
  d = np.maximum(np.abs(u), np.abs(v))
  return 0.5 + 0.5 * np.cos(2 * np.pi * d / _u(rng, n, 4.0, 7.0) + _u(rng, n, 0, 6.3))


def bricks(rng, n):
  u, v = _frame(_u(rng, n, -np.deg2rad(8), np.deg2rad(8)))
  height = _u(rng, n, 4.0, 6.0)
  width = height * _u(rng, n, 1.8, 2.6)
  v = v + _u(rng, n, 0, 8)
  row = np.floor(v / height)
  u = u + _u(rng, n, 0, 16) + 0.5 * width * np.mod(row, 2)
  mortar = _u(rng, n, 0.7, 1.2)
  dv = np.abs(np.mod(v, height) - height / 2)  # Distance from the row's middle.
  du = np.abs(np.mod(u, width) - width / 2)
  edge = np.minimum(height / 2 - dv, width / 2 - du)  # Distance to the nearest joint.
  return core.coverage(edge - mortar / 2, _AA)  # 1 on mortar, 0 on bricks.


def zigzag(rng, n):
  u, v = _frame(_u(rng, n, 0, 2 * np.pi))
  span = _u(rng, n, 6.0, 10.0)
  tri = 2 * np.abs(np.mod(u / span, 1.0) - 0.5)  # Triangle wave in [0, 1].
  return _stripes(v + _u(rng, n, 2.0, 4.0) * tri + _u(rng, n, 0, 8),
                  _u(rng, n, 4.0, 6.0), 0.5)


def marble(rng, n):
  u, _ = _frame(_u(rng, n, 0, np.pi))
  turbulence = _u(rng, n, 3.0, 6.0) * _fractal(rng, n, (2, 4, 8))
  return 0.5 + 0.5 * np.sin(2 * np.pi * u / _u(rng, n, 6.0, 10.0) + turbulence)


def _cell_bits(rng, n, u, v, cell):
  """Per-cell random bit and the position inside the cell, in [0, 1)^2."""
  fu, fv = np.floor(u / cell), np.floor(v / cell)
  iu, iv = fu.astype(np.int64) % 24, fv.astype(np.int64) % 24
  bits = rng.integers(0, 2, (n, 24 * 24))
  bit = np.take_along_axis(bits, (iv * 24 + iu).reshape(n, -1), 1).reshape(iu.shape)
  return bit.astype(bool), u / cell - fu, v / cell - fv


def truchet(rng, n):
  u, v = _frame(_u(rng, n, 0, np.pi / 2))
  cell = _u(rng, n, 6.0, 9.0)
  bit, fu, fv = _cell_bits(rng, n, u + 100, v + 100, cell)
  fu = np.where(bit, 1 - fu, fu)  # Mirror: arcs around the other corner pair.
  d = np.minimum(np.abs(np.sqrt(fu ** 2 + fv ** 2) - 0.5),
                 np.abs(np.sqrt((1 - fu) ** 2 + (1 - fv) ** 2) - 0.5)) * cell
  return _lines(d, _u(rng, n, 0.9, 1.5))


def maze(rng, n):
  u, v = _frame(_u(rng, n, -np.deg2rad(8), np.deg2rad(8)))
  cell = _u(rng, n, 4.0, 6.0)
  bit, fu, fv = _cell_bits(rng, n, u + 100, v + 100, cell)
  d = np.where(bit, fu - fv, fu + fv - 1) * cell / math.sqrt(2)  # Distance to '\' or '/'.
  return _lines(d, _u(rng, n, 0.9, 1.4))


def weave(rng, n):
  u, v = _frame(_u(rng, n, -np.deg2rad(8), np.deg2rad(8)))
  cell = _u(rng, n, 6.0, 9.0)
  u, v = u + 100 + _u(rng, n, 0, 9), v + 100 + _u(rng, n, 0, 9)
  across = np.mod(np.floor(u / cell) + np.floor(v / cell), 2) == 1
  threads = cell / rng.integers(2, 4, n).astype(np.float32)[:, None, None]
  return np.where(across, _stripes(v, threads, 0.6), _stripes(u, threads, 0.6))


SOURCE_FAMILIES: dict[str, Field] = {
    **{f"grating_{a}_{name}": grating(a, cycles)
       for a in (0, 45, 90, 135) for name, cycles in (("low", (1.5, 2.5)),
                                                      ("high", (5.0, 7.0)))},
    "checker": checker(0), "checker_diagonal": checker(45),
    "dot_lattice": dot_lattice, "random_dots": random_dots,
    "white_noise": white_noise, "smooth_noise": smooth_noise,
    "fractal_noise": fractal_noise, "thin_lines": thin_lines, "waves": waves,
    "rings": rings, "rays": rays, "plaid": plaid, "grid_lines": line_grid(0),
    "crosshatch": line_grid(45), "blobs": blobs,
}
NOVEL_FAMILIES: dict[str, Field] = {
    "cells": cells, "hexagons": hexagons, "spiral": spiral,
    "concentric_squares": concentric_squares, "bricks": bricks, "zigzag": zigzag,
    "marble": marble, "truchet": truchet, "maze": maze, "weave": weave,
}


def render_textures(rng: np.random.Generator, classes: np.ndarray,
                    families: dict[str, Field]) -> core.Examples:
  """Images of texture `classes` (indices into `families`) with random colours."""
  n = len(classes)
  fns = list(families.values())
  field = np.zeros((n, 64, 64), np.float32)
  for k, fn in enumerate(fns):
    rows = np.flatnonzero(classes == k)
    if len(rows):  # Some fields cannot draw zero images (and need not).
      field[rows] = fn(rng, len(rows))
  bg, fg = core.contrasting_colours(rng, n, min_contrast=0.25)
  # Compositing is linear in the field: filter first, composite at 32x32.
  field = core.downsample(field[..., None], _SS)[..., 0]
  canvas = core.composite(np.broadcast_to(bg[:, None, None, :], (n, 32, 32, 3)), field, fg)
  shade = core.gradient_background(rng, np.full((n, 3), 0.5, np.float32), 0.3) - 0.5
  canvas = np.clip(canvas + shade, 0, 1)
  return dict(image=core.finish(rng, canvas, 0.05), texture=classes.astype(np.int32),
              fg_colour=fg, bg_colour=bg)


def _source_block(rng: np.random.Generator, n: int) -> core.Examples:
  out = render_textures(rng, core.balanced_labels(rng, n, len(SOURCE_FAMILIES)),
                        SOURCE_FAMILIES)
  return dict(out, label=out["texture"])


def _novel_block(rng: np.random.Generator, n: int) -> core.Examples:
  return render_textures(rng, core.balanced_labels(rng, n, len(NOVEL_FAMILIES)),
                         NOVEL_FAMILIES)


TEXTURES = core.Source(
    name="textures",
    class_names=tuple(SOURCE_FAMILIES),
    block_fn=_source_block,
    description=("23 texture classes: sine gratings (4 orientations x 2 frequencies), "
                 "checkerboards, dot lattices, random dots, noise octaves, lines, waves, "
                 "rings, rays, plaid, grids, crosshatch, blobs; random colours and phase."))

# Specialized task: texture families that the `textures` source never draws
# (cells, tilings, spirals, ...), like VTAB's DTD-to-medical/satellite gap.
NOVEL_TEXTURES = core.TaskSpec(
    name="novel_textures",
    category="specialized",
    class_names=tuple(NOVEL_FAMILIES),
    block_fn=_novel_block,
    label_fn=lambda f: f["texture"],
    description="10 texture families unseen in pre-training (Voronoi cells, hexagons, "
                "spirals, concentric squares, bricks, zigzag, marble, Truchet, maze, weave).")
