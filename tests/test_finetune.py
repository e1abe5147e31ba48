"""Fine-tuning: the sweep's choice on val200, what trains and what does not,
batch statistics, divergence, a killed sweep that resumes without redoing
finished runs, and one step on 8 devices against 1."""
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from fusion import config_lib
from fusion import experiment
from fusion import hub
from fusion import predictions
from fusion import sharding
from fusion import train
from fusion.methods import finetune
from fusion.methods import linear_probe

import tiny_models


def _config(**overrides):
  config = finetune.default_config()
  config.learning_rates = (0.03,)
  config.steps = (30,)
  config.batch_size = 32
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  home = str(tmp_path_factory.mktemp("home"))
  os.environ["FUSION_HOME"] = home  # Module scope: monkeypatch is per test.
  specs = [{"name": a, "path": tiny_models.save_tiny(a, root / a)} for a in ("resnet", "vit")]
  config = ml_collections.ConfigDict(dict(
      seed=0, tasks=("digits",), hub=specs, batch_size=64, num_devices=0, cache_dir="",
      predictions_dir="", linear_probe=config_lib.probe_config()))
  yield experiment.Context.create(config, str(tmp_path_factory.mktemp("work")))
  del os.environ["FUSION_HOME"]


@pytest.fixture(scope="module")
def task(ctx):
  return ctx.tasks()[0]


def _result(val_logits, labels):
  labels = np.asarray(labels)
  return predictions.Result(predictions.Predictions(
      {"val200": val_logits, "test": val_logits}, {"val200": labels, "test": labels}),
      ("m",), 0.0)


def test_choose_takes_the_best_val_accuracy_then_the_lower_nll():
  labels = [0, 1, 1, 0]
  # b: higher accuracy (3/4) but a worse NLL than a (2/4): accuracy decides.
  a = _result(np.log([[.6, .4], [.4, .6], [.55, .45], [.45, .55]]), labels)
  b = _result(np.log([[.99, .01], [.01, .99], [.01, .99], [.01, .99]]), labels)
  assert finetune.choose([("a", a), ("b", b)])[0] == "b"
  assert finetune.choose([("b", b), ("a", a)])[0] == "b"
  # Equal accuracy: the lower NLL wins, whatever the order.
  c = _result(np.log([[.9, .1], [.1, .9], [.1, .9], [.2, .8]]), labels)
  assert finetune.choose([("b", b), ("c", c)])[0] == "c"
  assert finetune.choose([("c", c), ("b", b)])[0] == "c"


def _changed(before, after):
  flat_a = traverse_util.flatten_dict(jax.tree.map(np.asarray, before))
  flat_b = traverse_util.flatten_dict(jax.tree.map(np.asarray, after))
  return {"/".join(k) for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])}


@pytest.mark.parametrize("mode, expect", [
    ("head", set()),
    ("last_n", {"params/encoder/stages/1"}),
    ("all", {"params/embedder", "params/encoder/stages/0", "params/encoder/stages/1"}),
])
def test_training_changes_what_it_should_and_nothing_else(ctx, task, mode, expect):
  backbone = ctx.backbone("resnet")
  run = finetune.Run(0.03, 8, "train800")
  result = finetune.train_run(ctx, backbone, task, run, _config(trainable=mode), seed=0,
                              cache=predictions.Cache(), key=f"mask-{mode}")
  params = finetune.load_params(predictions.Cache(), f"mask-{mode}",
                                result.fields["params_sha256"])
  changed = {"/".join(k.split("/")[:4]) if "stages" in k else "/".join(k.split("/")[:2])
             for k in _changed(backbone.params, params["backbone"]) if k.startswith("params")}
  assert changed == expect
  assert np.abs(params["head"]["kernel"]).max() > 0  # The head always trains.
  # Batch statistics follow the training-mode forward passes, whatever trains.
  stats = _changed(backbone.params["batch_stats"], params["backbone"]["batch_stats"])
  assert stats


def test_a_padded_head_trains_as_the_task_sized_one(ctx, task):
  """The head trains padded to 16 classes (the padding masked out): the same
  predictions as a head of the task's 10, and the saved head is the task's size."""
  backbone = ctx.backbone("resnet")
  run = finetune.Run(0.03, 8, "train800")
  results = {}
  for multiple in (1, 16):
    results[multiple] = finetune.train_run(
        ctx, backbone, task, run, _config(class_multiple=multiple), seed=0,
        cache=predictions.Cache(), key=f"pad-{multiple}")
  assert linear_probe.head_width(task.num_classes, 16) == 16 != task.num_classes
  np.testing.assert_allclose(results[16].predictions.logits["val200"],
                             results[1].predictions.logits["val200"], rtol=1e-4, atol=1e-4)
  params = finetune.load_params(predictions.Cache(), "pad-16",
                                results[16].fields["params_sha256"])
  assert params["head"]["kernel"].shape == (backbone.feature_dim, task.num_classes)
  assert set(params) == {"backbone", "head"}


