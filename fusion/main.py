"""Entry point: `python -m fusion.main --config configs/x.py[:arg] --workdir DIR`.

Parses flags, writes the resolved config to the workdir and runs `config.job`.
`--config.key=value` overrides any config field; unknown keys and values of the
wrong type are flag errors that name them. `--help` lists the jobs, the configs
and their arguments; `--print_config` prints a config's keys and values.
"""
import ast
import contextlib
import glob
import importlib
import importlib.util
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import fusion  # Also sets USE_TF=0 before transformers is imported.
from fusion import config_lib
from fusion import io
from fusion import provenance
from fusion import workers
from ml_collections import config_flags

# Job name -> module with `run(config, workdir) -> str` (the results markdown).
JOBS = {
    "suite": "fusion.suite",
    "linear_probe": "fusion.suite",  # The suite of that one method.
    "select": "fusion.selection.job",
    "build_hub": "fusion.offline_hub",
}
JOB_HELP = {
    "suite": "every method of config.methods on every task of config.tasks (cached units)",
    "linear_probe": "the suite of the linear probe alone",
    "select": "ranks the hub by transferability estimators against linear probes",
    "build_hub": "pre-trains the offline hub into $FUSION_HOME (configs/build_hub.py)",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_FILE = "log.txt"  # Each run's log, kept in its workdir.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `configs/<name>.py[:arg]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the job.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the config's keys and values (after the :arg and "
    "--config.key=value overrides) and exit; needs no --workdir.")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", False,
    "Keep compiled XLA programs in $FUSION_HOME/jax_cache for later runs. Off by default: "
    "jaxlib 0.9.2's CPU backend logs a machine-feature warning for every program it "
    "loads from the cache, and a rerun of a cached job compiles little anyway.")


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
  if config.get("workers") is not None:
    workers.check(config.workers)
  if hasattr(module, "check_config"):
    module.check_config(config)


