"""The RL losses and advantage estimators of jaxai/rl against hand transcriptions of their formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxai.rl import advantages, losses

ACTIONS = 5


def test_reinforce_and_estimators_against_their_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, ACTIONS)).astype(np.float32)
  actions = rng.integers(0, ACTIONS, (2, 3))
  adv = rng.normal(size=(2, 3)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  chosen = np.take_along_axis(log_p, actions[..., None], -1)[..., 0]
  value, _ = losses.get("reinforce")(jnp.asarray(logits), jnp.asarray(actions), jnp.asarray(adv),
                                     jnp.asarray(mask))
  np.testing.assert_allclose(value, -(chosen * adv * mask).sum() / mask.sum(), rtol=1e-5)
  grad = jax.grad(lambda a: losses.get("reinforce")(jnp.asarray(logits), jnp.asarray(actions), a,
                                                    jnp.asarray(mask))[0])(jnp.asarray(adv))
  np.testing.assert_array_equal(grad, 0.0)  # advantages are not differentiated
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
  np.testing.assert_allclose(advantages.get("group_mean")(rewards), rewards - rewards.mean(1, keepdims=True))
  others = (rewards.sum(1, keepdims=True) - rewards) / 3
  np.testing.assert_allclose(advantages.get("leave_one_out")(rewards), rewards - others, rtol=1e-6)
  with pytest.raises(ValueError, match="known: group_mean, leave_one_out, reward"):
    advantages.get("grpo")
