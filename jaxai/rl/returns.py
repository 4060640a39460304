"""TD(lambda) returns with continuation flags, as Dreamer 4 writes them (after DreamerV3):

  R_t = r_t + gamma * c_t * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}),   R_T = v_T.

The recursion is rlax's ``lambda_returns`` (one scan per trajectory, vmapped over the batch).
"""
import jax
import jax.numpy as jnp
import rlax


def lambda_returns(rewards, continues, values, *, gamma: float = 0.997, lambda_: float = 0.95):
  """TD(lambda) returns R_0 .. R_{T-1} of B trajectories of T transitions.

  Index convention: step t is the transition from state s_t to s_{t+1}.
    rewards[:, t]   = r_t, the reward received on that transition (arriving at s_{t+1});
    continues[:, t] = c_t, 0 if s_{t+1} is terminal (nothing after it is bootstrapped) else 1,
                      or a probability of continuing;
    values[:, t]    = v_t = v(s_t), for t = 0 .. T (one more than the rewards: v_T bootstraps).
  So R_t pairs r_t and c_t with v_{t+1}, and the last return is R_{T-1} = r_{T-1} + gamma c_{T-1} v_T.
  A world model whose reward and continue heads read the state they arrive at (DreamerV3's
  ``reward[1:]``, ``cont[1:]``) passes those heads' outputs for s_1 .. s_T here.

  Args:
    rewards: [B, T].
    continues: [B, T].
    values: [B, T + 1].
    gamma: discount (Dreamer 4's 0.997).
    lambda_: TD(lambda) mixing (DreamerV3's 0.95; Dreamer 4 does not give one).

  Returns:
    [B, T] returns, differentiable in every input: wrap them in ``jax.lax.stop_gradient`` to use
    them as targets.
  """
  rewards, continues, values = (jnp.asarray(x, jnp.float32) for x in (rewards, continues, values))
  if values.shape != (rewards.shape[0], rewards.shape[1] + 1) or continues.shape != rewards.shape:
    raise ValueError(f"need rewards and continues [B, T] and values [B, T + 1]; got rewards "
                     f"{rewards.shape}, continues {continues.shape}, values {values.shape}")
  # rlax indexes its three inputs by the transition's end: its G_t = r_t + d_t ((1 - l) v_t + l G_{t+1})
  # reads v_t as the value of the state arrived at, hence values[:, 1:]; its scan starts from the
  # last of them, which is R_T = v_T.
  per_trajectory = lambda r, d, v: rlax.lambda_returns(r, d, v, lambda_=jnp.float32(lambda_))
  return jax.vmap(per_trajectory)(rewards, gamma * continues, values[:, 1:])
