"""Linear probes of Hugging Face hub models on the 19 VTAB-1k tasks.

Needs the network (HF weights, TFDS downloads) and a GPU or TPU. Choose subsets
with the arg, e.g.
  python -m fusion.main --config configs/vtab1k.py:tasks=cifar100+dtd,models=dinov2_s \
      --workdir /tmp/vtab
`--config.job=select` ranks the models by every transferability estimator
against these probes; `--config.select.ground_truth=DIR/results.json` against
an earlier job's rows instead.
"""
import ml_collections

from fusion import config_lib
from fusion.selection import job as select_job

# name -> HF hub id. Weights stored only as PyTorch/safetensors load with
# from_pt (no torch needed for safetensors).
HUB = {
    "vit_b16_in21k": "google/vit-base-patch16-224-in21k",
    "vit_b16": "google/vit-base-patch16-224",
    "beit_b16": "microsoft/beit-base-patch16-224-pt22k-ft22k",
    "clip_b16": "openai/clip-vit-base-patch16",
    "dino_vit_b16": "facebook/dino-vitb16",
    "dinov2_s": "facebook/dinov2-small",
    "dinov2_b": "facebook/dinov2-base",
    "resnet50": "microsoft/resnet-50",
    "regnet_y_040": "facebook/regnet-y-040",
}

TASKS = (
    "caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_distance", "dmlab", "kitti_distance", "dsprites_location",
    "dsprites_orientation", "smallnorb_azimuth", "smallnorb_elevation",
)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tasks=TASKS, models=tuple(HUB), seed=0)
  config = ml_collections.ConfigDict()
  config.job = "linear_probe"
  config.seed = arg.seed
  config.tasks = arg.tasks
  config.hub = [{"name": n, "path": p}
                for n, p in zip(arg.models, config_lib.select(arg.models, HUB, "models"))]
  config.batch_size = 128  # Feature extraction, global over the mesh.
  config.num_devices = 0  # 0: every local device.
  config.cache_dir = ""  # "": $FUSION_HOME/features.
  config.data_dir = ""  # TFDS data ("": $TFDS_DATA_DIR, else ~/tensorflow_datasets).
  config.linear_probe = config_lib.probe_config()
  config.select = select_job.default_config()
  return config
