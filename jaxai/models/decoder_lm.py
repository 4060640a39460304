"""Decoder-only language model on the shared transformer blocks."""
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import layers, transformer


class DecoderLM(nn.Module):
  block: transformer.BlockConfig
  num_layers: int
  vocab_size: int
  window_tokens: int | None = None  # sliding-window attention when set
  logit_soft_cap: float | None = None

  @nn.compact
  def __call__(self, tokens):
    c = self.block
    embed = self.param("embed", layers.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (self.vocab_size, c.width), jnp.float32)
    x = jnp.take(embed, tokens, axis=0).astype(c.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    positions = jnp.arange(tokens.shape[1])[None, :]
    for i in range(self.num_layers):
      x = transformer.TransformerBlock(c, frame_size=1, window_frames=self.window_tokens,
                                       name=f"block_{i}")(x, positions)
    x = layers.RMSNorm(dtype=c.dtype, name="final_norm")(x)
    logits = layers.Dense(self.vocab_size, ("embed", "vocab"), dtype=c.dtype, name="head")(x)
    return layers.soft_cap(logits.astype(jnp.float32), self.logit_soft_cap)
