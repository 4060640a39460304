"""Symexp two-hot distributional heads (DreamerV3, kept by Dreamer 4) for rewards and values.

A scalar is predicted as a softmax over bins equally spaced in symlog space, symlog(x) =
sign(x) log(1 + |x|): the head's cross-entropy does not grow with the scale of the targets, and a
few bins near 0 still resolve small rewards while the last ones reach symexp(20) ~ 5e8. A target is
encoded as the two-hot vector on the two bins around its symlog, weighted so the expected bin
equals it; a prediction is decoded as symexp of the expected bin.

``decode`` and ``loss`` read the number of bins from the logits; ``low`` and ``high`` (the symlog
range) must match the ``encode`` that made the targets.
"""
import jax
import jax.numpy as jnp
import rlax

NUM_BINS, LOW, HIGH = 255, -20.0, 20.0  # DreamerV3's; an odd count puts a bin exactly at 0

symlog, symexp = rlax.signed_logp1, rlax.signed_expm1


def encode(scalars, num_bins: int = NUM_BINS, low: float = LOW, high: float = HIGH) -> jax.Array:
  """Two-hot probabilities [..., num_bins] of ``scalars`` [...], clipped to [symexp(low), symexp(high)].

  rlax divides by (bin width + 1e-5), which moves the expected bin off symlog(x) by at most 1e-5:
  ``decode`` of the encoding is off by at most 1e-5 (1 + |x|).
  """
  return rlax.transform_to_2hot(symlog(jnp.asarray(scalars, jnp.float32)), low, high, num_bins)


def decode(logits, low: float = LOW, high: float = HIGH) -> jax.Array:
  """The scalar [...] that head ``logits`` [..., bins] predict: symexp of the expected bin."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  # rlax's transform_from_2hot wants a leading batch axis (it returns [1] for a single vector).
  flat = rlax.transform_from_2hot(probs.reshape(-1, probs.shape[-1]), low, high, probs.shape[-1])
  return symexp(flat.reshape(probs.shape[:-1]))


def loss(logits, targets, low: float = LOW, high: float = HIGH) -> jax.Array:
  """Cross-entropy [...] of head ``logits`` [..., bins] with the two-hot encoding of ``targets``
  [...]; the targets get no gradient."""
  target_probs = jax.lax.stop_gradient(encode(targets, logits.shape[-1], low, high))
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
