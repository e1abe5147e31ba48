"""CLEVR-style 2D scenes: the `scenes` source and the `scenes_count` /
`scenes_closest` structured tasks.

A pinhole camera at height `_CAMERA_HEIGHT` looks level over a ground plane;
the horizon is row `horizon` (jittered per image, as CLEVR jitters its camera,
so that depth must be read relative to the horizon and not from an absolute
row). An object at depth z stands on ground row `horizon + _F * _CAMERA_HEIGHT / z`
with a radius of `_F * R / z` pixels: nearer
objects are lower and larger, and they are painted last (occlusion in depth
order), with diffuse + specular shading and a shadow on the ground.

Factors, per object slot k < MAX_OBJECTS (slot 0 is the closest object, absent
slots hold NaN / -1): depth, x (centre column), ground_y (row where it touches
the ground), radius (pixels), shape, material, colour. Per scene: count,
closest_distance (the depth of slot 0) and horizon.
"""
import numpy as np

from fusion.data.render import core

MIN_OBJECTS, MAX_OBJECTS = 3, 10
HORIZON_RANGE = (5.0, 9.0)  # Row of the horizon.
Z_NEAR, Z_FAR = 2.0, 8.0  # Depth range of all objects.
Z_CLOSEST_MAX = 4.0  # The closest object is at most this far.
NUM_DISTANCE_BINS = 6  # As VTAB's CLEVR closest-object distance task.
# Bin edges equally spaced in inverse depth, i.e. in ground rows on screen, so
# every bin spans the same number of pixel rows (about 1.9).
DISTANCE_EDGES = 1.0 / np.linspace(1.0 / Z_NEAR, 1.0 / Z_CLOSEST_MAX, NUM_DISTANCE_BINS + 1)

_F = 32.9  # Focal length in pixels.
_CAMERA_HEIGHT = 1.34  # Ground rows: horizon + 44 / z, i.e. horizon + [5.5, 22].
_RADIUS = (0.25, 0.42)  # World radius of objects.
_CANDIDATES = 64  # Placement tries per object.
# Each object is drawn in a square window of a padded canvas, the smallest of
# these that holds it (its shadow reaches 1.5 radii right of the centre).
_WINDOWS = (10, 16, 26)
_PAD = 16

SHAPE_NAMES = ("sphere", "cube", "cylinder")
MATERIAL_NAMES = ("rubber", "metal")
COLOUR_NAMES = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
_COLOURS = np.array([[0.5, 0.5, 0.5], [0.75, 0.15, 0.15], [0.16, 0.3, 0.8],
                     [0.12, 0.55, 0.12], [0.5, 0.3, 0.1], [0.5, 0.16, 0.73],
                     [0.16, 0.8, 0.8], [0.95, 0.88, 0.2]], np.float32)
_LIGHT = np.array([-0.45, -0.65, 0.61]) / np.linalg.norm([-0.45, -0.65, 0.61])
_HALF = (_LIGHT + [0, 0, 1]) / np.linalg.norm(_LIGHT + [0, 0, 1])  # Blinn-Phong.
_LIGHT, _HALF = _LIGHT.astype(np.float32), _HALF.astype(np.float32)

SOURCE_CLASSES = tuple(f"{s}_{m}" for s in SHAPE_NAMES for m in MATERIAL_NAMES)


def ground_row(depth: np.ndarray, horizon: np.ndarray) -> np.ndarray:
  return horizon + _F * _CAMERA_HEIGHT / depth


def closest_distance_bin(distance: np.ndarray) -> np.ndarray:
  """Closest-object depth -> one of NUM_DISTANCE_BINS bins (0 = nearest)."""
  bins = np.searchsorted(DISTANCE_EDGES[1:-1], np.asarray(distance), side="right")
  return bins.astype(np.int32)


