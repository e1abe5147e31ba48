"""Fine-tuning throughput and model FLOP utilisation: 1 device vs all devices.

  python benchmarks/finetune.py                    # the offline hub's ResNet, batch 64
  python benchmarks/finetune.py --size tiny --steps 3 --warmup_steps 1 --repeats 1 \\
      --matmul_size 128 --batch_size 8             # a smoke run in seconds

A ResNet of the offline hub's architecture and size (`fusion.offline_hub.ARCHS
["resnet"]`, 32x32 images; weights drawn from the shapes by tests/tiny_models,
saved and loaded through `fusion.hub.load`) with a zero linear head is fine-tuned
through the real trainer (`fusion.train.train`) with the fine-tune method's
loss (`fusion.methods.finetune._loss_fn`), trainable mask (all, BatchNorm
statistics kept out of the optimizer) and optimizer settings, on random
images. Each device count runs in its own child interpreter (XLA_FLAGS
simulates N CPU devices; on an accelerator the first N devices are used):
after a warm-up run that compiles the step, `--repeats` runs of `--steps`
steps are timed and the fastest is reported (compile time excluded).

MFU = achieved FLOP/s / matmul ceiling. Achieved: the FLOPs of one training
step (XLA's cost analysis of the trainer's step function compiled for one
device at the global batch, i.e. the model's FLOPs, not counting the
per-device copies; compiled once, by the first child) times steps/s. Ceiling: the FLOP/s of a jitted float32
matmul (`--matmul_size` cubed, its rows split over the same devices), best
of a few runs, measured in the same child right after the fine-tuning runs.
"""
import os
import sys

# benchmarks/select.py would shadow the standard library's `select` (which
# subprocess imports): take this folder off sys.path before importing anything.
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, _REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(_REPO, "tests"))  # tiny_models: HF classes at chosen sizes.

# The offline hub's ResNet ("hub": the sizes of offline_hub.ARCHS["resnet"]) and
# one of the test suite's size ("tiny", for smoke runs).
SIZES = {"hub": None, "tiny": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])}
NUM_CLASSES = 10


def _backbone(size: str, directory: str):
  """A ResNet of the offline hub's architecture, saved and loaded by `hub.load`.

  Weights are drawn from the shapes (tiny_models) rather than pre-trained:
  throughput does not depend on them, and no hub needs building.
  """
  import tiny_models
  from fusion import hub
  from fusion import offline_hub
  sizes = SIZES[size] or offline_hub.ARCHS["resnet"][3]
  path = tiny_models.save_tiny("resnet", os.path.join(directory, "resnet"),
                               **{**sizes, "layer_type": "basic"})
  return hub.load({"name": f"resnet_{size}", "path": path})


def _step_flops(loss_fn, params, mask, opt, batch_size: int, resolution: int) -> float:
  """XLA's FLOPs of one trainer step at the global batch, compiled for one device."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fusion import train
  cfg = train.parse_config(opt)
  optimizer = train.make_optimizer(cfg)
  full_mask = train._full_mask(mask, params)
  step_fn = train._make_step(loss_fn, cfg.static(), full_mask,
                             train._full_multipliers(None, params))

  def abstract(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))

  abstract_params = jax.tree.map(abstract, params)
  state = train.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
      opt_state=jax.eval_shape(optimizer.init, train._partition(abstract_params, full_mask)[0]),
      rng=jax.eval_shape(jax.random.PRNGKey, 0))
  batch = {"image": jax.ShapeDtypeStruct((batch_size, resolution, resolution, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}
  cost = jax.jit(step_fn).lower(state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float(cost["flops"])


def matmul_ceiling(mesh, size: int, repeats: int) -> float:
  """FLOP/s of a jitted float32 [size, size] @ [size, size], rows split on `data`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fusion import sharding
  rows = size - size % sharding.data_size(mesh) or sharding.data_size(mesh)
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.normal(size=(rows, size)).astype(np.float32),
                     sharding.batch_sharded(mesh))
  b = jax.device_put(rng.normal(size=(size, size)).astype(np.float32),
                     sharding.replicated(mesh))
  fn = jax.jit(jnp.matmul, out_shardings=sharding.batch_sharded(mesh))
  fn(a, b).block_until_ready()  # Compile.
  # Enough calls per timing that a run lasts ~0.2 s.
  start = time.perf_counter()
  fn(a, b).block_until_ready()
  calls = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
  best = float("inf")
  for _ in range(max(repeats, 3)):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / calls)
  return 2.0 * rows * size * size / best


