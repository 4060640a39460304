"""Learn2PD's filter: a two-layer MLP that reads a block's confidences and says which masked
positions are already right, trained with BCE on the oracle's labels (``decoding.oracle_labels``).

block_len confidences -> hidden (ReLU) -> block_len logits: at block 32 and hidden 32, 2,112
parameters, the paper's ~2K. The diffusion LM stays frozen; the filter is its own small model.
"""
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


class Filter(nn.Module):
  """``Filter(hidden)(confidences [..., block_len]) -> logits [..., block_len]`` (fp32)."""
  hidden: int = 32

  @nn.compact
  def __call__(self, confidences):
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(confidences.astype(jnp.float32)))
    return nn.Dense(confidences.shape[-1], name="out")(x)


def bce_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
  """Mean binary cross-entropy over the weighted (still masked) positions, and the metrics: its
  accuracy at logit 0 and the share of positive labels."""
  w = weights.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  bce = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
  accuracy = jnp.sum(w * ((logits > 0) == labels)) / n
  return jnp.sum(w * bce) / n, {"filter_accuracy": accuracy, "positive_share": jnp.sum(w * labels) / n}
