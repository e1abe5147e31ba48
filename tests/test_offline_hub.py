"""The offline hub: builds tiny recipes with the real HF classes and the real
trainer, loads them through `fusion.hub`, and checks the cache: a second call
trains nothing, an interrupted build resumes to the same weights, a corrupt
or half-written model is rebuilt, and bad recipes fail with clear errors."""
import json
import os

import numpy as np
import pytest

from fusion import hub
from fusion import offline_hub

TINY_VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32)
TINY_CNN = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
NAMES = ("vit_shapes", "resnet_rotation", "vit_random")


def tiny_config(**overrides):
  config = offline_hub.default_config()
  config.train_examples = 128
  config.eval_examples = 32
  config.batch_size = 16  # Divisible by the 8 simulated devices.
  config.checkpoint_every = 2
  config.models = (
      offline_hub._model("vit_shapes", "vit", "shapes", "supervised", 0, 4, **TINY_VIT),
      offline_hub._model("resnet_rotation", "resnet", "union", "rotation", 0, 4, **TINY_CNN),
      offline_hub._model("vit_random", "vit", "none", "random", 0, 0, **TINY_VIT),
  )
  config.update(overrides)
  return config


def _weights(spec_or_dir) -> bytes:
  directory = spec_or_dir["path"] if isinstance(spec_or_dir, dict) else spec_or_dir
  with open(os.path.join(directory, offline_hub.WEIGHTS), "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(FUSION_HOME, specs) of the tiny hub, built once for the module."""
  home = str(tmp_path_factory.mktemp("fusion_home"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("FUSION_HOME", home)
    specs = offline_hub.build(tiny_config())
  return home, specs


@pytest.fixture
def calls(monkeypatch):
  """Names of the models `build_model` is asked to (re)build."""
  names = []
  original = offline_hub.build_model

  def spy(entry, *args, **kwargs):
    names.append(entry["name"])
    return original(entry, *args, **kwargs)

  monkeypatch.setattr(offline_hub, "build_model", spy)
  return names


def test_specs_load_through_the_hub_loader(built, monkeypatch):
  home, specs = built
  monkeypatch.setenv("FUSION_HOME", home)
  root = offline_hub.hub_dir(tiny_config())
  assert root.startswith(os.path.join(home, "hub") + os.sep)
  assert specs == [{"name": n, "path": os.path.join(root, n)} for n in NAMES]
  backbones = hub.load_hub(specs)
  assert [b.name for b in backbones] == list(NAMES)
  assert [b.architecture for b in backbones] == ["vit", "resnet", "vit"]
  for b in backbones:
    assert b.preprocess.resolution == 32
    assert b.feature_dim == 16
    expected = hub.HALF if b.architecture == "vit" else hub.IMAGENET_MEAN
    np.testing.assert_allclose(b.preprocess.mean, expected)
    if b.architecture == "resnet":
      assert set(b.params) == {"params", "batch_stats"}
    else:  # Saved without ViT's unused pooler.
      assert "pooler" not in b.params["params"]
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    feats = np.asarray(b.features(b.params, images))
    assert feats.shape == (4, 16) and np.all(np.isfinite(feats))
    assert np.std(feats, axis=0).max() > 0  # Depends on the input.
  # No staging or work directories are left behind.
  assert sorted(os.listdir(root)) == sorted([*NAMES, "manifest.json", "recipe.json"])


def test_manifest_and_run(built, monkeypatch, tmp_path):
  home, specs = built
  monkeypatch.setenv("FUSION_HOME", home)
  manifest = offline_hub.load_manifest(tiny_config())
  assert [e["name"] for e in manifest["models"]] == list(NAMES)
  vit, rotation, random = manifest["models"]
  for e in manifest["models"]:
    assert e["parameters"] > 0 and e["inference_gflops"] > 0 and e["build_seconds"] > 0
    assert e["feature_dim"] == 16
  assert (vit["source"], vit["paradigm"], vit["seed"], vit["steps"]) == (
      "shapes", "supervised", 0, 4)
  assert rotation["architecture"] == "resnet" and rotation["paradigm"] == "rotation"
  assert 0 <= vit["pretext_accuracy"] <= 1 and 0 <= rotation["pretext_accuracy"] <= 1
  assert random["pretext_accuracy"] is None and random["source"] == "none"
  config = type(tiny_config())({"job": "build_hub", "offline_hub": tiny_config()})
  markdown = offline_hub.run(config, str(tmp_path))
  assert all(f"| {n} |" in markdown for n in NAMES)
  assert (tmp_path / "results.md").read_text() == markdown
  assert json.loads((tmp_path / "manifest.json").read_text())["models"] == manifest["models"]


def test_second_call_is_cached(built, monkeypatch, calls):
  home, specs = built
  monkeypatch.setenv("FUSION_HOME", home)
  mtimes = {s["name"]: os.stat(os.path.join(s["path"], offline_hub.WEIGHTS)).st_mtime_ns
            for s in specs}
  def no_training(**kwargs):
    raise AssertionError(f"A cached hub trained {kwargs.get('run_name')!r} again.")

  monkeypatch.setattr(offline_hub.train, "train", no_training)
  assert offline_hub.build(tiny_config()) == specs
  assert calls == []  # Nothing rebuilt.
  assert mtimes == {s["name"]: os.stat(os.path.join(s["path"], offline_hub.WEIGHTS)).st_mtime_ns
                    for s in specs}


def test_interrupted_build_resumes_to_the_same_weights(built, monkeypatch, tmp_path, calls):
  _, reference = built
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  original = offline_hub.make_batch_fn

  def dying(images, labels, **kwargs):
    batch_fn = original(images, labels, **kwargs)
    def fn(step):
      if kwargs["paradigm"] == "rotation" and step == 3:
        raise KeyboardInterrupt("killed mid-model")
      return batch_fn(step)
    return fn

  monkeypatch.setattr(offline_hub, "make_batch_fn", dying)
  with pytest.raises(KeyboardInterrupt):
    offline_hub.build(tiny_config())
  root = offline_hub.hub_dir(tiny_config())
  assert offline_hub.is_complete(os.path.join(root, "vit_shapes"))
  assert not os.path.exists(os.path.join(root, "resnet_rotation"))
  assert not os.path.exists(os.path.join(root, offline_hub.MANIFEST))
  checkpoints = os.path.join(root, ".work", "resnet_rotation", "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["2"]  # Saved at step 2 of 4.
  assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
  finished = os.stat(os.path.join(root, "vit_shapes", offline_hub.WEIGHTS)).st_mtime_ns

  monkeypatch.setattr(offline_hub, "make_batch_fn", original)
  calls.clear()
  specs = offline_hub.build(tiny_config())
  assert calls == ["resnet_rotation", "vit_random"]  # The finished model is kept.
  assert os.stat(os.path.join(root, "vit_shapes", offline_hub.WEIGHTS)).st_mtime_ns == finished
  assert not os.path.exists(os.path.join(root, ".work"))
  # Resumed from step 2, the weights equal those of the uninterrupted build.
  for spec, ref in zip(specs, reference):
    assert _weights(spec) == _weights(ref), spec["name"]

  # A half-written or corrupt model directory is rebuilt, not trusted.
  os.remove(os.path.join(root, "vit_shapes", offline_hub.COMPLETE))
  with open(os.path.join(root, "vit_random", offline_hub.WEIGHTS), "r+b") as f:
    f.truncate(100)
  calls.clear()
  assert offline_hub.build(tiny_config()) == specs
  assert calls == ["vit_shapes", "vit_random"]
  for spec, ref in zip(specs, reference):
    assert _weights(spec) == _weights(ref), spec["name"]
  hub.load_hub(specs)


def test_seed_decides_the_weights(built, monkeypatch, tmp_path):
  _, reference = built
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  first = tiny_config().models[0]
  same = offline_hub.build(tiny_config(models=(first,)))
  other = offline_hub.build(tiny_config(models=({**first, "seed": 1},)))
  assert same[0]["path"] != reference[0]["path"]  # Another recipe, another directory.
  assert _weights(same[0]) == _weights(reference[0])
  assert _weights(other[0]) != _weights(reference[0])
  assert offline_hub.fingerprint(tiny_config(models=(first,))) != offline_hub.fingerprint(
      tiny_config(models=({**first, "seed": 1},)))


def _with_model(**changes):
  entry = {**tiny_config().models[0], **changes}
  return tiny_config(models=(entry,))


@pytest.mark.parametrize("config, match", [
    (_with_model(arch="mlp"), r"unknown arch 'mlp'; valid: \['beit', 'dinov2', 'regnet', "
                              r"'resnet', 'vit'\]"),
    (_with_model(source="cifar"), r"unknown source 'cifar'; valid: .*'glyphs'.*'union'"),
    (_with_model(paradigm="mae"), r"unknown paradigm 'mae'; valid: \('supervised', "
                                  r"'rotation', 'random'\)"),
    (_with_model(paradigm="random"), r"paradigm 'random' trains on nothing"),
    (_with_model(steps=0), r"steps=0 must be an int >= 1"),
    (_with_model(seed=-1), r"seed=-1 must be an int >= 0"),
    (_with_model(size={"hidden_sise": 8}), r"unknown ViTConfig fields \['hidden_sise'\]"),
    (_with_model(name="a/b"), r"name 'a/b' must match"),
    (tiny_config(models=(tiny_config().models[0],) * 2),
     r"Duplicate offline hub model names \['vit_shapes'\]"),
    (tiny_config(models=()), r"`models` is empty"),
    (tiny_config(batch_size=0), r"batch_size=0 must be an int >= 1"),
])
def test_bad_configs_say_what_is_wrong(config, match, monkeypatch, tmp_path):
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  with pytest.raises(ValueError, match=match):
    offline_hub.build(config)
  assert not os.path.exists(tmp_path / "hub")


def test_missing_and_unknown_model_keys():
  entry = dict(tiny_config().models[0])
  del entry["steps"]
  entry["lr"] = 1.0
  with pytest.raises(ValueError, match=r"missing keys \['steps'\], unknown keys \['lr'\]"):
    offline_hub.validate(tiny_config(models=(entry,)))


def test_build_hub_config():
  from configs import build_hub
  config = build_hub.get_config()
  assert config.job == "build_hub"
  default = offline_hub.validate(offline_hub.default_config())
  assert offline_hub.validate(config.offline_hub) == default
  models = default["models"]
  assert len(models) >= 8
  assert {m["source"] for m in models if m["paradigm"] == "supervised"} >= {
      "glyphs", "shapes", "textures", "scenes", "union"}
  assert {m["paradigm"] for m in models} == set(offline_hub.PARADIGMS)
  twins = [(m["arch"], m["source"], m["paradigm"], m["steps"], json.dumps(m["size"]))
           for m in models]
  assert len(set(twins)) < len(twins)  # Two members differ only in their seed.
  shifted = build_hub.get_config("seed=3").offline_hub
  assert [m["seed"] for m in shifted.models] == [m["seed"] + 3 for m in models]
  assert offline_hub.fingerprint(shifted) != offline_hub.fingerprint(config.offline_hub)
