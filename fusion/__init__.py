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
