"""fusion: transfer learning from a hub of pre-trained models."""
import os

# transformers must not import its TensorFlow side (it trips over Keras 3);
# set before anything imports transformers.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


def fusion_home() -> str:
  """Root of everything fusion caches: datasets, features, the offline hub."""
  return os.path.expanduser(os.environ.get("FUSION_HOME", "~/.cache/fusion"))


def use_compilation_cache(directory: str | None = None,
                          min_compile_seconds: float = 0.2) -> str:
  """Turns on JAX's persistent compilation cache, by default under $FUSION_HOME.

  Programs that took at least `min_compile_seconds` to compile are stored,
  so a rerun (or another process: tests, the demo) loads them instead of
  compiling again. Returns the directory.
  """
  import jax
  directory = directory or os.path.join(fusion_home(), "jax_cache")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
