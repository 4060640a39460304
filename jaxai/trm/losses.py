"""The losses of deep supervision: stable-max cross-entropy on the answer, BCE on the halt logit.

Stable-max (Prieto et al., 2025, "Grokking at the edge of numerical stability"; used by HRM and
TRM) replaces exp in softmax by s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0: it grows
linearly, so a model that already classifies its few training puzzles right cannot drive its loss
to zero by inflating the logits until float rounding takes over (softmax collapse), which stops
learning on small data sets. p_i = s(x_i) / sum_j s(x_j). It is computed as a softmax
cross-entropy of log s(x) (optax), with log s from log1p of the clipped branch, so neither branch
of the ``where`` sees a pole and gradients stay finite for any finite logits; the official code
takes the ratio in float64 instead.

Answer tokens whose label is ``IGNORE_LABEL`` count for nothing; an example's answer loss is the
mean over its counted tokens (the official per-example normalisation), and it is "exactly right"
when every counted token's argmax is its label: the halt head's target.
"""
import jax
import jax.numpy as jnp
import optax

IGNORE_LABEL = -100


def log_stablemax_scores(logits):
  """log s(logits), elementwise: log(1 + x) for x >= 0, -log(1 - x) for x < 0."""
  x = logits.astype(jnp.float32)
  return jnp.where(x >= 0, jnp.log1p(jnp.maximum(x, 0.0)), -jnp.log1p(-jnp.minimum(x, 0.0)))


def stablemax_cross_entropy(logits, labels):
  """-log p_label under stable-max: logits [..., V], integer labels [...] -> [...] (0 where the
  label is ``IGNORE_LABEL``)."""
  valid = labels != IGNORE_LABEL
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  loss = optax.softmax_cross_entropy_with_integer_labels(log_stablemax_scores(logits), safe)
  return jnp.where(valid, loss, 0.0)


def answer_loss(logits, labels):
  """Per-example stable-max cross-entropy [B], averaged over each example's counted tokens:
  logits [B, L, V], labels [B, L]."""
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {list(logits.shape)} must be labels {list(labels.shape)} plus a vocab axis")
  counted = jnp.sum(labels != IGNORE_LABEL, axis=-1)
  return jnp.sum(stablemax_cross_entropy(logits, labels), axis=-1) / jnp.maximum(counted, 1)


def token_correct(logits, labels):
  """bool [B, L]: the argmax is the label, on counted tokens (False elsewhere)."""
  return (jnp.argmax(logits, axis=-1) == labels) & (labels != IGNORE_LABEL)


def exactly_right(logits, labels):
  """bool [B]: every counted token's argmax is its label (the halt target; no gradient)."""
  right = jnp.all((jnp.argmax(logits, axis=-1) == labels) | (labels == IGNORE_LABEL), axis=-1)
  return jax.lax.stop_gradient(right)


def halt_loss(halt_logit, exact):
  """BCE [B] of the halt logit [B] against ``exact`` [B] (bool: the answer is exactly right)."""
  return optax.sigmoid_binary_cross_entropy(halt_logit.astype(jnp.float32), exact.astype(jnp.float32))
