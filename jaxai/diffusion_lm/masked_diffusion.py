"""The masked (absorbing-state) diffusion objective of LLaDA, in pure functions.

Forward process: a time t ~ U(0, 1) per row, and each maskable token independently replaced by
``MASK`` with probability p = (1 - eps) t + eps (eps keeps 1/p finite, as in LLaDA's code). The
denoiser sees the corrupted row and predicts every position; the loss is the cross-entropy at
the masked positions weighted by 1/p, summed over the row and divided by its number of maskable
positions, then averaged over rows: an upper bound on the negative log-likelihood per token. For
supervised finetuning only the response is maskable (the prompt is always seen), so the sum is
over response positions and divided by the response length (answer and EOT padding), as LLaDA's
SFT does.
"""
import jax
import jax.numpy as jnp
import optax

from jaxai.diffusion_lm import tasks

MASK_EPS = 1e-3


def corrupt(tokens: jax.Array, maskable: jax.Array, rng: jax.Array, *, eps: float = MASK_EPS
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(noisy tokens [B, L], masked [B, L] bool, p_mask [B]) for clean ``tokens`` whose ``maskable``
  positions may be masked (module docstring)."""
  t_key, mask_key = jax.random.split(rng)
  t = jax.random.uniform(t_key, (tokens.shape[0],))
  p_mask = (1.0 - eps) * t + eps
  masked = maskable & (jax.random.uniform(mask_key, tokens.shape) < p_mask[:, None])
  return jnp.where(masked, tasks.MASK, tokens), masked, p_mask


def loss(logits: jax.Array, tokens: jax.Array, masked: jax.Array, p_mask: jax.Array,
         maskable: jax.Array) -> jax.Array:
  """The 1/p-weighted cross-entropy of the masked positions per maskable position, averaged over
  rows (module docstring). logits [B, L, V] fp32; tokens, masked, maskable [B, L]; p_mask [B]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  per_row = jnp.sum(jnp.where(masked, ce, 0.0), axis=-1) / p_mask
  return jnp.mean(per_row / jnp.maximum(jnp.sum(maskable, axis=-1), 1))
