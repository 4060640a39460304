"""Pre-norm transformer block (RMSNorm, attention, SwiGLU) and a stack of them."""
import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import attention, layers


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Hyperparameters of one transformer block; papers share this and vary the mask per layer."""
  width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_hidden: int
  qk_norm: bool = True
  rope_base: float | None = 10_000.0
  attn_soft_cap: float | None = None
  impl: attention.AttentionImpl = "xla"
  dtype: jnp.dtype = jnp.float32


class TransformerBlock(nn.Module):
  """``block(x, positions, mask=None)`` -> x; with ``cache=`` (``attention.init_kv_cache``) it
  returns ``(x, updated cache)`` (see ``attention.Attention``)."""
  config: BlockConfig
  frame_size: int | None = 1
  window_frames: int | None = None

  @nn.compact
  def __call__(self, x, positions, mask=None, cache=None):
    c = self.config
    h = layers.RMSNorm(dtype=c.dtype, name="attn_norm")(x)
    attn = attention.Attention(
        c.num_heads, c.num_kv_heads, c.head_dim, qk_norm=c.qk_norm, rope_base=c.rope_base,
        soft_cap=c.attn_soft_cap, frame_size=self.frame_size, window_frames=self.window_frames,
        impl=c.impl, dtype=c.dtype, name="attn")
    if cache is None:
      x = x + attn(h, positions, mask)
    else:
      out, cache = attn(h, positions, mask, cache=cache)
      x = x + out
    h = layers.RMSNorm(dtype=c.dtype, name="mlp_norm")(x)
    x = x + layers.SwiGLU(c.mlp_hidden, dtype=c.dtype, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x if cache is None else (x, cache)
