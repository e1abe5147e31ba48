"""The dry run of a suite: every unit it would run and its estimated FLOPs.

`--config.dry_run=true` makes `suite.run` print this plan (and write it to
`<workdir>/plan.md` and `plan.json`) instead of running anything: no hub
weights, no data, no network. A GPU or TPU user sizes the job from it.

`units(config)` lists the (method, task, members) units in the order the suite
computes them; `estimate(...)` costs each one. Both are pure functions of
their arguments; `run(config, workdir)` wires them to the config.

The cost model (what the printed plan says, in short):
- F(m): forward GFLOPs of model m on one image at its resolution, as XLA counts
  them (a multiply-add is 2 FLOPs; `hub.inference_gflops` counts the same way).
  From `config.model_gflops` (configs/vtab1k.py keeps a table) or, for the
  offline hub's models, from XLA's cost analysis of the architecture on
  abstract shapes (no weights needed).
- A training step on B examples costs 3 x F x B (the backward pass ~ 2 forward
  passes); optimizer updates and linear heads are left out (< 1% here).
- Work is counted once, as the caches share it: a model's features on a split
  (forward passes over train800, val200, train800val200, test), a fine-tuning
  run (its steps, then forward passes over val200 and the test splits), a
  Hub-Pathway run. A unit's numbers are the work it adds to the units before
  it: the ensembles after `finetune` add almost nothing.
- Methods that fine-tune the top K models of a ranking (ensembles, soups) are
  costed for the K models with the largest F: an upper bound, marked "<=".
- Heads, gates and probes trained on cached features cost next to nothing next
  to the features themselves and count 0.
"""
import dataclasses
import json
import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fusion import io

# VTAB-1k split sizes (task_adaptation): train800, val200 and their union.
TRAIN_SPLITS = {"train800": 800, "val200": 200, "train800val200": 1000}
# Test-split sizes of the 19 VTAB-1k tasks: the TFDS splits (or slices) that
# fusion.data.tasks reads, from the TFDS catalog's split sizes and the
# task_adaptation cuts (eurosat, resisc45: the last 20% of train; dsprites: the
# last 10%; smallnorb: the second half of test; clevr: TFDS validation).
VTAB_TEST_EXAMPLES = {
    "caltech101": 6084, "cifar100": 10000, "dtd": 1880, "oxford_flowers102": 6149,
    "oxford_iiit_pet": 3669, "sun397": 21750, "svhn": 26032,
    "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670,
    "clevr_count": 15000, "clevr_distance": 15000, "dmlab": 22735, "kitti_distance": 711,
    "dsprites_location": 73728, "dsprites_orientation": 73728,
    "smallnorb_azimuth": 12150, "smallnorb_elevation": 12150,
}
REFERENCE_TFLOPS = 100.0  # The sustained rate the plan converts its total to hours at.


@dataclasses.dataclass(frozen=True)
class Unit:
  method: str
  task: str
  members: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TaskSize:
  """Examples a task's splits hold: what the forward passes run over."""
  name: str
  test: int  # The test split's examples.
  test_splits: int = 1  # 2 where the task also has `test_shift` (same examples).

  def examples(self, split: str) -> int:
    if split == "test":
      return self.test * self.test_splits
    return TRAIN_SPLITS[split]


@dataclasses.dataclass(frozen=True)
class Work:
  """One piece of cached work: computed once, whichever unit needs it first."""
  key: tuple
  train_flops: float = 0.0
  forward_flops: float = 0.0


@dataclasses.dataclass(frozen=True)
class Estimate:
  unit: Unit
  inference_gflops: float  # Per image, what the unit's result runs at test time.
  upper_bound: bool  # True when the unit's members depend on a ranking (see above).
  train_flops: float  # New work only (see the module docstring).
  forward_flops: float
  estimated: bool = True  # False: a method the plan has no cost model for.


# ------------------------------------------------------------------ units


def model_names(config) -> list[str]:
  """The hub's model names without loading it: `config.hub`, then the offline hub's."""
  from fusion import hub
  names = [hub.default_name(spec) for spec in (config.get("hub") or [])]
  if config.get("offline_hub") is not None:
    names += [m["name"] for m in config.offline_hub.models]
  return names


