"""Shift-vector transfer of ensembles, and its baselines.

"Transfer learning for ensembles: reducing computation time and keeping the
diversity" (Shashkov, Balabin, Burnaev, Zaytsev, 2022): instead of fine-tuning
each of the M members of a deep ensemble (one architecture, pre-trained on
one source with different seeds), fine-tune member 0 fully, take the shift of
its encoder weights, add that one shift to every other member's pre-trained
weights, and fine-tune each of them only briefly. The paper leaves open how
the shift is formed and how brief "brief" is; here (`config.shift`):

  members        the ensemble's hub models, member 0 first (one architecture,
                 identical parameter trees; M >= 2).
  delta_from     m: members 0..m-1 are fully fine-tuned (finetune's sweep and
                 cache) and delta = the mean of their encoder shifts
                 theta_finetuned - theta_pretrained, over the backbone's
                 `params` collection only (not the head, not `batch_stats`),
                 in float64. Members m..M-1 start from theta_pretrained,j + delta.
  brief_fraction f: each shifted member then fine-tunes for round(f x member 0's
                 chosen steps) steps (half up, at least 1 when f > 0; f = 0: no
                 fine-tune), with finetune's settings (batch, optimizer,
                 warm-up fraction and schedule over the brief steps, trainable
                 mode) at member 0's chosen learning rate x brief_lr_multiplier.
  head           "copy": member 0's fine-tuned head; "fresh": zeros.
  batch_stats    BatchNorm statistics of the start: "own" (member j's
                 pre-trained ones), "member0" (member 0's fine-tuned ones) or
                 "reestimate": one epoch over the training split of
                 training-mode forward passes of the shifted member
                 (`Backbone.features_train`, batches of finetune.batch_size in
                 split order, the last one smaller); each batch's own
                 statistics are recovered exactly from BatchNorm's momentum
                 update and the statistics are their example-weighted mean
                 (a cumulative average: nothing of the starting statistics
                 remains). The brief fine-tune then updates them as finetune does.

The VTAB-1k protocol holds on both sides: the val200 predictions come from
delta of member 0's train800 run (the setting its sweep chose) and brief
fine-tunes on train800; the test predictions from delta of its train800val200
retrain and brief fine-tunes on train800val200. Each member's brief run is a
cached unit of its own (keyed by the member, the runs delta and the head came
from, f, the options and the seed), so a rerun recomputes nothing and adding a
member costs one shift and one brief fine-tune per side. The ensemble is the
uniform average of the members' probabilities.

Methods (one row each), all sharing `config.shift`:
  shift        the method above
  independent  every member fully fine-tuned on its own: member 0 through
               finetune's sweep, the others at the setting it chose (its
               learning rate and steps; `independent_setting: member0`, one
               sweep per ensemble, as a recipe is tuned once) or each through
               a sweep of its own (`sweep`: M finetune units)
  brief_only   the brief fine-tune from theta_pretrained,j (no shift)
  shift_only   the shift without the brief fine-tune (f = 0)
Fields: `disagreement` (mean pairwise top-1 disagreement of the members' test
predictions), `disagreement_normalised` (divided by the ensemble's test error;
None when that is 0), `pairwise_kl` (mean KL over ordered member pairs on
test, i.e. the symmetrised KL; nats), `member_test_accuracy`, `brief_steps`,
`compute_ratio_vs_independent` (the method's optimizer steps over
`independent`'s, estimated from the first m members' full fine-tunes:
`independent_steps`) and `add_member_cost_ratio` (the steps one more member
costs, both sides' brief runs, or for `independent` its full fine-tune, over
member 0's full fine-tune including its sweep). `train_seconds` is the sum of the
seconds its parts recorded when they were computed.
"""
import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from fusion import hub
from fusion import metrics
from fusion import predictions
from fusion.methods import ensemble
from fusion.methods import finetune

MEMBERS = "hub"
USES = ("finetune",)
VERSION = 1
HEADS = ("copy", "fresh")
BATCH_STATS = ("own", "member0", "reestimate")
INDEPENDENT_SETTINGS = ("member0", "sweep")
ENCODER = "params"  # The backbone's collection that the shift moves.
# Prediction split -> (training split, finetune's field of the run that trained on it).
SIDES = (("val200", "train800", "val_run"), ("test", "train800val200", "final_run"))
DEFAULT_MEMBERS = ("resnet_glyphs", "resnet_glyphs_seed1", "resnet_glyphs_seed2",
                   "resnet_glyphs_seed3")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "members": DEFAULT_MEMBERS,  # Hub model names, member 0 first.
      "delta_from": 1,  # m: delta is the mean shift of the first m full fine-tunes.
      "brief_fraction": 0.1,  # f: brief steps = round(f x member 0's chosen steps).
      "brief_lr_multiplier": 1.0,  # x member 0's chosen learning rate.
      "head": "copy",  # "copy" (member 0's fine-tuned head) | "fresh" (zeros).
      "batch_stats": "own",  # "own" | "member0" | "reestimate".
      # independent: "member0": members 1.. fine-tune fully at the setting member
      # 0's sweep chose (one sweep for the ensemble, as one tunes a recipe once);
      # "sweep": each member runs finetune's sweep of its own.
      "independent_setting": "member0",
  })