def run(config, workdir: str) -> str:
  """Runs `config.job` with outputs under `workdir`; returns the results markdown.

  The run gets an id (`fusion.provenance`) and its log goes to <workdir>/log.txt.
  """
  module = job_module(config)
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  io.write_atomic(os.path.join(workdir, "config.json"),
                  config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
  with provenance.run(config) as current:
    header = f"Run {current.run_id}: job {config.job!r} into {workdir}"
    logging.info(header)
    with _log_to(os.path.join(workdir, LOG_FILE), header):
      return module.run(config, workdir)


@contextlib.contextmanager
def _log_to(path: str, header: str):
  """Appends `header`, then the log records (as filtered on the console), to `path`."""
  handler = std_logging.FileHandler(path)
  handler.setFormatter(std_logging.Formatter(
      "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  handler.addFilter(_QuietLibraries())
  # Whatever the loggers' levels (a job run from Python logs no INFO): the run's id.
  handler.handle(std_logging.LogRecord("fusion", std_logging.INFO, __file__, 0, header,
                                       None, None))
  root = std_logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)
    handler.close()


def _error_line(text: str) -> str:
  """The message of the last `SomeError: message` line of a traceback's text."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  for line in reversed(lines):
    match = re.match(r"^[\w.]*(Error|Exception): (.+)$", line)
    if match:
      return match.group(2)
  return lines[-1] if lines else str(text)


def _config_flag(argv: list[str]) -> tuple[int, str, str] | None:
  """(index in argv, prefix, value) of the --config flag's value: `--config X`
  gives prefix "", `--config=X` "--config="; None without one."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return i + 1, "", argv[i + 1]
    if arg.startswith("--config="):
      return i, "--config=", arg.split("=", 1)[1]
  return None


def _check_config_file(path: str) -> None:
  """A missing config file is named, with the configs there are."""
  if not os.path.isfile(path):
    configs = sorted(glob.glob(os.path.join(os.path.dirname(path) or ".", "*.py")))
    sys.exit(f"error: config file {path!r} does not exist; configs there: "
             f"{configs or 'none'} (e.g. --config configs/demo.py; --help lists them).")


def load_config_module(path: str):
  """A config file as a module (its `get_config(arg)`)."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_arguments(path: str) -> str:
  """The `:arg` keys of a config file with their defaults, one per line."""
  try:
    load_config_module(path).get_config(config_lib.HELP)
  except config_lib.ArgumentsHelp as e:
    return str(e)
  except Exception as e:  # A config of one's own that parses its arg otherwise.
    return f"(its arguments are not listed: {type(e).__name__}: {e})"
  return "(takes no arguments)"


def usage() -> str:
  """What --help prints: the command, jobs, configs with their arguments, flags."""
  configs = sorted(glob.glob(os.path.join("configs", "*.py"))) or sorted(
      glob.glob(os.path.join(REPO, "configs", "*.py")))
  lines = [
      "usage: python -m fusion.main --config configs/<name>.py[:key=value,...] "
      "--workdir DIR [--config.key=value ...]", "",
      "Jobs (config.job: each config sets one; --config.job=NAME picks another):"]
  lines += [f"  {name:<13} {text}" for name, text in JOB_HELP.items()]
  lines += ["", "Configs and their arguments, with defaults (configs/<name>.py:key=value,"
            "key2=a+b: ',' separates arguments, '+' joins the names within one; a "
            "true/false argument may be given alone, e.g. :full):"]
  for path in configs:
    doc = (_docstring(path) or "").strip().splitlines()
    lines.append(f"  {path}  {doc[0] if doc else ''}")
    lines += [f"      {line}" for line in config_arguments(path).splitlines()]
  lines += [
      "", "Every config also takes:",
      f"  {config_lib.ADD_MODELS}PATH+ORG/NAME  adds models to its hub (directories "
      "written by an HF Flax model's save_pretrained, or Hugging Face hub ids), e.g.",
      f"      --config configs/demo.py:tasks=digits,{config_lib.ADD_MODELS}/models/a+"
      "facebook/dinov2-small",
      "A task may be a folder of images with one sub-folder per class "
      "(tasks=digits+/data/flowers): it gets VTAB-1k splits from its images.",
      "", "A config's keys and values (any can be overridden with --config.key=value):",
      "  python -m fusion.main --config configs/demo.py --print_config",
      "", "Flags:", *[line for line in flags.FLAGS.main_module_help().splitlines()
                    if line.startswith(" ")],
      "", "Logging: -v 1 shows the libraries' info lines and error tracebacks; "
      "--helpfull lists every library's flags."]
  return "\n".join(lines)


def _docstring(path: str) -> str | None:
  """A config file's docstring, read without running it."""
  with open(path) as f:
    return ast.get_docstring(ast.parse(f.read()))


def _wants_help(argv: list[str]) -> bool:
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(a in ("-h", "--help", "--helpshort", "-?") for a in args)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with one `error:` line for every mistake it can name.

  `--help` prints `usage()` and exits 0; `configs/x.py:help` lists that
  config's arguments; `models+=...` is taken out of the config argument and its
  models appended to config.hub (any config). ml_collections reports unknown
  `--config.<key>` overrides as a bare AttributeError from inside absl.
  """
  if _wants_help(argv):
    print(usage())
    sys.exit(0)
  found = _config_flag(argv)
  path, added = "configs/<name>.py", ()
  if found is not None:
    i, prefix, value = found
    path, _, arg = value.partition(":")
    _check_config_file(path)
    try:
      arg, added = config_lib.split_added_models(arg)
    except ValueError as e:
      sys.exit(f"error: {e}")
    argv = [*argv[:i], prefix + path + (f":{arg}" if arg else ""), *argv[i + 1:]]
  try:
    rest = flags.FLAGS(argv)
  except config_lib.ArgumentsHelp as e:
    print(f"Arguments of {path} (key=value, ',' between arguments, '+' between names), "
          f"with their defaults:\n{e}")
    sys.exit(0)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config key in {overrides} ({e}). Overrides must name "
             "keys the config file defines (--print_config lists them); models are added "
             f"with {path}:{config_lib.ADD_MODELS}PATH.")
  except flags.Error as e:
    sys.exit(f"error: {_error_line(e)}")
  except ValueError as e:  # An override path ml_collections cannot parse.
    sys.exit(f"error: {_one_line(e)}. Overrides name keys with dots, e.g. "
             f"--config.linear_probe.steps=100 (--print_config lists the keys); models "
             f"are added with {path}:{config_lib.ADD_MODELS}PATH.")
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config configs/demo.py (--help lists "
             "the configs).")
  if not (_WORKDIR.value or _PRINT_CONFIG.value):
    sys.exit("error: --workdir is required: the directory for the job's outputs, e.g. "
             "--workdir workdirs/demo.")
  config_lib.add_models(_CONFIG.value, added)
  return rest


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO records of libraries that log every step (orbax: ~15 per
  save, TFDS: ~16 per generated dataset) or start-up notices (jax: "Unable to
  initialize backend 'tpu'" on CPU)."""
  LIBRARIES = ("orbax", "jax", "tensorflow_datasets")

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= std_logging.WARNING or not any(
        f"/{name}/" in path for name in self.LIBRARIES)


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    print(f"# {_config_flag(sys.argv)[2]}: override any key with --config.key=value\n"
          f"{config}")
    return
  if logging.get_verbosity() <= logging.INFO:  # `-v 1` or more shows them again.
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Its Flax deprecation notice on every model load; hub.py logs missing weights itself.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  if _COMPILATION_CACHE.value:
    fusion.use_compilation_cache()
  try:
    validate(config)
    with _logs_above_progress_bars():
      markdown = run(config, _WORKDIR.value)
  except ValueError as e:  # HubError, DatasetUnavailableError: the message says the way out.
    logging.debug("Traceback of the error below:", exc_info=True)  # `-v 1` shows it.
    sys.exit(f"error: {_one_line(e)}")
  print(markdown)


class _AboveBars:
  """A stream that writes through tqdm, above its progress bars, not across them."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    import tqdm
    if text.strip():
      tqdm.tqdm.write(text.rstrip("\n"), file=self.stream)

  def flush(self) -> None:
    self.stream.flush()


@contextlib.contextmanager
def _logs_above_progress_bars():
  handler = logging.get_absl_handler().python_handler
  stream = handler.stream
  handler.setStream(_AboveBars(stream))
  try:
    yield
  finally:
    handler.setStream(stream)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
