"""The agent's heads on the dynamics model's agent token: policy, reward and value.

Dreamer 4 reads the agent token's output with small MLPs, one output layer per multi-token-
prediction distance n = 0..L (L = 8): the policy head predicts the actions a_{t+n} and the reward
head the rewards r_{t+n} from the agent token of frame t (``agent_targets`` lines the targets up).
The value head, added for imagination RL, predicts the return from frame t only. Reward and value
are distributions over symlog-spaced bins (two-hot targets, ``jaxai.rl.twohot``), as in DreamerV3.

Each head is RMSNorm, ``layers`` hidden layers of ``hidden`` units with SiLU, then the output
layer, zero-initialised as DreamerV3 does: the policy starts uniform and reward and value start at
0, so the heads begin from the neutral prediction rather than from noise.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import layers


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  hidden: int = 256
  layers: int = 2
  mtp_length: int = 8  # L: policy and reward heads predict distances n = 0..L
  bins: int = 255      # two-hot bins of the reward and value heads


class MLPHead(nn.Module):
  """[..., D] -> logits [..., *outputs]; the output layer starts at zero."""
  config: HeadsConfig
  outputs: tuple[int, ...]

  @nn.compact
  def __call__(self, h):
    c = self.config
    x = layers.RMSNorm(dtype=jnp.float32, name="norm")(h.astype(jnp.float32))
    for i in range(c.layers):
      # Small layers: replicated past the input's embed axis.
      x = jax.nn.silu(layers.Dense(c.hidden, ("embed", None) if i == 0 else (None, None),
                                   name=f"hidden_{i}")(x))
    kernel = self.param("out", layers.partitioned(nn.initializers.zeros, (None,) * (1 + len(self.outputs))),
                        (c.hidden, *self.outputs), jnp.float32)
    bias = self.param("bias", layers.partitioned(nn.initializers.zeros, (None,) * len(self.outputs)),
                      self.outputs, jnp.float32)
    return jnp.tensordot(x, kernel, axes=1) + bias


class AgentHeads(nn.Module):
  """Agent-token features [..., D] -> {'policy': [..., L + 1, actions], 'reward': [..., L + 1, bins],
  'value': [..., bins]} logits."""
  config: HeadsConfig
  num_actions: int

  def setup(self):
    c = self.config
    self.policy = MLPHead(c, (c.mtp_length + 1, self.num_actions))
    self.reward = MLPHead(c, (c.mtp_length + 1, c.bins))
    self.value = MLPHead(c, (c.bins,))

  def __call__(self, h):
    return {"policy": self.policy(h), "reward": self.reward(h), "value": self.value(h)}


def agent_targets(values: jax.Array, valid: jax.Array, is_first: jax.Array,
                  mtp_length: int) -> tuple[jax.Array, jax.Array]:
  """Multi-token-prediction targets: ``values`` [B, T] -> ([B, T, L + 1], mask [B, T, L + 1]).

  Entry [b, t, n] is ``values[b, t + n]``, the target of distance n for frame t. It counts when
  t + n lies inside the window, step t + n is ``valid`` and no episode starts (``is_first``) in
  t + 1 .. t + n: a prediction never reaches into the next episode.
  """
  b, t = values.shape
  pad = lambda x, fill: jnp.concatenate([x, jnp.full((b, mtp_length), fill, x.dtype)], axis=1)
  index = jnp.arange(t)[:, None] + jnp.arange(mtp_length + 1)[None, :]  # [T, L + 1]
  episode = jnp.cumsum(is_first.astype(jnp.int32), axis=1)
  same_episode = pad(episode, -1)[:, index] == episode[:, :, None]
  return pad(values, 0)[:, index], same_episode & pad(valid, False)[:, index]
