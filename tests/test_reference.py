"""The select job's reference CNN really learns its task: on val200 of digits it
beats both chance and the network it started from by a wide margin, and its
representation moved away from that of its init (what a trainer that does not
update, e.g. learning rate 0, would return)."""
import jax
import numpy as np
import pytest

from fusion.data import pipeline
from fusion.data import synthetic
from fusion.data import tasks
from fusion.selection import reference

TASK = tasks.get("digits")
SPLITS = {"train800": slice(0, 800), "val200": slice(800, 1000)}  # As synthetic.Digits splits.


@pytest.fixture(scope="module")
def digits():
  """Digits as the pipeline would serve them, without preparing TFDS data."""
  images, labels = synthetic.digits_arrays()
  images = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  return {name: (images[s], labels[s].astype(np.int32)) for name, s in SPLITS.items()}


@pytest.fixture(scope="module")
def trained(digits):
  def load_split(task, split, *, resolution, mean, std, **kwargs):
    assert task is TASK and resolution == 32 and mean == std == reference.MEAN, kwargs
    return digits[split]

  cfg = reference.default_config()
  cfg.steps = 100  # Of 300 by default: 0.8 on val200, far above chance.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "load_split", load_split)
    return cfg, reference.train_reference(TASK, cfg, seed=0)


@pytest.fixture(scope="module")
def initial(trained, digits):
  """(representation, logits) on val200 of the network before any update: its
  init from the same seed, as `train_reference` draws it."""
  cfg, _ = trained
  model = reference.SmallCNN(TASK.num_classes, width=cfg.width, hidden=cfg.hidden)
  params = jax.jit(model.init)(jax.random.key(0), digits["train800"][0][:1])
  return tuple(map(np.asarray, jax.jit(model.apply)(params, digits["val200"][0])))


def test_reference_cnn_beats_chance_and_its_init(trained, initial, digits):
  _, ref = trained
  labels = digits["val200"][1]
  np.testing.assert_array_equal(ref.labels, labels)
  _, logits = initial
  untrained = np.mean(logits.argmax(-1) == labels)
  assert untrained < 0.25  # Ten classes: an untrained CNN is near chance.
  assert ref.probe_accuracy > 0.6
  assert ref.probe_accuracy > untrained + 0.4


def test_reference_representation_moved_from_init(trained, initial):
  cfg, ref = trained
  representation, _ = initial
  assert ref.features.shape == representation.shape == (200, cfg.hidden)
  change = np.abs(ref.features - representation).mean() / np.abs(representation).mean()
  assert change > 0.2
