"""The suite job: every method of `config.methods` on every task of `config.tasks`.

Each unit (method, task, members) is computed once through `methods.run_unit`
(cached under $FUSION_HOME) and its row appended to `<workdir>/rows.jsonl`
when done; a restarted suite skips the units whose rows are there. From all
rows: results.json, results.md and plots/. With `config.select`, the ranking
evaluation of the select job runs on top, with the linear probes as ground
truth. `job = "linear_probe"` is the suite of that one method.

With `config.workers` > 1, the tasks' units (and rankings) are first computed
in that many processes, about a task per job (`warm_caches`); the sequential
pass then finds every one cached and writes the same outputs as with one process.
"""
import collections
import copy
import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import tqdm

from fusion import experiment
from fusion import io
from fusion import methods
from fusion import predictions
from fusion import report
from fusion import workers as workers_lib

ROWS = "rows.jsonl"


def method_names(config) -> tuple[str, ...]:
  if config.job == "linear_probe":
    return ("linear_probe",)
  return tuple(config.get("methods") or ())


def check_config(config) -> None:
  """Clear errors for a config that cannot run, before any work."""
  names = method_names(config)
  if not names:
    raise ValueError("config.methods is empty; name at least one of "
                     f"{sorted(methods.METHODS)}.")
  for name in names:
    methods.get(name)
  if not config.get("tasks"):
    raise ValueError("config.tasks is empty; name at least one task.")
  experiment.load_tasks(config.tasks)  # Unknown names fail here.
  for name, subset in (config.get("method_tasks") or {}).items():
    methods.get(name)  # Unknown names fail here.
    extra = sorted(set(subset) - set(config.tasks))
    if extra:
      raise ValueError(f"config.method_tasks.{name} lists {extra}, which are not in "
                       f"config.tasks {list(config.tasks)}.")
  if config.get("select") is not None and "linear_probe" not in names:
    raise ValueError("config.select evaluates rankings against the linear probes: add "
                     "'linear_probe' to config.methods, or drop config.select.")


def read_rows(workdir: str) -> dict[str, dict]:
  """unit key -> row of the units finished in an earlier run of this workdir."""
  path = os.path.join(workdir, ROWS)
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a kill.
          continue
        if isinstance(row, dict) and "unit" in row:
          done[row["unit"]] = row
  return done


def runs_on(config, name: str, task) -> bool:
  """Whether method `name` runs on `task` (config.method_tasks narrows a method's tasks)."""
  subset = (config.get("method_tasks") or {}).get(name)
  return subset is None or task.name in subset


def plan_units(config, names: Sequence[str], task_list, backbones) -> list[tuple]:
  """(method, task, members) of every unit, in plan order: task by task."""
  return [(name, task, members) for task in task_list for name in names
          if runs_on(config, name, task)
          for members in methods.member_groups(methods.get(name), backbones)]


def run_units(ctx: experiment.Context, names: Sequence[str], task_list,
              workdir: str) -> list[dict]:
  """Rows of every (method, task, members) unit, in plan order; resumable."""
  plan = plan_units(ctx.config, names, task_list, ctx.backbones)
  done = read_rows(workdir)
  rows = []
  bar = tqdm.tqdm(plan, desc="suite", unit="unit")
  for name, task, members in bar:
    bar.set_postfix_str(f"{name} {task.name} {'+'.join(b.name for b in members)}"[:60])
    key = methods.unit_key(ctx, name, task, members)
    if key in done:
      rows.append(done[key])
      continue
    _, result = methods.run_unit(ctx, name, task, members)
    row = {**report.row(task, name, result, unit=key), **experiment.preprocess_fields(members)}
    with open(os.path.join(workdir, ROWS), "a") as f:
      f.write(json.dumps(row, default=io.json_default) + "\n")
    rows.append(row)
  bar.close()
  return rows


# ------------------------------------------------------------ worker processes


def _ranks(ctx: experiment.Context) -> bool:
  """Whether the suite ranks the hub (`evaluate` needs at least 2 models: it says so)."""
  return ctx.config.get("select") is not None and len(ctx.backbones) >= 2


@dataclasses.dataclass(frozen=True)
class Job:
  """A worker's piece of the suite: some methods' units on one task (and its ranking)."""
  task: Any
  names: tuple[str, ...]
  standalone: bool  # One standalone method's units (`methods.Method.standalone`).

  @property
  def ranks(self) -> bool:
    """The task's ranking goes with its job of non-standalone methods."""
    return not self.standalone

  @property
  def label(self) -> str:
    return f"task {self.task.name!r}" + (f", method {self.names[0]!r}"
                                        if self.standalone else "")