def check_config(config) -> None:
  """Clear errors for bad options (the members are checked against the hub later)."""
  members = tuple(config.members or ())
  if len(members) < 2:
    raise ValueError(f"shift.members={members} names {len(members)} model(s); an ensemble "
                     "needs M >= 2 members of one architecture.")
  duplicates = sorted({m for m in members if members.count(m) > 1})
  if duplicates:
    raise ValueError(f"shift.members names {duplicates} more than once: {members}.")
  f = config.brief_fraction
  if not isinstance(f, (int, float)) or not 0 <= f <= 1:
    raise ValueError(f"shift.brief_fraction={f!r} must lie in [0, 1] (the fraction of "
                     "member 0's fine-tuning steps; 0: no brief fine-tune).")
  if not (isinstance(config.brief_lr_multiplier, (int, float))
          and config.brief_lr_multiplier > 0):
    raise ValueError(f"shift.brief_lr_multiplier={config.brief_lr_multiplier!r} must be > 0.")
  if config.head not in HEADS:
    raise ValueError(f"shift.head={config.head!r} is not one of {HEADS}.")
  if config.batch_stats not in BATCH_STATS:
    raise ValueError(f"shift.batch_stats={config.batch_stats!r} is not one of {BATCH_STATS}.")
  independent_setting(config)
  m = config.delta_from
  if not isinstance(m, int) or not 1 <= m < len(members):
    raise ValueError(f"shift.delta_from={m!r} must be an int in [1, M - 1] = [1, "
                     f"{len(members) - 1}] (M = {len(members)} members; at least one is "
                     "shifted).")


def independent_setting(config) -> str:
  """`config.independent_setting` ("sweep" in a config without it), checked."""
  setting = config.get("independent_setting", "sweep")
  if setting not in INDEPENDENT_SETTINGS:
    raise ValueError(f"shift.independent_setting={setting!r} is not one of "
                     f"{INDEPENDENT_SETTINGS}.")
  return setting


def brief_steps(fraction: float, steps: int) -> int:
  """round(fraction x steps), half up; at least 1 when fraction > 0; 0 when it is 0."""
  if fraction == 0:
    return 0
  return max(1, int(math.floor(fraction * steps + 0.5)))


# ------------------------------------------------------------------ pure parts


def _flat(tree) -> dict[tuple, Any]:
  return traverse_util.flatten_dict(tree)


def check_same_trees(trees: Mapping[str, Any]) -> None:
  """ValueError naming the first path where a variable tree differs from the first one."""
  names = list(trees)
  reference = _flat(trees[names[0]])
  for name in names[1:]:
    flat = _flat(trees[name])
    for path in sorted(set(reference) | set(flat)):
      a, b = reference.get(path), flat.get(path)
      shape_a = None if a is None else tuple(np.shape(a))
      shape_b = None if b is None else tuple(np.shape(b))
      if shape_a != shape_b:
        raise ValueError(
            f"shift members need identical parameter trees; {name!r} differs from "
            f"{names[0]!r} first at {'/'.join(map(str, path))}: shape {shape_b} against "
            f"{shape_a} (None: absent).")


def encoder_delta(finetuned: Mapping[str, Any], pretrained: Mapping[str, Any]) -> dict:
  """theta_finetuned - theta_pretrained over the `params` collection, float64."""
  check_same_trees({"pretrained": pretrained[ENCODER], "finetuned": finetuned[ENCODER]})
  flat_ft, flat_pre = _flat(finetuned[ENCODER]), _flat(pretrained[ENCODER])
  return traverse_util.unflatten_dict(
      {p: np.asarray(flat_ft[p], np.float64) - np.asarray(flat_pre[p], np.float64)
       for p in flat_pre})


def mean_delta(deltas: Sequence[Any]) -> dict:
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *deltas)


