"""Only fusion/data imports TensorFlow / TFDS: the rest imports and runs where
they are absent (the lent GPU machine has neither). A child interpreter makes
them unimportable before anything is imported, imports MODULES, and runs the
trainer, a jitted tiny HF model and an estimator on numpy arrays."""
import os
import subprocess
import sys
import textwrap

# Everything outside fusion/data that must work without TensorFlow; add new
# packages here.
MODULES = ("fusion.hub", "fusion.features", "fusion.train", "fusion.metrics",
           "fusion.report", "fusion.sharding", "fusion.selection", "fusion.selection.job",
           "fusion.offline_hub", "fusion.main", "fusion.io", "fusion.predictions",
           "fusion.experiment", "fusion.methods", "fusion.suite")
BLOCKED = ("tensorflow", "tensorflow_datasets")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)

CHILD = textwrap.dedent("""
    import importlib, sys
    BLOCKED, MODULES, TESTS_DIR, WORKDIR = sys.argv[1:5]
    BLOCKED, MODULES = BLOCKED.split(","), MODULES.split(",")

    class Absent:
      \"\"\"Installed first: any import of a blocked package fails as if not installed.\"\"\"
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

    sys.meta_path.insert(0, Absent())
    try:
      import tensorflow
    except ImportError:
      pass
    else:
      sys.exit("the blocker does not block")

    for name in MODULES:
      importlib.import_module(name)

    import jax, jax.numpy as jnp, numpy as np
    from fusion import hub, metrics, selection, sharding, train
    sys.path.insert(0, TESTS_DIR)
    import tiny_models

    mesh = sharding.make_mesh(1)
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    def loss_fn(params, batch, rng):
      return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}
    state = train.train(loss_fn=loss_fn, params={"w": np.zeros(3, np.float32)},
                        batch_fn=lambda step: {"x": x, "y": y}, config={"learning_rate": 0.1},
                        mesh=mesh, num_steps=3, checkpoint=False, progress=False,
                        workdir=WORKDIR + "/train", log_every=1)
    assert int(state.step) == 3 and np.abs(np.asarray(state.params["w"])).sum() > 0
    import os  # The TensorBoard events too are written without TensorFlow.
    assert os.listdir(WORKDIR + "/train/tensorboard/train")

    backbone = hub.load(tiny_models.save_tiny("vit", WORKDIR + "/vit"))
    images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    feats = np.asarray(jax.jit(backbone.features)(backbone.params, images))
    assert feats.shape == (4, backbone.feature_dim) and np.isfinite(feats).all()
    labels = np.array([0, 1, 0, 1])
    assert 0 <= selection.get("knn")(feats, labels) <= 1
    assert 0 <= metrics.accuracy(feats[:, :2], labels) <= 1

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ran without", BLOCKED, "after importing", len(MODULES), "modules")
""")


def test_everything_outside_fusion_data_runs_without_tensorflow(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "", "USE_TF": "0"}
  result = subprocess.run(
      [sys.executable, "-c", CHILD, ",".join(BLOCKED), ",".join(MODULES), TESTS_DIR,
       str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ran without" in result.stdout


def test_the_blocker_blocks_what_fusion_data_needs(tmp_path):
  """The same child fails as soon as a module that needs TensorFlow is listed."""
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "", "USE_TF": "0"}
  result = subprocess.run(
      [sys.executable, "-c", CHILD, ",".join(BLOCKED), "fusion.data.tasks", TESTS_DIR,
       str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "No module named 'tensorflow' (blocked)" in result.stderr
