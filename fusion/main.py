"""Entry point: `python -m fusion.main --config configs/x.py[:arg] --workdir DIR`.

Parses flags, writes the resolved config to the workdir and runs `config.job`.
`--config.key=value` overrides any config field; unknown keys and values of the
wrong type are flag errors that name them.
"""
import glob
import importlib
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import fusion  # Also sets USE_TF=0 before transformers is imported.
from fusion import io
from ml_collections import config_flags

# Job name -> module with `run(config, workdir) -> str` (the results markdown).
JOBS = {
    "suite": "fusion.suite",
    "linear_probe": "fusion.suite",  # The suite of that one method.
    "select": "fusion.selection.job",
    "build_hub": "fusion.offline_hub",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `configs/<name>.py[:arg]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the job.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", False,
    "Keep compiled XLA programs in $FUSION_HOME/jax_cache for later runs. Off by default: "
    "jaxlib 0.9.2's CPU backend logs a machine-feature warning for every program it "
    "loads from the cache, and a rerun of a cached job compiles little anyway.")
flags.mark_flags_as_required(["config", "workdir"])


def job_module(config):
  job = config.get("job")
  if job not in JOBS:
    raise ValueError(f"Unknown job {job!r} in config; valid jobs: {sorted(JOBS)}.")
  return importlib.import_module(JOBS[job])


def validate(config) -> None:
  """The job's own config checks, before anything is written or computed."""
  module = job_module(config)
  if config.get("offline_hub") is not None:
    from fusion import offline_hub
    offline_hub.validate(config.offline_hub)
  if config.get("num_devices") is not None and int(config.num_devices) < 0:
    raise ValueError(f"config.num_devices={config.num_devices} must be >= 0 (0: every "
                     "local device).")
  if config.get("batch_size") is not None and int(config.batch_size) < 1:
    raise ValueError(f"config.batch_size={config.batch_size} must be >= 1.")
  if hasattr(module, "check_config"):
    module.check_config(config)


def run(config, workdir: str) -> str:
  """Runs `config.job` with outputs under `workdir`; returns the results markdown."""
  module = job_module(config)
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  io.write_atomic(os.path.join(workdir, "config.json"),
                  config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
  return module.run(config, workdir)


def _error_line(text: str) -> str:
  """The message of the last `SomeError: message` line of a traceback's text."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  for line in reversed(lines):
    match = re.match(r"^[\w.]*(Error|Exception): (.+)$", line)
    if match:
      return match.group(2)
  return lines[-1] if lines else str(text)


def _check_config_file(argv: list[str]) -> None:
  """A missing config file is named, with the configs there are."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    else:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      configs = sorted(glob.glob(os.path.join(os.path.dirname(path) or ".", "*.py")))
      sys.exit(f"error: config file {path!r} does not exist; configs there: "
               f"{configs or 'none'} (e.g. --config configs/demo.py).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear error for `--config.<key>` overrides of unknown keys.

  ml_collections reports those as a bare AttributeError from inside absl.
  """
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config key in {overrides} ({e}). Overrides must name "
             "keys the config file defines; see its get_config().")
  except flags.Error as e:
    sys.exit(f"error: {_error_line(e)}")


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO records of libraries that log every step (orbax: ~15 per
  save, TFDS: ~16 per generated dataset) or start-up notices (jax: "Unable to
  initialize backend 'tpu'" on CPU)."""
  LIBRARIES = ("orbax", "jax", "tensorflow_datasets")

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= std_logging.WARNING or not any(
        f"/{name}/" in path for name in self.LIBRARIES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() <= logging.INFO:  # `-v 1` or more shows them again.
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Its Flax deprecation notice on every model load; hub.py logs missing weights itself.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  if _COMPILATION_CACHE.value:
    fusion.use_compilation_cache()
  config = _CONFIG.value
  try:
    validate(config)
    logging.info("Running job %r into %s", config.job, _WORKDIR.value)
    markdown = run(config, _WORKDIR.value)
  except ValueError as e:  # HubError too: bad input; the message says the way out.
    logging.debug("Traceback of the error below:", exc_info=True)  # `-v 1` shows it.
    sys.exit(f"error: {e}")
  print(markdown)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
