"""Multi-head attention with GQA, QK-norm, RoPE, logit soft-cap and structured masks.

Masks are described structurally rather than as dense arrays so that the Pallas kernel can skip
whole blocks: ``frame_size=F`` makes attention block-causal over frames of F tokens (F=1 is plain
causal), ``window_frames=W`` limits it to the last W frames (sliding window), ``frame_size=None``
is bidirectional. An optional dense ``mask`` [T, S] (or broadcastable) is and-ed on top; only the
XLA path takes it.

Incremental decoding: ``Attention(..., cache=kv_cache)`` writes the new keys/values into a
fixed-size cache (``init_kv_cache``) at ``cache["index"]`` and attends over it with the queries
offset by that index, so decoding T new tokens costs attention to the cache, not a recompute of
the prefix. Positions past ``index + T`` hold stale or zero entries; the causal mask hides them.
"""
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import dispatch, layers
from kernels_pallas import block_causal_attention as block_causal_kernel

AttentionImpl = Literal["auto", "xla", "pallas"]


def frame_mask(q_len: int, kv_len: int, *, frame_size: int | None, window_frames: int | None = None,
               q_offset: int | jax.Array = 0) -> jax.Array:
  """Boolean [q_len, kv_len]: query i (at absolute position q_offset + i) may see key j."""
  if frame_size is None:
    return jnp.ones((q_len, kv_len), bool)
  q_frame = (q_offset + jnp.arange(q_len)) // frame_size
  k_frame = jnp.arange(kv_len) // frame_size
  visible = k_frame[None, :] <= q_frame[:, None]
  if window_frames is not None:
    visible &= q_frame[:, None] - k_frame[None, :] < window_frames
  return visible


def xla_attention(q, k, v, *, frame_size=None, window_frames=None, soft_cap=None, mask=None, q_offset=0,
                  kv_head_major=False):
  """Plain-XLA attention. q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (GQA), or
  [B, K, S, D] with ``kv_head_major`` (the KV cache's layout); a dense ``mask`` broadcasts against
  the logits [B, K, H/K, T, S]."""
  b, t, h, d = q.shape
  kv_heads = k.shape[1 if kv_head_major else 2]
  if h % kv_heads:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kv_heads})")
  g = h // kv_heads
  s = k.shape[2 if kv_head_major else 1]
  # Head-major, the query group folded into the rows and the keys transposed: both products are
  # plain [M, K] x [K, N] matmuls batched over (B, K), the layout XLA:CPU runs fastest in bf16 in
  # both passes (layers.einsum; some other layouts of a bf16 product with fp32 output are not
  # implemented there at all). Tokenizer train step 410 -> 382 ms against the [B, T, K, G, D] form.
  q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
  if kv_head_major:
    # A cache is read whole by every pass: contracting the keys as stored copies nothing, where
    # transposing them copied the cache of every time layer once per pass (the largest copies of
    # a rollout frame in profile_frame).
    logits = layers.einsum("bkqd,bksd->bkqs", q, k, q.dtype) * d ** -0.5
  else:
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    logits = layers.einsum("bkqd,bkds->bkqs", q, k, q.dtype) * d ** -0.5
  logits = layers.soft_cap(logits, soft_cap).reshape(b, kv_heads, g, t, s)
  visible = frame_mask(t, s, frame_size=frame_size, window_frames=window_frames, q_offset=q_offset)
  if mask is not None:
    visible = visible & mask
  logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, s)
  out = layers.einsum("bkqs,bksd->bkqd", probs, v, v.dtype).astype(v.dtype)
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def dot_product_attention(q, k, v, *, frame_size=None, window_frames=None, soft_cap=None, mask=None,
                          q_offset=0, kv_head_major=False, impl: AttentionImpl = "xla"):
  """The XLA path or the Pallas block-causal kernel (``dispatch.resolve``: ``auto`` picks the
  kernel only on a platform it is written for); both compute the same function."""
  on_xla = lambda: xla_attention(q, k, v, frame_size=frame_size, window_frames=window_frames,
                                 soft_cap=soft_cap, mask=mask, q_offset=q_offset, kv_head_major=kv_head_major)
  if dispatch.resolve(impl, block_causal_kernel.PLATFORMS) == "xla":
    return on_xla()
  if (kv_head_major or mask is not None or not isinstance(q_offset, int) or q_offset
      or q.shape[1] != k.shape[1]):
    # Dense extra masks and cached decoding stay on XLA: the kernel covers the training shapes.
    return on_xla()
  return block_causal_kernel.block_causal_attention(
      q, k, v, frame_size=q.shape[1] if frame_size is None else frame_size,
      window_frames=window_frames, soft_cap=soft_cap, interpret=dispatch.interpret())


