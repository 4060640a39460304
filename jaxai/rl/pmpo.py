"""PMPO, the policy loss of Dreamer 4 (Hafner et al., 2025, Eq. 11).

Only the sign of each advantage is used: states split into D+ (A >= 0) and D- (A < 0), the policy
raises the log-probability of the actions taken in D+ and lowers it in D-, each set averaged on its
own so that neither the scale of the returns nor the balance of the two sets changes the step size;
a KL to a frozen behaviour-cloning prior keeps the policy near what the world model has seen:

  L = (1 - alpha) / |D-| sum_{D-} log pi(a|s) - alpha / |D+| sum_{D+} log pi(a|s)
      + beta / N sum_i KL[pi(.|s_i) || pi_prior(.|s_i)].

It is a plain function, not an entry of ``losses``: the registry's contract is four arrays
``(logits, actions, advantages, mask)`` and PMPO needs a fifth, the prior's logits. Making it
optional there would let a string lookup silently drop the KL term, and a caller that picks PMPO
builds the prior anyway, so the lookup would buy nothing.
"""
import distrax
import jax
import jax.numpy as jnp


def pmpo_loss(logits, actions, advantages, prior_logits, mask=None, *, alpha: float = 0.5,
              beta: float = 0.3):
  """Dreamer 4's PMPO loss and its metrics.

  Args:
    logits: policy logits [..., A], differentiated.
    actions: the actions taken [...], integers in [0, A) (any value where ``mask`` is 0).
    advantages: R - v [...]; only their sign is read, and they get no gradient.
    prior_logits: the frozen prior's logits [..., A]; they get no gradient.
    mask: [...], 1 for a real state and 0 for padding (default: all real). Padding enters no count:
      not |D+|, not |D-|, not N.
    alpha: weight of D+ (and 1 - alpha of D-).
    beta: weight of the KL to the prior.

  Returns:
    (loss, metrics): the scalar loss; metrics ``positive_share`` (|D+| / N), ``entropy`` and
    ``prior_kl`` (means over the real states).
  """
  logits = logits.astype(jnp.float32)
  real = jnp.ones(actions.shape, bool) if mask is None else mask > 0
  policy = distrax.Categorical(logits=logits)
  prior = distrax.Categorical(logits=jax.lax.stop_gradient(prior_logits.astype(jnp.float32)))
  # jnp.where rather than a product with the mask: padding may hold actions outside [0, A), whose
  # log-probability is -inf and would turn 0 * -inf into NaN.
  log_prob = jnp.where(real, policy.log_prob(jnp.where(real, actions, 0)), 0.0)
  kl = jnp.where(real, policy.kl_divergence(prior), 0.0)
  # Comparisons carry no gradient, so the advantages are not differentiated.
  positive = real & (advantages >= 0)
  negative = real & (advantages < 0)

  def mean_over(subset, values):  # 0 for an empty set (its sum is 0), not NaN
    return jnp.sum(jnp.where(subset, values, 0.0)) / jnp.maximum(jnp.sum(subset), 1)

  loss = ((1 - alpha) * mean_over(negative, log_prob) - alpha * mean_over(positive, log_prob)
          + beta * mean_over(real, kl))
  return loss, {"positive_share": mean_over(real, positive.astype(jnp.float32)),
                "entropy": mean_over(real, policy.entropy()),
                "prior_kl": mean_over(real, kl)}
