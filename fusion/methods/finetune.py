"""Fine-tuning: a hub backbone plus a new zero-initialised linear head, VTAB-1k protocol.

A sweep over learning rates x step counts (SGD with momentum, linear warm-up
then cosine decay, batch 64 by default) trains on train800; the run with the
best val200 accuracy (ties: lower NLL) is retrained on train800val200 and
scored on test. val200 predictions come from the chosen train800 run.

Every run is its own cached unit (`run_key`): its val200 and test logits
(and, with `save_params`, its weights, for soups) are stored under
$FUSION_HOME/predictions, and it checkpoints with orbax under the workdir
while it trains, so a killed sweep resumes without redoing finished runs and
the run in flight resumes from its last checkpoint. A run whose loss turns
non-finite is marked failed with its reason; the others go on.

Which parameters train (`trainable`): "all"; "head" (the backbone frozen);
"last_n" (the last `last_n` blocks, `encoder/layer/<i>` of transformers or
`encoder/stages/<s>/layers/<l>` of CNNs, plus the final norms and poolers).
BatchNorm statistics update in training mode (`Backbone.features_train`) and
are kept. `backbone_lr_multiplier` scales the backbone's learning rate
relative to the head's.
"""
import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from fusion import experiment
from fusion import features as features_lib
from fusion import hub
from fusion import io
from fusion import metrics
from fusion import predictions
from fusion import train
from fusion.methods import linear_probe

MEMBERS = "each"
TRAINABLE = ("all", "head", "last_n")
# Top-level parameter groups after the last block (trained in "last_n" mode).
AFTER_BLOCKS = ("layernorm", "pooler", "post_layernorm", "visual_projection")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "learning_rates": (0.003, 0.01, 0.03),
      "steps": (500,),  # The grid's step counts.
      "batch_size": 64,
      # The head trains padded to a multiple of this many classes, the padding
      # masked out (`linear_probe.PAD_LOGIT`), so that tasks of up to 16 classes
      # share one compiled step per architecture; saved heads are not padded.
      "class_multiple": 16,
      "warmup_fraction": 0.1,  # Of each run's steps.
      "optimizer": {"optimizer": "sgd", "momentum": 0.9, "schedule": "cosine",
                    "weight_decay": 0.0, "grad_clip_norm": 1.0},
      "trainable": "all",
      "last_n": 1,
      "backbone_lr_multiplier": 1.0,
      "save_params": True,  # Keep each run's weights (soups need them).
      "checkpoint_every": 100,
      "eval_batch_size": 256,
  })


def check_config(config) -> None:
  if not config.learning_rates or not config.steps:
    raise ValueError(f"finetune's sweep grid is empty (learning_rates="
                     f"{tuple(config.learning_rates)}, steps={tuple(config.steps)}); give "
                     "at least one of each.")
  _head_width(config, 2)
  if min(config.steps) < 1 or min(config.learning_rates) <= 0:
    raise ValueError("finetune.steps must be >= 1 and learning_rates > 0; got "
                     f"{tuple(config.steps)}, {tuple(config.learning_rates)}.")
  if config.trainable not in TRAINABLE:
    raise ValueError(f"finetune.trainable={config.trainable!r} is not one of {TRAINABLE}.")
  if config.trainable == "last_n" and int(config.last_n) < 1:
    raise ValueError(f"finetune.last_n={config.last_n} must be >= 1.")
  if not 0 <= config.warmup_fraction < 1:
    raise ValueError(f"finetune.warmup_fraction={config.warmup_fraction} must be in [0, 1).")
  if config.batch_size < 1 or config.backbone_lr_multiplier < 0:
    raise ValueError(f"finetune.batch_size={config.batch_size} must be >= 1 and "
                     f"backbone_lr_multiplier={config.backbone_lr_multiplier} >= 0.")
  train.parse_config({**config.optimizer.to_dict(), "learning_rate": 1.0}, 1)


# ------------------------------------------------------------------ model


def _block_of(path: Sequence[str]) -> tuple[int, ...] | None:
  """The block a parameter belongs to, as an ordered index; None outside blocks."""
  if "encoder" not in path:
    return None
  rest = list(path[path.index("encoder") + 1:])
  if len(rest) >= 2 and rest[0] in ("layer", "layers") and rest[1].isdigit():
    return (int(rest[1]),)
  if len(rest) >= 4 and rest[0] == "stages" and rest[2] == "layers":
    return (int(rest[1]), int(rest[3]))
  return None


