"""TD(lambda) returns against a plain backward loop of Dreamer 4's recursion and its closed forms."""
import numpy as np
import pytest

from jaxai.rl import returns


def reference_returns(rewards, continues, values, gamma, lam):
  """R_t = r_t + gamma c_t ((1 - lam) v_{t+1} + lam R_{t+1}), R_T = v_T, one trajectory at a time."""
  batch, steps = rewards.shape
  out = np.zeros((batch, steps))
  for b in range(batch):
    next_return = values[b, steps]
    for t in reversed(range(steps)):
      next_return = rewards[b, t] + gamma * continues[b, t] * (
          (1 - lam) * values[b, t + 1] + lam * next_return)
      out[b, t] = next_return
  return out


def random_trajectories(seed, batch=3, steps=6):
  rng = np.random.default_rng(seed)
  continues = (rng.uniform(size=(batch, steps)) > 0.2).astype(np.float64)
  continues[0, 2] = 0.0  # an episode end mid-trajectory
  continues[1] = rng.uniform(size=steps)  # soft continuation probabilities
  return rng.normal(size=(batch, steps)), continues, rng.normal(size=(batch, steps + 1))


@pytest.mark.parametrize("gamma, lam", [(0.997, 0.95), (0.9, 0.5), (0.8, 0.0), (0.99, 1.0)])
def test_against_the_recursion(gamma, lam):
  rewards, continues, values = random_trajectories(0)
  got = returns.lambda_returns(rewards, continues, values, gamma=gamma, lambda_=lam)
  np.testing.assert_allclose(got, reference_returns(rewards, continues, values, gamma, lam),
                             rtol=1e-5, atol=1e-5)


def test_closed_forms_and_defaults():
  rewards, continues, values = random_trajectories(1)
  steps = rewards.shape[1]
  # lambda = 0: one-step targets r_t + gamma c_t v_{t+1}.
  np.testing.assert_allclose(returns.lambda_returns(rewards, continues, values, gamma=0.9, lambda_=0.0),
                             rewards + 0.9 * continues * values[:, 1:], rtol=1e-5, atol=1e-6)
  # lambda = 1, never terminal: the discounted rewards to the end, then gamma^(T - t) v_T.
  ones = np.ones_like(continues)
  want = [sum(0.9 ** (k - t) * rewards[:, k] for k in range(t, steps)) + 0.9 ** (steps - t) * values[:, -1]
          for t in range(steps)]
  np.testing.assert_allclose(returns.lambda_returns(rewards, ones, values, gamma=0.9, lambda_=1.0),
                             np.stack(want, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns.lambda_returns(rewards, continues, values),
                             reference_returns(rewards, continues, values, 0.997, 0.95), rtol=1e-5, atol=1e-5)


def test_values_need_one_more_step():
  rewards, continues, values = random_trajectories(2)
  with pytest.raises(ValueError, match=r"values \[B, T \+ 1\]"):
    returns.lambda_returns(rewards, continues, values[:, 1:])
