"""Files: atomic writes, sha256 of a file, JSON of numpy values.

The lowest layer: imports nothing of fusion, so every module (the offline hub,
the caches, the report) can use it.
"""
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
  """Calls `write(f)` on a temporary file, then renames it to `path`.

  Readers see the old file or the whole new one, never half of it. The file
  gets the permissions of an ordinary `open` (0666 less the umask), not
  mkstemp's 0600.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_atomic(path: str, text: str | bytes) -> None:
  """Writes `text` (str or bytes) to `path` atomically."""
  data = text.encode() if isinstance(text, str) else text
  atomic_write(path, lambda f: f.write(data))


def json_default(value: Any) -> Any:
  """`json.dumps(default=...)` for numpy / jax scalars and arrays, ConfigDicts."""
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    return value.to_dict()
  if hasattr(value, "tolist"):  # numpy and jax arrays and scalars
    return value.tolist()
  raise TypeError(f"Not JSON serialisable: {type(value).__name__}")


def write_json(path: str, value: Any) -> None:
  write_atomic(path, json.dumps(value, indent=1, default=json_default) + "\n")


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def sha256_json(value: Any) -> str:
  """Hex sha256 of `value` as canonical JSON (sorted keys): a fingerprint."""
  text = json.dumps(value, sort_keys=True, default=json_default)
  return hashlib.sha256(text.encode()).hexdigest()