def trainable_mask(variables: Mapping[str, Any], mode: str, last_n: int = 1) -> Any:
  """Bool tree over the backbone's variables: which leaves the optimizer updates.

  BatchNorm `batch_stats` are never optimized (they take the values that
  training-mode forward passes compute).
  """
  flat = traverse_util.flatten_dict(variables)
  blocks = sorted({b for p in flat if (b := _block_of(p)) is not None})
  last = set(blocks[-last_n:]) if mode == "last_n" else set()
  if mode == "last_n" and not blocks:
    raise ValueError("finetune.trainable='last_n' needs a model with encoder blocks "
                     "(encoder/layer/<i> or encoder/stages/<s>/layers/<l>); this one has none.")

  def trains(path) -> bool:
    if path[0] == "batch_stats" or mode == "head":
      return False
    if mode == "all":
      return True
    block = _block_of(path)
    if block is not None:
      return block in last
    top = [p for p in path[1:] if p != "vision_model"][:1]
    return bool(top) and top[0] in AFTER_BLOCKS

  return traverse_util.unflatten_dict({p: trains(p) for p in flat})


def _head_width(config, num_classes: int) -> int:
  return linear_probe.head_width(num_classes, config.get("class_multiple", 1),
                                 "finetune.class_multiple")


@functools.lru_cache(maxsize=64)
def _loss_fn(backbone: hub.Backbone):
  """Cross-entropy of the linear head on the backbone's training-mode features.

  One function per computation twin (hub.computation_twin), so the trainer
  compiles one step per architecture and head width, shared by every run of
  the sweep and every checkpoint of that architecture, and by the tasks whose
  class counts pad to one width. `params["class_mask"]`, when there, masks a
  padded head's padding out.
  """
  def loss_fn(params, batch, rng):
    feats, new_backbone = backbone.features_train(params["backbone"], batch["image"], rng)
    logits = linear_probe.masked_logits(linear_probe.head_logits(params["head"], feats),
                                        params.get("class_mask"))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"accuracy": accuracy}, {**params, "backbone": new_backbone})
  return loss_fn


def predict(backbone: hub.Backbone, params, images: np.ndarray, mesh,
            batch_size: int) -> np.ndarray:
  """Logits [N, C] of (fine-tuned backbone, head) params on preprocessed images."""
  batch_size = max(batch_size - batch_size % mesh.size, mesh.size)
  feats = features_lib.extract_array(backbone, images, mesh=mesh, batch_size=batch_size,
                                     params=params["backbone"])
  return linear_probe.logits_of(params["head"], feats)


# ------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep, trained on `split`."""
  learning_rate: float
  steps: int
  split: str  # "train800" or "train800val200"


def run_splits(task, train_split: str) -> tuple[str, ...]:
  """The splits a run predicts: what its Result is used for. A train800 run
  gives val200 (choices are made there); its train800val200 retrain gives the
  test splits (val200 is in its training data)."""
  if train_split == "train800":
    return ("val200",)
  return experiment.test_splits(task)


def run_inputs(backbone: hub.Backbone, task, run: Run, config, seed: int) -> dict:
  settings = config.to_dict()
  for key in ("learning_rates", "steps", "save_params", "checkpoint_every",
              "eval_batch_size"):
    settings.pop(key)
  return {"method": "finetune_run", "task": experiment.task_key(task),
          "model": [backbone.name, hub.params_fingerprint(backbone)],
          "run": dataclasses.asdict(run), "settings": settings, "seed": int(seed)}


def run_key(backbone, task, run: Run, config, seed: int) -> str:
  return predictions.unit_key(run_inputs(backbone, task, run, config, seed))


def _params_path(cache: predictions.Cache, key: str) -> str:
  return os.path.join(cache.directory, key + ".params.npz")


def load_params(cache: predictions.Cache, key: str, sha256: str) -> Any:
  """A run's saved weights, verified against the sha256 its Result records."""
  path = _params_path(cache, key)
  if not os.path.exists(path) or io.sha256_file(path) != sha256:
    raise ValueError(f"The saved weights of fine-tuning run {key} are missing or corrupt "
                     f"({path}); delete {cache.directory}/{key}.json to retrain the run.")
  with np.load(path, allow_pickle=False) as data:
    flat = {tuple(k.split("/")): data[k] for k in data.files}
  return traverse_util.unflatten_dict(flat)


