"""Stable-max cross-entropy and the halt loss against plain numpy formulas.

(Named test_trm_losses, not test_losses: tests/rl has a test_losses.py, and pytest's default
import mode refuses two test modules of one basename.)
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxai.trm import losses


def numpy_stablemax_nll(logits, labels):
  """-log p_label with s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), p = s / sum s, in float64."""
  x = np.asarray(logits, np.float64)
  s = np.where(x >= 0, x + 1, 1 / (1 - np.minimum(x, 0)))
  p = s / s.sum(-1, keepdims=True)
  return -np.log(np.take_along_axis(p, np.asarray(labels)[..., None], -1)[..., 0])


def test_stablemax_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 10)) * np.array([0.1, 3.0, 30.0])[:, None, None]
  labels = rng.integers(10, size=(3, 7))
  got = jax.jit(losses.stablemax_cross_entropy)(logits.astype(np.float32), labels)
  np.testing.assert_allclose(got, numpy_stablemax_nll(logits, labels), rtol=1e-5, atol=1e-6)


def test_answer_loss_is_the_mean_over_counted_tokens():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32)
  labels = rng.integers(4, size=(2, 5))
  labels[0, 1:3] = losses.IGNORE_LABEL
  nll = numpy_stablemax_nll(logits, np.where(labels < 0, 0, labels))
  expected = [nll[0, [0, 3, 4]].mean(), nll[1].mean()]
  np.testing.assert_allclose(jax.jit(losses.answer_loss)(logits, labels), expected, rtol=1e-5)


def test_stablemax_gradient_is_finite_and_right_for_large_logits():
  logits = np.array([[1e30, -1e30, 0.0, 1e4], [-1e4, 3.0, -2.0, 0.5]], np.float32)
  labels = np.array([1, 2])
  grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(losses.stablemax_cross_entropy(x, labels))))(logits))
  assert np.all(np.isfinite(grad))
  # Moderate row against the analytic gradient: d/dx_i = s'(x_i) / sum s - [i = label] s'(x_i) / s(x_i).
  x = np.array([-1e4, 3.0, -2.0, 0.5])
  s = np.where(x >= 0, x + 1, 1 / (1 - np.minimum(x, 0)))
  ds = np.where(x >= 0, 1.0, 1 / (1 - np.minimum(x, 0)) ** 2)
  expected = ds / s.sum()
  expected[2] -= ds[2] / s[2]
  np.testing.assert_allclose(grad[1], expected, rtol=1e-5, atol=1e-9)


def test_halt_target_is_exactly_right():
  labels = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, losses.IGNORE_LABEL, 4]])
  predicted = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 7, 4]])  # row 2 errs only where ignored
  logits = np.eye(8, dtype=np.float32)[predicted] * 5.0
  np.testing.assert_array_equal(jax.jit(losses.exactly_right)(logits, labels), [True, False, True])


def test_halt_loss_is_binary_cross_entropy():
  logit = np.array([-5.0, -5.0, 2.0, 0.0])
  target = np.array([True, False, True, False])
  sigmoid = 1 / (1 + np.exp(-logit))
  expected = -(target * np.log(sigmoid) + (1 - target) * np.log(1 - sigmoid))
  np.testing.assert_allclose(jax.jit(losses.halt_loss)(logit.astype(np.float32), target), expected, rtol=1e-5)