def units(config) -> list[Unit]:
  """Every (method, task, members) unit of the suite, in `suite.run_units`' order."""
  from fusion import methods
  from fusion import suite  # It imports this module only inside `run`: no cycle.
  names = model_names(config)
  return [Unit(name, task, tuple(members))
          for task in config.tasks for name in suite.method_names(config)
          if suite.runs_on(config, name, types.SimpleNamespace(name=task))
          for members in methods.member_groups(methods.get(name), names)]


# ------------------------------------------------------------------ cost models


@dataclasses.dataclass(frozen=True)
class _Costs:
  """What a method's cost model reads: FLOPs per model, the task, the config."""
  gflops: Mapping[str, float]
  task: TaskSize
  config: Any
  seed: int

  def f(self, model: str) -> float:
    return self.gflops[model] * 1e9

  def method_config(self, key: str, default: Callable[[], Any]):
    own = self.config.get(key)
    return own if own is not None else default()

  def features(self, model: str, splits=("train800", "val200", "train800val200", "test")
               ) -> list[Work]:
    return [Work(("features", model, self.task.name, s),
                 forward_flops=self.f(model) * self.task.examples(s)) for s in splits]

  def finetune_run(self, model: str, lr, steps: int, split: str, seed: int,
                   batch: int) -> Work:
    # Each run predicts val200 and the test splits (fusion.methods.finetune.train_run).
    evals = self.task.examples("val200") + self.task.examples("test")
    return Work(("finetune_run", model, self.task.name, lr, steps, split, seed),
                train_flops=3 * self.f(model) * steps * batch,
                forward_flops=self.f(model) * evals)

  def finetune(self, model: str, seed: int | None = None) -> list[Work]:
    """The sweep on train800, then the chosen setting's retrain on train800val200."""
    from fusion.methods import finetune
    c = self.method_config("finetune", finetune.default_config)
    seed = self.seed if seed is None else seed
    runs = [self.finetune_run(model, float(lr), int(s), "train800", seed, int(c.batch_size))
            for s in c.steps for lr in c.learning_rates]
    # The retrain's cost does not depend on which learning rate wins; its steps
    # are the sweep's longest (an upper bound when the grid has several).
    return runs + [self.finetune_run(model, "chosen", int(max(c.steps)), "train800val200",
                                     seed, int(c.batch_size))]


def _top(c: _Costs, members: Sequence[str], k: int) -> list[str]:
  """The k members with the largest F: the costliest choice a ranking could make."""
  return sorted(members, key=lambda m: -c.gflops[m])[:k or len(members)]


def _ensemble_config(c: _Costs):
  from fusion.methods import ensemble
  return c.method_config("ensemble", ensemble.default_config)


def _per_model_features(c, members):  # Every member's features on every split.
  return [w for m in members for w in c.features(m)], sum(c.gflops[m] for m in members), False


def _probe_choice(c, members):  # best_probe: one model's probe, chosen on val200.
  work, _, _ = _per_model_features(c, members)
  return work, max(c.gflops[m] for m in members), len(members) > 1


def _finetune(c, members):
  model, = members
  return c.finetune(model), c.gflops[model], False


def _ranked(c, members, top_k_of: Callable[[int], int], combine: Callable[[list], float],
            extra=lambda c, top, members: []):
  config = _ensemble_config(c)
  top = _top(c, members, top_k_of(int(config.top_k)))
  work = [w for m in members for w in c.features(m, ("train800",))]  # The ranking.
  work += [w for m in top for w in c.finetune(m)] + extra(c, top, members)
  return work, combine([c.gflops[m] for m in top]), len(top) < len(members)


def _seed_runs(c, top, members):
  """seed_ensemble: K - 1 more seeds of the best-ranked model at its chosen setting."""
  from fusion.methods import finetune
  ft = c.method_config("finetune", finetune.default_config)
  k = int(_ensemble_config(c).top_k) or len(members)
  return [c.finetune_run(top[0], "chosen", int(max(ft.steps)), split, c.seed + i,
                         int(ft.batch_size))
          for i in range(1, k) for split in ("train800", "train800val200")]


