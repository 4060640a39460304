"""Advantage estimators, pure functions registered by name: ``rewards [G, N] -> advantages [G, N]``
for G groups of N samples (one group: [1, N]). The baseline of each is computed without the
sample's gradient (rewards carry none)."""
import jax.numpy as jnp

from jaxai.rl import registry

ESTIMATORS = registry.Registry("advantage estimator")
register, get = ESTIMATORS.register, ESTIMATORS.get


@register("reward")
def reward(rewards):
  """The reward itself (no baseline)."""
  return rewards


@register("group_mean")
def group_mean(rewards):
  """Reward minus the mean reward of its group: the simplest variance-reducing baseline."""
  return rewards - jnp.mean(rewards, axis=-1, keepdims=True)


@register("leave_one_out")
def leave_one_out(rewards):
  """Reward minus the mean of the other samples of its group (RLOO): an unbiased baseline."""
  n = rewards.shape[-1]
  return (rewards - jnp.mean(rewards, axis=-1, keepdims=True)) * n / (n - 1)