def run_child(args) -> dict:
  """Steps/s, FLOPs per step and the matmul ceiling on `args.num_devices` devices."""
  import jax
  import numpy as np
  from fusion import sharding
  from fusion import train
  from fusion.methods import finetune

  available = len(jax.devices())
  if args.num_devices > available:
    return {"devices": args.num_devices, "error": f"only {available} devices "
            f"({jax.devices()[0].platform}) are available"}
  mesh = sharding.make_mesh(args.num_devices)
  with tempfile.TemporaryDirectory() as tmp:
    backbone = _backbone(args.size, tmp)
  resolution = backbone.preprocess.resolution
  params = {"backbone": backbone.params,
            "head": {"kernel": np.zeros((backbone.feature_dim, NUM_CLASSES), np.float32),
                     "bias": np.zeros((NUM_CLASSES,), np.float32)}}
  config = finetune.default_config()
  mask = {"backbone": finetune.trainable_mask(backbone.params, "all"), "head": True}
  loss_fn = finetune._loss_fn(backbone)
  rng = np.random.default_rng(0)
  pool = 8  # Distinct batches, cycled: the host side stays cheap.
  images = rng.normal(size=(pool, args.batch_size, resolution, resolution, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(pool, args.batch_size)).astype(np.int32)

  def batch_fn(step):
    return {"image": images[step % pool], "label": labels[step % pool],
            "mask": np.ones(args.batch_size, bool)}

  # One schedule for the warm-up and the timed runs: total_steps and
  # warmup_steps are part of the compiled step, so they must not change.
  opt = {**config.optimizer.to_dict(), "learning_rate": 0.01, "total_steps": args.steps,
         "warmup_steps": int(round(config.warmup_fraction * args.steps))}

  def fit(num_steps):
    state = train.train(loss_fn=loss_fn, params=params, batch_fn=batch_fn,
                        config=opt, mesh=mesh, num_steps=num_steps, seed=0,
                        trainable=mask, lr_multiplier={"backbone": 1.0, "head": 1.0},
                        checkpoint=False, progress=False, log_every=num_steps)
    jax.block_until_ready(state)
    return state

  start = time.perf_counter()
  fit(args.warmup_steps)  # Compiles the step (the step count is not in the program).
  compile_s = time.perf_counter() - start
  best = float("inf")
  for _ in range(args.repeats):
    start = time.perf_counter()
    state = fit(args.steps)
    best = min(best, time.perf_counter() - start)
  done = int(jax.device_get(state.step))
  if done != args.steps:
    raise RuntimeError(f"The timed run did {done} steps, not {args.steps}.")
  # The model's FLOPs per step do not depend on the device count: compiled
  # once (by the first child), passed on to the others.
  flops = args.step_flops or _step_flops(loss_fn, params, mask, opt, args.batch_size,
                                         resolution)
  ceiling = matmul_ceiling(mesh, args.matmul_size, args.repeats)
  steps_per_s = args.steps / best
  return {"devices": args.num_devices, "platform": jax.devices()[0].platform,
          "steps_per_s": steps_per_s, "images_per_s": steps_per_s * args.batch_size,
          "step_gflop": flops / 1e9, "achieved_gflops": flops * steps_per_s / 1e9,
          "ceiling_gflops": ceiling / 1e9, "warmup_s": compile_s}


def _child(devices: int, args, step_flops: float | None = None) -> dict:
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  # Simulated CPU devices meet in each step's all-reduce; on a busy machine one
  # can lag past XLA's 40 s limit, which aborts the process: allow 10 minutes.
  flags += (f" --xla_force_host_platform_device_count={devices}"
            " --xla_cpu_collective_call_terminate_timeout_seconds=600")
  env = {**os.environ, "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": flags.strip()}
  command = [sys.executable, __file__, "--child", "--num_devices", str(devices),
             "--size", args.size, "--batch_size", str(args.batch_size),
             "--steps", str(args.steps), "--warmup_steps", str(args.warmup_steps),
             "--repeats", str(args.repeats), "--matmul_size", str(args.matmul_size)]
  if step_flops:
    command += ["--step_flops", repr(step_flops)]
  result = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                          timeout=args.timeout)
  if result.returncode:
    sys.exit(f"child with {devices} devices failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _plural(n: int) -> str:
  return f"{n} device" + ("s" if n != 1 else "")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="hub",
                      help="hub: the offline hub's ResNet; tiny: the tests' size")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
  parser.add_argument("--warmup_steps", type=int, default=3, help="untimed run (compiles)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--devices", default="1,2",
                      help="device counts, comma-separated; the first is the baseline")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
  parser.add_argument("--num_devices", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--step_flops", type=float, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.batch_size, args.steps, args.warmup_steps, args.repeats, args.matmul_size) < 1:
    parser.error("batch_size, steps, warmup_steps, repeats and matmul_size must be >= 1.")
  if args.child:
    print(json.dumps(run_child(args)))
    return

  counts = [int(n) for n in args.devices.split(",")]
  results = []
  for n in counts:
    flops = next((r["step_gflop"] * 1e9 for r in results if "error" not in r), None)
    results.append(_child(n, args, flops))
  print(f"fine-tuning resnet ({args.size} size, 32x32 images, {NUM_CLASSES} classes), "
        f"batch {args.batch_size}, best of {args.repeats} x {args.steps} steps after a "
        f"{args.warmup_steps}-step warm-up run; {results[0].get('platform', '?')}")
  for r in results:
    if "error" in r:
      print(f"finetune resnet {_plural(r['devices'])}: skipped, {r['error']}")
      continue
    mfu = r["achieved_gflops"] / r["ceiling_gflops"]
    print(f"finetune resnet {_plural(r['devices'])}: {r['steps_per_s']:.2f} steps/s, "
          f"{r['images_per_s']:.1f} images/s, MFU {mfu:.3g} (achieved "
          f"{r['achieved_gflops']:.3g} GFLOP/s / matmul ceiling "
          f"{r['ceiling_gflops']:.3g} GFLOP/s; {r['step_gflop']:.3g} GFLOP per step; "
          f"warm-up run {r['warmup_s']:.1f} s)")
  base = results[0]
  for r in results[1:]:
    if "error" in r or "error" in base:
      continue
    print(f"{_plural(r['devices'])} / {_plural(base['devices'])}: "
          f"{r['steps_per_s'] / base['steps_per_s']:.2f}x steps/s, matmul ceiling "
          f"{r['ceiling_gflops'] / base['ceiling_gflops']:.2f}x")
  if results[0].get("platform") == "cpu" and len(results) > 1:
    print("(simulated CPU devices share this machine's cores: the N-device runs check "
          "the sharded path rather than measure a speed-up)")


if __name__ == "__main__":
  main()