def shift(variables: Mapping[str, Any], delta: Any) -> dict:
  """`variables` with theta + delta in the `params` collection (sum in float64, cast back
  to each leaf's dtype); every other collection (BatchNorm `batch_stats`) as it is."""
  check_same_trees({"member": variables[ENCODER], "delta": delta})
  flat, flat_delta = _flat(variables[ENCODER]), _flat(delta)
  moved = {p: (np.asarray(v, np.float64) + flat_delta[p]).astype(np.asarray(v).dtype)
           for p, v in flat.items()}
  return {**variables, ENCODER: traverse_util.unflatten_dict(moved)}


def delta_norm(delta: Any) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(delta))))


def start_params(pretrained: Mapping[str, Any], delta: Any, member0: Mapping[str, Any],
                 head: str, batch_stats: str) -> dict:
  """The brief fine-tune's start {"backbone", "head"} of one member (before re-estimation).

  `member0` is member 0's fine-tuned {"backbone", "head"}; `delta` None: no shift.
  """
  backbone = dict(pretrained) if delta is None else shift(pretrained, delta)
  if batch_stats == "member0" and "batch_stats" in backbone:
    backbone["batch_stats"] = member0["backbone"]["batch_stats"]
  if head == "copy":
    new_head = member0["head"]
  else:
    new_head = jax.tree.map(np.zeros_like, member0["head"])
  return {"backbone": jax.tree.map(np.asarray, backbone),
          "head": jax.tree.map(np.asarray, new_head)}


@functools.lru_cache(maxsize=16)
def _batch_stats_fn(backbone: hub.Backbone):
  def fn(variables, images):
    _, new = backbone.features_train(variables, images, jax.random.PRNGKey(0))
    return new["batch_stats"]
  return jax.jit(fn)


def reestimate_batch_stats(backbone: hub.Backbone, variables: Mapping[str, Any],
                           images: np.ndarray, batch_size: int) -> dict:
  """`variables` with BatchNorm statistics re-estimated over `images` (one epoch).

  Training-mode passes update running = m * running + (1 - m) * batch; from
  running = 0 and from running = 1 on the first batch, m is read off, and each
  batch's own statistics are then (pass from 0) / (1 - m). The result is their
  mean weighted by batch size, independent of the statistics `variables` had.
  Models without `batch_stats` come back unchanged.
  """
  if "batch_stats" not in variables:
    return dict(variables)
  fn = _batch_stats_fn(hub.computation_twin(backbone))
  zeros = jax.tree.map(lambda x: jnp.zeros_like(jnp.asarray(x)), variables["batch_stats"])
  ones = jax.tree.map(jnp.ones_like, zeros)
  from_zeros = {**variables, "batch_stats": zeros}
  first = np.asarray(images[:batch_size], np.float32)
  a = fn(from_zeros, first)
  momentum = jax.tree.map(lambda b, a: b - a, fn({**variables, "batch_stats": ones}, first), a)
  total, count = None, 0
  for start in range(0, len(images), batch_size):
    x = np.asarray(images[start:start + batch_size], np.float32)
    stats = a if start == 0 else fn(from_zeros, x)
    stats = jax.tree.map(lambda s, m, n=len(x): np.asarray(s, np.float64) * n / (1 - np.asarray(
        m, np.float64)), stats, momentum)
    total = stats if total is None else jax.tree.map(np.add, total, stats)
    count += len(x)
  dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, variables["batch_stats"])
  new = jax.tree.map(lambda t, d: (t / count).astype(d), total, dtypes)
  return {**variables, "batch_stats": new}


# ------------------------------------------------------------------ members


def resolve_members(members: Sequence[hub.Backbone], config) -> list[hub.Backbone]:
  """config.shift.members as Backbones, member 0 first; clear errors for a bad list."""
  check_config(config)
  by_name = {b.name: b for b in members}
  missing = [n for n in config.members if n not in by_name]
  if missing:
    raise ValueError(f"shift.members names {missing}, which are not in the hub; models: "
                     f"{sorted(by_name)}.")
  chosen = [by_name[n] for n in config.members]
  archs = {b.name: b.architecture for b in chosen}
  if len(set(archs.values())) > 1:
    raise ValueError(f"shift members must share one architecture; got {archs}.")
  check_same_trees({b.name: b.params for b in chosen})
  return chosen


def check_hub(config, backbones) -> None:
  resolve_members(backbones, config)


def _cache(ctx) -> predictions.Cache:
  return predictions.Cache(ctx.config.get("predictions_dir") or None)


def _run_params(cache: predictions.Cache, key: str) -> Any:
  result = cache.load(key)
  if result is None or "params_sha256" not in result.fields:
    raise ValueError(f"shift needs the saved weights of fine-tuning run {key}; it has none. "
                     "Set finetune.save_params=True (the default).")
  return finetune.load_params(cache, key, result.fields["params_sha256"])


