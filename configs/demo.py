"""The offline embedded default: `make demo`.

Builds the offline hub under $FUSION_HOME on first use (configs/build_hub.py),
generates the offline mini-VTAB tasks, runs the suite of methods on every
task (every unit cached: a second run recomputes nothing) and ranks the hub
by every transferability estimator against the linear probes. No network, no
GPU. Subsets with the arg, e.g.
  python -m fusion.main --config configs/demo.py:tasks=digits+mixed --workdir /tmp/demo
  python -m fusion.main --config configs/demo.py:methods=nearest_centroid --workdir /tmp/nc
  python -m fusion.main --config configs/demo.py --config.job=select --workdir /tmp/sel
"""
import ml_collections

from fusion import config_lib
from fusion import methods
from fusion import offline_hub
from fusion.selection import job as select_job

# Task names of fusion.data.tasks.OFFLINE_TASKS (listed here: loading a config
# must not import TensorFlow).
TASKS = ("digits", "house_numbers", "mixed", "novel_textures", "shapes_location",
         "shapes_orientation", "scenes_count", "scenes_closest")
METHODS = ("linear_probe", "nearest_centroid", "best_probe", "concat", "uniform_probe_avg",
           "moe", "moe_no_label", "feature_gate")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tasks=TASKS, methods=METHODS, seed=0)
  config_lib.select(arg.tasks, dict.fromkeys(TASKS), "tasks")  # Unknown names fail here.
  config = ml_collections.ConfigDict()
  config.job = "suite"  # "linear_probe" and "select" run those parts alone.
  config.seed = arg.seed
  config.tasks = arg.tasks
  config.methods = arg.methods
  config.offline_hub = offline_hub.default_config()
  config.batch_size = 256  # Feature extraction, global over the mesh.
  config.num_devices = 0  # 0: every local device.
  config.cache_dir = ""  # "": $FUSION_HOME/features.
  config.predictions_dir = ""  # "": $FUSION_HOME/predictions.
  config.linear_probe = config_lib.probe_config(learning_rates=(1e-3, 1e-2, 1e-1), steps=300)
  config.nearest_centroid = methods.get("nearest_centroid").default_config()
  config.best_probe = methods.get("best_probe").default_config()
  config.best_probe.probe = config.linear_probe  # Reuses the linear_probe units.
  config.concat = methods.get("concat").default_config()
  config.uniform_probe_avg = methods.get("uniform_probe_avg").default_config()
  config.uniform_probe_avg.probe = config.linear_probe
  config.moe = methods.get("moe").default_config()
  config.moe_no_label = methods.get("moe_no_label").default_config()
  config.feature_gate = methods.get("feature_gate").default_config()
  config.select = select_job.default_config()
  return config
