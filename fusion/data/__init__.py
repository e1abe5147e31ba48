"""Data layer: the only package that imports TensorFlow / TFDS.

TensorFlow serves tf.data on the host only; it must never take accelerator
memory that jax needs, so GPUs are hidden from it before any op runs.
"""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
  # RuntimeError: TF already initialised its devices (someone ran an op
  # first); ValueError: no GPU device type in this build. Nothing to hide.
  pass
