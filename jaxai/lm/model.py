"""Decoder-only language model on the shared transformer blocks, with a KV cache for decoding.

``DecoderLM(...)(tokens)`` is the training forward pass: causal attention, RoPE positions
0..T-1. For decoding, the same parameters also take per-row ``positions`` and a key-padding
``kv_mask`` (left-padded batches of prompts of different lengths: a row's pad tokens get no
position of their own and no query attends to them), and a ``cache`` (``init_cache``): the new
tokens' keys and values are written at the cache's index and the queries attend to everything
written so far, so a decode step costs one token's pass, not a recompute of the prefix. The
padding mask is kept in the cache beside the keys, so a caller describes only the tokens it
passes in, never the cache's layout. The blocks are a ``transformer.BlockStack``: scanned over
layers and rematerialised when the block config says so (the cache then stacked over layers).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import attention, layers, transformer

BYTE_VOCAB = 256  # byte-level: every byte is a token



def _constrain_cache(cache: dict) -> dict:
  """Names the cache's axes, so that under ``nn.logical_axis_rules`` it is sharded like the
  keys and values the model computes (batch over data, kv_heads over tensor by default)."""
  def constrain(layer, axes):
    return {**layer, "key": nn.with_logical_constraint(layer["key"], axes),
            "value": nn.with_logical_constraint(layer["value"], axes)}
  layers_ = cache["layers"]
  if isinstance(layers_, dict):  # one cache stacked over the layers of a scanned stack
    layers_ = constrain(layers_, ("layers",) + attention.KV_CACHE_AXES)
  else:
    layers_ = [constrain(layer, attention.KV_CACHE_AXES) for layer in layers_]
  return {"layers": layers_, "kv_mask": nn.with_logical_constraint(cache["kv_mask"], ("batch", "length"))}


def init_cache(model: "DecoderLM", batch: int, max_len: int, dtype=None) -> dict:
  """An empty cache for ``model``: ``layers``, the blocks' KV caches (``transformer.init_stack_cache``:
  keys and values [batch, kv_heads, max_len, head_dim] in ``dtype``, default the model's compute
  dtype, one per block, or stacked over layers for a scanned stack), and ``kv_mask``
  [batch, max_len], True where a real (not padding) token has been written."""
  b = model.block if dtype is None else dataclasses.replace(model.block, dtype=dtype)
  return _constrain_cache({"layers": transformer.init_stack_cache(b, model.num_layers, batch, max_len),
                           "kv_mask": jnp.zeros((batch, max_len), bool)})


class DecoderLM(nn.Module):
  """``model(tokens, positions=None, kv_mask=None, cache=None)``: tokens [B, T] -> logits [B, T, V]
  (fp32), or ``(logits, updated cache)`` with a cache.

  With ``bidirectional`` every position attends to every other (no cache): the same stack as the
  denoiser of a masked diffusion LM (``jaxai/diffusion_lm``), which predicts all positions at once.

  positions: [B, T] RoPE positions; default 0..T-1, offset by the cache's index with a cache.
  kv_mask: [B, T] bool, False for padding tokens: no query attends to their keys (the padding's
    own outputs are meaningless). Default: all real.
  cache: ``init_cache(model, B, max_len)``; the tokens are the next ones after those written.
  """
  block: transformer.BlockConfig
  num_layers: int
  vocab_size: int
  window_tokens: int | None = None  # sliding-window attention when set
  logit_soft_cap: float | None = None
  bidirectional: bool = False

  @nn.compact
  def __call__(self, tokens, positions=None, kv_mask=None, cache=None):
    c = self.block
    if self.bidirectional and (cache is not None or self.window_tokens):
      raise ValueError("a bidirectional model has no KV cache and no sliding window")
    embed = self.param("embed", layers.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (self.vocab_size, c.width), jnp.float32)
    x = jnp.take(embed, tokens, axis=0).astype(c.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    b, t = tokens.shape
    index = 0 if cache is None else transformer.cache_index(cache["layers"])
    if positions is None:
      positions = (index + jnp.arange(t))[None, :]
    mask = None
    if cache is not None:
      new = jnp.ones((b, t), bool) if kv_mask is None else kv_mask.astype(bool)
      kv_mask = jax.lax.dynamic_update_slice_in_dim(cache["kv_mask"], new, index, 1)
    if kv_mask is not None:  # broadcasts against the attention logits [B, K, G, T, S]
      mask = kv_mask.astype(bool)[:, None, None, None, :]
    stack = transformer.BlockStack(c, self.num_layers, frame_sizes=(None,) if self.bidirectional else (1,),
                                   window_frames=self.window_tokens, name="block")
    if cache is None:
      x = stack(x, positions, mask)
    else:
      x, new_layers = stack(x, positions, mask, cache["layers"])
    x = layers.RMSNorm(dtype=c.dtype, name="final_norm")(x)
    logits = layers.Dense(self.vocab_size, ("embed", "vocab"), dtype=c.dtype, name="head")(x)
    logits = layers.soft_cap(logits.astype(jnp.float32), self.logit_soft_cap)
    if cache is None:
      return logits
    return logits, _constrain_cache({"layers": new_layers, "kv_mask": kv_mask})