def test_runs_predict_the_splits_they_are_used_for(ctx, task):
  result = finetune.fit_predict(ctx, task, [ctx.backbone("resnet")], _config(), seed=0)
  cache = predictions.Cache()
  val_run, final_run = cache.load(result.fields["val_run"]), cache.load(result.fields["final_run"])
  tests = experiment.test_splits(task)
  assert "test_shift" in tests
  # The train800 run is chosen on val200; its retrain on train800val200 is tested.
  assert val_run.predictions.splits == ("val200",)
  assert final_run.predictions.splits == tests
  assert result.predictions.splits == ("val200",) + tests
  np.testing.assert_array_equal(result.predictions.logits["val200"],
                                val_run.predictions.logits["val200"])
  for split in tests:
    np.testing.assert_array_equal(result.predictions.logits[split],
                                  final_run.predictions.logits[split])
  # A method's unit still needs val200 and test.
  with pytest.raises(ValueError, match="need logits and labels of"):
    predictions.Predictions(dict(val_run.predictions.logits), dict(val_run.predictions.labels))


def test_last_n_counts_blocks_of_transformers_and_cnns():
  flat = {("params", "embeddings", "x"): 0, ("params", "encoder", "layer", "0", "w"): 0,
          ("params", "encoder", "layer", "1", "w"): 0, ("params", "layernorm", "scale"): 0}
  mask = traverse_util.flatten_dict(finetune.trainable_mask(
      traverse_util.unflatten_dict(flat), "last_n", 1))
  assert [("/".join(k)) for k, v in mask.items() if v] == ["params/encoder/layer/1/w",
                                                          "params/layernorm/scale"]
  with pytest.raises(ValueError, match="needs a model with encoder blocks"):
    finetune.trainable_mask({"params": {"dense": {"w": 0}}}, "last_n", 1)


def test_a_killed_sweep_resumes_without_redoing_finished_runs(ctx, task, monkeypatch):
  config = _config(learning_rates=(0.01, 0.03))
  backbone = ctx.backbone("vit")
  trained = []
  real = finetune.train_run

  def dies_on_the_second_run(ctx, backbone, task, run, *args, **kwargs):
    trained.append(run.learning_rate)
    if len(trained) == 2:
      raise KeyboardInterrupt("killed")
    return real(ctx, backbone, task, run, *args, **kwargs)

  monkeypatch.setattr(finetune, "train_run", dies_on_the_second_run)
  with pytest.raises(KeyboardInterrupt):
    finetune.fit_predict(ctx, task, [backbone], config, seed=0)
  assert trained == [0.01, 0.03]
  monkeypatch.setattr(finetune, "train_run", lambda *a, **k: trained.append(a[3]) or real(*a, **k))
  result = finetune.fit_predict(ctx, task, [backbone], config, seed=0)
  # The first run came from the cache; the second and the retrain ran.
  assert [r.learning_rate for r in trained[2:]] == [0.03, result.fields["learning_rate"]]
  assert [r["learning_rate"] for r in result.fields["sweep"]] == [0.01, 0.03]


def test_a_diverging_run_is_marked_failed_and_the_others_go_on(ctx, task):
  config = _config(learning_rates=(0.03, 1e9), optimizer=ml_collections.ConfigDict(
      {"optimizer": "sgd", "momentum": 0.9, "schedule": "cosine", "weight_decay": 0.0,
       "grad_clip_norm": 0.0}))
  result = finetune.fit_predict(ctx, task, [ctx.backbone("vit")], config, seed=0)
  failed = [r for r in result.fields["sweep"] if "failed" in r]
  assert [r["learning_rate"] for r in failed] == [1e9] and "non-finite" in failed[0]["failed"]
  assert result.fields["learning_rate"] == 0.03
  config.learning_rates = (1e9,)
  with pytest.raises(ValueError, match="Every fine-tuning run of vit on digits diverged"):
    finetune.fit_predict(ctx, task, [ctx.backbone("vit")], config, seed=0)


@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rates=()), "sweep grid is empty"),
    (dict(steps=()), "sweep grid is empty"),
    (dict(trainable="some"), "trainable='some' is not one of"),
    (dict(class_multiple=0), r"finetune.class_multiple=0 must be an integer >= 1"),
])
def test_bad_finetune_configs_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    finetune.check_config(_config(**overrides))


def test_one_step_on_8_devices_gives_the_loss_of_1_device(ctx, task):
  backbone = ctx.backbone("resnet")
  images, labels = ctx.images(task, "train800", backbone.preprocess)
  batch = {"image": images[:32], "label": labels[:32]}
  params = {"backbone": backbone.params,
            "head": {"kernel": np.full((16, 10), 0.01, np.float32),
                     "bias": np.zeros(10, np.float32)}}
  losses = []
  for mesh in (sharding.make_mesh(1), sharding.make_mesh(8)):
    state = train.train(loss_fn=finetune._loss_fn(backbone), params=params,
                        batch_fn=lambda step: batch,
                        config={"optimizer": "sgd", "learning_rate": 0.1},
                        mesh=mesh, num_steps=2, checkpoint=False, progress=False,
                        trainable={"backbone": {"params": True, "batch_stats": False},
                                   "head": True})
    loss, _ = finetune._loss_fn(backbone)(jax.device_get(state.params), batch,
                                          jax.random.PRNGKey(0))
    losses.append(float(loss))
  assert losses[0] == pytest.approx(losses[1], abs=1e-5)
  assert hub.params_fingerprint(backbone)  # The backbone itself was not modified.