@dataclasses.dataclass(frozen=True)
class Plan:
  """What every shifted member's runs share on one task."""
  learning_rate: float  # Member 0's chosen rate x brief_lr_multiplier.
  steps: int  # Brief steps (0: none).
  head: str
  batch_stats: str
  shifted: bool  # False: brief_only (start from theta_pretrained).


def member_side(ctx, task, backbone: hub.Backbone, train_split: str, plan: Plan,
                delta: Any, delta_runs: Sequence[str], member0_run: str,
                member0: Mapping[str, Any], ft_config, seed: int
                ) -> tuple[str, predictions.Result]:
  """(key, Result) of one member's start (+ brief fine-tune) on one training split; cached."""
  cache = _cache(ctx)
  run = finetune.Run(plan.learning_rate, plan.steps, train_split)
  inputs = {**finetune.run_inputs(backbone, task, run, ft_config, seed),
            "method": "shift_member", "version": VERSION,
            "start": {"delta_runs": list(delta_runs) if plan.shifted else None,
                      "member0_run": member0_run, "head": plan.head,
                      "batch_stats": plan.batch_stats}}
  key = predictions.unit_key(inputs)
  result = cache.load(key)
  if result is not None:
    return key, result
  t0 = time.time()
  start = start_params(backbone.params, delta if plan.shifted else None, member0, plan.head,
                       plan.batch_stats)
  if plan.batch_stats == "reestimate":
    images, _ = ctx.images(task, train_split, backbone.preprocess)
    start["backbone"] = reestimate_batch_stats(backbone, start["backbone"], images,
                                               int(ft_config.batch_size))
  if plan.steps > 0:
    result = finetune.train_run(ctx, backbone, task, run, ft_config, seed,
                                init_params=start, cache=cache, key=key)
  else:
    result = finetune.run_result(ctx, backbone, task, run, start, ft_config, cache, key)
  result = dataclasses.replace(result, train_seconds=round(time.time() - t0, 3))
  cache.save(key, inputs, result)
  return key, result


def _combine(name: str, sides: Mapping[str, tuple[str, predictions.Result]]
             ) -> predictions.Result:
  """One member's Result: val200 from its train800 side, test from its train800val200 side."""
  (val_key, val), (final_key, final) = sides["val200"], sides["test"]
  tests = [s for s in final.predictions.splits if s != "val200"]  # test, test_shift
  preds = predictions.Predictions(
      {"val200": val.predictions.logits["val200"],
       **{s: final.predictions.logits[s] for s in tests}},
      {"val200": val.predictions.labels["val200"],
       **{s: final.predictions.labels[s] for s in tests}})
  return predictions.Result(
      preds, members=(name,), inference_gflops=val.inference_gflops,
      train_steps=val.train_steps + final.train_steps,
      train_examples=val.train_examples + final.train_examples,
      train_seconds=val.train_seconds + final.train_seconds,
      fields={"val_run": val_key, "final_run": final_key})


# ------------------------------------------------------------------ the methods


def _finetune_config(ctx):
  from fusion import methods  # The registry imports this module.
  config = methods.method_config(ctx.config, "finetune")
  finetune.check_config(config)
  if not config.save_params:
    raise ValueError("shift builds on member 0's fine-tuned weights: set "
                     "finetune.save_params=True (the default).")
  return config


def _full(ctx, task, backbones) -> list[tuple[str, predictions.Result]]:
  from fusion import methods
  return [methods.run_unit(ctx, "finetune", task, [b]) for b in backbones]


def diversity_fields(results: Sequence[predictions.Result], ensemble_logits: np.ndarray,
                     labels: np.ndarray) -> dict[str, Any]:
  """Diversity of the members' test predictions and the ensemble's test error."""
  logits = [r.predictions.logits["test"] for r in results]
  d = metrics.pairwise_disagreement(logits)
  error = 1.0 - metrics.accuracy(ensemble_logits, labels)
  return {"disagreement": d, "disagreement_normalised": d / error if error > 0 else None,
          "pairwise_kl": metrics.pairwise_kl(logits),
          "member_test_accuracy": {r.members[0]: metrics.accuracy(r.predictions.logits["test"],
                                                                  labels) for r in results}}


def _ensemble(results, fields) -> predictions.Result:
  out = ensemble.ensemble_result(results, [1] * len(results), {})
  p = out.predictions
  fields = {**fields, **diversity_fields(results, p.logits["test"], p.labels["test"])}
  return dataclasses.replace(out, train_seconds=round(sum(r.train_seconds for r in results), 3),
                             fields=fields)