def task_jobs(config, names: Sequence[str], task) -> list[Job]:
  """The jobs of one task: its standalone methods' units one job each, so that the
  workers share a task's minutes; the rest (they share cached features and
  fine-tunes) and the ranking one job."""
  names = [n for n in names if runs_on(config, n, task)]
  alone = [n for n in names if methods.get(n).standalone]
  rest = tuple(n for n in names if n not in alone)
  return [Job(task, rest, False)] + [Job(task, (n,), True) for n in alone]


def _needs_work(ctx, job: Job, done: dict) -> bool:
  """Whether a unit of `job` is neither in rows.jsonl nor cached, or its ranking is not."""
  cache = predictions.Cache(ctx.config.get("predictions_dir") or None)
  for name, _, members in plan_units(ctx.config, job.names, [job.task], ctx.backbones):
    key = methods.unit_key(ctx, name, job.task, members)
    if key not in done and cache.load(key) is None:
      return True
  if job.ranks and _ranks(ctx):
    from fusion.selection import job as select_job
    return select_job.cached_rankings(ctx, job.task) is None
  return False


def _narrowed_units(config, job: Job, backbones) -> int:
  """Units of `job` of the methods `config.method_tasks` narrows (the fine-tuning
  ones, minutes each on a CPU): the jobs with more go to the workers first."""
  narrowed = set(config.get("method_tasks") or {})
  return sum(1 for name, _, _ in plan_units(config, job.names, [job.task], backbones)
             if name in narrowed)


def _registry(names: Sequence[str]) -> dict[str, methods.Method]:
  """The config's methods (and those they use) as registered in this process, a
  method registered at runtime included: the workers' fresh registry may lack them."""
  wanted = set(names) | {used for name in names for used in methods.get(name).uses}
  return {name: methods.get(name) for name in sorted(wanted)}


_WORKER_CONTEXT: dict[str, experiment.Context] = {}  # One per worker process: the hub loads once.


def _warm(job: tuple[str, bytes]) -> str:
  """A worker's job: its units, and its task's ranking, into the caches."""
  label, payload = job
  try:
    config, workdir, job, registry = pickle.loads(payload)
    methods.METHODS.update(registry)
    key = f"{workdir}\n{config.to_json_best_effort(sort_keys=True)}"
    if key not in _WORKER_CONTEXT:
      _WORKER_CONTEXT.clear()
      _WORKER_CONTEXT[key] = experiment.Context.create(config, workdir)
    ctx = _WORKER_CONTEXT[key]
    for name, _, members in plan_units(config, job.names, [job.task], ctx.backbones):
      methods.run_unit(ctx, name, job.task, members)
    if job.ranks and _ranks(ctx):
      from fusion.selection import job as select_job
      select_job.rank_task_cached(ctx, job.task, select_job.entries(config.select), workdir)
  except Exception as e:
    raise workers_lib.job_error(label, e) from e
  return label


def warm_caches(ctx: experiment.Context, names: Sequence[str], task_list,
                workdir: str) -> None:
  """With `config.workers` > 1: the units and rankings that need work, computed in
  that many processes (spawn), a job per task (`task_jobs`: a standalone method's
  units are a job of their own), those with more fine-tuning units first and the
  standalone ones last, to fill the gaps. Workers write only the caches
  (predictions, rankings; metrics.jsonl lines): `run_units` then finds every unit
  cached."""
  n = workers_lib.check(ctx.config.get("workers") or 1)
  if n < 2:
    return
  import jax
  if jax.process_count() > 1:
    raise ValueError(f"config.workers={n} runs tasks in processes of one host; a "
                     "multi-host run (--jax_distributed) needs config.workers=1.")
  done = read_rows(workdir)
  todo = [job for task in task_list for job in task_jobs(ctx.config, names, task)
          if _needs_work(ctx, job, done)]
  if len(todo) < 2:
    return
  todo.sort(key=lambda job: (job.standalone,  # Stable.
                             -_narrowed_units(ctx.config, job, ctx.backbones)))
  jobs_of_task = collections.Counter(job.task.name for job in todo)
  for task in {job.task.name: job.task for job in todo}.values():
    if jobs_of_task[task.name] > 1:  # Two processes must not generate its data at once.
      from fusion.data import pipeline
      pipeline.prepare(task)
  config = copy.deepcopy(ctx.config)
  config.workers = 1  # A worker runs its job in one process (no pool in a pool).
  registry = _registry(names)
  jobs = [(job.label, workers_lib.dumps((config, workdir, job, registry),
                                        f"{job.label}, its methods and the config"))
          for job in todo]
  processes = min(n, len(jobs))
  with workers_lib.pool(processes, pin=True) as pool, tqdm.tqdm(
      total=len(jobs), desc=f"suite: jobs in {processes} processes", unit="job") as bar:
    for label in pool.imap_unordered(_warm, jobs):
      bar.set_postfix_str(f"{label} done")
      bar.update()


