"""Characters in the fonts that ship with matplotlib: the `glyphs` source and the
`house_numbers` natural task.

Each (font, character) is rasterised once with FreeType into a mask atlas; the
images then scale, rotate, move and colour those masks in vectorised numpy.
"""
import functools
import os
import string
import warnings

import matplotlib
import numpy as np
from matplotlib import ft2font

from fusion.data.render import core

CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase  # 62 classes.
DIGITS = string.digits

# Pre-training fonts: DejaVu Sans / Serif / Sans Mono in all four styles.
SOURCE_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf")
# Never seen in pre-training: STIX and Computer Modern (also shipped with matplotlib).
HELD_OUT_FONTS = (
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
    "cmti10.ttf")

_ATLAS_SIDE = 64  # Texels per atlas box side.
_EM = 40  # Font size in texels: the em is 40/64 of the box.


def font_dir() -> str:
  return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _rasterise(font_file: str, char: str) -> np.ndarray:
  path = os.path.join(font_dir(), font_file)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Font {font_file!r} is not in {font_dir()}; available: "
                            f"{sorted(f for f in os.listdir(font_dir()) if f.endswith('.ttf'))}")
  font = ft2font.FT2Font(path)
  if not font.get_char_index(ord(char)):
    raise ValueError(f"Font {font_file!r} has no glyph for {char!r}.")
  font.set_size(_EM, 72)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    font.set_text(char, 0, flags=ft2font.LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
  bitmap = np.asarray(font.get_image(), np.float32) / 255.0
  rows, cols = np.flatnonzero(bitmap.any(1)), np.flatnonzero(bitmap.any(0))
  ink = bitmap[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  h, w = ink.shape
  if h > _ATLAS_SIDE - 2 or w > _ATLAS_SIDE - 2:
    raise ValueError(f"Glyph {char!r} of {font_file!r} ({h}x{w}) does not fit the atlas.")
  box = np.zeros((_ATLAS_SIDE, _ATLAS_SIDE), np.float32)
  top, left = (_ATLAS_SIDE - h) // 2, (_ATLAS_SIDE - w) // 2  # Ink box centred.
  box[top:top + h, left:left + w] = ink
  return box


@functools.lru_cache(maxsize=8)
def glyph_pyramid(fonts: tuple[str, ...], chars: str) -> list[np.ndarray]:
  """Mip-mapped atlas; sprite font_index * len(chars) + char_index."""
  atlas = np.stack([_rasterise(f, c) for f in fonts for c in chars])
  return core.atlas_pyramid(atlas)


def render_glyphs(rng: np.random.Generator, labels: np.ndarray, chars: str,
                  fonts: tuple[str, ...], size_range: tuple[float, float] = (22.0, 38.0),
                  max_angle: float = np.deg2rad(20), max_shift: float = 4.0,
                  neighbours: float = 0.0, max_clutter: int = 3,
                  background_texture: bool = False) -> core.Examples:
  """Characters `chars[labels]` with random font, size, rotation, place, colours.

  `size` is the atlas box in pixels (the em is 5/8 of it). With `neighbours` > 0
  each side gets, with that probability, another random character of the same
  font and colour one advance away, mostly cut off by the frame (house numbers).
  """
  n = len(labels)
  pyramid = glyph_pyramid(fonts, chars)
  font = rng.integers(0, len(fonts), n)
  size = rng.uniform(*size_range, n).astype(np.float32)
  angle = rng.uniform(-max_angle, max_angle, n).astype(np.float32)
  cx = (16.0 + rng.uniform(-max_shift, max_shift, n)).astype(np.float32)
  cy = (16.0 + rng.uniform(-max_shift, max_shift, n)).astype(np.float32)
  bg, fg = core.contrasting_colours(rng, n)
  canvas = core.gradient_background(rng, bg)
  if background_texture:  # Brick, stucco, wood...: coarse value noise on the wall.
    texture = core.smooth_noise(rng, n, int(rng.integers(4, 9)), 32)
    amount = rng.uniform(0.0, 0.25, n).astype(np.float32)[:, None, None, None]
    canvas = np.clip(canvas + amount * (texture[..., None] - 0.5), 0, 1)
  canvas = core.draw_clutter(rng, canvas, max_clutter, max_clutter)
  alpha = core.warp_sprites(pyramid, font * len(chars) + labels, cx, cy, size, angle)
  left = np.full(n, -1, np.int32)
  right = np.full(n, -1, np.int32)
  if neighbours:
    advance = size * (_EM / _ATLAS_SIDE) * rng.uniform(0.55, 0.75, n).astype(np.float32)
    for sign, which in ((-1, left), (1, right)):
      present = rng.uniform(0, 1, n) < neighbours
      other = rng.integers(0, len(chars), n).astype(np.int32)
      which[present] = other[present]
      rows = np.flatnonzero(present)
      side = core.warp_sprites(
          pyramid, font[rows] * len(chars) + other[rows],
          cx[rows] + sign * advance[rows] * np.cos(angle[rows]),
          cy[rows] + sign * advance[rows] * np.sin(angle[rows]), size[rows], angle[rows])
      alpha[rows] = np.maximum(alpha[rows], side)
  canvas = core.composite(canvas, alpha, fg)
  if background_texture:  # Camera blur of a random strength.
    blur = rng.uniform(0.0, 0.7, n).astype(np.float32)[:, None, None, None]
    padded = np.pad(canvas, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(padded[:, i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9
    canvas = (1 - blur) * canvas + blur * box
  return dict(
      image=core.finish(rng, canvas, 0.05), char=labels.astype(np.int32),
      font=font.astype(np.int32), size=size, angle=angle, x=cx, y=cy,
      fg_colour=fg, bg_colour=bg, left_neighbour=left, right_neighbour=right)


def _glyphs_block(rng: np.random.Generator, n: int) -> core.Examples:
  labels = core.balanced_labels(rng, n, len(CHARS))
  out = render_glyphs(rng, labels, CHARS, SOURCE_FONTS)
  del out["left_neighbour"], out["right_neighbour"]
  return dict(out, label=out["char"])


GLYPHS = core.Source(
    name="glyphs",
    class_names=tuple(CHARS),
    block_fn=_glyphs_block,
    description=(
        "62 characters (0-9A-Za-z) in the 12 DejaVu fonts of matplotlib, random size, "
        "rotation (+-20 deg), position, contrasting colours, lines and blobs behind. "
        "Label: the character (o/O/0, l/I/1, ... are genuinely ambiguous)."))


def _house_numbers_block(rng: np.random.Generator, n: int) -> core.Examples:
  labels = core.balanced_labels(rng, n, len(DIGITS))
  return render_glyphs(rng, labels, DIGITS, HELD_OUT_FONTS, size_range=(34.0, 46.0),
                       max_angle=np.deg2rad(12), max_shift=2.5, neighbours=0.8,
                       max_clutter=2, background_texture=True)


# Natural task, the SVHN of this mini-VTAB: the centre digit of a house-number
# crop. It is a natural-image-like recognition task (clutter, blur, textured
# walls, distracting neighbour digits cut by the frame) whose test images can
# never be pre-training images: its fonts (STIX, Computer Modern) are not used by
# any source. It rewards shape features that survive a change of typeface.
HOUSE_NUMBERS = core.TaskSpec(
    name="house_numbers",
    category="natural",
    class_names=tuple(DIGITS),
    block_fn=_house_numbers_block,
    label_fn=lambda f: f["char"],
    description=("Centre digit of a house-number crop in held-out fonts (STIX, Computer "
                 "Modern), neighbour digits cut by the frame, textured walls, blur."))
