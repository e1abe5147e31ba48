"""Entry point: `python -m fusion.main --config configs/x.py[:arg] --workdir DIR`.

Parses flags, writes the resolved config to the workdir and runs `config.job`.
`--config.key=value` overrides any config field; unknown keys and values of the
wrong type are flag errors that name them.
"""
import importlib
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import fusion  # noqa: F401  (sets USE_TF=0 before transformers is imported)
from fusion import hub
from ml_collections import config_flags

# Job name -> module with `run(config, workdir) -> str` (the results markdown).
JOBS = {
    "linear_probe": "fusion.linear_probe",
    "select": "fusion.selection.job",
    "build_hub": "fusion.offline_hub",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `configs/<name>.py[:arg]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the job.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def job_module(config):
  job = config.get("job")
  if job not in JOBS:
    raise ValueError(f"Unknown job {job!r} in config; valid jobs: {sorted(JOBS)}.")
  return importlib.import_module(JOBS[job])


def run(config, workdir: str) -> str:
  """Runs `config.job` with outputs under `workdir`; returns the results markdown."""
  module = job_module(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
  return module.run(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear error for `--config.<key>` overrides of unknown keys.

  ml_collections reports those as a bare AttributeError from inside absl.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config key in {overrides} ({e}). Overrides must name "
             "keys the config file defines; see its get_config().")
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to see the flags.")


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO records of libraries that log every step (orbax: ~15 per save)."""
  LIBRARIES = ("orbax",)

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= std_logging.WARNING or not any(
        f"/{name}/" in path for name in self.LIBRARIES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() <= logging.INFO:  # `-v 1` or more shows them again.
    logging.get_absl_handler().addFilter(_QuietLibraries())
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  config = _CONFIG.value
  try:
    job_module(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  logging.info("Running job %r into %s", config.job, _WORKDIR.value)
  try:
    markdown = run(config, _WORKDIR.value)
  except hub.HubError as e:  # Unknown model, missing network: the message says what to do.
    sys.exit(f"error: {e}")
  print(markdown)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
