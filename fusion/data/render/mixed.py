"""The `mixed` task: two input domains sharing one label space.

Half of the images are digits (glyph domain, label = the digit), half are
textures (texture domain, label = index into MIXED_TEXTURES). A glyph-trained
and a texture-trained model each know one half, so the best model differs per
input: the case that per-input routing and gated fusion are for.
"""
import numpy as np

from fusion.data.render import core
from fusion.data.render import glyphs
from fusion.data.render import textures

MIXED_TEXTURES = ("checker", "dot_lattice", "random_dots", "white_noise", "fractal_noise",
                  "thin_lines", "rings", "rays", "plaid", "blobs")
DOMAINS = ("glyph", "texture")


def _mixed_block(rng: np.random.Generator, n: int) -> core.Examples:
  mixed_class = core.balanced_labels(rng, n, len(glyphs.DIGITS))
  domain = core.balanced_labels(rng, n, len(DOMAINS))
  texture_ids = np.array([list(textures.SOURCE_FAMILIES).index(t) for t in MIXED_TEXTURES])
  g, t = np.flatnonzero(domain == 0), np.flatnonzero(domain == 1)
  digit_images = glyphs.render_glyphs(rng, mixed_class[g], glyphs.DIGITS,
                                      glyphs.SOURCE_FONTS)["image"]
  texture_images = textures.render_textures(rng, texture_ids[mixed_class[t]],
                                            textures.SOURCE_FAMILIES)["image"]
  image = np.empty((n, core.IMAGE_SIZE, core.IMAGE_SIZE, 3), np.uint8)
  image[g], image[t] = digit_images, texture_images
  # Class in its own source's label space: CHARS starts with the digits.
  source_class = np.where(domain == 0, mixed_class, texture_ids[mixed_class])
  return dict(image=image, mixed_class=mixed_class, domain=domain,
              source_class=source_class.astype(np.int32))


MIXED = core.TaskSpec(
    name="mixed",
    # Its own kind of task; filed under "natural" because its inputs are
    # object-like recognition problems rather than structure or specialised images.
    category="natural",
    class_names=tuple(f"{d}|{t}" for d, t in zip(glyphs.DIGITS, MIXED_TEXTURES)),
    block_fn=_mixed_block,
    label_fn=lambda f: f["mixed_class"],
    description=("Half digits in the pre-training fonts (label = digit), half source "
                 "textures (label = index into MIXED_TEXTURES); factor `domain` says "
                 "which (0 glyph, 1 texture)."))
