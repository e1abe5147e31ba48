"""The offline hub: builds tiny recipes with the real HF classes and the real
trainer, loads them through `fusion.hub`, and checks the cache: a second call
trains nothing, an interrupted build resumes to the same weights, a corrupt
or half-written model is rebuilt, and bad recipes fail with clear errors.
What is saved is what was trained: weights that differ from the init (the
control's equal it), and a head that re-measures the manifest's accuracy."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from fusion import hub
from fusion import offline_hub

TINY_VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32)
TINY_CNN = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
NAMES = ("vit_shapes", "resnet_rotation", "vit_random")
ROTATION_STEPS = 40  # Enough to learn rotations of scenes (~90% held out; chance 25%).


def tiny_config(**overrides):
  config = offline_hub.default_config()
  config.train_examples = 128
  config.eval_examples = 32
  config.batch_size = 16  # Divisible by the 8 simulated devices.
  config.checkpoint_every = 2
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 2
  config.models = (
      offline_hub._model("vit_shapes", "vit", "shapes", "supervised", 0, 4, **TINY_VIT),
      offline_hub._model("resnet_rotation", "resnet", "scenes", "rotation", 0, ROTATION_STEPS,
                         **TINY_CNN),
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


def _leaves(tree) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def test_saved_weights_are_trained_and_the_control_is_its_init(built, monkeypatch):
  home, specs = built
  monkeypatch.setenv("FUSION_HOME", home)
  for entry, spec in zip(tiny_config().models, specs):
    saved = _leaves(hub.load(spec).params)
    init = _leaves(offline_hub.init_variables(entry["arch"], entry["size"], entry["seed"]))
    assert sorted(saved) == sorted(init), entry["name"]
    changed = [k for k in sorted(saved) if not np.array_equal(saved[k], init[k])]
    if entry["paradigm"] == "random":
      assert changed == [], entry["name"]
    else:  # Every weight moved (the ResNet's BatchNorm statistics too).
      assert changed == sorted(saved), (entry["name"], set(saved) - set(changed))


def _accuracy(backbone, params, kernel, bias, batch) -> float:
  """Held-out pretext accuracy: the hub's features, the head in float64."""
  pre = backbone.preprocess
  images = ((batch["image"].astype(np.float32) / 255 - np.float32(pre.mean)) /
            np.float32(pre.std)).astype(np.float32)
  feats = np.asarray(jax.jit(backbone.features)(params, images), np.float64)
  logits = feats @ kernel.astype(np.float64) + bias.astype(np.float64)
  return float(np.mean(logits.argmax(-1) == batch["label"]))


def test_saved_head_re_measures_the_pretext_accuracy(built, monkeypatch):
  home, specs = built
  monkeypatch.setenv("FUSION_HOME", home)
  recipe = offline_hub.validate(tiny_config())
  manifest = {e["name"]: e for e in offline_hub.load_manifest(tiny_config())["models"]}
  for entry, spec in zip(tiny_config().models, specs):
    backbone = hub.load(spec)
    path = os.path.join(spec["path"], offline_hub.SOURCE_HEAD)
    if entry["paradigm"] == "random":
      assert not os.path.exists(path) and backbone.source_head is None
      assert manifest[entry["name"]]["source_head_classes"] is None
      continue
    with np.load(path, allow_pickle=False) as f:
      kernel, bias, names = f["kernel"], f["bias"], tuple(f["label_names"])
    head = backbone.source_head
    assert np.array_equal(head.kernel, kernel) and np.array_equal(head.bias, bias)
    assert head.label_names == names == offline_hub.pretext_label_names(
        entry["source"], entry["paradigm"])
    assert kernel.shape == (backbone.feature_dim, len(names))
    assert manifest[entry["name"]]["source_head_classes"] == len(names)
    batch = offline_hub.heldout_pretext(entry, recipe)
    accuracy = _accuracy(backbone, backbone.params, kernel, bias, batch)
    assert abs(accuracy - manifest[entry["name"]]["pretext_accuracy"]) <= 1 / len(
        batch["label"]) + 1e-9, entry["name"]
    if entry["paradigm"] == "rotation":  # Trained enough to be far from chance (0.25).
      untrained = _accuracy(backbone, offline_hub.init_variables(
          entry["arch"], entry["size"], entry["seed"]), kernel, bias, batch)
      assert accuracy >= 0.6 and untrained <= 0.45, (accuracy, untrained)


def test_pretext_label_names():
  assert offline_hub.pretext_label_names("scenes", "rotation") == offline_hub.ROTATION_LABELS
  assert offline_hub.pretext_label_names("shapes", "supervised")[:2] == ("square", "ellipse")
  union = offline_hub.pretext_label_names(offline_hub.UNION, "supervised")
  sources = offline_hub._sources()
  assert len(union) == sum(s.num_classes for s in sources.values())
  # In the order of source_data's label offsets.
  offset = sources["glyphs"].num_classes
  assert union[0] == "glyphs/0" and union[offset] == "shapes/square"


def test_a_changed_or_missing_head_is_not_complete(built, tmp_path):
  _, specs = built
  directory = str(tmp_path / "vit_shapes")
  shutil.copytree(specs[0]["path"], directory)
  assert offline_hub.is_complete(directory)
  head = os.path.join(directory, offline_hub.SOURCE_HEAD)
  with open(head, "r+b") as f:
    f.truncate(os.path.getsize(head) - 1)
  assert not offline_hub.is_complete(directory)
  os.remove(head)
  assert not offline_hub.is_complete(directory)


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
  assert sorted(os.listdir(checkpoints)) == ["2"]  # Saved at step 2, killed at 3.
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


def test_models_built_in_workers_are_those_built_in_one_process(built, monkeypatch, tmp_path,
                                                               calls):
  home, specs = built
  monkeypatch.setenv("FUSION_HOME", home)
  reference = offline_hub.hub_dir(tiny_config())
  monkeypatch.setenv("FUSION_HOME", str(tmp_path))
  root = offline_hub.hub_dir(tiny_config())
  shutil.copytree(reference, root)
  shutil.rmtree(os.path.join(root, "vit_shapes"))  # Missing,
  with open(os.path.join(root, "vit_random", offline_hub.WEIGHTS), "r+b") as f:
    f.truncate(100)  # and corrupt: both rebuilt, each in its own process.
  assert offline_hub.build(tiny_config(), workers=2) == [
      {"name": s["name"], "path": os.path.join(root, s["name"])} for s in specs]
  assert calls == []  # Not in this process.
  assert sorted(os.listdir(root)) == sorted([*NAMES, "manifest.json", "recipe.json"])

  def manifest(directory):
    with open(os.path.join(directory, offline_hub.MANIFEST)) as f:
      m = json.load(f)
    for entry in m["models"]:
      entry.pop("build_seconds")  # Wall time.
    return m

  assert manifest(root) == manifest(reference)
  for name in NAMES:
    for file in (offline_hub.WEIGHTS, offline_hub.SOURCE_HEAD, offline_hub.COMPLETE):
      assert (os.path.exists(os.path.join(root, name, file)) ==
              os.path.exists(os.path.join(reference, name, file))), (name, file)
    with open(os.path.join(root, name, offline_hub.COMPLETE)) as f:  # sha256 of each file.
      with open(os.path.join(reference, name, offline_hub.COMPLETE)) as g:
        assert json.load(f) == json.load(g), name


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
