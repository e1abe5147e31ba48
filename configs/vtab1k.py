"""The suite on the 19 VTAB-1k tasks with public Hugging Face hub models.

Needs the network (HF weights, TFDS downloads) and a GPU or TPU; size the job
first with the dry run, which needs neither (it prints every unit with its
estimated FLOPs and writes plan.md / plan.json, nothing else):
  python -m fusion.main --config configs/vtab1k.py --workdir /tmp/vtab --config.dry_run=true
Choose subsets with the arg (names joined by '+'), e.g.
  python -m fusion.main --config configs/vtab1k.py:tasks=cifar100+dtd,models=dinov2_s \
      --workdir /tmp/vtab
  python -m fusion.main --config configs/vtab1k.py:methods=linear_probe+finetune,models=resnet50 \
      --workdir /tmp/vtab_ft
`--config.job=select` ranks the models by every transferability estimator
against the linear probes; `--config.select.ground_truth=DIR/results.json`
against an earlier job's rows instead.
"""
import ml_collections

from fusion import config_lib
from fusion import methods as methods_lib
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
# One checkpoint of each architecture fusion.hub supports.
DEFAULT_MODELS = ("vit_b16", "beit_b16", "clip_b16", "dinov2_b", "resnet50", "regnet_y_040")

# Forward GFLOPs per image at the checkpoint's resolution (224; DINOv2's crop is
# 224 too), for the dry run, which loads no weights. Measured with XLA's cost
# analysis of the HF Flax class built from the checkpoint's config.json values on
# abstract shapes, as fusion.hub.inference_gflops counts (a multiply-add is 2
# FLOPs, so these are ~2x the GMACs that papers and timm list: ResNet-50 4.1,
# ViT-B/16 17.6). tests/test_plan.py recomputes resnet50's.
GFLOPS = {
    "vit_b16_in21k": 35.68, "vit_b16": 35.68, "beit_b16": 35.68, "clip_b16": 35.23,
    "dino_vit_b16": 35.68, "dinov2_s": 12.64, "dinov2_b": 47.10, "resnet50": 7.943,
    "regnet_y_040": 7.800,
}

TASKS = (
    "caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_distance", "dmlab", "kitti_distance", "dsprites_location",
    "dsprites_orientation", "smallnorb_azimuth", "smallnorb_elevation",
)

# Every method of fusion.methods.METHODS that runs on a hub of different
# pre-trained models. Left out: the shift family (shift, independent,
# brief_only, shift_only), which transfers a deep ensemble of one architecture
# pre-trained with different seeds; no such ensemble is among these checkpoints.
FEATURE_METHODS = ("linear_probe", "nearest_centroid", "best_probe", "concat",
                   "uniform_probe_avg", "moe", "moe_no_label", "feature_gate")
# `finetune` first: the ensembles and soups reuse its units.
FINETUNE_METHODS = ("finetune", "finetune_best", "uniform_topk", "ensemble", "seed_ensemble",
                    "greedy_all", "uniform_soup", "greedy_soup")
ROUTING_METHODS = ("pathway_k1", "pathway", "pathway_frozen")
METHODS = FEATURE_METHODS + FINETUNE_METHODS + ROUTING_METHODS

# The VTAB fine-tuning sweep. task_adaptation's README (Cloud TPU example) fine-tunes
# with SGD + momentum at batch 512, learning rate 0.01, 2,500 steps; its
# scripts/run_all_tasks.sh warms up for 8% of the steps. The VTAB paper's
# "lightweight" sweep adds learning rate 0.1 and a 10,000-step schedule (from our
# reading of Zhai et al. 2019, not re-checked here); we sweep 0.001, 0.01 and 0.1
# at 2,500 steps (0.001 for the transformers, which SGD at 0.1 can diverge) and
# leave the 4x costlier 10,000-step schedule to `--config.finetune.steps=...`.
# Gradient clipping at norm 1 as big_vision's transfer config.
LEARNING_RATES = (0.001, 0.01, 0.1)
STEPS = 2500
BATCH_SIZE = 512  # Global over the mesh: fewer devices may need a smaller batch.


def get_config(arg=None):
  # methods: every one of METHODS that fits the hub (routing needs 2 models or more).
  arg = config_lib.parse_arg(arg, tasks=TASKS, models=DEFAULT_MODELS, methods=(), seed=0)
  config_lib.select(arg.tasks, dict.fromkeys(TASKS), "tasks")  # Unknown names fail here.
  config_lib.select(arg.methods, dict.fromkeys(METHODS), "methods")
  methods = arg.methods or tuple(
      m for m in METHODS if len(arg.models) > 1 or m not in ROUTING_METHODS)
  routing = [m for m in methods if m in ROUTING_METHODS]
  if routing and len(arg.models) < 2:  # Found here, not hours into a run.
    raise ValueError(f"Methods {routing} route between hub models and need at least 2; "
                     f"models={'+'.join(arg.models)}. Name more models or leave those "
                     "methods out (methods=...).")
  config = ml_collections.ConfigDict()
  config.job = "suite"  # "linear_probe" and "select" run those parts alone.
  config.dry_run = False  # True: print the plan (units, estimated FLOPs) and stop.
  config.seed = arg.seed
  config.tasks = arg.tasks
  config.methods = methods
  config.hub = [{"name": n, "path": p}
                for n, p in zip(arg.models, config_lib.select(arg.models, HUB, "models"))]
  config.model_gflops = {n: GFLOPS[n] for n in arg.models}
  config.batch_size = 256  # Feature extraction, global over the mesh.
  config.num_devices = 0  # 0: every local device.
  config.workers = 1  # One process: it has the accelerator to itself (2+ on CPU only).
  config.cache_dir = ""  # "": $FUSION_HOME/features.
  config.predictions_dir = ""  # "": $FUSION_HOME/predictions.
  config.data_dir = ""  # TFDS data ("": $TFDS_DATA_DIR, else ~/tensorflow_datasets).
  config.linear_probe = config_lib.probe_config()
  for name in ("nearest_centroid", "finetune", "ensemble", "best_probe", "concat",
               "uniform_probe_avg", "moe", "moe_no_label", "feature_gate", "pathway"):
    config[name] = methods_lib.get(name).default_config()
  config.ensemble.top_k = min(config.ensemble.top_k, len(arg.models))  # Small hubs too.
  config.best_probe.probe = config.linear_probe  # Reuses the linear_probe units.
  config.uniform_probe_avg.probe = config.linear_probe
  config.finetune.learning_rates = LEARNING_RATES
  config.finetune.steps = (STEPS,)
  config.finetune.batch_size = BATCH_SIZE
  config.finetune.eval_batch_size = BATCH_SIZE
  config.finetune.checkpoint_every = 500
  # Hub-Pathway fine-tunes the hub through its router with the same sweep.
  config.pathway.learning_rates = LEARNING_RATES
  config.pathway.steps = STEPS
  config.pathway.batch_size = BATCH_SIZE
  # Gates see 32x32 thumbnails of the 224x224 images (the offline demo: 8 of 32).
  for name in ("moe", "moe_no_label", "pathway"):
    config[name].thumbnail_size = 32
  # The ranking evaluation needs the linear probes as ground truth.
  config.select = (select_job.default_config() if "linear_probe" in methods
                   else None)
  return config