def _save_params(cache: predictions.Cache, key: str, params) -> str:
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  path = _params_path(cache, key)
  io.atomic_write(path, lambda f: np.savez(f, **{"/".join(k): v for k, v in flat.items()}))
  return io.sha256_file(path)


def train_run(ctx, backbone: hub.Backbone, task, run: Run, config, seed: int,
              init_params=None, cache: predictions.Cache | None = None,
              key: str | None = None) -> predictions.Result:
  """Trains one run (resuming its checkpoint) and returns its val200/test predictions.

  `init_params` ({"backbone", "head"}) replace the pre-trained backbone and
  the zero head as the starting point (the shift method starts from them).
  The head trains padded to `class_multiple` (`_loss_fn`); the Result's and the
  saved weights' head is the task's own.
  """
  images, labels = ctx.images(task, run.split, backbone.preprocess)
  batch_fn = _batch_fn(images, labels, config.batch_size, seed)
  if init_params is None:
    init_params = {"backbone": backbone.params,
                   "head": {"kernel": np.zeros((backbone.feature_dim, task.num_classes),
                                               np.float32),
                            "bias": np.zeros((task.num_classes,), np.float32)}}
  width = _head_width(config, task.num_classes)
  init_params = {"backbone": init_params["backbone"],
                 "head": linear_probe.pad_head(init_params["head"], width),
                 "class_mask": linear_probe.class_mask(task.num_classes, width)}
  mask = {"backbone": trainable_mask(init_params["backbone"], config.trainable,
                                     int(config.last_n)),
          "head": True, "class_mask": False}
  opt = config.optimizer.to_dict()
  opt.update(learning_rate=run.learning_rate, total_steps=run.steps,
             warmup_steps=int(round(config.warmup_fraction * run.steps)))
  name = f"finetune/{task.name}/{backbone.name}/{run.split}/lr={run.learning_rate:g}," \
         f"steps={run.steps},seed={seed}"
  checkpoint_dir = (train.default_checkpoint_dir(ctx.workdir, f"{name}/{key}")
                    if ctx.workdir and key else None)
  state = train.train(
      loss_fn=_loss_fn(hub.computation_twin(backbone)), params=init_params,
      batch_fn=batch_fn, config=opt,
      mesh=ctx.mesh, num_steps=run.steps, workdir=ctx.workdir, seed=seed, trainable=mask,
      lr_multiplier={"backbone": float(config.backbone_lr_multiplier), "head": 1.0,
                     "class_mask": 1.0},
      run_name=name, checkpoint=checkpoint_dir is not None, checkpoint_dir=checkpoint_dir,
      checkpoint_every=int(config.checkpoint_every), max_to_keep=1, progress=False)
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  params = {"backbone": params["backbone"],
            "head": linear_probe.unpad_head(params["head"], task.num_classes)}
  result = run_result(ctx, backbone, task, run, params, config, cache, key)
  if checkpoint_dir:  # The run is cached now: its checkpoints are not needed.
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
  return result


def run_result(ctx, backbone: hub.Backbone, task, run: Run, params, config,
               cache: predictions.Cache | None = None, key: str | None = None
               ) -> predictions.Result:
  """The Result of a run that ended with `params` ({"backbone", "head"}): its
  `run_splits` predicted, its weights saved (with `cache` and `key`)."""
  splits = run_splits(task, run.split)
  logits, labels = {}, {}
  for split in splits:
    x, labels[split] = ctx.images(task, split, backbone.preprocess)
    logits[split] = predict(backbone, params, x, ctx.mesh, int(config.eval_batch_size))
  fields = {"learning_rate": run.learning_rate, "steps": run.steps, "split": run.split}
  if cache is not None and key is not None and config.save_params:
    fields["params_sha256"] = _save_params(cache, key, params)
  return predictions.Result(
      predictions.Predictions(logits, labels, required=splits),
      members=(backbone.name,), inference_gflops=_gflops(backbone, task), train_steps=run.steps,
      train_examples=run.steps * config.batch_size, fields=fields)


