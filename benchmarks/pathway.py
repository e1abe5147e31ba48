"""Hub-Pathway's cost against k: train-step and inference times of k = 1, k = 2
and dense routing (k = M) over the models the demo routes between, and their ratios.

  python benchmarks/pathway.py                    # the demo's M = 8 models, batch 64
  python benchmarks/pathway.py --batch_size 256   # where the per-model fixed cost weighs less
  python benchmarks/pathway.py --size tiny --steps 2 --repeats 1 --batch_size 16 \
      --num_images 32                             # smoke

Models have the offline hub's architectures and sizes (`offline_hub.default_config()`:
ResNets, DINOv2s, ViTs at 32x32; weights drawn from the shapes by tests/tiny_models,
saved and loaded through `fusion.hub.load`: speed does not depend on them, and no
hub needs building), less `pathway.exclude_models` of `--config` (the demo's: the
shift method's extra resnet_glyphs seeds), as the method does (`routed_models`).
The network is `fusion.methods.pathway`'s (thumbnail generator, noisy top-k,
capacity dispatch, per-model heads, hub models fine-tuned), trained through
`fusion.train.train` on random images. Inference is the method's default path,
`pathway.predict_sparse` (the generator routes `--num_images` images, then each
model runs on the inputs routed to it, in batches padded to `--batch_size`).
Times exclude compilation (a warm-up run first; the fastest of `--repeats`, taken
round robin over the k so that a drifting load slows each alike); a train step is
the time of `--steps` steps less that of 1 step, over `--steps` - 1. Goal of the
issue: time(k) / time(dense) <= 1.3 k / M; the script prints the measured ratio
beside it, and the share of dense's model slots that k runs (buffer slots in a
train step, padded slots at inference): the ratio's floor, the rest is fixed cost.
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


def _pathway_config(path: str):
  """`config.pathway` of a config file (its exclude_models, generator, noise, ...)."""
  from fusion import main as fusion_main
  return fusion_main.load_config_module(path).get_config().pathway


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


def _spread(generator, generator_params, gate_input, num_models: int, seed: int):
  """The generator with a random output layer, its clean logits standardised per model
  on `gate_input`.

  At init the output layer is zero: every logit ties and top-k sends every input
  to models 0..k-1, so the sparse inference would time k models on all inputs,
  not k models per input spread over M. A trained generator spreads them (the
  load losses push towards balance); random projections of the thumbnails'
  features, centred and scaled alike, spread them about evenly.
  """
  import jax
  import numpy as np
  params = jax.tree.map(np.array, generator_params)
  out = params["params"]["out"]
  rng = np.random.default_rng(seed)
  out["kernel"][:, :num_models] = rng.normal(size=out["kernel"][:, :num_models].shape)
  clean = np.asarray(generator.apply(params, gate_input))[:, :num_models]
  mean, std = clean.mean(0), clean.std(0) + 1e-6
  out["kernel"][:, :num_models] /= std
  out["bias"][:num_models] = -mean / std
  return params


def _timed(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _padded(routed, batch_size: int) -> int:
  """Model slots the sparse inference runs: each model's routed inputs, padded to batches."""
  import numpy as np
  per_model = routed.sum(0).astype(int)
  return int(np.sum(-(-per_model // batch_size) * batch_size))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=("hub", "tiny"), default="hub")
  parser.add_argument("--config", default=os.path.join(_REPO, "configs", "demo.py"),
                      help="its pathway.exclude_models set the routed models (M)")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="training batch, and the inference's padded batch")
  parser.add_argument("--num_images", type=int, default=1024,
                      help="images of one timed inference run")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--capacity_factor", type=float, default=None,
                      help="training buffers; default the config's")
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

  config = _pathway_config(args.config)
  config.batch_size = args.batch_size
  if args.capacity_factor is not None:
    config.capacity_factor = args.capacity_factor
  if config.generator != "thumbnail":
    sys.exit(f"error: pathway.generator={config.generator!r}; this benchmark times the "
             "thumbnail generator.")
  with tempfile.TemporaryDirectory() as directory:
    backbones = pathway.routed_models(config, _hub(args.size, directory))
  num_models, batch_size, num_classes = len(backbones), args.batch_size, 10
  num_images = args.num_images
  mesh = sharding.make_mesh(1)
  rng = np.random.default_rng(0)
  resolution = backbones[0].preprocess.resolution
  thumb = int(config.thumbnail_size)
  images = rng.random((max(num_images, batch_size), resolution, resolution, 3), np.float32)
  gate_input = rng.uniform(-1, 1, (len(images), thumb, thumb, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, len(images)).astype(np.int32)
  batch = {"inputs": [images[:batch_size]], "gate_input": gate_input[:batch_size],
           "label": labels[:batch_size], "valid": np.ones(batch_size, bool)}
  images, gate_input, labels = images[:num_images], gate_input[:num_images], labels[:num_images]
  generator = pathway.generator_of(config, num_models)
  encoders = tuple(pathway._hub_encoder(b) for b in backbones)
  params = pathway._init(generator, batch["gate_input"], [b.params for b in backbones],
                         [b.feature_dim for b in backbones], num_classes, 0,
                         pathway.head_width(config, num_classes))
  params["generator"] = _spread(generator, params["generator"], gate_input, num_models, 0)
  trainable = pathway.trainable([{c: c == "params" for c in b.params} for b in backbones])
  print(f"M={num_models} routed models ({args.config}): "
        f"{', '.join(b.name for b in backbones)}", flush=True)
  ks = (1, 2, num_models)
  runs, routed = {}, {}  # (k, what) -> a callable to time, compiled first; k -> [N, M].
  for k in ks:
    loss_fn, _ = pathway.networks(config, encoders, generator, k, num_classes)

    def fit(steps, loss_fn=loss_fn):
      state = train.train(loss_fn=loss_fn, params=params, batch_fn=lambda step: batch,
                          config={"optimizer": "sgd", "learning_rate": 1e-3}, mesh=mesh,
                          num_steps=steps, trainable=trainable, checkpoint=False,
                          progress=False, log_every=max(steps, 1))
      jax.block_until_ready(state.params)

    def infer(k=k):  # The method's inference: numpy out, so it has finished on return.
      return pathway.predict_sparse(config, encoders, k, num_classes, params, [images],
                                    gate_input, labels, batch_size)

    runs[k, "train"] = functools.partial(fit, args.steps)
    runs[k, "train1"] = functools.partial(fit, 1)
    runs[k, "train"](), runs[k, "train1"]()  # Compile: the step count is in the key.
    runs[k, "infer"] = infer
    routed[k] = infer()[1]
    print(f"compiled k={k}", flush=True)
  # Round robin, the fastest of `repeats` each: a machine whose load drifts slows
  # every k alike instead of the last one measured.
  best = dict.fromkeys(runs, float("inf"))
  for _ in range(args.repeats):
    for key, fn in runs.items():
      best[key] = min(best[key], _timed(fn, 1))
  times, work = {}, {}
  for k in ks:
    # Per step: a run of `steps` less a run of 1, so the trainer's fixed cost per call
    # (state set-up, parameter transfer) does not count.
    train_s = (best[k, "train"] - best[k, "train1"]) / (args.steps - 1)
    infer_s = best[k, "infer"]
    times[k] = (train_s, infer_s)
    slots = routing.capacity(k, batch_size, num_models, float(config.capacity_factor))
    work[k] = (slots, _padded(routed[k], batch_size))
    per_model = routed[k].sum(0).astype(int)
    name = f"dense k={k}" if k == num_models else f"k={k}"
    print(f"pathway {name} (M={num_models}, batch {batch_size}, {slots} slots per model): "
          f"train step {1e3 * train_s:.1f} ms; inference of {num_images} images "
          f"{1e3 * infer_s:.0f} ms, {1e3 * infer_s / num_images:.3f} ms/image "
          f"({num_images / infer_s:.0f} images/s), inputs per model "
          f"{per_model.min()}-{per_model.max()}", flush=True)
  for k in (1, 2):
    goal = 1.3 * k / num_models
    for what, i in (("train step", 0), ("inference", 1)):
      ratio = times[k][i] / times[num_models][i]
      slots = work[k][i] / work[num_models][i]
      print(f"k={k} / dense {what}: {ratio:.3f} (goal <= 1.3 k / M = {goal:.3f}: "
            f"{'met' if ratio <= goal else 'not met'}; model slots {slots:.3f} of dense)")


if __name__ == "__main__":
  main()