def _soup_eval(greedy: bool):
  def extra(c, top, members):
    del members
    from fusion.methods import finetune
    ft = c.method_config("finetune", finetune.default_config)
    runs = len(ft.learning_rates) * len(ft.steps)
    # The greedy soup scores each ingredient and each trial soup on val200.
    vals = (2 * runs - 1) if greedy else 1
    evals = vals * c.task.examples("val200") + c.task.examples("test")
    return [Work(("soup", greedy, top[0], c.task.name), forward_flops=c.f(top[0]) * evals)]
  return extra


def _pathway(k_of: Callable[[Any], int], frozen: bool):
  def cost(c, members):
    from fusion import routing
    from fusion.methods import pathway
    config = c.method_config("pathway", pathway.default_config)
    k, total = k_of(config), sum(c.gflops[m] for m in members)
    bound = sum(sorted((c.gflops[m] for m in members), reverse=True)[:k])
    if frozen:  # Generator and heads on cached features.
      work, _, _ = _per_model_features(c, members)
      return work, bound, True
    batch = int(config.batch_size)
    slots = routing.capacity(k, batch, len(members), float(config.capacity_factor))
    # Every model runs its buffer of `slots` examples per batch of `batch`.
    per_example = total * 1e9 * slots / batch
    steps = int(config.steps)
    runs = [(float(lr), "train800", ("val200",)) for lr in config.learning_rates]
    runs.append(("chosen", "train800val200", ("test",)))
    work = [Work(("pathway_run", k, tuple(members), c.task.name, lr, split),
                 train_flops=3 * per_example * steps * batch,
                 forward_flops=per_example * sum(c.task.examples(s) for s in evals))
            for lr, split, evals in runs]
    if config.generator != "thumbnail":  # A gate on one hub model's cached features.
      work += c.features(config.generator)
    return work, bound, True
  return cost


def _shift(kind: str):
  """The shift family (fusion.methods.shift) over config.shift.members."""
  def cost(c, members):
    from fusion.methods import finetune
    from fusion.methods import shift
    config = c.method_config("shift", shift.default_config)
    ft = c.method_config("finetune", finetune.default_config)
    ens = list(config.members)
    unknown = [m for m in ens if m not in c.gflops]
    if unknown:
      raise ValueError(f"shift.members names {unknown}, which are not in the hub "
                       f"{sorted(c.gflops)}.")
    gflops = sum(c.gflops[m] for m in ens)
    if kind == "independent":
      if shift.independent_setting(config) == "sweep":
        return [w for m in ens for w in c.finetune(m)], gflops, False
      return c.finetune(ens[0]) + [  # The others at member 0's chosen setting.
          c.finetune_run(m, "chosen", int(max(ft.steps)), split, c.seed, int(ft.batch_size))
          for m in ens[1:] for split in ("train800", "train800val200")], gflops, False
    m = int(config.delta_from)
    work = [w for member in ens[:m] for w in c.finetune(member)]
    f = 0.0 if kind == "shift_only" else float(config.brief_fraction)
    brief = max(1, math.floor(f * max(ft.steps) + 0.5)) if f > 0 else 0  # Half up.
    for member in ens[m:]:  # brief_only: the same runs from the pre-trained weights.
      for split, evals in (("train800", "val200"), ("train800val200", "test")):
        forward = c.f(member) * c.task.examples(evals)
        if config.batch_stats == "reestimate":
          forward += c.f(member) * c.task.examples(split)
        work.append(Work((kind, member, c.task.name, split), forward_flops=forward,
                         train_flops=3 * c.f(member) * brief * int(ft.batch_size)))
    return work, gflops, False
  return cost


