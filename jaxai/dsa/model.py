"""Byte-level decoder LM whose layers each attend in one of ``LAYER_KINDS``: DSA's modes (dense,
indexed, sparse; ``jaxai.dsa.attention``) or CWM-style local / global GQA layers.

  dense | indexed | sparse  ``attention.SparseAttention`` in that mode (MQA, one KV head);
  local                     GQA causal attention over the last ``window`` tokens;
  global                    GQA causal attention over everything, RoPE base ``global_rope_base``
                            (CWM scales RoPE for long context in its global layers only).

``layer_pattern`` repeats over the layers (CWM: local, local, local, global). The model takes a
list of per-layer caches (``init_cache``) for decoding, as ``jaxai.lm.model.DecoderLM`` does; the
prompt must fill whole rows (no padding), which is what the benchmarks and tests feed it.
"""
import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from jaxai.dsa import attention as dsa_attention
from jaxai.nn import attention, layers

LAYER_KINDS = dsa_attention.MODES + ("local", "global")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  width: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_hidden: int
  layer_pattern: tuple[str, ...] = ("dense",)
  num_kv_heads: int = 1          # local / global layers (GQA); DSA layers always have one
  window: int = 128              # local layers
  global_rope_base: float = 10_000.0
  rope_base: float = 10_000.0
  topk: int = 64
  indexer_heads: int = 4
  indexer_dim: int = 32
  indexer_rope_dims: int = 16
  indexer_precision: str = "default"
  qk_norm: bool = True
  logit_soft_cap: float | None = None
  impl: str = "xla"
  dtype: jnp.dtype = jnp.float32
  vocab_size: int = 256

  def __post_init__(self):
    unknown = [k for k in self.layer_pattern if k not in LAYER_KINDS]
    if unknown or not self.layer_pattern:
      raise ValueError(f"layer_pattern entries must be among {', '.join(LAYER_KINDS)}, got "
                       f"{self.layer_pattern}")

  def kind(self, layer: int) -> str:
    return self.layer_pattern[layer % len(self.layer_pattern)]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> list[dict]:
  """One empty cache per layer (``dsa_attention.init_cache`` or ``attention.init_kv_cache``)."""
  caches = []
  for i in range(config.num_layers):
    kind = config.kind(i)
    if kind in dsa_attention.MODES:
      caches.append(dsa_attention.init_cache(batch, max_len, config.head_dim,
                                             None if kind == "dense" else config.indexer_dim, config.dtype))
    else:
      caches.append(attention.init_kv_cache(batch, max_len, config.num_kv_heads, config.head_dim,
                                            config.dtype))
  return caches


class Block(nn.Module):
  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x, positions, cache=None):
    c = self.config
    h = layers.RMSNorm(dtype=c.dtype, name="attn_norm")(x)
    if self.kind in dsa_attention.MODES:
      attn = dsa_attention.SparseAttention(
          c.num_heads, c.head_dim, mode=self.kind, topk=c.topk, indexer_heads=c.indexer_heads,
          indexer_dim=c.indexer_dim, indexer_rope_dims=c.indexer_rope_dims,
          precision=c.indexer_precision, qk_norm=c.qk_norm, rope_base=c.rope_base,
          impl=c.impl, dtype=c.dtype, name="attn")
      args = (h, positions) if cache is None else (h, positions, cache)
    else:
      local = self.kind == "local"
      attn = attention.Attention(
          c.num_heads, c.num_kv_heads, c.head_dim, qk_norm=c.qk_norm,
          rope_base=c.rope_base if local else c.global_rope_base, frame_size=1,
          window_frames=c.window if local else None, impl=c.impl, dtype=c.dtype, name="attn")
      args = (h, positions) if cache is None else (h, positions, None, cache)
    out = attn(*args)
    if cache is not None:
      out, cache = out
    x = x + out
    h = layers.RMSNorm(dtype=c.dtype, name="mlp_norm")(x)
    x = x + layers.SwiGLU(c.mlp_hidden, dtype=c.dtype, name="mlp")(h)
    return x if cache is None else (x, cache)


class LongContextLM(nn.Module):
  """``model(tokens, cache=None)``: tokens [B, T] -> logits [B, T, V] fp32, or ``(logits, caches)``
  with ``init_cache``'s list (the tokens follow those written). Positions are 0..T-1, offset by
  the caches' index. DSA layers sow their losses into the ``losses`` collection."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, cache=None):
    c = self.config
    embed = self.param("embed", layers.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (c.vocab_size, c.width), jnp.float32)
    x = jnp.take(embed, tokens, axis=0).astype(c.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    start = 0 if cache is None else cache[0]["index"]
    positions = (start + jnp.arange(tokens.shape[1]))[None, :]
    new_caches = []
    for i in range(c.num_layers):
      block = Block(c, c.kind(i), name=f"block_{i}")
      if cache is None:
        x = block(x, positions)
      else:
        x, layer_cache = block(x, positions, cache[i])
        new_caches.append(layer_cache)
    x = layers.RMSNorm(dtype=c.dtype, name="final_norm")(x)
    logits = layers.Dense(c.vocab_size, ("embed", "vocab"), dtype=c.dtype, name="head")(x)
    logits = layers.soft_cap(logits.astype(jnp.float32), c.logit_soft_cap)
    return logits if cache is None else (logits, new_caches)
