"""Helpers for `configs/*.py`: argument parsing and shared defaults.

Config arguments: `configs/x.py:key=value,key2=a+b`: ',' separates arguments,
'+' joins the names of one. `configs/x.py:help` lists a config's arguments
(`ArgumentsHelp`). `models+=path+hf/id` adds models to any config's hub: main
takes it out of the argument (`split_added_models`) before the config sees it.
"""
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

HELP = "help"  # `configs/x.py:help`: list the arguments instead of building a config.
ADD_MODELS = "models+="


class ArgumentsHelp(Exception):
  """Raised by `parse_arg(HELP, ...)`: carries the config's argument defaults."""

  def __init__(self, defaults: Mapping[str, Any]):
    super().__init__(describe_args(defaults))
    self.defaults = dict(defaults)


def _example(key: str, default: Any) -> str:
  """`key=<its default, written as an argument>`: the form a user types."""
  if isinstance(default, bool):  # `key` alone means key=true.
    return f"{key}={str(default).lower()}"
  if isinstance(default, tuple):
    return f"{key}={'+'.join(map(str, default))}"
  return f"{key}={default}"


def describe_args(defaults: Mapping[str, Any]) -> str:
  """One line per argument with its default, in the form the command line takes."""
  return "\n".join(_example(k, v) for k, v in defaults.items())


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:key=value,key2=a+b` into a ConfigDict.

  Each key must appear in `defaults`; values take the type of their default
  (a tuple default splits on '+', a bool accepts true/false/1/0). `arg ==
  HELP` raises `ArgumentsHelp` with the defaults. Errors show the right form.
  """
  if arg == HELP:
    raise ArgumentsHelp(defaults)
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  previous = None  # The last (key, value) read: a name cut off by ',' belongs to it.
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(_unknown_arg(key, sep, previous, defaults))
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value, e.g. "
                         f"{_example(key, default)}.")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean; write "
                         f"{key}=true or {key}=false.")
      result[key] = value.lower() in ("true", "1")
    elif isinstance(default, tuple):
      result[key] = tuple(v for v in value.split("+") if v)
    else:
      try:
        result[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"Config argument {key}={value!r} is not a "
                         f"{type(default).__name__}, e.g. {_example(key, default)}.") from None
    previous = (key, value)
  return result


def _unknown_arg(key: str, sep: str, previous, defaults: Mapping[str, Any]) -> str:
  message = f"Unknown config argument {key!r}; valid: {sorted(defaults)}."
  if key == ADD_MODELS[:-1]:
    return (f"{message} `{ADD_MODELS}` adds models through `python -m fusion.main`; "
            "in Python, call fusion.config_lib.add_models(config, paths).")
  if not sep and previous is not None and isinstance(defaults[previous[0]], tuple):
    # `tasks=digits,mixed`: ',' separates arguments, '+' joins names.
    return (f"{message} ',' separates arguments and '+' joins the names of one: did you "
            f"mean {previous[0]}={previous[1]}+{key}?")
  if not sep:
    return (f"{message} Arguments are key=value, separated by ',', names within one "
            f"joined by '+', e.g. {','.join(_example(k, v) for k, v in defaults.items())}.")
  return message


# ------------------------------------------------------- models+= (any config)


def split_added_models(arg: str | None) -> tuple[str | None, tuple[str, ...]]:
  """(the argument without its `models+=` items, the paths / hub ids they add).

  `configs/x.py:tasks=digits,models+=/path/a+org/name` -> ("tasks=digits",
  ("/path/a", "org/name")). Every config takes it, whatever its own arguments.
  """
  if not arg:
    return arg, ()
  kept, added = [], []
  for item in arg.split(","):
    if item.strip().startswith(ADD_MODELS):
      names = [v for v in item.strip()[len(ADD_MODELS):].split("+") if v]
      if not names:
        raise ValueError(f"Config argument {item!r} names no model; write "
                         f"{ADD_MODELS}/path/to/model+org/hub-id.")
      added += names
    else:
      kept.append(item)
  return ",".join(kept) or None, tuple(added)


def add_models(config: ml_collections.ConfigDict, paths: Sequence[str]) -> None:
  """Appends hub specs of `paths` (local `save_pretrained` directories or HF hub
  ids) to `config.hub`, next to its other models (`offline_hub` included).

  Each is named after its last path component, as `fusion.hub.default_name`.
  """
  if not paths:
    return
  specs = list(config.get("hub") or [])
  for path in paths:
    name = os.path.basename(os.path.abspath(os.path.expanduser(path)))
    specs.append({"name": name, "path": path})
  with config.unlocked():
    config.hub = specs


def probe_config(learning_rates: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                 steps: int = 500, batch_size: int = 256) -> ml_collections.ConfigDict:
  """Linear-probe defaults: AdamW on standardised features, cosine decay."""
  return ml_collections.ConfigDict({
      "learning_rates": tuple(learning_rates),
      "steps": steps,
      "batch_size": batch_size,
      "optimizer": {
          "optimizer": "adamw",
          "weight_decay": 1e-4,
          "b1": 0.9,
          "b2": 0.999,
          "schedule": "cosine",
          "warmup_steps": 0,
          "grad_clip_norm": 0.0,
      },
  })


def select(names: Sequence[str], available: dict[str, Any], what: str) -> list[Any]:
  """Entries of `available` by name, in order; unknown names are an error."""
  unknown = [n for n in names if n not in available]
  if unknown:
    raise ValueError(f"Unknown {what} {unknown}; valid: {sorted(available)}.")
  return [available[n] for n in names]


def is_path(name: str) -> bool:
  """Whether a task or model name is a path (a folder) rather than a registered name."""
  return "/" in name or os.sep in name or name.startswith((".", "~")) or os.path.isdir(name)


def check_tasks(names: Sequence[str], known: Sequence[str]) -> None:
  """Unknown task names are an error; paths pass (folders of images, checked when
  the task is loaded)."""
  unknown = [n for n in names if n not in known and not is_path(n)]
  if unknown:
    raise ValueError(f"Unknown tasks {unknown}; valid: {sorted(known)}, or a folder of "
                     "images with one sub-folder per class (a path, e.g. ./my_images).")