def _plots(ctx, rows, names, task_list, workdir: str) -> str:
  """Makes the suite's plots under <workdir>/plots; their results.md section
  (only the plots this run made, so a stale file of an earlier run is not linked)."""
  plots = os.path.join(workdir, "plots")

  def made(name: str, ok: bool) -> list[tuple[str, str]]:
    return [(name, f"plots/{name}")] if ok else []

  cost = report.plot_accuracy_vs_gflops(rows, names,
                                        os.path.join(plots, "accuracy_vs_gflops.png"))
  per_task = report.plot_accuracy_vs_gflops_per_task(
      rows, names, os.path.join(plots, "accuracy_vs_gflops_tasks.png"))
  per_model = [n for n in names if methods.get(n).members == "each"]
  for name in per_model:
    report.plot_heatmap(rows, os.path.join(plots, f"{name}.png"), method=name,
                        title=f"{name}: test accuracy (%)")
  study = {os.path.basename(p) for p in report.plot_study(rows, plots)}  # Gates, agreement.
  report.plot_routing(rows, plots)  # Hub-Pathway's routing, one plot per row with a matrix.
  routed = {}
  for r in rows:
    if "routing_matrix" in r:
      routed.setdefault(r["method"], []).append(
          (r["task"], f"plots/routing_{r['method']}_{r['task']}.png"))
  select = ctx.config.get("select") is not None  # evaluate() made these.
  items = [
      ("Test accuracy against inference GFLOPs per image, one point per method (mean over "
       "the tasks every method ran), Pareto front dashed", made("accuracy_vs_gflops.png", cost)),
      ("The same per task (small multiples), with each accuracy's 95% bootstrap interval",
       made("accuracy_vs_gflops_tasks.png", per_task)),
      ("Test accuracy per task and model, for the methods with a row per model",
       [(n, f"plots/{n}.png") for n in per_model]),
      ("Ranking quality per transferability estimator (weighted Kendall tau, Spearman, "
       "top-1 regret against the linear probes, per task and mean)",
       made("selection.png", select)),
      ("Model taxonomy dendrograms (RSA of the models' frozen features, hierarchical "
       "clustering), per task",
       [(t.name, f"plots/taxonomy_{t.name}.png") for t in task_list] if select else []),
      ("Gated fusion: the gate's mean weight per model, tasks x models, per gated method",
       made("gate_weights.png", "gate_weights.png" in study)),
      *[(f"Routing of `{m}`: the fraction of each class's test inputs sent to each model",
         links) for m, links in routed.items()],
      ("Agreement of the models' linear probes on test, models x models per task "
       "(diagonal: each probe's accuracy)", made("agreement.png", "agreement.png" in study)),
  ]
  return report.plots_section(workdir, items, embed=(
      "Test accuracy against inference GFLOPs per image", "plots/accuracy_vs_gflops.png")
      if cost else None)


def run(config, workdir: str) -> str:
  """The suite job: rows.jsonl, results.json, results.md and plots/ under `workdir`."""
  check_config(config)
  if config.get("dry_run"):  # The plan of units and their FLOPs; nothing loads or runs.
    from fusion import plan
    return plan.run(config, workdir)
  names = method_names(config)
  ctx = experiment.Context.create(config, workdir)
  for name in names:  # Checks that need the hub (e.g. K against its size): before any unit.
    methods.check_hub(ctx, name)
  task_list = ctx.tasks()
  warm_caches(ctx, names, task_list, workdir)  # config.workers > 1: in parallel processes.
  rows = run_units(ctx, names, task_list, workdir)
  sections = report.methods_sections(rows, list(names))
  select_sections = []
  if config.get("select") is not None:
    from fusion.selection import job as select_job
    probes = [r for r in rows if r["method"] == "linear_probe"]
    select_rows, select_sections = select_job.evaluate(ctx, task_list, probes, workdir,
                                                       "linear probes of this suite")
    rows = rows + select_rows
  sections += [("Plots", _plots(ctx, rows, list(names), task_list, workdir)),
               *select_sections]
  per_model = [n for n in names if methods.get(n).members == "each"]
  logging.info("suite: %d rows of %d methods on %d tasks", len(rows), len(names),
               len(task_list))
  return report.write_results(workdir, rows, sections, table_methods=per_model,
                              sections_first=True)
