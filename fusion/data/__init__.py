"""Data layer: the only package that imports TensorFlow / TFDS.

TensorFlow serves tf.data on the host only; it must never take accelerator
memory that jax needs, so GPUs are hidden from it before any op runs.
"""
import contextlib
import os
import sys

from absl import logging


@contextlib.contextmanager
def _quiet_stderr():
  """Silences what C++ libraries print to fd 2 while importing (TF's oneDNN and
  absl::InitializeLog notices). `-v 1` shows it; Python errors still surface."""
  if logging.get_verbosity() >= logging.DEBUG:
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


with _quiet_stderr():
  import tensorflow as tf
  import tensorflow_datasets  # Its import loads more of TF.

# TFDS's nested generation bars would cut across the suite's one; fusion logs what
# it generates. `-v 1` shows them.
if logging.get_verbosity() < logging.DEBUG:
  tensorflow_datasets.disable_progress_bar()

try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
  # RuntimeError: TF already initialised its devices (someone ran an op
  # first); ValueError: no GPU device type in this build. Nothing to hide.
  pass
