"""Policy losses, pure functions registered by name: ``(logits, actions, advantages, mask) ->
(loss, metrics)`` with logits [..., A], actions, advantages and mask [...] (mask 0 for padding).

REINFORCE (Williams, 1992) is rlax's policy-gradient loss, -log pi(a) * sg(A); rlax averages over
every entry, padding included, so it is rescaled here to the mean over the unmasked ones: a batch
with more padding then takes the same step as one without.
"""
import jax
import jax.numpy as jnp
import rlax

from jaxai.rl import registry

LOSSES = registry.Registry("policy loss")
register, get = LOSSES.register, LOSSES.get


def _flat(logits, actions, advantages, mask):
  return (logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), actions.reshape(-1).astype(jnp.int32),
          advantages.reshape(-1).astype(jnp.float32), mask.reshape(-1).astype(jnp.float32))


def entropy(logits) -> jax.Array:
  """Entropy of each categorical distribution of ``logits`` [..., A]."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


@register("reinforce")
def reinforce(logits, actions, advantages, mask):
  logits, actions, advantages, mask = _flat(logits, actions, advantages, mask)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  loss = rlax.policy_gradient_loss(logits, actions, advantages, mask) * mask.shape[0] / count
  return loss, {"entropy": jnp.sum(entropy(logits) * mask) / count,
                "advantage": jnp.sum(advantages * mask) / count}
