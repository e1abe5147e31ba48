"""Helpers for `configs/*.py`: argument parsing and shared defaults."""
from collections.abc import Sequence
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:key=value,key2=a+b` into a ConfigDict.

  Each key must appear in `defaults`; values take the type of their default
  (a tuple default splits on '+', a bool accepts true/false/1/0).
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      hint = ""
      if not sep:
        hint = (" Arguments are separated by ',' and names within one by '+', e.g. "
                "tasks=digits+mixed,seed=1.")
      raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}.{hint}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value: {key}=...")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      result[key] = value.lower() in ("true", "1")
    elif isinstance(default, tuple):
      result[key] = tuple(v for v in value.split("+") if v)
    else:
      try:
        result[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"Config argument {key}={value!r} is not a "
                         f"{type(default).__name__}.") from None
  return result


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
