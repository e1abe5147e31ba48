"""Gated fusion and its baselines: a one-hot gate is the linear probe, the
label-space head against float64 numpy, 8 devices give 1 device's loss, the
learning rate chosen on val200, no backbone call once the cache is warm, and
clear errors for bad input. Tiny HF models on `digits`."""
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from fusion import config_lib
from fusion import experiment
from fusion import features as features_lib
from fusion import hub
from fusion import methods
from fusion import metrics
from fusion import report
from fusion import sharding
from fusion import suite
from fusion.methods import linear_probe
from fusion.methods import moe

import tiny_models

# Through the suite; moe_no_label and feature_gate are moe's fit_predict with
# other configs (their models: test_variants_are_registered_with_their_configs).
SUITE_METHODS = ("best_probe", "concat", "uniform_probe_avg", "moe")
THUMB = 8


def _small(config, **overrides):
  """A method config cut to test size."""
  values = dict(learning_rates=(1e-2,), steps=10, batch_size=64)
  if "thumbnail_size" in config:
    values.update(thumbnail_size=THUMB, gate_widths=(4, 8), width=16)
  return ml_collections.ConfigDict({**config.to_dict(), **values, **overrides})


@pytest.fixture(scope="module")
def ctx(home, tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  specs = [{"name": a, "path": tiny_models.save_tiny(a, root / a)} for a in ("vit", "resnet")]
  text = tiny_models.save_tiny("bert", root / "bert")
  probe = config_lib.probe_config(learning_rates=(1e-2, 1e-1), steps=20, batch_size=64)
  config = ml_collections.ConfigDict(dict(
      job="suite", seed=0, tasks=("digits",), hub=specs, batch_size=64, num_devices=0,
      cache_dir="", predictions_dir="", methods=SUITE_METHODS, linear_probe=probe))
  for name in SUITE_METHODS:
    own = methods.get(name).default_config()
    if "probe" in own:
      own.probe = probe
    else:
      own = _small(own)
    if "text_encoder" in own:
      own.text_encoder = text
    config[name] = own
  return experiment.Context.create(config, None)


@pytest.fixture(scope="module")
def task(ctx):
  task, = ctx.tasks()
  return task


@pytest.fixture(scope="module")
def warm(ctx, task):
  """Every feature and thumbnail in the cache; each backbone's FLOPs counted (XLA
  traces the backbone for those), the label head's class names embedded."""
  for split in moe.SPLITS + ("test_shift",):
    for b in ctx.backbones:
      ctx.features(b, task, split)
    features_lib.extract_thumbnails(task, split, THUMB)
  for b in ctx.backbones:
    hub.inference_gflops(b)
  return ctx


def _splits(ctx, task, thumbnails=True):
  out = {}
  for s in moe.SPLITS:
    sets = [ctx.features(b, task, s) for b in ctx.backbones]
    th = features_lib.extract_thumbnails(task, s, THUMB).images if thumbnails else None
    out[s] = moe.Split(tuple(fs.features for fs in sets), sets[0].labels, th)
  return out


@pytest.fixture(scope="module")
def suite_rows(warm, task, tmp_path_factory):
  """Every new method through the suite with vision backbones that raise if run."""
  def no_backbone(*args, **kwargs):
    raise AssertionError("a vision backbone ran although its features are cached")

  real = hub.Backbone.features

  def vision_raises(self, *args, **kwargs):
    if self.kind == "vision":
      no_backbone()
    return real(self, *args, **kwargs)

  workdir = str(tmp_path_factory.mktemp("suite"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(features_lib, "_features_fn", no_backbone)
    patch.setattr(hub.Backbone, "features", vision_raises)
    # The patch bites: an uncached extraction fails.
    with pytest.raises(AssertionError, match="a vision backbone ran"):
      features_lib.extract(warm.backbones[0], task, "val200",
                           cache_dir=str(tmp_path_factory.mktemp("cold")))
    rows = suite.run_units(warm, SUITE_METHODS, [task], workdir)
  return {r["method"]: r for r in rows}


# ------------------------------------------------------------------ the model


def test_no_backbone_call_once_the_cache_is_warm(suite_rows, ctx):
  assert set(suite_rows) == set(SUITE_METHODS)
  names = [b.name for b in ctx.backbones]
  for name in ("moe", "uniform_probe_avg", "concat"):
    assert suite_rows[name]["members"] == names
    assert suite_rows[name]["test_accuracy"] > 0.2, name  # 10 classes: chance is 0.1.


@pytest.fixture(scope="module")
def one_step(ctx, task, tmp_path_factory):
  """One training step of `moe` on a 1-device and on the 8-device mesh:
  (first-step losses, outputs on val200)."""
  splits = _splits(ctx, task)
  config = _small(ctx.config.moe, steps=1)
  emb = moe.class_embeddings(moe.class_names(task), config.prompt, config.text_encoder)
  model = moe.model_of(config, 10, 2)
  losses, outputs = [], []
  for devices in (1, 8):
    workdir = str(tmp_path_factory.mktemp(f"d{devices}"))
    _, predict = moe.fit(model, splits["train800"], learning_rate=1e-2, config=config,
                         mesh=sharding.make_mesh(devices), seed=0, class_emb=emb,
                         workdir=workdir, run_name="step")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      losses.append(json.loads(f.readline())["loss"])
    outputs.append(predict(splits["val200"]))
  return losses, outputs


def test_eight_devices_give_the_loss_of_one(one_step):
  assert len(jax.devices()) == 8
  losses, outputs = one_step
  assert losses[1] == pytest.approx(losses[0], abs=1e-5)
  # Adam's first step is lr * sign(gradient) wherever the gradient is not ~0, so
  # the two meshes end up close, but near-zero gradient entries may step apart.
  np.testing.assert_allclose(outputs[1]["log_probs"], outputs[0]["log_probs"], atol=1e-2)


def test_gate_weights_sum_to_one(suite_rows, one_step, ctx):
  names = [b.name for b in ctx.backbones]
  weights = suite_rows["moe"]["gate_mean_weight"]
  assert list(weights) == names
  assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
  for out in one_step[1]:  # Per input.
    assert out["gate"].shape == (200, 2)
    np.testing.assert_allclose(out["gate"].sum(-1), 1.0, atol=1e-6)
    assert (out["gate"] > 0).all()


def test_variants_are_registered_with_their_configs():
  for name in ("moe", "moe_no_label", "feature_gate", "best_probe", "concat",
               "uniform_probe_avg"):
    assert methods.get(name).members == "hub"
  variants = {name: moe.model_of(methods.get(name).default_config(), 10, 3)
              for name in ("moe", "moe_no_label", "feature_gate")}
  assert [(m.gate, m.level, m.label_head, m.label_blend) for m in variants.values()] == [
      ("thumbnail", "feature", True, None), ("thumbnail", "feature", False, None),
      ("features", "feature", False, None)]


def _fixed_gate_config(probe):
  """Prediction level, no label head, the linear probe's training settings."""
  config = moe.default_config(label_head=False, gate="features")
  for key in ("learning_rates", "steps", "batch_size", "optimizer"):
    config[key] = probe[key]
  config.level = "prediction"
  return config


def test_one_hot_gate_reproduces_the_linear_probe(ctx, task):
  """Prediction level, gate frozen to model m: the linear probe of model m."""
  splits = _splits(ctx, task, thumbnails=False)
  probe = ctx.config.linear_probe
  m = 1
  preds, fields, _ = moe.fit_predict_splits(splits, 10, _fixed_gate_config(probe),
                                            mesh=ctx.mesh, seed=3, gate_weights=np.eye(2)[m])
  fs = {s: ctx.features(ctx.backbones[m], task, s) for s in moe.SPLITS}
  reference, ref_fields = linear_probe.probe(fs, 10, probe, mesh=ctx.mesh, seed=3)
  assert fields["learning_rate"] == ref_fields["learning_rate"]
  assert fields["sweep"] == ref_fields["sweep"]
  for split in ("val200", "test"):
    np.testing.assert_allclose(preds.logits[split],
                               metrics.log_softmax(reference.logits[split]), atol=1e-5)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("level", ["feature", "prediction"])
def test_label_space_logits_match_a_float64_reference(level):
  rng = np.random.default_rng(0)
  num_classes, dims, emb_dim, n = 5, (6, 4, 3), 7, 9
  xs = [rng.normal(size=(n, d)).astype(np.float32) for d in dims]
  class_emb = rng.normal(size=(num_classes, emb_dim)) * 3  # Not unit: the head normalises.
  config = moe.default_config(gate="features")
  config.update(level=level, width=8)
  model = moe.model_of(config, num_classes, len(dims))
  params = moe.init_params(model, {"x": xs}, seed=0, class_emb=class_emb)
  # Every parameter off its init (zero heads, zero gate, blend 0.5).
  params["params"] = jax.tree.map(
      lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params["params"])
  params["params"]["log_temperature"] = np.float32(np.log(0.2))
  out = moe._apply_of(model)(params, {"x": xs})

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  e = class_emb / np.linalg.norm(class_emb, axis=1, keepdims=True)
  a = 1 / (1 + np.exp(-p["blend_logit"]))
  temperature = np.exp(p["log_temperature"])
  x64 = [x.astype(np.float64) for x in xs]
  g = np.concatenate(x64, 1) @ p["gate"]["out"]["kernel"] + p["gate"]["out"]["bias"]
  w = np.exp(_np_log_softmax(g))

  def head(h, suffix):
    z = h @ p["head" + suffix]["kernel"] + p["head" + suffix]["bias"]
    v = h @ p["label_proj" + suffix]["kernel"]
    cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ e.T
    probs = (1 - a) * np.exp(_np_log_softmax(z)) + a * np.exp(_np_log_softmax(cos / temperature))
    return probs

  if level == "feature":
    h = sum(w[:, [m]] * (x @ p[f"proj_{m}"]["kernel"] + p[f"proj_{m}"]["bias"])
            for m, x in enumerate(x64))
    probs = head(h, "")
  else:
    probs = sum(w[:, [m]] * head(x, f"_{m}") for m, x in enumerate(x64))
  np.testing.assert_allclose(np.asarray(out["log_probs"]), np.log(probs), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["gate"]), w, atol=1e-6)
  assert float(out["blend"]) == pytest.approx(a, abs=1e-6)
  assert float(out["temperature"]) == pytest.approx(0.2, rel=1e-6)


# ------------------------------------------------------- choices on val200


def test_learning_rate_is_chosen_on_val200_and_the_final_model_retrained(ctx):
  rng = np.random.default_rng(0)
  num_classes, dim = 10, 16  # The shapes of the digits features: one compiled step.
  means = [3 * rng.normal(size=(num_classes, dim)) for _ in range(2)]
  moved = [np.roll(m, 1, axis=0) for m in means]  # train800val200 / test: other means.

  def split(ms, n):
    labels = (np.arange(n) % num_classes).astype(np.int32)
    return moe.Split(tuple((m[labels] + rng.normal(size=(n, dim))).astype(np.float32)
                           for m in ms), labels)

  splits = {"train800": split(means, 160), "val200": split(means, 80),
            "train800val200": split(moved, 240), "test": split(moved, 200)}
  config = _fixed_gate_config(ctx.config.linear_probe)
  # lr 0 leaves the zero heads at uniform logits (chance); 1e-9 points them the
  # right way with near-uniform probabilities; 0.1 learns. The worst accuracy,
  # the first and the last rate would each pick another one.
  config.learning_rates = (0.0, 0.1, 1e-9)
  preds, fields, _ = moe.fit_predict_splits(splits, num_classes, config, mesh=ctx.mesh,
                                            seed=0, gate_weights=np.array([0.5, 0.5]))
  assert fields["learning_rate"] == 0.1
  assert fields["sweep"]["0"] == pytest.approx(0.1)
  val = metrics.accuracy(preds.logits["val200"], preds.labels["val200"])
  assert val == fields["sweep"]["0.1"] == max(fields["sweep"].values())
  # The final model saw train800val200: a train800 model would score ~0 on test.
  assert metrics.accuracy(preds.logits["test"], preds.labels["test"]) > 0.9


def test_best_of_ranks_accuracy_then_nll():
  def m(acc, nll):
    return {"val_accuracy": acc, "val_nll": nll}
  # Best accuracy beats a lower NLL; the worst accuracy, the lowest NLL, first and
  # last would each pick another rate.
  assert moe.best_of([(1e-3, m(0.5, 0.9)), (1e-2, m(0.8, 1.2)), (1e-1, m(0.7, 0.4)),
                      (1.0, m(0.6, 0.5))]) == 1e-2
  assert moe.best_of([(1e-3, m(0.8, 0.9)), (1e-2, m(0.8, 0.7)), (1e-1, m(0.8, 0.8))]) == 1e-2


def test_baselines_choose_and_average_the_cached_probes(suite_rows, ctx, task):
  probes = {b.name: methods.run_unit(ctx, "linear_probe", task, [b])[1] for b in ctx.backbones}
  val = {n: metrics.accuracy(r.predictions.logits["val200"], r.predictions.labels["val200"])
         for n, r in probes.items()}
  best = suite_rows["best_probe"]
  assert best["probe_val_accuracy"] == val
  assert val[best["model"]] == max(val.values())
  chosen = probes[best["model"]].predictions
  assert best["test_accuracy"] == metrics.accuracy(chosen.logits["test"], chosen.labels["test"])
  # Uniform average of probabilities, against numpy.
  uniform = methods.run_unit(ctx, "uniform_probe_avg", task, ctx.backbones)[1].predictions
  probs = np.mean([metrics.softmax(r.predictions.logits["test"]) for r in probes.values()], 0)
  np.testing.assert_allclose(metrics.softmax(uniform.logits["test"]), probs, atol=1e-6)
  study = suite_rows["uniform_probe_avg"]["probe_study"]
  assert study["models"] == list(probes) and study["test_agreement"][0][0] == 1.0
  assert 0 <= study["test_agreement"][0][1] <= 1
  assert suite_rows["concat"]["feature_dim"] == sum(b.feature_dim for b in ctx.backbones)


def test_label_head_reports_its_blend_and_the_plots_are_drawn(suite_rows, tmp_path):
  assert 0 < suite_rows["moe"]["label_blend_weight"] < 1
  assert suite_rows["moe"]["label_temperature"] > 0
  made = report.plot_study(list(suite_rows.values()), str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in made] == ["gate_weights.png", "agreement.png"]
  assert all(os.path.getsize(p) > 1000 for p in made)
  assert report.plot_study([suite_rows["concat"]], str(tmp_path / "none")) == []


# ---------------------------------------------------------------- inputs


def test_thumbnails_are_cached_in_minus_one_one(warm, task, monkeypatch):
  th = features_lib.extract_thumbnails(task, "val200", THUMB)
  assert th.images.shape == (200, THUMB, THUMB, 3) and th.images.dtype == np.float32
  assert -1 <= th.images.min() < 0 < th.images.max() <= 1
  np.testing.assert_array_equal(th.labels, warm.features(warm.backbones[0], task,
                                                         "val200").labels)
  from fusion.data import pipeline
  monkeypatch.setattr(pipeline, "load_split", lambda *a, **k: 1 / 0)
  assert features_lib.extract_thumbnails(task, "val200", THUMB).fingerprint == th.fingerprint
  assert features_lib.thumbnail_fingerprint(task, "val200", 16)[0] != th.fingerprint


def test_class_embeddings_are_unit_norm_and_cached(ctx, task):
  encoder = ctx.config.moe.text_encoder
  names = moe.class_names(task)
  emb = moe.class_embeddings(names, "a photo of a {}.", encoder)
  assert emb.shape == (10, 16)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  assert moe.class_embeddings(names, "a photo of a {}.", encoder) is emb
  other = moe.class_embeddings(names, "a {} drawn by hand", encoder)
  assert not np.allclose(other, emb)


def test_bad_input_gets_a_clear_error(warm, task):
  config = warm.config.moe
  nameless = dataclasses.replace(task, label_names=None, label_key="no_such_feature")
  with pytest.raises(ValueError, match="has no class names.*moe_no_label"):
    moe.fit_predict(warm, nameless, warm.backbones, config, 0)
  with pytest.raises(ValueError, match=r"at least 2 models; got \['vit'\]"):
    moe.fit_predict(warm, task, warm.backbones[:1], config, 0)
  with pytest.raises(ValueError, match="Thumbnail size 64 is larger than the 32x32 images "
                                       "of task 'digits'"):
    moe.fit_predict(warm, task, warm.backbones, _small(config, thumbnail_size=64), 0)
  with pytest.raises(ValueError, match=r"Unknown level 'pixel'; valid: \('feature'"):
    moe.fit_predict(warm, task, warm.backbones, _small(config, level="pixel"), 0)
  with pytest.raises(ValueError, match="label_blend=1.5 must be 'learned' or a number"):
    moe.validate_config(_small(config, label_blend=1.5))
  with pytest.raises(ValueError, match="exactly one '{}'"):
    moe.validate_config(_small(config, prompt="a photo"))
