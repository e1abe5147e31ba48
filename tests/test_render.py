"""Procedural renderers (fusion.data.render): determinism, any-range rendering,
labels, held-out data never in a pre-training set, errors."""
import functools
import hashlib

import numpy as np
import pytest

from fusion.data import render
from fusion.data.render import core
from fusion.data.render import glyphs
from fusion.data.render import textures

BLOCK = render.BLOCK_SIZE
TASKS = sorted(render.TASKS)
SOURCES = sorted(render.SOURCES)


@functools.lru_cache(maxsize=None)
def _split(name, split, seed=0):
  """A whole task split, cached: several tests look at it (must not mutate)."""
  task = render.get_task(name)
  return task.render_range(split, 0, task.split_sizes[split], seed)


@functools.lru_cache(maxsize=None)
def _source(name, seed=0):
  """The first two blocks of a source, cached."""
  return render.get_source(name).render_range(0, 2 * BLOCK, seed)


def _head(examples, n=BLOCK):
  return {k: v[:n] for k, v in examples.items()}


def _assert_same(a, b):
  assert set(a) == set(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)  # NaN == NaN.


def _hashes(images):
  return [hashlib.sha256(image.tobytes()).digest() for image in images]


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", SOURCES)
def test_source_is_a_pure_function_of_seed(name):
  source = render.get_source(name)
  a = _head(_source(name))
  np.random.seed(123)  # The global numpy state must not matter.
  _assert_same(a, source(BLOCK))
  other = source(BLOCK, seed=1)
  assert not set(_hashes(a["image"])) & set(_hashes(other["image"]))
  assert a["image"].shape == (BLOCK, 32, 32, 3) and a["image"].dtype == np.uint8
  assert a["label"].dtype == np.int32
  assert set(source.spec()) == set(a)
  for key, (dtype, shape) in source.spec().items():  # The declared spec holds.
    assert a[key].dtype == dtype and a[key].shape == (BLOCK,) + shape, key


@pytest.mark.parametrize("name", TASKS)
def test_task_is_a_pure_function_of_split_and_seed(name):
  task = render.get_task(name)
  a = _head(_split(name, "train"))
  _assert_same(a, task.render_range("train", 0, BLOCK, seed=0))
  for other in (task.render_range("train", 0, BLOCK, 1), _head(_split(name, "test"))):
    assert not set(_hashes(a["image"])) & set(_hashes(other["image"]))
  assert set(task.spec()) == set(a)
  for key, (dtype, shape) in task.spec().items():
    assert a[key].dtype == dtype and a[key].shape == (BLOCK,) + shape, key


KINDS_AND_NAMES = [("source", n) for n in SOURCES] + [("task", n) for n in TASKS]


@pytest.mark.parametrize("kind, name", KINDS_AND_NAMES)
def test_any_range_equals_the_slice_of_a_bigger_render(kind, name):
  if kind == "source":
    whole, render_range = _source(name), render.get_source(name).render_range
  else:
    whole = _split(name, "train")
    render_range = functools.partial(render.get_task(name).render_range, "train")
  # Across a block edge, a single example, nothing.
  for start, stop in ((BLOCK - 5, BLOCK + 9), (7, 8), (5, 5)):
    _assert_same(render_range(start, stop), {k: v[start:stop] for k, v in whole.items()})


def test_iterate_and_render_yield_the_rendered_examples_in_order():
  source = render.get_source("shapes")
  whole = _source("shapes")
  got = list(source.iterate(BLOCK + 3, chunk=BLOCK))
  assert [i for i, _ in got] == list(range(BLOCK + 3))
  for i in (0, BLOCK - 1, BLOCK, BLOCK + 2):
    _assert_same(got[i][1], {k: v[i] for k, v in whole.items()})
  task = render.get_task("shapes_location")
  validation = _split("shapes_location", "validation")
  got = list(task.render("validation"))
  assert [i for i, _ in got] == list(range(task.split_sizes["validation"]))
  for i in (0, 199):
    _assert_same(got[i][1], {k: v[i] for k, v in validation.items()})
  assert len(list(task.render("validation", num_examples=3))) == 3


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize("kind, name", KINDS_AND_NAMES)
def test_labels_in_range_and_balanced_per_block(kind, name):
  spec = render.get_source(name) if kind == "source" else render.get_task(name)
  assert spec.num_classes == len(spec.class_names) == len(set(spec.class_names)) >= 2
  examples = _head(_source(name) if kind == "source" else _split(name, "train"))
  counts = np.bincount(examples["label"], minlength=spec.num_classes)
  assert len(counts) == spec.num_classes  # Nothing out of range...
  assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # ...and balanced.


