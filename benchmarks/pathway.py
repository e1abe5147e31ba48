"""Hub-Pathway's cost against k: train-step and inference times of k = 1, k = 2
and dense routing (k = M) over the whole offline hub, and their ratios.

  python benchmarks/pathway.py                    # the offline hub's M models, batch 64
  python benchmarks/pathway.py --size tiny --steps 2 --repeats 1 --batch_size 16  # smoke

Models have the offline hub's architectures and sizes (`offline_hub.default_config()`:
ResNets, DINOv2s, ViTs at 32x32; weights drawn from the shapes by tests/tiny_models,
saved and loaded through `fusion.hub.load`: speed does not depend on them, and no
hub needs building). The network is `fusion.methods.pathway`'s (thumbnail
generator, noisy top-k, capacity dispatch, per-model heads, hub models
fine-tuned), trained through `fusion.train.train` on random images. Times exclude
compilation (a warm-up run first; the fastest of `--repeats`, taken round robin over
the k so that a drifting load slows each alike); a train step is
the time of `--steps` steps less that of 1 step, over `--steps` - 1. Goal of the
issue: time(k) / time(dense) <= 1.3 k / M; the script prints the measured ratio
beside it.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, "tests"))  # tiny_models

import argparse  # noqa: E402
import functools  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

TINY = {"resnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        "vit": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32),
        "dinov2": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)}


def _hub(size: str, directory: str):
  import tiny_models
  from fusion import hub
  from fusion import offline_hub
  backbones = []
  for i, entry in enumerate(offline_hub.default_config().models):
    arch = entry["arch"]
    sizes = {**offline_hub.ARCHS[arch][3], **entry["size"]}
    if size == "tiny":
      sizes = {**sizes, **TINY[arch]}
    sizes = {k: v for k, v in sizes.items() if k != "image_size" or arch != "resnet"}
    path = tiny_models.save_tiny(arch, os.path.join(directory, entry["name"]), seed=i,
                                 **sizes)
    backbones.append(hub.load({"name": entry["name"], "path": path}))
  return backbones


def _timed(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=("hub", "tiny"), default="hub")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  args = parser.parse_args()
  if args.steps < 2:
    parser.error(f"--steps={args.steps}: the train step is timed as the difference of "
                 "runs of --steps and 1 steps; give --steps >= 2.")

  import jax
  import numpy as np
  from fusion import routing
  from fusion import sharding
  from fusion import train
  from fusion.methods import pathway

  with tempfile.TemporaryDirectory() as directory:
    backbones = _hub(args.size, directory)
  num_models, batch_size, num_classes = len(backbones), args.batch_size, 10
  mesh = sharding.make_mesh(1)
  rng = np.random.default_rng(0)
  resolution = backbones[0].preprocess.resolution
  batch = {"inputs": [rng.random((batch_size, resolution, resolution, 3), np.float32)],
           "gate_input": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
           "valid": np.ones(batch_size, bool)}
  config = pathway.default_config()
  config.batch_size, config.capacity_factor = batch_size, args.capacity_factor
  generator = pathway.generator_of(config, num_models)
  encoders = tuple(pathway._hub_encoder(b) for b in backbones)
  params = pathway._init(generator, batch["gate_input"], [b.params for b in backbones],
                         [b.feature_dim for b in backbones], num_classes, 0)
  trainable = {"generator": True, "heads": True,
               "encoders": [{c: c == "params" for c in b.params} for b in backbones]}
  ks = (1, 2, num_models)
  runs = {}  # (k, what) -> a callable to time; compiled first.
  for k in ks:
    # Inference at the training capacity (the sparse dispatch); the method's default
    # inference capacity (eval_capacity_factor None: the whole batch) is timed apart.
    config.eval_capacity_factor = args.capacity_factor
    loss_fn, predict = pathway.networks(config, encoders, generator, k, num_classes)
    config.eval_capacity_factor = None
    _, predict_no_drops = pathway.networks(config, encoders, generator, k, num_classes)

    def fit(steps, loss_fn=loss_fn):
      state = train.train(loss_fn=loss_fn, params=params, batch_fn=lambda step: batch,
                          config={"optimizer": "sgd", "learning_rate": 1e-3}, mesh=mesh,
                          num_steps=steps, trainable=trainable, checkpoint=False,
                          progress=False, log_every=max(steps, 1))
      jax.block_until_ready(state.params)

    runs[k, "train"] = functools.partial(fit, args.steps)
    runs[k, "train1"] = functools.partial(fit, 1)
    runs[k, "train"](), runs[k, "train1"]()  # Compile: the step count is in the key.
    for what, fn in (("infer", predict), ("infer_no_drops", predict_no_drops)):
      if what == "infer" or k < num_models:
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(params, batch))
        runs[k, what] = functools.partial(
            lambda j: jax.block_until_ready(j(params, batch)), jitted)
    print(f"compiled k={k}", flush=True)
  # Round robin, the fastest of `repeats` each: a machine whose load drifts slows
  # every k alike instead of the last one measured.
  best = dict.fromkeys(runs, float("inf"))
  for _ in range(args.repeats):
    for key, fn in runs.items():
      best[key] = min(best[key], _timed(fn, 1))
  times = {}
  for k in ks:
    # Per step: a run of `steps` less a run of 1, so the trainer's fixed cost per call
    # (state set-up, parameter transfer) does not count.
    train_s = (best[k, "train"] - best[k, "train1"]) / (args.steps - 1)
    infer_s = best[k, "infer"]
    times[k] = (train_s, infer_s)
    slots = routing.capacity(k, batch_size, num_models, args.capacity_factor)
    name = "dense" if k == num_models else f"k={k}"
    extra = (f"; at the default inference capacity ({batch_size} slots, no drops) "
             f"{1e3 * best[k, 'infer_no_drops']:.1f} ms" if k < num_models else "")
    print(f"pathway {name} (M={num_models}, batch {batch_size}, capacity {slots}): train step "
          f"{1e3 * train_s:.1f} ms, inference {1e3 * infer_s:.1f} ms "
          f"({batch_size / infer_s:.0f} images/s){extra}", flush=True)
  dense = times[num_models]
  for k in (1, 2):
    goal = 1.3 * k / num_models
    for what, i in (("train step", 0), ("inference", 1)):
      ratio = times[k][i] / dense[i]
      print(f"k={k} / dense {what}: {ratio:.3f} (goal <= 1.3 k / M = {goal:.3f}: "
            f"{'met' if ratio <= goal else 'not met'})")


if __name__ == "__main__":
  main()
