"""Gates: softmax weights that sum to 1 per input, uniform at init, the
thumbnail CNN's shapes and its sensitivity to the thumbnail."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion import routing


def test_dense_gate_weights_sum_to_one_per_input_and_match_numpy():
  logits = np.random.default_rng(0).normal(size=(7, 5)) * 10
  weights = np.asarray(routing.dense_gate(jnp.asarray(logits, jnp.float32)))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(weights, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert (weights >= 0).all()
  with pytest.raises(ValueError, match="temperature must be > 0"):
    routing.dense_gate(jnp.zeros((1, 2)), temperature=0.0)


def test_thumbnail_cnn_starts_uniform_and_then_depends_on_the_thumbnail(size=16):
  gate = routing.ThumbnailCNN(num_models=3, widths=(4, 8))
  thumbs = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (6, size, size, 3)),
                       jnp.float32)
  params = gate.init(jax.random.PRNGKey(0), thumbs)
  weights = routing.dense_gate(gate.apply(params, thumbs))
  assert weights.shape == (6, 3)
  np.testing.assert_allclose(weights, 1 / 3, atol=1e-7)  # Zero-initialised output layer.
  # A non-zero output layer: weights differ between thumbnails, still sum to 1.
  params = jax.tree.map(lambda x: x, params)
  out = params["params"]["out"]
  out["kernel"] = jnp.asarray(np.random.default_rng(2).normal(size=out["kernel"].shape),
                              jnp.float32)
  weights = np.asarray(routing.dense_gate(gate.apply(params, thumbs)))
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert np.ptp(weights[:, 0]) > 1e-3
  with pytest.raises(ValueError, match=r"thumbnails \[B, t, t, 3\]"):
    gate.apply(params, thumbs[..., :1])


def test_feature_gate_linear_and_mlp():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 12)), jnp.float32)
  for hidden in (0, 8):
    gate = routing.FeatureGate(num_models=4, hidden=hidden)
    params = gate.init(jax.random.PRNGKey(0), x)
    assert ("hidden" in params["params"]) == bool(hidden)
    weights = routing.dense_gate(gate.apply(params, x))
    np.testing.assert_allclose(weights, 0.25, atol=1e-7)
  with pytest.raises(ValueError, match="num_models >= 1"):
    routing.FeatureGate(num_models=0).init(jax.random.PRNGKey(0), x)


def _normal_cdf(x):
  from math import erf, sqrt
  return 0.5 * (1.0 + np.vectorize(erf)(np.asarray(x, np.float64) / sqrt(2.0)))


@pytest.mark.parametrize("noise_std", ["learned", 0.25])
def test_noisy_logits_and_load_loss_match_numpy(noise_std):
  rng = np.random.default_rng(4)
  clean = rng.normal(size=(9, 5)).astype(np.float32)
  raw = rng.normal(size=(9, 5)).astype(np.float32)
  std = (routing.learned_noise_std(jnp.asarray(raw)) if noise_std == "learned"
         else noise_std)
  key = jax.random.PRNGKey(3)
  noisy, std_out = routing.noisy_logits(jnp.asarray(clean), std, key)
  want_std = (np.log1p(np.exp(raw.astype(np.float64))) + 1e-2 if noise_std == "learned"
              else np.full(clean.shape, noise_std))
  eps = np.asarray(jax.random.normal(key, clean.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(std_out, want_std, rtol=1e-5)
  np.testing.assert_allclose(noisy, clean + eps * want_std, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(routing.noisy_logits(jnp.asarray(clean), std, None)[0], clean)
  # Shazeer et al.'s smooth load, k = 2: P(model in the top k) under fresh noise of its own.
  k, noisy64 = 2, np.asarray(noisy, np.float64)
  prob = np.zeros_like(noisy64)
  for b in range(len(clean)):
    for m in range(clean.shape[1]):
      kth_other = np.sort(np.delete(noisy64[b], m))[::-1][k - 1]
      prob[b, m] = _normal_cdf((clean[b, m] - kth_other) / want_std[b, m])
  load = prob.sum(0)
  want = load.var() / load.mean() ** 2
  got = routing.load_loss(jnp.asarray(clean), noisy, std_out, k)
  assert float(got) == pytest.approx(want, rel=1e-4)
