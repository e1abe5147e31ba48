"""Shift-vector ensembles: the shift on trees (encoder weights only, exactly
theta_pretrained + delta), member 0 shifted by its own delta is its fine-tune,
what the brief fine-tune changes, re-estimated batch statistics, diversity
against numpy, adding a member recomputes nothing else, bad member lists, and
the four methods end to end on 3 (then 4) tiny ResNets."""
import dataclasses
import itertools
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from fusion import config_lib
from fusion import experiment
from fusion import methods
from fusion import metrics
from fusion import predictions
from fusion import report
from fusion.methods import finetune
from fusion.methods import shift

import tiny_models

NAMES = ("shift", "independent", "brief_only", "shift_only")
STEPS, FRACTION = 20, 0.25  # Brief runs: 5 steps.


def _config(specs, members=("r0", "r1", "r2"), **shift_overrides):
  ft = finetune.default_config()
  ft.learning_rates, ft.steps, ft.batch_size = (0.1,), (STEPS,), 32
  sh = shift.default_config()
  sh.members, sh.brief_fraction = members, FRACTION
  sh.update(shift_overrides)
  return ml_collections.ConfigDict(dict(
      job="suite", seed=0, tasks=("digits",), hub=specs, batch_size=64, num_devices=0,
      cache_dir="", predictions_dir="", methods=NAMES,
      linear_probe=config_lib.probe_config(learning_rates=(1e-2,), steps=20),
      finetune=ft, shift=sh))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The four methods on digits (3 members), rows as the suite writes them.

  No workdir: the fine-tunes skip orbax checkpoints (test_finetune covers them).
  """
  root = tmp_path_factory.mktemp("hub")
  home = str(tmp_path_factory.mktemp("home"))
  os.environ["FUSION_HOME"] = home  # Module scope: monkeypatch is per test.
  specs = [{"name": f"r{i}", "path": tiny_models.save_tiny("resnet", root / f"r{i}", seed=i)}
           for i in range(4)]
  specs.append({"name": "vit", "path": tiny_models.save_tiny("vit", root / "vit")})
  ctx = experiment.Context.create(_config(specs), None)
  task = ctx.tasks()[0]
  rows = {}
  for name in NAMES:
    key, result = methods.run_unit(ctx, name, task, ctx.backbones)
    rows[name] = report.row(task, name, result, unit=key)
  yield ctx, task, rows
  del os.environ["FUSION_HOME"]


def _cache():
  return predictions.Cache()


def _params(key):
  result = _cache().load(key)
  return finetune.load_params(_cache(), key, result.fields["params_sha256"])


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def _equal(a, b) -> bool:
  fa, fb = _flat(a), _flat(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def _member0(ctx, task):
  _, unit = methods.run_unit(ctx, "finetune", task, [ctx.backbone("r0")])
  return unit


# ------------------------------------------------------------------ pure parts


def _tree(rng, scale=1.0):
  return {"params": {"conv": {"kernel": (scale * rng.normal(size=(3, 3, 2, 4))).astype(
                         np.float32)},
                     "norm": {"scale": rng.normal(size=4).astype(np.float32),
                              "bias": rng.normal(size=4).astype(np.float32)}},
          "batch_stats": {"norm": {"mean": rng.normal(size=4).astype(np.float32),
                                   "var": rng.uniform(.5, 2, size=4).astype(np.float32)}}}


def test_the_shift_moves_encoder_weights_only_by_exactly_delta():
  rng = np.random.default_rng(0)
  pre0, ft0, pre1, ft1, pre2 = (_tree(rng) for _ in range(5))
  member0 = {"backbone": ft0, "head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                                       "bias": rng.normal(size=3).astype(np.float32)}}
  delta = shift.encoder_delta(ft0, pre0)
  assert set(delta) == {"conv", "norm"}  # The `params` collection only.
  flat_delta = _flat(delta)
  for path, value in _flat(ft0["params"]).items():
    np.testing.assert_array_equal(
        flat_delta[path], value.astype(np.float64) - _flat(pre0["params"])[path])
  moved = shift.shift(pre2, delta)
  for path, value in _flat(pre2["params"]).items():
    np.testing.assert_array_equal(_flat(moved["params"])[path],
                                  (value.astype(np.float64) + flat_delta[path]).astype(
                                      np.float32))
  assert _equal(moved["batch_stats"], pre2["batch_stats"])
  # Member 0 shifted by its own delta is its fine-tuned encoder, bit for bit.
  assert _equal(shift.shift(pre0, delta)["params"], ft0["params"])
  # delta_from = 2: the mean of two members' shifts.
  mean = shift.mean_delta([delta, shift.encoder_delta(ft1, pre1)])
  kernel = ("conv", "kernel")
  np.testing.assert_allclose(_flat(mean)[kernel], (
      (ft0["params"]["conv"]["kernel"].astype(np.float64) - pre0["params"]["conv"]["kernel"]) +
      (ft1["params"]["conv"]["kernel"].astype(np.float64) - pre1["params"]["conv"]["kernel"]))
      / 2, rtol=1e-12)
  # Heads and BatchNorm statistics as configured.
  start = shift.start_params(pre2, delta, member0, "copy", "own")
  assert _equal(start["backbone"], moved) and _equal(start["head"], member0["head"])
  start = shift.start_params(pre2, delta, member0, "fresh", "member0")
  assert _equal(start["backbone"]["params"], moved["params"])
  assert _equal(start["backbone"]["batch_stats"], ft0["batch_stats"])
  assert all(not v.any() for v in _flat(start["head"]).values())
  start = shift.start_params(pre2, None, member0, "copy", "own")  # brief_only
  assert _equal(start["backbone"], pre2)


@pytest.mark.parametrize("fraction, steps, expect", [
    (0.1, 150, 15), (0.0, 150, 0), (0.001, 150, 1), (0.25, 20, 5), (0.025, 20, 1),
    (0.125, 20, 3), (1.0, 20, 20)])
def test_brief_steps_round_half_up_with_at_least_one(fraction, steps, expect):
  assert shift.brief_steps(fraction, steps) == expect


def test_diversity_matches_numpy_references():
  rng = np.random.default_rng(3)
  logits = [rng.normal(size=(50, 5)) * s for s in (1.0, 2.0, 3.0, 0.5)]
  probs = [np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in logits]
  pairs = list(itertools.combinations(range(4), 2))
  disagreement = np.mean([np.mean([np.argmax(probs[i][n]) != np.argmax(probs[j][n])
                                   for n in range(50)]) for i, j in pairs])
  kl = lambda p, q: np.mean([sum(p[n, c] * np.log(p[n, c] / q[n, c]) for c in range(5))
                             for n in range(50)])
  symmetrised = np.mean([(kl(probs[i], probs[j]) + kl(probs[j], probs[i])) / 2
                         for i, j in pairs])
  assert metrics.pairwise_disagreement(logits) == pytest.approx(disagreement, abs=1e-12)
  assert metrics.pairwise_kl(logits) == pytest.approx(symmetrised, rel=1e-10)
  assert metrics.pairwise_kl([logits[0], logits[0]]) == 0.0
  with pytest.raises(ValueError, match="at least 2 members"):
    metrics.pairwise_kl(logits[:1])


def test_trees_that_differ_are_named_with_path_and_shapes():
  a = {"params": {"w": np.zeros((3, 4)), "b": np.zeros(4)}}
  with pytest.raises(ValueError, match=r"'wide' differs from 'r0' first at params/w: shape "
                                       r"\(3, 5\) against \(3, 4\)"):
    shift.check_same_trees({"r0": a, "wide": {"params": {"w": np.zeros((3, 5)),
                                                         "b": np.zeros(4)}}})
  with pytest.raises(ValueError, match=r"at params/b: shape None against \(4,\)"):
    shift.check_same_trees({"r0": a, "short": {"params": {"w": np.zeros((3, 4))}}})


# ------------------------------------------------------------------ on tiny models


def test_the_four_methods_report_diversity_and_compute_in_their_rows(run):
  ctx, task, rows = run
  for name in NAMES:
    assert methods.get(name).config_key == "shift" and methods.get(name).uses == ("finetune",)
    assert rows[name]["members"] == ["r0", "r1", "r2"]
  full = _member0(ctx, task)
  s, ind, brief, only = (rows[n] for n in NAMES)
  assert s["brief_steps"] == brief["brief_steps"] == 5 and only["brief_steps"] == 0
  # Member 0's full fine-tune (sweep + retrain) + 2 members x 2 sides x 5 brief steps.
  assert s["train_steps"] == full.train_steps + 2 * 2 * 5
  assert ind["train_steps"] == 3 * full.train_steps and only["train_steps"] == full.train_steps
  assert s["compute_ratio_vs_independent"] == pytest.approx(
      s["train_steps"] / ind["train_steps"])
  assert s["add_member_cost_ratio"] == pytest.approx(2 * 5 / full.train_steps)
  assert s["train_examples"] == 32 * s["train_steps"]
  # The diversity fields are those of the cached members' test predictions.
  members = [full] + [shift._combine(n, {  # pylint: disable=protected-access
      "val200": (k["val_run"], _cache().load(k["val_run"])),
      "test": (k["final_run"], _cache().load(k["final_run"]))})
      for n, k in s["member_runs"].items()]
  logits = [m.predictions.logits["test"] for m in members]
  assert s["disagreement"] == pytest.approx(metrics.pairwise_disagreement(logits))
  assert s["pairwise_kl"] == pytest.approx(metrics.pairwise_kl(logits))
  assert s["disagreement_normalised"] == pytest.approx(
      s["disagreement"] / (1 - s["test_accuracy"]))
  assert s["disagreement"] > 0 and ind["disagreement"] > 0
  for row in rows.values():
    assert row["train_seconds"] > 0


def test_member0_shifted_by_its_own_delta_without_brief_fine_tune_is_its_fine_tune(run):
  ctx, task, _ = run
  r0 = ctx.backbone("r0")
  unit = _member0(ctx, task)
  val_run = unit.fields["val_run"]
  tuned = _params(val_run)
  delta = shift.encoder_delta(tuned["backbone"], r0.params)
  plan = shift.Plan(unit.fields["learning_rate"], 0, "copy", "member0", True)
  key, result = shift.member_side(ctx, task, r0, "train800", plan, delta, [val_run], val_run,
                                  tuned, ctx.config.finetune, 0)
  assert _equal(_params(key), tuned)
  np.testing.assert_array_equal(result.predictions.logits["val200"],
                                unit.predictions.logits["val200"])


def test_the_brief_fine_tune_changes_what_it_should_and_shift_only_nothing(run):
  ctx, task, rows = run
  r1 = ctx.backbone("r1")
  unit = _member0(ctx, task)
  for pred_split, _, field in shift.SIDES:
    tuned = _params(unit.fields[field])
    start = shift.start_params(r1.params, shift.encoder_delta(tuned["backbone"],
                                                              ctx.backbone("r0").params),
                               tuned, "copy", "own")
    run_key = "val_run" if pred_split == "val200" else "final_run"
    # shift_only (f = 0): exactly theta_pre + delta, member 0's head, r1's own statistics.
    fixed = _params(rows["shift_only"]["member_runs"]["r1"][run_key])
    assert _equal(fixed, start)
    assert _equal(fixed["head"], tuned["head"])
    assert _equal(fixed["backbone"]["batch_stats"], r1.params["batch_stats"])
    # shift (5 steps): every encoder tensor, the head and the statistics moved from there.
    brief = _flat(_params(rows["shift"]["member_runs"]["r1"][run_key]))
    begin = _flat(start)
    assert brief.keys() == begin.keys()
    unchanged = [k for k in brief if np.array_equal(brief[k], begin[k])]
    assert unchanged == []


def test_reestimated_batch_statistics_forget_the_start(run):
  ctx, task, _ = run
  r0, r1 = ctx.backbone("r0"), ctx.backbone("r1")
  images, _ = ctx.images(task, "train800", r0.preprocess)
  x = images[:64]  # Batches of 32 throughout: one compiled pass.
  own = shift.reestimate_batch_stats(r0, r0.params, x, 32)
  other = shift.reestimate_batch_stats(r0, {**r0.params, "batch_stats":
                                            r1.params["batch_stats"]}, x, 32)
  for a, b in zip(jax.tree.leaves(own["batch_stats"]), jax.tree.leaves(other["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not _equal(own["batch_stats"], r0.params["batch_stats"])
  assert _equal(own["params"], r0.params["params"])
  # One batch: its statistics are a fixed point of a training-mode pass over it.
  halves = [shift.reestimate_batch_stats(r0, r0.params, x[i:i + 32], 32) for i in (0, 32)]
  again = shift._batch_stats_fn(r0)(halves[0], x[:32])  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(halves[0]["batch_stats"]), jax.tree.leaves(again)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Two batches: the mean of their own estimates.
  for a, h0, h1 in zip(*(jax.tree.leaves(t["batch_stats"]) for t in [own] + halves)):
    np.testing.assert_allclose(a, (np.asarray(h0) + h1) / 2, rtol=1e-4, atol=1e-6)
  # batch_stats="reestimate" in a member's start: re-estimated on its training split.
  unit = _member0(ctx, task)
  tuned = _params(unit.fields["val_run"])
  delta = shift.encoder_delta(tuned["backbone"], r0.params)
  plan = shift.Plan(unit.fields["learning_rate"], 0, "copy", "reestimate", True)
  key, _ = shift.member_side(ctx, task, r1, "train800", plan, delta, [unit.fields["val_run"]],
                             unit.fields["val_run"], tuned, ctx.config.finetune, 0)
  start = shift.start_params(r1.params, delta, tuned, "copy", "own")
  expect = shift.reestimate_batch_stats(r1, start["backbone"], images, 32)
  assert _equal(_params(key), {"backbone": expect, "head": tuned["head"]})


def test_delta_from_2_adds_the_mean_shift_of_two_full_fine_tunes(run):
  ctx, task, rows = run
  config = ml_collections.ConfigDict(ctx.config.shift.to_dict())
  config.delta_from = 2
  _, result = methods.run_unit(ctx, "shift_only", task, ctx.backbones, config=config)
  assert list(result.fields["member_runs"]) == ["r2"]
  units = [methods.run_unit(ctx, "finetune", task, [ctx.backbone(n)])[1] for n in ("r0", "r1")]
  for pred_split, _, field in shift.SIDES:
    tuned = [_params(u.fields[field]) for u in units]
    delta = shift.mean_delta([shift.encoder_delta(t["backbone"], ctx.backbone(n).params)
                              for t, n in zip(tuned, ("r0", "r1"))])
    run_key = "val_run" if pred_split == "val200" else "final_run"
    assert _equal(_params(result.fields["member_runs"]["r2"][run_key]),
                  shift.start_params(ctx.backbone("r2").params, delta, tuned[0], "copy", "own"))
  # Two full fine-tunes (independent's) and one shifted member.
  assert result.train_steps == 2 * units[0].train_steps
  assert result.fields["compute_ratio_vs_independent"] == pytest.approx(2 / 3)


def test_independent_members_train_at_member0s_setting_or_their_own(run, monkeypatch):
  """With two learning rates and a choice that differs by member (member 0's sweep
  picks 0.05, the others' would pick 0.1): "member0" trains members 1.. at 0.05,
  with no sweep of their own; "sweep" lets each choose."""
  ctx, task, _ = run
  real_choose = finetune.choose
  def choose(candidates):  # By member: the first learning rate for r0, else the last.
    ordered = sorted(candidates, key=lambda c: c[0].learning_rate)
    return ordered[0] if candidates[0][1].members == ("r0",) else ordered[-1]
  monkeypatch.setattr(finetune, "choose", choose)
  ft = ml_collections.ConfigDict(ctx.config.finetune.to_dict())
  ft.learning_rates = (0.05, 0.1)
  monkeypatch.setattr(ctx, "config", ml_collections.ConfigDict(
      {**ctx.config.to_dict(), "finetune": ft.to_dict()}))
  results = {}
  for setting in ("member0", "sweep"):
    config = ml_collections.ConfigDict(ctx.config.shift.to_dict())
    config.independent_setting = setting
    _, results[setting] = methods.run_unit(ctx, "independent", task, ctx.backbones,
                                           config=config)
  monkeypatch.setattr(finetune, "choose", real_choose)
  units = {n: methods.run_unit(ctx, "finetune", task, [ctx.backbone(n)])[1]
           for n in ("r0", "r1", "r2")}
  assert [u.fields["learning_rate"] for u in units.values()] == [0.05, 0.1, 0.1]
  one, own = results["member0"], results["sweep"]
  assert one.fields["independent_setting"] == "member0"
  # member0: r0's unit (sweep of 2 + retrain), then r1 and r2 at 0.05 (2 runs each).
  assert one.train_steps == 3 * STEPS + 2 * 2 * STEPS
  assert own.train_steps == 3 * 3 * STEPS
  for name in ("r1", "r2"):
    unit = units[name]
    at_member0 = finetune.with_setting(ctx, ctx.backbone(name), task, ft, 0, 0.05, STEPS)
    np.testing.assert_allclose(one.fields["member_test_accuracy"][name],
                               metrics.accuracy(at_member0.predictions.logits["test"],
                                                at_member0.predictions.labels["test"]))
    np.testing.assert_allclose(own.fields["member_test_accuracy"][name],
                               metrics.accuracy(unit.predictions.logits["test"],
                                                unit.predictions.labels["test"]))
  # shift's compute ratio divides by these steps, estimated from member 0's unit.
  for setting, result in (("member0", one), ("sweep", own)):
    config = ml_collections.ConfigDict({**ctx.config.shift.to_dict(),
                                        "independent_setting": setting})
    assert shift.independent_steps(config, [units["r0"]], 3) == result.train_steps


def test_adding_a_member_is_one_shift_and_brief_fine_tune_only(run, monkeypatch):
  ctx, task, rows = run
  before = rows["shift"]["member_runs"]
  files = {}
  for runs in before.values():
    for key in runs.values():
      for ext in (".json", ".npz", ".params.npz"):
        with open(os.path.join(_cache().directory, key + ext), "rb") as f:
          files[key + ext] = f.read()
  trained, starts = [], []
  real = finetune.train_run

  def spy(ctx, b, task, r, *args, **kwargs):
    trained.append((b.name, r.split, r.steps))
    starts.append(kwargs["init_params"])
    return real(ctx, b, task, r, *args, **kwargs)

  monkeypatch.setattr(finetune, "train_run", spy)
  config = ml_collections.ConfigDict(ctx.config.shift.to_dict())
  config.members = ("r0", "r1", "r2", "r3")
  _, result = methods.run_unit(ctx, "shift", task, ctx.backbones, config=config)
  assert trained == [("r3", "train800", 5), ("r3", "train800val200", 5)]
  # Each brief fine-tune starts from theta_pre + delta of its side, with member 0's head.
  unit = _member0(ctx, task)
  for start, (_, _, field) in zip(starts, shift.SIDES):
    tuned = _params(unit.fields[field])
    delta = shift.encoder_delta(tuned["backbone"], ctx.backbone("r0").params)
    assert _equal(start, shift.start_params(ctx.backbone("r3").params, delta, tuned, "copy",
                                            "own"))
  assert {n: result.fields["member_runs"][n] for n in before} == before
  for name, content in files.items():
    with open(os.path.join(_cache().directory, name), "rb") as f:
      assert f.read() == content, name
  accuracy = result.fields["member_test_accuracy"]
  assert {n: accuracy[n] for n in ("r0", "r1", "r2")} == rows["shift"]["member_test_accuracy"]
  assert result.members == ("r0", "r1", "r2", "r3")


def test_the_demo_runs_the_four_methods_on_the_fine_tuning_tasks():
  from configs import demo
  config = demo.get_config()
  assert set(NAMES) <= set(config.methods) and config.shift == shift.default_config()
  for name in NAMES:
    assert config.method_tasks[name] == demo.FINETUNE_TASKS
  assert config.shift.members[0] == "resnet_glyphs"
  names = [m["name"] for m in config.offline_hub.models]
  assert set(config.shift.members) <= set(names)
  # 10% of the demo's 80 fine-tuning steps.
  assert config.finetune.steps == (80,)
  assert shift.brief_steps(config.shift.brief_fraction, config.finetune.steps[0]) == 8


@pytest.mark.parametrize("overrides, message", [
    (dict(members=("r0", "vit")), r"must share one architecture; got \{'r0': 'resnet', "
                                  r"'vit': 'vit'\}"),
    (dict(members=("r0",)), r"names 1 model\(s\); an ensemble needs M >= 2"),
    (dict(members=("r0", "r9")), r"names \['r9'\], which are not in the hub"),
    (dict(brief_fraction=-0.1), r"brief_fraction=-0.1 must lie in \[0, 1\]"),
    (dict(brief_fraction=1.5), r"brief_fraction=1.5 must lie in \[0, 1\]"),
    (dict(delta_from=3), r"delta_from=3 must be an int in \[1, M - 1\] = \[1, 2\]"),
    (dict(head="random"), "head='random' is not one of"),
    (dict(independent_setting="best"), "independent_setting='best' is not one of"),
])
def test_bad_member_lists_and_options_are_named(run, monkeypatch, overrides, message):
  ctx, task, _ = run
  monkeypatch.setattr(finetune, "train_run", None)  # Nothing may train before the error.
  config = ml_collections.ConfigDict(ctx.config.shift.to_dict())
  config.update(overrides)
  for fit in (shift.fit_predict, shift.fit_independent):
    with pytest.raises(ValueError, match=message):
      fit(ctx, task, ctx.backbones, config, 0)
  for name in ("shift", "independent", "brief_only", "shift_only"):  # The suite's early check.
    with pytest.raises(ValueError, match=message):
      methods.get(name).check_hub(config, ctx.backbones)


def test_a_member_whose_tree_differs_is_named(run):
  ctx, task, _ = run
  r0 = ctx.backbone("r0")
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, r0.params))
  path = sorted(flat)[0]
  flat[path] = np.zeros(flat[path].shape[:-1] + (flat[path].shape[-1] + 1,), np.float32)
  wide = dataclasses.replace(r0, name="wide", params=traverse_util.unflatten_dict(flat))
  config = ml_collections.ConfigDict(ctx.config.shift.to_dict())
  config.members = ("r0", "wide")
  with pytest.raises(ValueError, match=f"'wide' differs from 'r0' first at {'/'.join(path)}"):
    shift.fit_predict(ctx, task, ctx.backbones + [wide], config, 0)
