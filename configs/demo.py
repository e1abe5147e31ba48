"""The offline embedded default: `make demo`.

Builds the offline hub under $FUSION_HOME on first use (configs/build_hub.py),
generates the offline mini-VTAB tasks, linear-probes every hub model on every
task and ranks the hub by every transferability estimator against those
probes. No network, no GPU. Subsets with the arg, e.g.
  python -m fusion.main --config configs/demo.py:tasks=digits+mixed --workdir /tmp/demo
  python -m fusion.main --config configs/demo.py --config.job=linear_probe --workdir /tmp/lp
"""
import ml_collections

from fusion import config_lib
from fusion import offline_hub
from fusion.data import tasks as tasks_lib
from fusion.selection import job as select_job


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tasks=tasks_lib.OFFLINE_TASKS, seed=0)
  config_lib.select(arg.tasks, tasks_lib.TASKS, "tasks")  # Unknown names fail here.
  config = ml_collections.ConfigDict()
  config.job = "select"  # The linear probes are its ground truth; "linear_probe" alone works too.
  config.seed = arg.seed
  config.tasks = arg.tasks
  config.offline_hub = offline_hub.default_config()
  config.batch_size = 256  # Feature extraction, global over the mesh.
  config.num_devices = 0  # 0: every local device.
  config.cache_dir = ""  # "": $FUSION_HOME/features.
  config.probe = config_lib.probe_config(learning_rates=(1e-3, 1e-2, 1e-1), steps=300)
  config.select = select_job.default_config()
  return config
