"""Procedural 32x32 RGB images for the offline hub and the offline mini-VTAB.

Pure numpy (matplotlib only to rasterise fonts once): no TensorFlow, no network.

- `SOURCES[name](num_examples, seed)` -> dict(image=uint8[N,32,32,3],
  label=int32[N], <factors>): pre-training data for the hub.
- `TASKS[name]`: downstream `TaskSpec`s (split sizes, classes, category);
  `render(split, seed)` yields (index, example); `render_range(split, start,
  stop, seed)` returns any slice, equal to the same slice of a whole render.
- `.spec()` of either: {key: (dtype, per-example shape)} of the arrays
  (what `fusion.data.synthetic` declares as TFDS features).

Example i of a stream depends only on (stream, seed, i), see `core`. Every task
split has its own stream, disjoint from the source streams, and the natural and
specialized tasks draw fonts / texture families no source draws.
"""
from fusion.data.render import core
from fusion.data.render.core import BLOCK_SIZE, Source, TaskSpec
from fusion.data.render.glyphs import GLYPHS, HOUSE_NUMBERS
from fusion.data.render.mixed import MIXED
from fusion.data.render.scenes import SCENES, SCENES_CLOSEST, SCENES_COUNT
from fusion.data.render.shapes import SHAPES_LOCATION, SHAPES_ORIENTATION, SHAPES_SOURCE
from fusion.data.render.textures import NOVEL_TEXTURES, TEXTURES

SOURCES: dict[str, Source] = {s.name: s for s in (GLYPHS, SHAPES_SOURCE, TEXTURES, SCENES)}
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    HOUSE_NUMBERS, MIXED, NOVEL_TEXTURES, SHAPES_LOCATION, SHAPES_ORIENTATION,
    SCENES_COUNT, SCENES_CLOSEST)}


def get_source(name: str) -> Source:
  if name not in SOURCES:
    raise ValueError(f"Unknown source {name!r}; sources: {sorted(SOURCES)}.")
  return SOURCES[name]


def get_task(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f"Unknown rendered task {name!r}; tasks: {sorted(TASKS)}.")
  return TASKS[name]


__all__ = ["BLOCK_SIZE", "SOURCES", "TASKS", "Source", "TaskSpec", "core", "get_source",
           "get_task"]