def _sample_layout(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  """Counts, closest-depth bins and closest-object kinds balanced per block."""
  count = MIN_OBJECTS + core.balanced_labels(rng, n, MAX_OBJECTS - MIN_OBJECTS + 1)
  dist_bin = core.balanced_labels(rng, n, NUM_DISTANCE_BINS)
  inv_edges = 1.0 / DISTANCE_EDGES
  inv_closest = rng.uniform(inv_edges[dist_bin + 1], inv_edges[dist_bin])
  kind = core.balanced_labels(rng, n, len(SOURCE_CLASSES))
  k = MAX_OBJECTS
  shape = rng.integers(0, len(SHAPE_NAMES), (n, k))
  material = rng.integers(0, len(MATERIAL_NAMES), (n, k))
  shape[:, 0], material[:, 0] = kind // len(MATERIAL_NAMES), kind % len(MATERIAL_NAMES)
  world_radius = rng.uniform(*_RADIUS, (n, k))
  # Candidates for every slot; slot 0 (the closest) has its depth fixed.
  inv = rng.uniform(1.0 / Z_FAR, inv_closest[:, None, None], (n, k, _CANDIDATES))
  inv[:, 0, :] = inv_closest[:, None]
  depth_c = 1.0 / inv
  radius_c = _F * world_radius[..., None] / depth_c
  x_c = radius_c + rng.uniform(0, 1, (n, k, _CANDIDATES)) * (32 - 2 * radius_c)
  horizon = rng.uniform(*HORIZON_RANGE, n)
  centre_c = ground_row(depth_c, horizon[:, None, None]) - radius_c
  present = np.arange(k)[None] < count[:, None]
  depth = np.full((n, k), np.nan)
  x, centre, radius = np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k))
  rows = np.arange(n)
  for slot in range(k):  # Greedy: the first candidate that keeps its distance.
    if slot == 0:
      pick = np.zeros(n, int)
    else:
      gap2 = ((x_c[:, slot, :, None] - x[:, None, :slot]) ** 2 +
              (centre_c[:, slot, :, None] - centre[:, None, :slot]) ** 2)
      reach = 0.85 * (radius_c[:, slot, :, None] + radius[:, None, :slot])
      worst = (gap2 / reach ** 2).min(axis=-1)  # Squared distance ratio, [n, candidates].
      ok = worst >= 1.0
      pick = np.where(ok.any(1), ok.argmax(1), worst.argmax(1))  # Else the least crowded.
    depth[:, slot] = depth_c[rows, slot, pick]
    x[:, slot] = x_c[rows, slot, pick]
    centre[:, slot] = centre_c[rows, slot, pick]
    radius[:, slot] = radius_c[rows, slot, pick]
  for a in (depth, x, radius):
    a[~present] = np.nan
  colour = rng.integers(0, len(_COLOURS), (n, k))
  for a in (shape, material, colour):
    a[~present] = -1
  return dict(count=count.astype(np.int32), closest_distance=depth[:, 0].astype(np.float32),
              depth=depth.astype(np.float32), x=x.astype(np.float32),
              ground_y=ground_row(depth, horizon[:, None]).astype(np.float32),
              horizon=horizon.astype(np.float32),
              radius=radius.astype(np.float32), shape=shape.astype(np.int32),
              material=material.astype(np.int32), colour=colour.astype(np.int32))


def _background(rng: np.random.Generator, horizon: np.ndarray) -> np.ndarray:
  n = len(horizon)
  ground = core.colours(rng, rng.uniform(0.35, 0.6, n), max_saturation=0.08)
  sky = core.colours(rng, rng.uniform(0.6, 0.85, n), max_saturation=0.1)
  _, y = core.pixel_grid()
  h = horizon[:, None, None].astype(np.float32)
  near = np.clip((y - h) / (32 - h), 0, 1)[..., None]  # [n, 32, 1, 1]: 0 far, 1 near.
  ground_img = ground[:, None, None, :] * (0.8 + 0.35 * near)
  sky_img = sky[:, None, None, :] * (1.0 - 0.15 * np.clip((h - y) / h, 0, 1))[..., None]
  above = core.coverage(y - h)[..., None]  # Soft horizon line.
  img = above * sky_img + (1 - above) * ground_img
  return np.broadcast_to(img, (n, 32, 32, 3)).astype(np.float32)