# The logical axes of a cache's keys and values (``init_kv_cache``), for sharding constraints.
KV_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> dict:
  """Empty cache for ``Attention``: keys and values [batch, kv_heads, max_len, head_dim] (head-major,
  the layout attention reads them in; ``KV_CACHE_AXES``), index 0.

  Only causal (``frame_size`` not None) attention may use it, and with ``frame_size=F`` the writes
  must be whole frames (index and length multiples of F): otherwise a query would see unwritten
  keys of its own frame.
  """
  zeros = jnp.zeros((batch, num_kv_heads, max_len, head_dim), dtype)
  return {"key": zeros, "value": zeros, "index": jnp.zeros((), jnp.int32)}


class Attention(nn.Module):
  """Self-attention: GQA projections, optional QK-norm and RoPE, structured mask.

  ``__call__(x, positions, mask=None)`` returns the output; with ``cache=`` (see ``init_kv_cache``)
  it returns ``(output, updated cache)``, the cache holding x's keys/values at ``index`` and the
  index advanced by x's length. ``positions`` are absolute (the caller adds the index), and a
  dense ``mask`` is then [..., T, max_len].
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool = True
  rope_base: float | None = 10_000.0
  soft_cap: float | None = None
  frame_size: int | None = 1
  window_frames: int | None = None
  impl: AttentionImpl = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask=None, cache=None):
    dense = lambda n, heads_axis, name: layers.Dense(
        (n, self.head_dim), ("embed", heads_axis, "head_dim"), dtype=self.dtype, name=name)(x)
    q = dense(self.num_heads, "heads", "query")
    k = dense(self.num_kv_heads, "kv_heads", "key")
    v = dense(self.num_kv_heads, "kv_heads", "value")
    if self.qk_norm:  # normalising q and k bounds the logits, which keeps bf16 training stable
      q = layers.RMSNorm("head_dim", dtype=self.dtype, name="query_norm")(q)
      k = layers.RMSNorm("head_dim", dtype=self.dtype, name="key_norm")(k)
    if self.rope_base is not None:
      q = layers.rope(q, positions, base=self.rope_base)
      k = layers.rope(k, positions, base=self.rope_base)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
    q_offset = 0
    if cache is not None:
      if self.frame_size is None:
        raise ValueError("a KV cache needs causal attention (frame_size not None)")
      q_offset = cache["index"]
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
          buf, new.transpose(0, 2, 1, 3).astype(buf.dtype), q_offset, 2)
      k, v = write(cache["key"], k), write(cache["value"], v)
      cache = {"key": k, "value": v, "index": q_offset + x.shape[1]}
    out = dot_product_attention(q, k, v, frame_size=self.frame_size, window_frames=self.window_frames,
                                soft_cap=self.soft_cap, mask=mask, q_offset=q_offset,
                                kv_head_major=cache is not None, impl=self.impl)
    out = layers.Dense(x.shape[-1], ("heads", "head_dim", "embed"), in_axis=(-2, -1),
                       dtype=self.dtype, name="out")(out)
    return out if cache is None else (out, cache)