def test_task_labels_follow_their_factors():
  def bins(values, high):  # 16 equal bins of [0, high), in float64.
    return np.clip(np.floor(values.astype(np.float64) / high * 16), 0, 15)

  loc = _split("shapes_location", "train")
  np.testing.assert_array_equal(loc["label"], bins(loc["x"], 1.0))
  ori = _split("shapes_orientation", "train")
  np.testing.assert_array_equal(ori["label"], bins(ori["orientation"], 2 * np.pi))
  assert set(ori["shape"]) <= {render.shapes.SHAPE_NAMES.index(s)
                               for s in render.shapes.ASYMMETRIC_SHAPES}
  count = _split("scenes_count", "train")
  np.testing.assert_array_equal(count["label"], count["count"] - 3)
  np.testing.assert_array_equal(count["count"], np.isfinite(count["depth"]).sum(1))
  closest = _split("scenes_closest", "train")
  np.testing.assert_array_equal(closest["closest_distance"], np.nanmin(closest["depth"], 1))
  edges = render.scenes.DISTANCE_EDGES
  assert (edges[closest["label"]] <= closest["closest_distance"]).all()
  assert (closest["closest_distance"] <= edges[closest["label"] + 1]).all()
  mixed = _head(_split("mixed", "train"))
  np.testing.assert_array_equal(mixed["label"], mixed["mixed_class"])
  assert set(np.bincount(mixed["domain"])) <= {BLOCK // 2}  # Half glyphs, half textures.
  texture_ids = [list(textures.SOURCE_FAMILIES).index(t) for t in render.mixed.MIXED_TEXTURES]
  want = np.where(mixed["domain"] == 0, mixed["label"], np.take(texture_ids, mixed["label"]))
  np.testing.assert_array_equal(mixed["source_class"], want)


def test_task_categories_and_split_sizes():
  for name in TASKS:
    task = render.get_task(name)
    assert task.category in ("natural", "specialized", "structured")
    assert dict(task.split_sizes) == {"train": 800, "validation": 200, "test": 2000}
  assert render.get_task("novel_textures").category == "specialized"
  assert {render.get_task(n).category for n in ("house_numbers", "mixed")} == {"natural"}
  for source in SOURCES:
    assert render.get_source(source).num_examples >= 20_000


# ------------------------------------------------- held out from pre-training


def test_every_stream_is_distinct():
  """Example i of a stream is drawn from the seed [stream_id, seed, block]: no
  two of our streams share an id, so no task split replays a source's numbers."""
  streams = [render.get_source(n).stream for n in SOURCES]
  streams += [render.get_task(n).stream(s) for n in TASKS for s in ("train", "validation",
                                                                     "test")]
  assert len(set(streams)) == len(streams)
  assert len({core.stream_id(s) for s in streams}) == len(streams)


def test_held_out_tasks_draw_what_no_source_draws():
  assert not set(glyphs.HELD_OUT_FONTS) & set(glyphs.SOURCE_FONTS)
  assert not set(textures.NOVEL_FAMILIES) & set(textures.SOURCE_FAMILIES)
  assert set(render.mixed.MIXED_TEXTURES) <= set(textures.SOURCE_FAMILIES)


def _spy_fonts_and_textures(monkeypatch):
  """(font tuples, texture family names) that renders draw from, as they draw."""
  fonts, families = [], []
  real_pyramid = glyphs.glyph_pyramid

  def pyramid(font_files, chars):
    fonts.append(tuple(font_files))
    return real_pyramid(font_files, chars)

  monkeypatch.setattr(glyphs, "glyph_pyramid", pyramid)
  for table in (textures.SOURCE_FAMILIES, textures.NOVEL_FAMILIES):
    for name, field in list(table.items()):
      def spy(rng, n, name=name, field=field):
        families.append(name)
        return field(rng, n)
      monkeypatch.setitem(table, name, spy)
  return fonts, families


def test_held_out_tasks_render_with_held_out_fonts_and_textures(monkeypatch):
  """What each render draws, watched while it renders: the held-out tasks use
  the held-out fonts / texture families (all of them), the sources never do."""
  fonts, families = _spy_fonts_and_textures(monkeypatch)
  house = render.get_task("house_numbers").render_range("test", 0, BLOCK)
  assert set(fonts) == {glyphs.HELD_OUT_FONTS} and not families
  # The per-example factor indexes that tuple, and every held-out font shows up.
  assert set(house["font"]) == set(range(len(glyphs.HELD_OUT_FONTS)))

  fonts.clear()
  novel = render.get_task("novel_textures").render_range("test", 0, BLOCK)
  assert not fonts and set(families) == set(textures.NOVEL_FAMILIES)
  assert set(novel["texture"]) == set(range(len(textures.NOVEL_FAMILIES)))

  families.clear()
  for name in SOURCES:
    render.get_source(name).render_range(0, BLOCK, seed=0)
  assert set(fonts) == {glyphs.SOURCE_FONTS}
  assert set(families) == set(textures.SOURCE_FAMILIES)


def test_no_test_image_is_a_training_or_pretraining_image():
  """Exact duplicates by hash: each task's whole test split against its train
  and validation splits, the other tasks' test splits and the first images of
  every source at two seeds."""
  pretraining = set()
  for name in SOURCES:
    for seed in (0, 1):
      pretraining.update(_hashes(_source(name, seed)["image"]))
  seen = {}
  for name in TASKS:
    test, train, val = (_hashes(_split(name, s)["image"]) for s in ("test", "train",
                                                                    "validation"))
    assert len(test) >= 2000, name
    assert len(set(test)) == len(test), name  # No duplicates inside the split.
    assert not set(test) & (set(train) | set(val)), name
    assert not set(train) & set(val), name
    assert not set(test) & pretraining, name
    for other, hashes in seen.items():
      assert not set(test) & hashes, (name, other)
    seen[name] = set(test)


# ------------------------------------------------------------------ errors


def test_bad_names_and_ranges_raise_clear_errors():
  with pytest.raises(ValueError, match="Unknown source 'mnist'.*glyphs"):
    render.get_source("mnist")
  with pytest.raises(ValueError, match="Unknown rendered task 'svhn'.*house_numbers"):
    render.get_task("svhn")
  task = render.get_task("shapes_location")
  with pytest.raises(ValueError, match="no split 'val'.*validation"):
    task.render("val")  # At the call, before anything is rendered.
  with pytest.raises(ValueError, match="no split 'train800'"):
    task.render_range("train800", 0, 1)
  source = render.get_source("shapes")
  with pytest.raises(ValueError, match="start must be a non-negative int, got -1"):
    source.render_range(-1, 3)
  with pytest.raises(ValueError, match=r"stop \(2\) must be >= start \(3\)"):
    source.render_range(3, 2)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    source(4, seed=1.5)
  with pytest.raises(ValueError, match="chunk must be a positive multiple"):
    source.iterate(4, chunk=100)  # At the call, before anything is rendered.
  with pytest.raises(ValueError, match="num_examples must be a non-negative int, got -2"):
    task.render("test", num_examples=-2)
  with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
    source.iterate(4, seed=-1)
  with pytest.raises(ValueError, match="category 'odd'"):
    core.TaskSpec(name="t", category="odd", class_names=("a", "b"),
                  block_fn=task.block_fn, label_fn=task.label_fn, description="")