def _batch_fn(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
  from fusion.data import pipeline  # Its array helper only; no TF op runs.
  inner = pipeline.array_batch_fn(images, labels, batch_size=batch_size, seed=seed)
  return lambda step: {k: v for k, v in inner(step).items() if k != "mask"}


def _gflops(backbone: hub.Backbone, task) -> float:
  return hub.inference_gflops(backbone) + linear_probe.head_gflops(backbone.feature_dim,
                                                                   task.num_classes)


def cached_run(ctx, backbone, task, run: Run, config, seed: int
               ) -> tuple[str, predictions.Result | str]:
  """(key, Result) of one run from the cache, else trained; a diverged run gives its reason."""
  cache = predictions.Cache(ctx.config.get("predictions_dir") or None)
  inputs = run_inputs(backbone, task, run, config, seed)
  key = predictions.unit_key(inputs)
  result = cache.load(key)
  if result is None:
    try:
      result = train_run(ctx, backbone, task, run, config, seed, cache=cache, key=key)
    except train.NonFiniteLossError as e:
      logging.warning("finetune run %s diverged: %s", key, e)
      return key, f"diverged at step {e.step}: non-finite loss {e.loss}"
    cache.save(key, inputs, result)
  return key, result


def choose(candidates: Sequence[tuple[Any, predictions.Result]]) -> tuple[Any, predictions.Result]:
  """The candidate with the best val200 accuracy; ties: lower val200 NLL, then order."""
  def score(item):
    p = item[1].predictions
    return (-metrics.accuracy(p.logits["val200"], p.labels["val200"]),
            metrics.nll(p.logits["val200"], p.labels["val200"]))
  return min(candidates, key=score)


def sweep(ctx, backbone, task, config, seed: int
          ) -> tuple[list[dict], tuple[Run, predictions.Result]]:
  """Every run of the grid on train800: (their records, (chosen run, its Result))."""
  records, finished = [], []
  for steps in config.steps:
    for lr in config.learning_rates:
      run = Run(float(lr), int(steps), "train800")
      key, result = cached_run(ctx, backbone, task, run, config, seed)
      record = {"key": key, "learning_rate": run.learning_rate, "steps": run.steps}
      if isinstance(result, str):
        record["failed"] = result
      else:
        p = result.predictions
        record.update(val_accuracy=metrics.accuracy(p.logits["val200"], p.labels["val200"]),
                      val_nll=metrics.nll(p.logits["val200"], p.labels["val200"]))
        finished.append((run, result))
      records.append(record)
  if not finished:
    raise ValueError(f"Every fine-tuning run of {backbone.name} on {task.name} diverged: "
                     f"{[r['failed'] for r in records]}. Lower finetune.learning_rates or "
                     "set finetune.optimizer.grad_clip_norm.")
  return records, choose(finished)


def with_setting(ctx, backbone, task, config, seed: int, learning_rate: float, steps: int,
                 sweep_records: Sequence[dict] = ()) -> predictions.Result:
  """The Result of one setting: val200 from its train800 run, test from its retrain.

  `sweep_records` (the sweep that chose the setting) count in the training
  cost; without them, only the setting's two runs do.
  """
  run = Run(float(learning_rate), int(steps), "train800")
  outcomes = {}
  for split in ("train800", "train800val200"):
    key, result = cached_run(ctx, backbone, task, dataclasses.replace(run, split=split),
                             config, seed)
    if isinstance(result, str):
      raise ValueError(f"Fine-tuning {backbone.name} on {task.name}'s {split} (learning rate "
                       f"{learning_rate:g}, {steps} steps, seed {seed}) {result}.")
    outcomes[split] = (key, result)
  (val_key, val), (final_key, final) = outcomes["train800"], outcomes["train800val200"]
  tests = experiment.test_splits(task)
  preds = predictions.Predictions(
      {"val200": val.predictions.logits["val200"],
       **{s: final.predictions.logits[s] for s in tests}},
      {"val200": val.predictions.labels["val200"],
       **{s: final.predictions.labels[s] for s in tests}})
  steps_done = [r["steps"] for r in sweep_records if "failed" not in r] or [run.steps]
  total = sum(steps_done) + run.steps
  return predictions.Result(
      preds, members=(backbone.name,), inference_gflops=_gflops(backbone, task),
      train_steps=total, train_examples=config.batch_size * total,
      fields={"learning_rate": run.learning_rate, "steps": run.steps, "seed": int(seed),
              "val_run": val_key, "final_run": final_key, "sweep": list(sweep_records)})


def fit_predict(ctx, task, members, config, seed) -> predictions.Result:
  check_config(config)
  backbone, = members
  records, (best, _) = sweep(ctx, backbone, task, config, seed)
  return with_setting(ctx, backbone, task, config, seed, best.learning_rate, best.steps,
                      records)
