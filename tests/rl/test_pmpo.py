"""PMPO (Dreamer 4, Eq. 11) against a per-state numpy transcription of the formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxai.rl import pmpo

ACTIONS = 4


def reference_pmpo(logits, actions, advantages, prior_logits, mask, alpha=0.5, beta=0.3):
  """Eq. 11 state by state: log-softmax and KL by hand, sets D+ / D- by the advantage's sign."""
  positive, negative, kls, entropies = [], [], [], []
  for l, a, adv, q, m in zip(logits.reshape(-1, ACTIONS), actions.reshape(-1), advantages.reshape(-1),
                             prior_logits.reshape(-1, ACTIONS), mask.reshape(-1)):
    if not m:
      continue
    log_pi = l - np.log(np.sum(np.exp(l)))
    log_prior = q - np.log(np.sum(np.exp(q)))
    (positive if adv >= 0 else negative).append(log_pi[a])
    kls.append(np.sum(np.exp(log_pi) * (log_pi - log_prior)))
    entropies.append(-np.sum(np.exp(log_pi) * log_pi))
  mean = lambda xs: np.sum(xs) / max(len(xs), 1)
  loss = (1 - alpha) * mean(negative) - alpha * mean(positive) + beta * mean(kls)
  return loss, {"positive_share": len(positive) / len(kls), "entropy": mean(entropies),
                "prior_kl": mean(kls)}


def inputs(seed, shape=(3, 5)):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (ACTIONS,))
  prior_logits = rng.normal(size=shape + (ACTIONS,))
  actions = rng.integers(0, ACTIONS, shape)
  advantages = rng.normal(size=shape)
  return logits, actions, advantages, prior_logits


def check(logits, actions, advantages, prior_logits, mask, **weights):
  got_loss, got_metrics = pmpo.pmpo_loss(*map(jnp.asarray, (logits, actions, advantages, prior_logits)),
                                         None if mask is None else jnp.asarray(mask), **weights)
  want_loss, want_metrics = reference_pmpo(logits, actions, advantages, prior_logits,
                                           np.ones(actions.shape) if mask is None else mask, **weights)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
  for name, want in want_metrics.items():
    np.testing.assert_allclose(got_metrics[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_mixed_signs_and_weights():
  logits, actions, advantages, prior_logits = inputs(0)
  advantages[0, 0] = 0.0  # a zero advantage belongs to D+
  check(logits, actions, advantages, prior_logits, None)
  check(logits, actions, advantages, prior_logits, None, alpha=0.8, beta=0.05)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["empty_D-", "empty_D+"])
def test_an_empty_set_contributes_nothing(sign):
  logits, actions, advantages, prior_logits = inputs(1)
  advantages = sign * np.abs(advantages)
  check(logits, actions, advantages, prior_logits, None)
  grad = jax.grad(lambda l: pmpo.pmpo_loss(l, actions, advantages, prior_logits)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(grad))


def test_padding_enters_no_count():
  logits, actions, advantages, prior_logits = inputs(2)
  mask = np.ones(actions.shape, bool)
  mask[0, 2:] = mask[2, 1:] = False
  actions[~mask] = -1  # padding may hold any action; it must not leak a -inf
  advantages[~mask] = 5.0  # padding with a positive advantage must not grow |D+|
  check(logits, actions, advantages, prior_logits, mask)
  check(logits, actions, advantages, prior_logits, mask.astype(np.float32))
  # Only D- left among the real states: the D+ term is 0, still no NaN.
  check(logits, actions, -np.abs(advantages), prior_logits, mask)


def plain_jnp_pmpo(logits, actions, advantages, prior_logits, mask, alpha=0.5, beta=0.3):
  """Eq. 11 in jnp by a loop over the real states, for jax.grad (no distrax, no masking tricks)."""
  positive, negative, kls = [], [], []
  for i in np.ndindex(actions.shape):
    if not mask[i]:
      continue
    log_pi = logits[i] - jnp.log(jnp.sum(jnp.exp(logits[i])))
    log_prior = prior_logits[i] - jnp.log(jnp.sum(jnp.exp(prior_logits[i])))
    (positive if advantages[i] >= 0 else negative).append(log_pi[actions[i]])
    kls.append(jnp.sum(jnp.exp(log_pi) * (log_pi - log_prior)))
  mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
  return (1 - alpha) * mean(negative) - alpha * mean(positive) + beta * mean(kls)


def test_gradients_reach_the_policy_only():
  logits, actions, advantages, prior_logits = inputs(3, shape=(2, 4))
  mask = np.ones(actions.shape, bool)
  mask[1, 3] = False
  args = tuple(map(jnp.asarray, (logits, actions, advantages, prior_logits, mask)))
  grads = jax.grad(lambda *a: pmpo.pmpo_loss(*a, alpha=0.7, beta=0.3)[0], argnums=(0, 2, 3))(*args)
  want = jax.grad(plain_jnp_pmpo)(jnp.asarray(logits), actions, advantages, jnp.asarray(prior_logits),
                                  mask, alpha=0.7, beta=0.3)
  np.testing.assert_allclose(grads[0], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[0][1, 3], 0.0)  # padding gets no gradient
  np.testing.assert_array_equal(grads[1], 0.0)  # only the advantages' sign is read
  np.testing.assert_array_equal(grads[2], 0.0)  # the prior is frozen
