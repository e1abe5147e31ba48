"""Worker processes that continue the current run (`config.workers`).

On a CPU one process keeps only about 1.5 cores busy (XLA compiles on one
thread, Python runs between steps), so a job with independent pieces (the
suite's tasks, the offline hub's models) finishes sooner with them in several
processes. `pool(n)` starts n of them with the spawn start method (JAX is not
fork-safe). Each inherits the parent's environment, absl verbosity, run id
(`fusion.provenance`, so its metrics.jsonl lines carry the run's id) and JAX
options (the compilation cache); it logs through the parent's handlers (the
console, the workdir's log.txt) and shows no progress bars: the parent shows
one over the pieces. Workers only fill the caches under $FUSION_HOME; the job
then reads every result back in order, so its outputs do not depend on n.
"""
import contextlib
import logging
import logging.handlers
import multiprocessing
import multiprocessing.pool
import os
import pickle
import queue
import signal
import threading
from collections.abc import Iterator
from typing import Any

from absl import logging as absl_logging

from fusion import provenance

# JAX options a worker takes from its parent (`fusion.use_compilation_cache` sets them).
JAX_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


def check(value: int) -> int:
  """`config.workers` as an int >= 1, else a clear error."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.workers={value!r} must be an integer >= 1 (1: one process; "
                     "2 on a 2-core CPU).")
  return value


def dumps(value: Any, what: str) -> bytes:
  """`value` pickled for a worker, which unpickles it inside its job: there an
  error (a function a fresh process cannot import) names the job instead of
  killing the worker. A value that cannot be pickled is a clear error here."""
  try:
    return pickle.dumps(value)
  except (pickle.PicklingError, AttributeError, TypeError) as e:
    raise ValueError(f"config.workers > 1 sends {what} to worker processes, and it cannot "
                     f"be pickled ({e}); define its functions at module level, or set "
                     "config.workers=1.") from e


def job_error(what: str, error: Exception) -> Exception:
  """A worker's error naming its job (`what`, e.g. "task 'digits'"); a ValueError
  stays one, so that `fusion.main` shows it as one `error:` line, as without workers."""
  if isinstance(error, ValueError):
    return ValueError(f"{what} (in a worker process): {error}")
  return RuntimeError(f"{what} (in a worker process): {type(error).__name__}: {error}")


def _parent_state() -> dict[str, Any]:
  import jax
  return {"verbosity": absl_logging.get_verbosity(),
          "level": logging.getLogger().getEffectiveLevel(),
          "run_id": provenance.run_id(),
          "jax": {name: getattr(jax.config, name) for name in JAX_OPTIONS}}


def core_sets(processes: int) -> list[set[int]] | None:
  """The CPU cores of each of `processes` workers, dealt out round robin; None
  (no pinning) where the OS cannot pin or there are fewer cores than workers."""
  if not hasattr(os, "sched_getaffinity"):
    return None
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < processes:
    return None
  return [set(cores[i::processes]) for i in range(processes)]


def _init(state: dict[str, Any], records, cores) -> None:
  """A worker's set-up: its cores, the parent's logging, run id and JAX options."""
  if cores is not None:
    try:  # Before JAX starts its thread pools. A replacement worker finds none left.
      os.sched_setaffinity(0, cores.get(timeout=5))
    except queue.Empty:
      pass
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool.
  absl_logging.set_verbosity(state["verbosity"])  # fusion.data reads it on import.
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  root.addHandler(logging.handlers.QueueHandler(records))
  root.setLevel(state["level"])
  provenance.join_run(state["run_id"])
  import jax
  for name, value in state["jax"].items():
    jax.config.update(name, value)


def _forward(records) -> None:
  """The parent's side of the workers' logging: their records through its handlers."""
  while True:
    record = records.get()
    if record is None:
      return
    logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        del os.environ[k]
      else:
        os.environ[k] = v


@contextlib.contextmanager
def pool(processes: int, pin: bool = False) -> Iterator[multiprocessing.pool.Pool]:
  """A spawn Pool of `processes` workers that continue the current run.

  `pin`: each worker on its own share of the cores (`core_sets`): two processes
  fine-tuning on 2 CPU cores ran 9% faster pinned than left to the scheduler
  (172 s against 189 s wall, measured).

  On leaving the block normally the workers finish and exit; on an error (a
  worker's, re-raised by the pool, or Ctrl-C) they are terminated at once.
  """
  context = multiprocessing.get_context("spawn")
  records = context.Queue()
  forwarder = threading.Thread(target=_forward, args=(records,), daemon=True)
  forwarder.start()
  cores = core_sets(processes) if pin else None
  if cores is not None:
    queued = context.Queue()
    for core_set in cores:
      queued.put(core_set)
    cores = queued
  # tqdm reads TQDM_DISABLE when it is imported, before an initializer runs.
  with _environ(TQDM_DISABLE="1"):
    workers = context.Pool(processes, _init, (_parent_state(), records, cores))
  try:
    yield workers
  except BaseException:
    workers.terminate()
    raise
  else:
    workers.close()
  finally:
    workers.join()
    records.put(None)
    forwarder.join(timeout=10)  # A record cut short by terminate must not hang the job.
