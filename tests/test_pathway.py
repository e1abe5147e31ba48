"""Hub-Pathway: noisy top-k routing, capacity dispatch, losses and the method.

k = M without noise is the dense gate-weighted mixture; overflow past a
model's capacity is dropped and counted, never mis-routed; the exploitation
loss reaches a head only through the inputs routed to it; 8 devices give the
loss of 1; the method runs through the suite on tiny models."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fusion import main
from fusion import methods
from fusion import routing
from fusion import sharding
from fusion import train
from fusion.methods import pathway

import tiny_models

B, DIMS, K = 16, (3, 5, 4), 6  # Batch, per-model feature dims, classes.
M = len(DIMS)


def _network(k, slots, weights=(1.0, 0.0, 0.0, 1.0)):
  encoders = tuple(pathway._identity for _ in DIMS)
  generator = routing.FeatureGate(2 * M)
  return pathway._network(encoders, generator, k, slots, K, weights), generator


def _batch(rng, n=B):
  return {"inputs": [rng.normal(size=(n, d)).astype(np.float32) for d in DIMS],
          "gate_input": rng.normal(size=(n, 7)).astype(np.float32),
          "label": rng.integers(0, K, n).astype(np.int32), "valid": np.ones(n, bool)}


def _params(generator, batch, rng):
  gen = generator.init(jax.random.PRNGKey(0), batch["gate_input"][:1])
  gen = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), gen)
  heads = [{"kernel": rng.normal(size=(d, K)).astype(np.float32),
            "bias": rng.normal(size=K).astype(np.float32)} for d in DIMS]
  return {"generator": gen, "heads": heads, "encoders": [{} for _ in DIMS]}


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_k_equal_m_without_noise_is_the_dense_weighted_mixture():
  rng = np.random.default_rng(0)
  (_, predict), generator = _network(k=M, slots=routing.capacity(M, B, M, 1.0))
  batch = _batch(rng)
  params = _params(generator, batch, rng)
  log_probs, routed, dropped = predict(params, batch)
  clean = np.asarray(generator.apply(params["generator"], batch["gate_input"]))[:, :M]
  gates = _softmax(clean)
  dense = sum(gates[:, [m]] * _softmax(batch["inputs"][m] @ params["heads"][m]["kernel"]
                                       + params["heads"][m]["bias"]) for m in range(M))
  np.testing.assert_allclose(np.exp(log_probs), dense, rtol=1e-5, atol=1e-6)
  assert int(dropped) == 0 and np.all(np.asarray(routed) == 1)


def test_top_k_gates_and_their_losses_match_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(9, 5)).astype(np.float32)
  gates, index = routing.top_k_gates(jnp.asarray(logits), 2)
  top = np.argsort(-logits, 1)[:, :2]
  expected = np.zeros_like(logits, np.float64)
  for b in range(9):
    expected[b, top[b]] = _softmax(logits[b, top[b]])
  np.testing.assert_allclose(gates, expected, rtol=1e-6)
  importance = expected.sum(0)
  assert float(routing.importance_loss(gates)) == pytest.approx(
      importance.var() / importance.mean() ** 2, rel=1e-5)
  # V-MoE's normalisation: the softmax over all M models, kept at the top k.
  gates_all, _ = routing.top_k_gates(jnp.asarray(logits), 2, "all")
  full = _softmax(logits)
  np.testing.assert_allclose(gates_all, np.where(expected > 0, full, 0.0), rtol=1e-6)
  with pytest.raises(ValueError, match=r"1 <= k <= M = 5 models; got k=6"):
    routing.top_k_gates(jnp.asarray(logits), 6)


def test_overflow_is_dropped_and_counted_in_batch_order():
  rng = np.random.default_rng(2)
  gates = np.zeros((12, 3), np.float32)
  choice = rng.integers(0, 3, 12)
  gates[np.arange(12), choice] = 1.0
  slots = 2
  dispatch, combine, dropped = routing.dispatch(jnp.asarray(gates), slots)
  dispatch = np.asarray(dispatch)
  expect_dropped = sum(max(0, np.sum(choice == m) - slots) for m in range(3))
  assert int(dropped) == expect_dropped > 0
  for m in range(3):
    routed = np.flatnonzero(choice == m)
    kept = routed[:slots]  # First come, first served.
    for c, b in enumerate(kept):
      assert dispatch[b, m, c] == 1 and dispatch[:, m, c].sum() == 1
    assert dispatch[routed[slots:], m].sum() == 0  # Dropped: no slot, no weight.
  assert dispatch.sum() == 12 - expect_dropped
  np.testing.assert_array_equal(np.asarray(combine), dispatch * gates[..., None])


def test_exploitation_gradients_reach_a_head_only_from_its_routed_inputs():
  rng = np.random.default_rng(3)
  (loss_fn, predict), generator = _network(k=1, slots=B, weights=(0.0, 0.0, 0.0, 1.0))
  batch = _batch(rng)
  params = _params(generator, batch, rng)
  _, routed, _ = predict(params, batch)
  routed = np.asarray(routed)

  def head_grads(b):
    return jax.grad(lambda p: loss_fn(p, b, None)[0])(params)["heads"]

  base = head_grads(batch)
  for m in range(M):
    assert routed[:, m].any() and not routed[:, m].all()
    changed = {**batch, "inputs": [x.copy() for x in batch["inputs"]]}
    changed["inputs"][m][routed[:, m] == 0] += 10.0  # Inputs not routed to m.
    after = head_grads(changed)
    np.testing.assert_allclose(after[m]["kernel"], base[m]["kernel"], atol=1e-6)
    changed["inputs"][m][routed[:, m] == 1] += 1.0  # Inputs routed to m.
    assert not np.allclose(head_grads(changed)[m]["kernel"], base[m]["kernel"])


def test_eight_devices_give_the_loss_of_one():
  rng = np.random.default_rng(4)
  (loss_fn, _), generator = _network(k=2, slots=routing.capacity(2, B, M, 1.25),
                                     weights=(1.0, 0.01, 0.01, 1.0))
  batch = _batch(rng)
  params = _params(generator, batch, rng)
  losses = []
  for mesh in (sharding.make_mesh(1), sharding.make_mesh(8)):
    state = train.train(loss_fn=loss_fn, params=params, batch_fn=lambda step: batch,
                        config={"optimizer": "sgd", "learning_rate": 0.1}, mesh=mesh,
                        num_steps=2, checkpoint=False, progress=False)
    losses.append(float(loss_fn(jax.device_get(state.params), batch, None)[0]))
  assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("k, capacity_factor, message", [
    (0, 1.0, r"1 <= k <= M = 3 models; got k=0"),
    (4, 1.0, r"1 <= k <= M = 3 models; got k=4"),
    (1, 0.0, r"capacity_factor=0.0 must be > 0"),
])
def test_bad_routing_settings_are_named(k, capacity_factor, message):
  config = pathway.default_config()
  config.capacity_factor = capacity_factor
  with pytest.raises(ValueError, match=message):
    pathway.check_config(config, 3, k)
  with pytest.raises(ValueError, match="at least 2"):
    pathway.check_config(pathway.default_config(), 1, 1)


@pytest.mark.parametrize("key, value, message", [
    ("eval_capacity_factor", 0.0, r"capacity_factor=0.0 must be > 0"),
    ("eval_capacity_factor", "many", r"eval_capacity_factor='many' must be None"),
    ("noise", "loud", r"noise='loud' is not one of \('learned', 'fixed'\)"),
    ("fixed_noise_std", 0.0, r"fixed_noise_std=0.0 must be None \(1 / M\) or a number > 0"),
])
def test_bad_inference_capacity_and_noise_are_named(key, value, message):
  config = pathway.default_config()
  config.noise = "fixed"
  config[key] = value
  with pytest.raises(ValueError, match=message):
    pathway.check_config(config, 3, 1)


def test_inference_capacity_defaults_to_the_whole_batch():
  config = pathway.default_config()
  assert config.eval_capacity_factor is None
  assert pathway._eval_slots(config, 1, 11) == config.batch_size
  config.eval_capacity_factor = 2.0  # As in training: ceil(k B f / M).
  assert pathway._eval_slots(config, 1, 11) == routing.capacity(1, 64, 11, 2.0) == 12


@pytest.mark.parametrize("k, normalisation", [(1, "all"), (2, "all"), (2, "top_k")])
def test_sparse_inference_equals_whole_batch_buffers_and_runs_k_models(
    k, normalisation, monkeypatch):
  """predict_sparse gives the buffered predict's output with buffers of the whole
  batch, and runs each model on exactly the inputs routed to it."""
  rng = np.random.default_rng(5)
  n = 2 * B + 5  # Not a multiple of the batch: the last batch is padded.
  config = pathway.default_config()
  config.generator, config.batch_size, config.gate_normalisation = "feature", B, normalisation
  encoders = tuple(pathway._identity for _ in DIMS)
  generator = pathway.generator_of(config, M)
  _, predict = pathway._network(encoders, generator, k, B, K, (1.0, 0.0, 0.0, 1.0),
                                normalisation)
  batch = _batch(rng, n)
  params = _params(generator, batch, rng)
  dense = pathway.predict_all(jax.jit(predict), params, batch["inputs"],
                              batch["gate_input"], batch["label"], B)
  rows_run = {m: 0 for m in range(M)}
  real_expert = pathway._expert

  def counting_expert(encode):
    fn = real_expert(encode)
    def run(enc_params, head, class_mask, x):
      m = next(i for i, h in enumerate(params["heads"]) if h is head)
      rows_run[m] += len(x)
      return fn(enc_params, head, class_mask, x)
    return run
  monkeypatch.setattr(pathway, "_expert", counting_expert)
  log_probs, routed, dropped, labels = pathway.predict_sparse(
      config, encoders, k, K, params, batch["inputs"], batch["gate_input"], batch["label"], B)
  np.testing.assert_allclose(np.exp(log_probs), np.exp(dense[0]), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(routed, dense[1])
  assert dropped == dense[2] == 0 and np.all(routed.sum(1) == k)
  for m in range(M):  # Its routed inputs, padded to whole batches; no other input.
    assert rows_run[m] == -(-int(routed[:, m].sum()) // B) * B


def test_pathway_runs_through_the_suite(tmp_path, monkeypatch):
  monkeypatch.setenv("FUSION_HOME", str(tmp_path / "home"))
  specs = [{"name": a, "path": tiny_models.save_tiny(a, tmp_path / a)}
           for a in ("resnet", "vit", "dinov2")]
  cfg = pathway.default_config()
  cfg.steps, cfg.frozen_steps, cfg.batch_size = 10, 30, 32
  config = ml_collections.ConfigDict(dict(
      job="suite", seed=0, tasks=("digits",), hub=specs, batch_size=64, num_devices=0,
      cache_dir="", predictions_dir="", methods=("pathway_k1", "pathway_frozen"),
      pathway=cfg))
  main.run(config, str(tmp_path / "work"))
  with open(tmp_path / "work" / "results.json") as f:
    rows = {r["method"]: r for r in json.load(f)["rows"]}
  k1, frozen = rows["pathway_k1"], rows["pathway_frozen"]
  assert k1["k"] == 1 and frozen["k"] == 2 and frozen["frozen"]
  # At the default inference capacity nothing is dropped: every input runs k models.
  assert k1["models_per_input"] == 1 and frozen["models_per_input"] == 2
  assert k1["test_dropped"] == frozen["test_dropped"] == 0
  assert np.shape(k1["routing_matrix"]) == (10, 3)
  assert k1["capacity"] == routing.capacity(1, 32, 3, cfg.capacity_factor) == 14
  # Cost grows with k: the k = 1 pathway runs fewer GFLOPs per image.
  assert k1["inference_gflops"] < frozen["inference_gflops"]
  assert os.path.exists(tmp_path / "work" / "plots" / "routing_pathway_k1_digits.png")


def _two_domain_task(rng, n):
  """Frozen 'models' [n, 4] of a 2-class task where the useful model differs by input:
  model 0 sees the label on domain 0 only, model 1 on domain 1 only, model 2 never;
  the gate input says the domain (plus noise)."""
  domain = rng.integers(0, 2, n)
  labels = rng.integers(0, 2, n).astype(np.int32)
  signal = (2.0 * labels - 1.0)[:, None] * np.array([[2.0, 0, 0, 0]])
  inputs = [rng.normal(size=(n, 4)) + signal * (domain == m)[:, None] for m in range(3)]
  gate = np.stack([2.0 * domain - 1.0, np.zeros(n)], 1) + 0.3 * rng.normal(size=(n, 2))
  return ([x.astype(np.float32) for x in inputs], gate.astype(np.float32), labels,
          domain)


def _padded(params, width):
  """params with heads padded to `width` classes (random values in the padding: the
  mask must make them irrelevant) and the class mask of `_init`."""
  rng = np.random.default_rng(9)
  heads = [{"kernel": np.concatenate([h["kernel"], rng.normal(size=(len(h["kernel"]),
                                                                    width - K))], 1),
            "bias": np.concatenate([h["bias"], rng.normal(size=width - K)])}
           for h in params["heads"]]
  heads = jax.tree.map(lambda x: x.astype(np.float32), heads)
  return {**params, "heads": heads,
          "class_mask": (np.arange(width) < K).astype(np.float32)}


def test_padded_heads_give_the_loss_gradients_and_predictions_of_unpadded_ones():
  """Heads padded to 16 classes with the class mask: the same loss, the same
  gradients of the real parameters and none of the padding, the same predictions,
  buffered and sparse (the dropped weight's uniform prediction over the real
  classes only)."""
  rng = np.random.default_rng(8)
  slots = routing.capacity(1, B, M, 0.5)  # Small: some weight is dropped.
  weights = (1.0, 0.01, 0.01, 1.0)
  encoders = tuple(pathway._identity for _ in DIMS)
  generator = routing.FeatureGate(2 * M)
  batch = _batch(rng)
  params = _params(generator, batch, rng)
  padded = _padded(params, 16)
  plain_loss, plain_predict = pathway._network(encoders, generator, 1, slots, K, weights)
  pad_loss, pad_predict = pathway._network(encoders, generator, 1, slots, 16, weights)
  key = jax.random.PRNGKey(1)
  (loss, _), grads = jax.value_and_grad(plain_loss, has_aux=True)(params, batch, key)
  (p_loss, _), p_grads = jax.value_and_grad(pad_loss, has_aux=True)(padded, batch, key)
  assert float(p_loss) == pytest.approx(float(loss), rel=1e-6)
  for g, pg in zip(grads["heads"], p_grads["heads"]):
    np.testing.assert_allclose(pg["kernel"][:, :K], g["kernel"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pg["bias"][:K], g["bias"], rtol=1e-5, atol=1e-7)
    assert not np.any(pg["kernel"][:, K:]) and not np.any(pg["bias"][K:])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               p_grads["generator"], grads["generator"])
  lp, routed, dropped, _ = pathway.predict_all(jax.jit(plain_predict), params, batch["inputs"],
                                               batch["gate_input"], batch["label"], B)
  p_lp, p_routed, p_dropped, _ = pathway.predict_all(
      jax.jit(pad_predict), padded, batch["inputs"], batch["gate_input"], batch["label"], B)
  assert dropped > 0 and p_dropped == dropped
  assert p_lp.shape == (B, K)
  np.testing.assert_allclose(np.exp(p_lp), np.exp(lp), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(p_lp).sum(1), 1.0, rtol=1e-5)
  config = pathway.default_config()
  config.generator, config.batch_size = "feature", B
  sparse = [pathway.predict_sparse(config, encoders, 1, K, p, batch["inputs"],
                                   batch["gate_input"], batch["label"], B)[0]
            for p in (params, padded)]
  np.testing.assert_allclose(np.exp(sparse[1]), np.exp(sparse[0]), rtol=1e-5, atol=1e-7)


def test_tasks_with_different_class_counts_share_one_compiled_step():
  config = pathway.default_config()
  encoders = tuple(pathway._identity for _ in DIMS)
  generator = pathway.generator_of(config, M)
  assert pathway.head_width(config, 6) == pathway.head_width(config, 16) == 16
  assert pathway.head_width(config, 17) == 32
  assert (pathway.networks(config, encoders, generator, 1, 6)[0]
          is pathway.networks(config, encoders, generator, 1, 10)[0])
  config.class_multiple = 1  # No padding: a step per class count.
  assert (pathway.networks(config, encoders, generator, 1, 6)[0]
          is not pathway.networks(config, encoders, generator, 1, 10)[0])
  config.class_multiple = 0
  with pytest.raises(ValueError, match=r"class_multiple=0 must be an integer >= 1"):
    pathway.check_config(config, 3, 1)


def test_default_router_sends_each_input_to_its_useful_model_and_drops_nothing():
  rng = np.random.default_rng(5)
  config = pathway.default_config()
  config.generator = "features"  # Any hub model name: a linear gate on given features.
  train_x, train_gate, train_y, _ = _two_domain_task(rng, 800)
  test_x, test_gate, test_y, test_domain = _two_domain_task(rng, 1000)
  encoders = tuple(pathway._identity for _ in range(3))
  params, predict = pathway.train_arrays(
      config, 1, 0.05, 300, 0, sharding.make_mesh(1), encoders, [{}, {}, {}], [{}, {}, {}],
      (4, 4, 4), 2, train_x, train_gate, train_y)
  log_probs, routed, dropped, _ = pathway.predict_all(
      jax.jit(predict), params, test_x, test_gate, test_y, int(config.batch_size))
  # The default inference capacity is the whole batch: every input runs its k = 1 model.
  assert dropped == 0 and np.all(routed.sum(1) == 1)
  for m in (0, 1):  # Each domain mostly to its own model.
    assert routed[test_domain == m, m].mean() > 0.8, routed[test_domain == m].mean(0)
  # One model alone is at chance on half the inputs (75% at best); routing beats it.
  assert (log_probs.argmax(1) == test_y).mean() > 0.85


def test_k_against_the_hub_is_checked_before_any_unit():
  config = pathway.default_config()
  config.k = 4
  three = [None] * 3  # Only the hub's size counts.
  for name in ("pathway", "pathway_frozen"):
    with pytest.raises(ValueError, match=r"1 <= k <= M = 3 models; got k=4"):
      methods.get(name).check_hub(config, three)
  methods.get("pathway_k1").check_hub(config, three)  # k = 1 whatever config.k says.
  with pytest.raises(ValueError, match="needs at least 2; got 1"):
    methods.get("pathway_k1").check_hub(config, [None])


def test_models_narrow_the_routed_hub_and_bad_names_are_named():
  from types import SimpleNamespace
  hub_models = [SimpleNamespace(name=n) for n in ("a", "b", "c", "d")]
  config = pathway.default_config()
  assert pathway.routed_models(config, hub_models) == hub_models  # (): the whole hub.
  config.exclude_models = ("c", "a")
  assert [b.name for b in pathway.routed_models(config, hub_models)] == ["b", "d"]
  config.k = 3  # Against the 2 routed models, not the hub's 4.
  with pytest.raises(ValueError, match=r"1 <= k <= M = 2 models; got k=3"):
    methods.get("pathway").check_hub(config, hub_models)
  config.exclude_models = ("b", "nope")
  with pytest.raises(ValueError, match=r"exclude_models names \['nope'\], which are not in"):
    methods.get("pathway_k1").check_hub(config, hub_models)
