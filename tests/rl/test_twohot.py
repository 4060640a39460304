"""Symexp two-hot heads against hand computations of the encoding, the expectation and the cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxai.rl import twohot

SCALARS = np.array([-1e8, -12345.0, -300.0, -3.7, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 42.0, 1e5, 4e8])


def hand_two_hot(scalars, num_bins=255, low=-20.0, high=20.0):
  """Mass on the two bins around symlog(x), split linearly by distance (exact, float64)."""
  bins = np.linspace(low, high, num_bins)
  width = bins[1] - bins[0]
  y = np.clip(np.sign(scalars) * np.log1p(np.abs(scalars)), low, high)
  lower = np.minimum(np.floor((y - low) / width).astype(int), num_bins - 2)
  upper_weight = (y - bins[lower]) / width
  probs = np.zeros(scalars.shape + (num_bins,))
  np.put_along_axis(probs, lower[..., None], (1 - upper_weight)[..., None], -1)
  np.put_along_axis(probs, lower[..., None] + 1, upper_weight[..., None], -1)
  return probs


def test_encode_puts_hand_weights_on_the_two_neighbouring_bins():
  probs = np.asarray(twohot.encode(SCALARS))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  assert np.all((probs > 1e-6).sum(-1) <= 2)
  np.testing.assert_allclose(probs, hand_two_hot(SCALARS), atol=1e-4)  # rlax's 1e-5 eps: <= 7e-5
  np.testing.assert_allclose(probs[SCALARS == 0.0][0, 127], 1.0)  # 0 is the middle bin
  # Out of range: clipped to the last bins.
  np.testing.assert_allclose(np.asarray(twohot.encode(np.array([-1e12, 1e12])))[:, [0, -1]], np.eye(2))


def test_encode_then_decode_round_trips():
  scalars = np.concatenate([SCALARS, np.random.default_rng(0).normal(size=50) * 100])
  decoded = twohot.decode(jnp.log(twohot.encode(scalars)))  # log 0 = -inf: softmax gives back probs
  np.testing.assert_allclose(decoded, scalars, rtol=3e-5, atol=2e-5)
  # A coarser, narrower head keeps its own range.
  small = np.array([-100.0, -2.5, 0.0, 0.3, 7.0, 140.0])
  decoded = twohot.decode(jnp.log(twohot.encode(small, num_bins=41, low=-5.0, high=5.0)), low=-5.0, high=5.0)
  np.testing.assert_allclose(decoded, small, rtol=1e-4, atol=1e-4)


def test_decode_and_loss_against_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 255)) * 3
  targets = rng.normal(size=(2, 3)) * 50
  bins = np.linspace(-20.0, 20.0, 255)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected_bin = (probs * bins).sum(-1)
  np.testing.assert_allclose(twohot.decode(jnp.asarray(logits)),
                             np.sign(expected_bin) * np.expm1(np.abs(expected_bin)), rtol=1e-4, atol=1e-5)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(hand_two_hot(targets) * log_probs).sum(-1)
  np.testing.assert_allclose(twohot.loss(jnp.asarray(logits), jnp.asarray(targets)), want, rtol=1e-4)
  grad = jax.grad(lambda t: twohot.loss(jnp.asarray(logits), t).sum())(jnp.asarray(targets))
  np.testing.assert_array_equal(grad, 0.0)  # targets are not differentiated