def transfer(ctx, task, members, config, seed, *, shifted: bool = True,
             fraction: float | None = None) -> predictions.Result:
  """The shift-vector ensemble (`shifted=False`: brief_only; `fraction=0`: shift_only)."""
  backbones = resolve_members(members, config)
  ft_config = _finetune_config(ctx)
  m = int(config.delta_from)
  full = _full(ctx, task, backbones[:m])
  first = full[0][1]
  fraction = float(config.brief_fraction if fraction is None else fraction)
  plan = Plan(learning_rate=float(first.fields["learning_rate"]) *
              float(config.brief_lr_multiplier),
              steps=brief_steps(fraction, int(first.fields["steps"])),
              head=str(config.head), batch_stats=str(config.batch_stats), shifted=shifted)
  cache = _cache(ctx)
  sides: dict[str, dict[str, tuple[str, predictions.Result]]] = {
      b.name: {} for b in backbones[m:]}
  norms = {}
  for pred_split, train_split, field in SIDES:
    runs = [r.fields[field] for _, r in full]
    finetuned = [_run_params(cache, k) for k in runs]
    delta = None
    if shifted:
      delta = mean_delta([encoder_delta(p["backbone"], b.params)
                          for p, b in zip(finetuned, backbones[:m])])
      norms[pred_split] = delta_norm(delta)
    for b in backbones[m:]:
      sides[b.name][pred_split] = member_side(
          ctx, task, b, train_split, plan, delta, runs, runs[0], finetuned[0], ft_config, seed)
  results = [r for _, r in full] + [_combine(n, s) for n, s in sides.items()]
  total = sum(r.train_steps for r in results)
  return _ensemble(results, {
      "delta_from": m, "brief_fraction": fraction, "brief_steps": plan.steps,
      "brief_learning_rate": plan.learning_rate, "head": plan.head,
      "batch_stats": plan.batch_stats, "shifted": shifted,
      "member0_learning_rate": float(first.fields["learning_rate"]),
      "member0_steps": int(first.fields["steps"]), "delta_norm": norms,
      "member_runs": {n: {"val_run": s["val200"][0], "final_run": s["test"][0]}
                      for n, s in sides.items()},
      "compute_ratio_vs_independent": total / independent_steps(
          config, [r for _, r in full], len(backbones)),
      "add_member_cost_ratio": 2 * plan.steps / first.train_steps})


def independent_steps(config, full: Sequence[predictions.Result], num_members: int) -> float:
  """The optimizer steps of `independent` on M = num_members members, from the
  first m members' full fine-tunes (finetune units): "member0", member 0's
  sweep and retrain plus M - 1 members' train800 run and retrain at its chosen
  steps; "sweep", every member the same sweep grid (M x their mean)."""
  steps = [r.train_steps for r in full]
  if independent_setting(config) == "sweep":
    return float(np.mean(steps)) * num_members
  return steps[0] + (num_members - 1) * 2 * int(full[0].fields["steps"])


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  """shift: delta of the first m full fine-tunes added to the others, then brief fine-tunes."""
  return transfer(ctx, task, members, config, seed)


def fit_brief_only(ctx, task, members, config, seed) -> predictions.Result:
  """brief_only: the brief fine-tunes from the members' own pre-trained weights."""
  return transfer(ctx, task, members, config, seed, shifted=False)


def fit_shift_only(ctx, task, members, config, seed) -> predictions.Result:
  """shift_only: the shifted members as they are (f = 0)."""
  return transfer(ctx, task, members, config, seed, fraction=0.0)


def fit_independent(ctx, task, members, config, seed) -> predictions.Result:
  """independent: every member fully fine-tuned on its own, uniformly averaged;
  members 1.. at member 0's chosen setting, or each after its own sweep
  (`independent_setting`)."""
  del seed  # The fine-tunes use the job's seed, as the finetune units do.
  backbones = resolve_members(members, config)
  ft_config = _finetune_config(ctx)
  setting = independent_setting(config)
  if setting == "sweep":
    results = [r for _, r in _full(ctx, task, backbones)]
  else:
    (_, first), = _full(ctx, task, backbones[:1])
    results = [first] + [finetune.with_setting(ctx, b, task, ft_config, ctx.seed,
                                               first.fields["learning_rate"],
                                               first.fields["steps"])
                         for b in backbones[1:]]
  add = results[-1].train_steps / results[0].train_steps
  return _ensemble(results, {"independent_setting": setting,
                             "compute_ratio_vs_independent": 1.0,
                             "add_member_cost_ratio": add})