def _shade(base: np.ndarray, nx, ny, nz, metal: np.ndarray) -> np.ndarray:
  """Colour from a surface normal: ambient + diffuse + specular.

  The normal's components broadcast to [m, H, W] (constant per face for cubes,
  per column for cylinders), and so does the result's [m, H, W, 3].
  """
  diffuse = np.clip(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0, 1)
  h = np.clip(nx * _HALF[0] + ny * _HALF[1] + nz * _HALF[2], 0, 1)
  h = h * h
  h = h * h
  h8 = h * h
  spec = h8 * h8 * h8  # h ** 24, without pow().
  m = metal[:, None, None]
  intensity = (0.3 + 0.7 * diffuse) * np.where(m, 0.75, 1.0)
  highlight = spec * np.where(m, 0.9, 0.12)
  return np.clip(base[:, None, None, :] * intensity[..., None] + highlight[..., None], 0, 1)


def _paint(win: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
  a = alpha[..., None]
  return win + (colour - win) * a


def _draw_object(win, px, py, cx, gy, r, shape, metal, base):
  """Paints one object per row into windows `win` [m, W, W, 3].

  px [m, 1, W] and py [m, W, 1] are the windows' pixel centres; cx, gy, r
  [m, 1, 1] the objects' centre column, ground row and radius.
  """
  # Shadow: a flat ellipse on the ground, away from the light.
  sx, sy = (px - cx - 0.35 * r) / (1.15 * r), (py - gy) / (0.35 * r)
  win = win * (1 - 0.45 * core.coverage((np.sqrt(sx ** 2 + sy ** 2) - 1) * 0.35 * r))[..., None]
  dx, dy = px - cx, py - (gy - r)  # [m, 1, W], [m, W, 1]
  is_sphere, is_cube = shape == 0, shape == 1
  out = win.copy()
  one = np.ones((1, 1, 1), np.float32)
  if is_sphere.any():
    i = np.flatnonzero(is_sphere)
    rr = r[i]
    nx, ny = dx[i] / rr, dy[i] / rr
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
    alpha = core.coverage(np.sqrt(dx[i] ** 2 + dy[i] ** 2) - rr)
    out[i] = _paint(win[i], alpha, _shade(base[i], nx, ny, nz, metal[i]))
  if is_cube.any():
    i = np.flatnonzero(is_cube)
    a, g, x, y = 0.8 * r[i], gy[i], dx[i], py[i]
    w = win[i]
    front = core.coverage(np.maximum(np.abs(x) - a, np.abs(y - (g - a)) - a))
    t = (g - 2 * a - y) / (0.6 * a)  # 0 at the top face's front edge, 1 at its back.
    top = core.coverage(np.maximum(np.abs(x - 0.5 * a * t) - a,
                                   np.abs(t - 0.5) * 0.6 * a - 0.3 * a))
    s = (x - a) / (0.5 * a)  # 0 at the front face's right edge, 1 at the back.
    side = core.coverage(np.maximum(np.abs(s - 0.5) * 0.5 * a - 0.25 * a,
                                    np.abs(y + 0.6 * a * s - (g - a)) - a))
    # Flat faces catch no highlight; metal gets a glint fading across the face.
    glint = (0.45 * metal[i, None, None] *
             np.clip(0.6 - (x + y - g + a) / (2.5 * a), 0, 1))[..., None]
    for alpha, normal, gloss in ((front, (0.0, 0.0, 1.0), glint),
                                 (top, (0.0, -1.0, 0.3), 0.5 * glint),
                                 (side, (1.0, 0.0, 0.3), 0.0)):
      nrm = (np.array(normal) / np.linalg.norm(normal)).astype(np.float32)
      colour = _shade(base[i], nrm[0] * one, nrm[1] * one, nrm[2] * one, metal[i])
      w = _paint(w, alpha, np.minimum(colour + gloss, 1))
    out[i] = w
  rest = ~(is_sphere | is_cube)
  if rest.any():  # Cylinders: a shaded body between two elliptic caps.
    i = np.flatnonzero(rest)
    a, g, x, y = 0.8 * r[i], gy[i], dx[i], py[i]
    bottom, top = g - 0.3 * a, g - 0.3 * a - 1.8 * a
    cap = lambda yc: np.sqrt((x / a) ** 2 + ((y - yc) / (0.3 * a)) ** 2) - 1
    body = np.minimum(np.maximum(np.abs(x) - a, np.maximum(top - y, y - bottom)),
                      cap(bottom) * 0.3 * a)
    nx = np.clip(x / a, -1, 1)  # Per column: [m, 1, W].
    w = _paint(win[i], core.coverage(body),
               _shade(base[i], nx, 0 * nx, np.sqrt(1 - nx ** 2), metal[i]))
    lid = _shade(base[i], 0 * one, -0.95 * one, 0.3 * one, metal[i])
    out[i] = _paint(w, core.coverage(cap(top) * 0.3 * a), lid)
  return out


def render_scenes(rng: np.random.Generator, n: int) -> core.Examples:
  f = _sample_layout(rng, n)
  tint = rng.uniform(0.85, 1.1, (n, MAX_OBJECTS, 3)).astype(np.float32)  # Colour jitter.
  side = 32 + 2 * _PAD
  canvas = np.pad(_background(rng, f["horizon"]), ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))
  flat = canvas.reshape(-1, 3)  # A view: writes go to `canvas`.
  order = np.argsort(-np.nan_to_num(f["depth"], nan=np.inf), axis=1)  # Far to near.
  window = np.minimum(np.searchsorted(np.array(_WINDOWS) - 4, 3 * f["radius"]),
                      len(_WINDOWS) - 1)
  for rank in range(MAX_OBJECTS):
    present = rank >= MAX_OBJECTS - f["count"]  # Absent slots sort first.
    for w, size in enumerate(_WINDOWS):
      rows = np.flatnonzero(present & (window[np.arange(n), order[:, rank]] == w))
      if not len(rows):
        continue
      s = order[rows, rank]
      cx, gy, r = f["x"][rows, s], f["ground_y"][rows, s], f["radius"][rows, s]
      ox = np.floor(cx).astype(np.int64) - size // 2 + _PAD
      oy = np.floor(gy - r).astype(np.int64) - size // 2 + _PAD
      offsets = np.arange(size)
      ys, xs = oy[:, None] + offsets, ox[:, None] + offsets
      index = (rows[:, None, None] * side + ys[:, :, None]) * side + xs[:, None, :]
      px = (xs - _PAD + 0.5).astype(np.float32)[:, None, :]
      py = (ys - _PAD + 0.5).astype(np.float32)[:, :, None]
      base = np.clip(_COLOURS[f["colour"][rows, s]] * tint[rows, s], 0, 1)
      flat[index] = _draw_object(flat[index], px, py, cx[:, None, None], gy[:, None, None],
                                 r[:, None, None], f["shape"][rows, s],
                                 f["material"][rows, s] == 1, base)
  canvas = canvas[:, _PAD:_PAD + 32, _PAD:_PAD + 32]
  return dict(image=core.finish(rng, canvas, 0.03), **f)


