"""Methods: every way of turning hub models into a classifier for a task.

A method is a module with
  default_config() -> ConfigDict
  fit_predict(ctx, task, members, config, seed) -> predictions.Result
  MEMBERS = "each" | "hub"   one unit per hub model, or one over the whole hub
  USES = ("finetune",)       optional: the methods whose units it builds on
and one line in `METHODS`. A family of methods sharing one config (the
ensemble baselines) registers each member with `config_key` naming it. The suite and the report treat all methods alike;
`run_unit` computes a unit once and caches its Result on disk, so a method
that builds on another (an ensemble on fine-tunes) calls `run_unit` too.
"""
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import ml_collections

from fusion import experiment
from fusion import hub
from fusion import predictions
from fusion.methods import ensemble
from fusion.methods import finetune
from fusion.methods import hub_baselines
from fusion.methods import linear_probe
from fusion.methods import moe
from fusion.methods import nearest_centroid
from fusion.methods import pathway
from fusion.methods import shift
from fusion.methods import soup

MEMBER_MODES = ("each", "hub")


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  fit_predict: Callable[..., predictions.Result]
  default_config: Callable[[], ml_collections.ConfigDict]
  members: str = "each"
  version: int = 1  # Part of every unit's key: bump when results change meaning.
  config_key: str = ""  # The job config's key of its config; "": the name.
  uses: tuple[str, ...] = ()  # Methods whose configs its results depend on.
  # check_hub(config, backbones): errors for a config that cannot run on this hub
  # (K larger than the hub, members not in it), raised before any unit runs.
  check_hub: Callable[..., None] | None = None
  # Its units use no work that other methods cache too (features, fine-tunes):
  # the suite's workers may run them as jobs of their own (`suite.warm_caches`).
  standalone: bool = False

  def __post_init__(self):
    if self.members not in MEMBER_MODES:
      raise ValueError(f"Method {self.name!r}: members={self.members!r} is not one of "
                       f"{MEMBER_MODES}.")
    if not self.config_key:
      object.__setattr__(self, "config_key", self.name)

  @classmethod
  def of(cls, name: str, module: ModuleType, fit_predict=None,
         config_key: str = "", check_hub=None, standalone: bool = False) -> "Method":
    return cls(name, fit_predict or module.fit_predict, module.default_config,
               module.MEMBERS, getattr(module, "VERSION", 1), config_key,
               tuple(getattr(module, "USES", ())),
               check_hub or getattr(module, "check_hub", None), standalone)


METHODS: dict[str, Method] = {
    "linear_probe": Method.of("linear_probe", linear_probe),
    "nearest_centroid": Method.of("nearest_centroid", nearest_centroid),
    "finetune": Method.of("finetune", finetune),
    "ensemble": Method.of("ensemble", ensemble),
    "finetune_best": Method.of("finetune_best", ensemble, ensemble.fit_finetune_best,
                               "ensemble"),
    "uniform_topk": Method.of("uniform_topk", ensemble, ensemble.fit_uniform_topk, "ensemble"),
    "seed_ensemble": Method.of("seed_ensemble", ensemble, ensemble.fit_seed_ensemble,
                               "ensemble"),
    "greedy_all": Method.of("greedy_all", ensemble, ensemble.fit_greedy_all, "ensemble"),
    "uniform_soup": Method.of("uniform_soup", soup, soup.fit_uniform, "ensemble"),
    "greedy_soup": Method.of("greedy_soup", soup, config_key="ensemble"),
    # Fine-tuned on the task's images alone: standalone.
    "pathway": Method.of("pathway", pathway, standalone=True),
    "pathway_k1": Method.of("pathway_k1", pathway, pathway.fit_k1, "pathway",
                            pathway.check_hub_k1, standalone=True),
    "pathway_frozen": Method.of("pathway_frozen", pathway, pathway.fit_frozen, "pathway"),
    "best_probe": Method("best_probe", hub_baselines.best_probe, hub_baselines.probes_config,
                         "hub"),
    "concat": Method("concat", hub_baselines.concat, hub_baselines.concat_config, "hub"),
    "uniform_probe_avg": Method("uniform_probe_avg", hub_baselines.uniform_probe_avg,
                                hub_baselines.probes_config, "hub"),
    "moe": Method.of("moe", moe),
    "moe_no_label": Method("moe_no_label", moe.fit_predict, moe.no_label_config, "hub",
                           moe.VERSION),
    "feature_gate": Method("feature_gate", moe.fit_predict, moe.feature_gate_config, "hub",
                           moe.VERSION),
    "shift": Method.of("shift", shift),
    "independent": Method.of("independent", shift, shift.fit_independent, "shift"),
    "brief_only": Method.of("brief_only", shift, shift.fit_brief_only, "shift"),
    "shift_only": Method.of("shift_only", shift, shift.fit_shift_only, "shift"),
}


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; registered: {sorted(METHODS)}.")
  return METHODS[name]


def method_config(config, name: str) -> ml_collections.ConfigDict:
  """`config.<config_key>` when the job config has it, else the method's default."""
  method = get(name)
  own = config.get(method.config_key)
  return own if own is not None else method.default_config()


def check_hub(ctx: experiment.Context, name: str) -> None:
  """The method's own checks of its job config against the loaded hub."""
  method = get(name)
  if method.check_hub is not None:
    method.check_hub(method_config(ctx.config, name), ctx.backbones)


def member_groups(method: Method, backbones: Sequence[hub.Backbone]
                  ) -> list[list[hub.Backbone]]:
  """The members of each unit of `method` on one task."""
  if method.members == "each":
    return [[b] for b in backbones]
  return [list(backbones)]


def _plain(config) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def unit_inputs(ctx, method: Method, task, members: Sequence[hub.Backbone], config,
                seed: int) -> dict[str, Any]:
  """Everything a unit's Result depends on: its cache key's inputs."""
  return {"method": method.name, "method_version": method.version,
          "task": experiment.task_key(task),
          "members": [[b.name, hub.params_fingerprint(b)] for b in members],
          "config": _plain(config), "seed": int(seed),
          "uses": {name: _plain(method_config(ctx.config, name)) for name in method.uses}}


def _resolve(ctx, name, config, seed):
  config = method_config(ctx.config, name) if config is None else config
  return get(name), config, ctx.seed if seed is None else seed


def unit_key(ctx: experiment.Context, name: str, task, members: Sequence[hub.Backbone],
             config=None, seed: int | None = None) -> str:
  """The predictions-cache key of a unit (config: the job's `config.<name>`)."""
  method, config, seed = _resolve(ctx, name, config, seed)
  return predictions.unit_key(unit_inputs(ctx, method, task, members, config, seed))


def run_unit(ctx: experiment.Context, name: str, task, members: Sequence[hub.Backbone],
             config=None, seed: int | None = None) -> tuple[str, predictions.Result]:
  """(unit key, Result) of one unit: from the predictions cache, else computed and cached."""
  method, config, seed = _resolve(ctx, name, config, seed)
  inputs = unit_inputs(ctx, method, task, members, config, seed)
  key = predictions.unit_key(inputs)
  cache = predictions.Cache(ctx.config.get("predictions_dir") or None)
  result = cache.load(key)
  if result is None:
    t0 = time.time()
    result = method.fit_predict(ctx, task, list(members), config, seed)
    if not result.train_seconds:
      result = dataclasses.replace(result, train_seconds=round(time.time() - t0, 3))
    cache.save(key, inputs, result)
    logging.debug("%s on %s (%s): computed in %.1f s", name, task.name,
                 "+".join(b.name for b in members), time.time() - t0)
  return key, result
