"""Feature extraction throughput: cached vs uncached, and 1 vs 2 devices.

  python benchmarks/extract.py              # CPU: a ViT the size of the offline hub's
  python benchmarks/extract.py --arch resnet --num_images 4096
  python benchmarks/extract.py --tiny --splits val200 --num_images 64 --batch_size 32 \
      --repeats 1                           # seconds: a smoke run, not a measurement

Part 1 extracts the offline `digits` task (train800val200 + test by default) through
`fusion.features.extract` twice: with an empty cache (tf.data decode, resize,
jitted forward) and again from the cache. Part 2 times the jitted, sharded
forward alone (`extract_array` on random images) in two child interpreters that
see 1 and 2 CPU devices (XLA_FLAGS), so the second can split each batch over the
`data` axis. Each figure is printed with its ratio to its baseline.
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
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
sys.path.insert(0, os.path.join(_REPO, "tests"))  # tiny_models: HF classes at chosen sizes.

# The offline hub's sizes (CPU-friendly), built with the real HF classes.
ARCHS = {
    "vit": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=192),
    "resnet": dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1]),
}


def _backbone(arch: str, directory: str, tiny: bool = False):
  """The benchmark's model; `tiny`: tiny_models' own toy size (hidden 16)."""
  import tiny_models
  from fusion import hub
  sizes = {} if tiny else ARCHS[arch]
  path = tiny_models.save_tiny(arch, os.path.join(directory, arch), **sizes)
  return hub.load({"name": arch, "path": path})


def time_forward(arch: str, num_images: int, batch_size: int, repeats: int,
                 tiny: bool = False) -> dict:
  """Images/s of the jitted forward over every visible device (child process)."""
  import jax
  import numpy as np
  from fusion import features, sharding
  with tempfile.TemporaryDirectory() as tmp:
    backbone = _backbone(arch, tmp, tiny)
  mesh = sharding.make_mesh()
  images = np.random.default_rng(0).normal(size=(num_images, 32, 32, 3)).astype(np.float32)
  features.extract_array(backbone, images[:batch_size], mesh=mesh, batch_size=batch_size)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    features.extract_array(backbone, images, mesh=mesh, batch_size=batch_size)
    best = min(best, time.perf_counter() - start)
  return {"devices": len(jax.devices()), "images_per_s": num_images / best}


def time_cache(arch: str, batch_size: int, splits: tuple[str, ...] = ("train800val200", "test"),
               tiny: bool = False) -> dict:
  """Images/s of `extract` on digits with an empty cache, then from the cache."""
  from fusion import features
  from fusion.data import tasks
  task = tasks.get("digits")
  with tempfile.TemporaryDirectory() as tmp:
    backbone = _backbone(arch, tmp, tiny)
    features.extract(backbone, task, "val200", batch_size=batch_size,
                     cache_dir=os.path.join(tmp, "warm"))  # Compile, build the dataset.
    out = {}
    for label in ("uncached", "cached"):
      start = time.perf_counter()
      count = sum(len(features.extract(backbone, task, s, batch_size=batch_size,
                                       cache_dir=os.path.join(tmp, "cache")).labels)
                  for s in splits)
      out[label] = count / (time.perf_counter() - start)
  return {**out, "images": count}


def _child(devices: int, args) -> dict:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
  command = [sys.executable, __file__, "--child", "--arch", args.arch,
             "--num_images", str(args.num_images), "--batch_size", str(args.batch_size),
             "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])
  result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"child with {devices} devices failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", choices=sorted(ARCHS), default="vit")
  parser.add_argument("--num_images", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--splits", default="train800val200,test",
                      help="comma-separated digits splits that part 1 extracts")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny_models' toy sizes (hidden 16): a smoke run, not a measurement")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(time_forward(args.arch, args.num_images, args.batch_size, args.repeats,
                                  args.tiny)))
    return

  os.environ.setdefault("TQDM_DISABLE", "1")
  splits = tuple(s for s in args.splits.split(",") if s)
  cache = time_cache(args.arch, args.batch_size, splits, args.tiny)
  print(f"{args.arch}{' (tiny)' if args.tiny else ''}, digits {' + '.join(splits)} "
        f"({cache['images']:,} images), batch {args.batch_size}")
  print(f"  uncached extract: {cache['uncached']:9.0f} images/s")
  print(f"  cached extract:   {cache['cached']:9.0f} images/s  "
        f"({cache['cached'] / cache['uncached']:.0f}x uncached)")
  one, two = _child(1, args), _child(2, args)
  print(f"{args.arch}{' (tiny)' if args.tiny else ''}, jitted forward on {args.num_images} images, "
        f"batch {args.batch_size}")
  print(f"  1 CPU device:  {one['images_per_s']:7.0f} images/s")
  print(f"  2 CPU devices: {two['images_per_s']:7.0f} images/s  "
        f"({two['images_per_s'] / one['images_per_s']:.2f}x 1 device; the simulated devices "
        "share this machine's cores)")


if __name__ == "__main__":
  main()