# Method name -> cost(costs, members) -> (work, inference GFLOPs per image, upper bound).
COST_MODELS: dict[str, Callable] = {
    "linear_probe": _per_model_features,
    "nearest_centroid": _per_model_features,
    "best_probe": _probe_choice,
    "concat": _per_model_features,
    "uniform_probe_avg": _per_model_features,
    "moe": _per_model_features,
    "moe_no_label": _per_model_features,
    "feature_gate": _per_model_features,
    "finetune": _finetune,
    "ensemble": lambda c, m: _ranked(c, m, lambda k: k, sum),
    "finetune_best": lambda c, m: _ranked(c, m, lambda k: k, max),
    "uniform_topk": lambda c, m: _ranked(c, m, lambda k: k, sum),
    "greedy_all": lambda c, m: _ranked(c, m, lambda k: 0, sum),
    "seed_ensemble": lambda c, m: _ranked(
        c, m, lambda k: 1, lambda g: g[0] * (int(_ensemble_config(c).top_k) or len(m)),
        _seed_runs),
    "uniform_soup": lambda c, m: _ranked(c, m, lambda k: k, max, _soup_eval(False)),
    "greedy_soup": lambda c, m: _ranked(c, m, lambda k: k, max, _soup_eval(True)),
    "pathway": _pathway(lambda config: int(config.k), frozen=False),
    "pathway_k1": _pathway(lambda config: 1, frozen=False),
    "pathway_frozen": _pathway(lambda config: int(config.k), frozen=True),
    "shift": _shift("shift"),
    "independent": _shift("independent"),
    "brief_only": _shift("brief_only"),
    "shift_only": _shift("shift_only"),
}


def estimate(config, plan_units: Sequence[Unit], gflops: Mapping[str, float],
             sizes: Mapping[str, TaskSize]) -> list[Estimate]:
  """The cost of each unit: the work it adds to the units before it (see above)."""
  missing = sorted({m for u in plan_units for m in u.members} - set(gflops))
  if missing:
    raise ValueError(f"No forward GFLOPs known for models {missing}; add them to "
                     "config.model_gflops (GFLOPs per image at the model's resolution).")
  done: set[tuple] = set()
  out = []
  for unit in plan_units:
    model = COST_MODELS.get(unit.method)
    if model is None:
      out.append(Estimate(unit, 0.0, False, 0.0, 0.0, estimated=False))
      continue
    costs = _Costs(gflops, sizes[unit.task], config, int(config.get("seed", 0)))
    work, inference, bound = model(costs, list(unit.members))
    new = {w.key: w for w in work if w.key not in done}  # Repeats within a unit count once.
    done.update(new)
    out.append(Estimate(unit, float(inference), bool(bound),
                        sum(w.train_flops for w in new.values()),
                        sum(w.forward_flops for w in new.values())))
  return out


# ------------------------------------------------------------------ inputs


def task_sizes(names: Sequence[str]) -> dict[str, TaskSize]:
  """name -> TaskSize, from the VTAB table or an offline task's own split sizes."""
  from fusion import experiment
  out = {}
  for task in experiment.load_tasks(names):
    test = VTAB_TEST_EXAMPLES.get(task.name) or dict(task.source_sizes).get("test")
    if not test:
      raise ValueError(f"The plan does not know the size of task {task.name!r}'s test "
                       "split; add it to fusion.plan.VTAB_TEST_EXAMPLES.")
    out[task.name] = TaskSize(task.name, int(test), len(experiment.test_splits(task)))
  return out


def offline_gflops(entry: Mapping[str, Any]) -> float:
  """Forward GFLOPs of an offline-hub recipe entry, from XLA on abstract shapes."""
  import jax
  import jax.numpy as jnp
  from fusion import offline_hub
  size_json = json.dumps(entry["size"], sort_keys=True)
  _, template = offline_hub._architecture(entry["arch"], size_json)  # pylint: disable=protected-access
  shapes = jax.eval_shape(offline_hub._init_fn(entry["arch"], size_json),  # pylint: disable=protected-access
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  variables = dict(shapes) if "batch_stats" in shapes else {"params": shapes}
  r = template.preprocess.resolution
  lowered = jax.jit(template.features).lower(
      variables, jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32))
  return float((lowered.cost_analysis() or {}).get("flops", 0.0)) / 1e9


def model_gflops(config) -> dict[str, float]:
  """name -> forward GFLOPs per image: `config.model_gflops`, then the offline hub's."""
  out = {str(k): float(v) for k, v in dict(config.get("model_gflops") or {}).items()}
  if config.get("offline_hub") is not None:
    for entry in config.offline_hub.models:
      if entry["name"] not in out:
        out[entry["name"]] = offline_gflops(entry)
  return out


