"""Builds the offline hub of `make demo` (configs/demo.py builds it on first use).

Pre-trains the recipe of `fusion.offline_hub.default_config()` on the
procedural sources, on CPU, into $FUSION_HOME/hub/<fingerprint>/ and writes
its manifest (architecture, source, paradigm, seed, parameters, GFLOPs,
pretext accuracy, build seconds) to the workdir. A built hub is found again
at once; an interrupted build resumes. Another seed builds another hub:
  python -m fusion.main --config configs/build_hub.py --workdir /tmp/hub
  python -m fusion.main --config configs/build_hub.py:seed=1 --workdir /tmp/hub1
"""
import ml_collections

from fusion import config_lib
from fusion import offline_hub


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, seed=0)
  config = ml_collections.ConfigDict()
  config.job = "build_hub"
  config.seed = arg.seed
  config.offline_hub = offline_hub.default_config(seed=arg.seed)
  return config
