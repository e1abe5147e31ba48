"""Multi-host: two processes joined by `jax.distributed` on localhost (CPU, gloo
collectives, one device each) fine-tune a tiny ResNet for two steps through
`fusion.train.train` on one global mesh; their losses and weights equal a
single process's to 1e-5.

Run as a script, this file is one worker process (see `_worker`).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

STEPS = 2
BATCH = 8  # Global; 4 examples per process.
NUM_CLASSES = 5
TIMEOUT_S = 150  # Per worker, start to finish.
# What the worker prints when it reaches each stage; the failure of a stage
# before "collective" means jax cannot run multi-process on CPU here.
STAGES = ("initialized", "collective", "trained")


def _setup(model_dir: str):
  """(loss_fn, initial params, trainable mask, batch_fn, optimizer config)."""
  from fusion import hub
  from fusion.methods import finetune
  backbone = hub.load({"name": "resnet", "path": model_dir})
  rng = np.random.default_rng(0)
  # A random head: with finetune's zero head the first loss is log(classes)
  # whatever the backbone computes.
  head = {"kernel": rng.normal(0, 0.5, (backbone.feature_dim, NUM_CLASSES)).astype(np.float32),
          "bias": np.zeros(NUM_CLASSES, np.float32)}
  params = {"backbone": backbone.params, "head": head}
  mask = {"backbone": finetune.trainable_mask(backbone.params, "all"), "head": True}

  def batch_fn(step):  # The same global batch in every process.
    r = np.random.default_rng([1, step])
    return {"image": r.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
            "label": r.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
            "mask": np.ones(BATCH, bool)}

  config = {"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9}
  return finetune._loss_fn(backbone), params, mask, batch_fn, config


def _fine_tune(model_dir: str, mesh, workdir: str):
  """Losses of each step (from metrics.jsonl of process 0) and the final params."""
  from fusion import train
  loss_fn, params, mask, batch_fn, config = _setup(model_dir)
  state = train.train(loss_fn=loss_fn, params=params, batch_fn=batch_fn, config=config,
                      mesh=mesh, num_steps=STEPS, workdir=workdir, trainable=mask,
                      checkpoint=False, log_every=1, progress=False)
  # Params are replicated: every process holds a whole copy.
  import jax
  final = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), state.params)
  losses = None
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      losses = [json.loads(line)["loss"] for line in f]
  return losses, final


def _flat(tree) -> dict[str, np.ndarray]:
  from flax import traverse_util
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _worker(args) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{args.port}"
  jax.distributed.initialize(coordinator_address=address, num_processes=args.num_processes,
                             process_id=args.process_id, coordinator_bind_address=address,
                             initialization_timeout=60, heartbeat_timeout_seconds=30,
                             shutdown_timeout_seconds=30)
  print("STAGE initialized", jax.process_index(), jax.process_count(),
        len(jax.local_devices()), len(jax.devices()), flush=True)
  from fusion import sharding
  mesh = sharding.make_mesh()  # Both processes' devices.
  # A cross-process reduction first: the sum of each process's index.
  ones = jax.make_array_from_callback(
      (len(jax.devices()),), sharding.batch_sharded(mesh),
      lambda index: np.arange(len(jax.devices()), dtype=np.float32)[index])
  total = jax.jit(lambda x: x.sum(), out_shardings=sharding.replicated(mesh))(ones)
  print("STAGE collective", float(total.addressable_shards[0].data), flush=True)
  losses, final = _fine_tune(args.model_dir, mesh, args.workdir)
  np.savez(os.path.join(args.workdir, "params.npz"), **_flat(final))
  with open(os.path.join(args.workdir, "result.json"), "w") as f:
    json.dump({"losses": losses, "devices": len(jax.devices()),
               "process_index": jax.process_index()}, f)
  print("STAGE trained", losses, flush=True)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(model_dir: str, tmp_path, num_processes: int = 2):
  """Starts the workers and waits (bounded); always kills them. -> [(rc, output)]."""
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1",
         # One CPU device per process (conftest asks for 8 in this one).
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": os.pathsep.join(
             [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
              os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)}
  procs = []
  try:
    for i in range(num_processes):
      workdir = tmp_path / f"process{i}"
      workdir.mkdir()
      log = open(tmp_path / f"process{i}.log", "w")
      procs.append((subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--process_id", str(i),
           "--num_processes", str(num_processes), "--port", str(port),
           "--model_dir", model_dir, "--workdir", str(workdir)],
          env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    for proc, _ in procs:
      try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        break
  finally:
    killed = []
    for i, (proc, log) in enumerate(procs):
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
        killed.append(i)
      log.close()
  results = []
  for i, (proc, _) in enumerate(procs):
    output = (tmp_path / f"process{i}.log").read_text()
    if i in killed:
      output += f"\n[killed by the test after {TIMEOUT_S} s]"
    results.append((proc.returncode, output))
  return results


def test_two_processes_fine_tune_like_one(tmp_path):
  import pytest

  import tiny_models
  from fusion import sharding

  model_dir = tiny_models.save_tiny("resnet", tmp_path / "resnet")
  results = _run_workers(model_dir, tmp_path)
  for i, (rc, output) in enumerate(results):
    reached = [s for s in STAGES if f"STAGE {s}" in output]
    if rc != 0 and "collective" not in reached:
      pytest.skip(f"jax.distributed with gloo CPU collectives did not run here: process "
                  f"{i} exited with {rc} before a cross-process reduction (stages "
                  f"reached: {reached}). Its output ends:\n{output[-1500:]}")
    assert rc == 0, f"process {i} failed after its stages {reached}:\n{output[-3000:]}"
    assert f"STAGE collective {float(sum(range(2)))}" in output, output[-2000:]
  with open(tmp_path / "process0" / "result.json") as f:
    first = json.load(f)
  assert first["devices"] == 2 and first["process_index"] == 0
  assert len(first["losses"]) == STEPS

  # The same two steps in this process, on one device.
  losses, final = _fine_tune(model_dir, sharding.make_mesh(1), str(tmp_path / "single"))
  np.testing.assert_allclose(first["losses"], losses, rtol=0, atol=1e-5)
  assert losses[1] != losses[0]  # The first update changed the second loss.
  want = _flat(final)
  for i in range(2):
    with np.load(tmp_path / f"process{i}" / "params.npz") as got:
      assert set(got.files) == set(want)
      for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--workdir", required=True)
  _worker(parser.parse_args())