# ------------------------------------------------------------------ the plan


def _p(flops: float) -> str:
  """FLOPs as PFLOPs (1e15), 3 significant digits."""
  return f"{flops / 1e15:.3g}"


def markdown(estimates: Sequence[Estimate], gflops: Mapping[str, float]) -> str:
  """The printed plan: how it is estimated, every unit, totals per method and overall."""
  train = sum(e.train_flops for e in estimates)
  forward = sum(e.forward_flops for e in estimates)
  tasks = list(dict.fromkeys(e.unit.task for e in estimates))
  names = list(dict.fromkeys(e.unit.method for e in estimates))
  hours = (train + forward) / (REFERENCE_TFLOPS * 1e12) / 3600
  lines = [
      f"# Dry run: {len(estimates)} units of {len(names)} methods on {len(tasks)} tasks",
      "",
      "Nothing was loaded, trained or downloaded. FLOPs are estimates: a training step "
      "costs 3 x forward FLOPs x batch; forward passes are the features of each model and "
      "split, and each trained run's predictions on val200 and test; work the caches share "
      "is counted once, by the first unit that needs it (later units list only what they "
      "add). Heads and gates on cached features count 0. '<=': the members come from a "
      "ranking, costed at the costliest models. PFLOPs = 1e15 FLOPs.",
      "",
      "Forward GFLOPs per image: " + ", ".join(f"{m} {g:.4g}" for m, g in gflops.items()) + ".",
      "",
      "| # | method | task | members | inference GFLOPs / image | training PFLOPs | "
      "forward PFLOPs |",
      "|---:|---|---|---|---:|---:|---:|",
  ]
  for i, e in enumerate(estimates, 1):
    gf = (("<= " if e.upper_bound else "") + f"{e.inference_gflops:.4g}"
          if e.estimated else "not estimated")
    lines.append(f"| {i} | {e.unit.method} | {e.unit.task} | {'+'.join(e.unit.members)} | "
                 f"{gf} | {_p(e.train_flops)} | {_p(e.forward_flops)} |")
  lines += ["", "| method | units | training PFLOPs | forward PFLOPs |",
            "|---|---:|---:|---:|"]
  for name in names:
    mine = [e for e in estimates if e.unit.method == name]
    lines.append(f"| {name} | {len(mine)} | {_p(sum(e.train_flops for e in mine))} | "
                 f"{_p(sum(e.forward_flops for e in mine))} |")
  lines += ["", f"**Total: {_p(train)} PFLOPs training + {_p(forward)} PFLOPs forward = "
            f"{_p(train + forward)} PFLOPs** (at a sustained {REFERENCE_TFLOPS:g} TFLOP/s: "
            f"{hours:.3g} hours)."]
  unestimated = sorted({e.unit.method for e in estimates if not e.estimated})
  if unestimated:
    lines.append(f"\nNo cost model for {unestimated} (fusion.plan.COST_MODELS): their units "
                 "count 0.")
  return "\n".join(lines) + "\n"


def summary(estimates: Sequence[Estimate]) -> dict[str, Any]:
  return {"units": [{**dataclasses.asdict(e.unit), "members": list(e.unit.members),
                     "inference_gflops": e.inference_gflops, "upper_bound": e.upper_bound,
                     "train_flops": e.train_flops, "forward_flops": e.forward_flops,
                     "estimated": e.estimated} for e in estimates],
          "train_flops": sum(e.train_flops for e in estimates),
          "forward_flops": sum(e.forward_flops for e in estimates)}


def run(config, workdir: str) -> str:
  """The dry run: plan.md and plan.json under `workdir`; returns the markdown."""
  plan_units = units(config)
  gflops = model_gflops(config)
  estimates = estimate(config, plan_units, gflops, task_sizes(config.tasks))
  text = markdown(estimates, {m: gflops[m] for m in model_names(config) if m in gflops})
  os.makedirs(workdir, exist_ok=True)
  io.write_atomic(os.path.join(workdir, "plan.md"), text)
  io.write_json(os.path.join(workdir, "plan.json"), summary(estimates))
  return text
