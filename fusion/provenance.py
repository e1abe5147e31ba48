"""Provenance: a run's id, and what produced its results.json.

`fusion.main.run` opens a run (`with provenance.run(config):`). The run gets an
id that every metrics.jsonl line carries (`fusion.train`), so lines of two runs
into one workdir stay apart. `results_fields()` is what results.json gets under
the one key `KEY` ("provenance"): run id, dates, fusion version, git commit,
package versions, the hub's fingerprints, the config, the devices. Everything
that differs between two runs with the same seed is under that key (and in the
rows' wall-time fields, `report.WALL_TIME_FIELDS`): drop both to compare them.

Outside a run (a job called directly from Python) there is no run id and
results.json has no provenance.
"""
import contextlib
import contextvars
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import fusion

KEY = "provenance"
# What the numbers depend on beyond fusion's own code.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections",
            "transformers", "tensorflow", "tensorflow-cpu", "tensorflow-datasets",
            "scikit-learn", "scipy")


@dataclasses.dataclass
class Run:
  """The run in progress: its id, start time, config and (once loaded) its hub."""
  run_id: str
  started: datetime.datetime
  config: Any
  backbones: list = dataclasses.field(default_factory=list)


_CURRENT: contextvars.ContextVar[Run | None] = contextvars.ContextVar("fusion_run",
                                                                      default=None)


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def new_run_id(now: datetime.datetime) -> str:
  """`20261130T101530Z-3fa9c2`: sorts by start time, unique with the random tail."""
  return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def run(config) -> Iterator[Run]:
  """The current run while the block runs (nested: the inner one)."""
  now = _now()
  token = _CURRENT.set(Run(new_run_id(now), now, config))
  try:
    yield _CURRENT.get()
  finally:
    _CURRENT.reset(token)


def join_run(run_id: str | None) -> None:
  """Makes this process continue the run `run_id` of the process that started it
  (a worker of `fusion.workers`): its metrics.jsonl lines carry that id."""
  if run_id is not None:
    _CURRENT.set(Run(run_id, _now(), None))


def run_id() -> str | None:
  """The current run's id; None outside a run."""
  current = _CURRENT.get()
  return None if current is None else current.run_id


def note_hub(backbones: Sequence[Any]) -> None:
  """Records the loaded hub of the current run, for its fingerprints."""
  current = _CURRENT.get()
  if current is not None:
    current.backbones = list(backbones)


def git_commit(directory: str | None = None) -> str | None:
  """HEAD of the git checkout holding fusion's code, `+dirty` when tracked files
  changed; None outside a checkout (an installed wheel) or without git."""
  directory = directory or os.path.dirname(os.path.dirname(os.path.abspath(fusion.__file__)))
  git = ["git", "-C", directory]
  try:
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=10)
    if head.returncode != 0:
      return None
    status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
  """name -> installed version, for the installed ones (no imports needed)."""
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def devices() -> dict[str, Any]:
  import jax
  local = jax.local_devices()
  return {"platform": local[0].platform, "kind": local[0].device_kind,
          "local_count": len(local), "count": jax.device_count(),
          "processes": jax.process_count()}


def hub_fingerprints(backbones: Sequence[Any]) -> dict[str, dict[str, str]]:
  """name -> its source and the sha256 of its weights (the cache keys' fingerprint)."""
  from fusion import hub
  return {b.name: {"source": b.source, "fingerprint": hub.params_fingerprint(b)}
          for b in backbones}


def describe(current: Run) -> dict[str, Any]:
  config = current.config
  if hasattr(config, "to_json_best_effort"):
    config = json.loads(config.to_json_best_effort())
  return {
      "run_id": current.run_id,
      "started": current.started.isoformat(timespec="seconds"),
      "written": _now().isoformat(timespec="seconds"),
      "fusion_version": fusion.__version__,
      "git_commit": git_commit(),
      "python": platform.python_version(),
      "packages": package_versions(),
      "devices": devices(),
      "hub": hub_fingerprints(current.backbones),
      "config": config,
  }


def results_fields() -> dict[str, Any]:
  """{KEY: provenance} inside a run, else {}: what results.json adds to its rows."""
  current = _CURRENT.get()
  return {} if current is None else {KEY: describe(current)}