def _source_block(rng: np.random.Generator, n: int) -> core.Examples:
  out = render_scenes(rng, n)
  label = out["shape"][:, 0] * len(MATERIAL_NAMES) + out["material"][:, 0]
  return dict(out, label=label.astype(np.int32))


# Pre-training label: shape and material of the closest object. It needs the
# scene's depth order and object parts, but it is neither downstream label, so
# scenes_count and scenes_closest stay transfer tasks.
SCENES = core.Source(
    name="scenes",
    class_names=SOURCE_CLASSES,
    block_fn=_source_block,
    description=("CLEVR-like: 3-10 shaded spheres / cubes / cylinders (rubber or metal, "
                 "8 colours) on a ground plane in perspective, occluding in depth order. "
                 "Label: shape x material of the closest object (6 classes)."))

SCENES_COUNT = core.TaskSpec(
    name="scenes_count",
    category="structured",
    class_names=tuple(str(c) for c in range(MIN_OBJECTS, MAX_OBJECTS + 1)),
    block_fn=render_scenes,
    label_fn=lambda f: f["count"] - MIN_OBJECTS,
    description="Number of objects, 3..10 (VTAB CLEVR count).")

SCENES_CLOSEST = core.TaskSpec(
    name="scenes_closest",
    category="structured",
    class_names=tuple(f"{lo:.2f}-{hi:.2f}" for lo, hi in
                      zip(DISTANCE_EDGES[:-1], DISTANCE_EDGES[1:])),
    block_fn=render_scenes,
    label_fn=lambda f: closest_distance_bin(f["closest_distance"]),
    description=("Depth of the closest object in 6 bins (VTAB CLEVR closest-object "
                 "distance); bins are equal steps of ground row."))
