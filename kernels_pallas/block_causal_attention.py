"""Block-causal flash attention (Pallas), for video world models.

Tokens are laid out frame after frame, `frame_size` tokens per frame: a query sees every key of its
own frame and of earlier frames (frame(i) = i // frame_size), or with `window_frames=W` only of the
last W frames. For each query block the kernels visit only the KV blocks that hold a visible key
(loop bounds, so hidden blocks cost nothing), run the blocks that are visible to every query of the
block without a mask, and mask only the partial blocks on the frame boundaries. When frame_size is
a multiple of both block sizes there are no partial blocks except at the window's edge.

Layout is [batch, tokens, heads, head_dim], as in `jax.nn.dot_product_attention`; k and v may have
fewer heads than q (GQA: query head h reads kv head h // (heads // kv_heads)). Sequences that are
not a multiple of the block size are zero-padded inside the wrapper and the padding is masked.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Platforms this kernel is written for (compiled; every kernel also runs interpreted on CPU).
PLATFORMS = ("gpu",)

# Finite, so that a row whose first visited block is entirely masked produces no NaN: what it
# accumulates there is scaled by exp(MASK_VALUE - m) == 0 as soon as a visible key arrives.
# References multiply fp32 in full fp32 on every backend (GPUs default to TF32).
HIGHEST = lax.Precision.HIGHEST
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: the forward and dq kernels tile (block_q x block_k), the dk/dv kernel
  (block_q_dkv x block_k_dkv). Sequences shorter than a block use a smaller power of two."""
  block_q: int = 64
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64


# Triton's tl.dot needs every matmul dimension >= 16; the interpreter takes any size.
MIN_COMPILED_BLOCK = 16


def _div(a, b):
  """a // b for a >= 0. Python ints stay Python ints: an op on constants alone inside a kernel
  does not lower on Triton."""
  return a // b if isinstance(a, int) else lax.div(a, b)


def _cdiv(a, b):
  return _div(a + b - 1, b)


def _maximum(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _where(pred, a, b):
  """Scalar jnp.where; between two static ints it uses arithmetic, since Triton does not lower a
  select between two constants."""
  if isinstance(a, int) and isinstance(b, int):
    return b + (a - b) * lax.convert_element_type(pred, jnp.int32)
  return jnp.where(pred, a, b)


def _dot(a, b, *, trans_a=False, trans_b=False):
  """2-D matmul accumulating in fp32 (the form every Pallas backend lowers). HIGHEST keeps fp32
  inputs in fp32 (Triton's default would round them to TF32); bf16 inputs are unaffected."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=HIGHEST,
                         preferred_element_type=jnp.float32)


def _block_ranges(start_any, end_any, start_all, end_all, block):
  """Turns token ranges into block ranges (lo, full_lo, full_hi, hi).

  [start_any, end_any) holds every token visible to some row of the tile, [start_all, end_all)
  the tokens visible to all of them: blocks [lo, hi) must be visited, [full_lo, full_hi) of those
  need no mask.
  """
  lo = _div(start_any, block)
  hi = _maximum(_cdiv(end_any, block), lo)
  full_lo = jnp.minimum(_maximum(_cdiv(start_all, block), lo), hi)
  full_hi = jnp.clip(_div(end_all, block), full_lo, hi)
  return lo, full_lo, full_hi, hi


def _visit_blocks(ranges, body, carry):
  """Runs body(block, carry, masked=...) over the visible blocks, masking only the partial ones."""
  # Static (Python int) bounds would give a weak-typed loop index, which Triton fails to lower.
  lo, full_lo, full_hi, hi = (lax.convert_element_type(b, jnp.int32) for b in ranges)
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


@dataclasses.dataclass(frozen=True)
class _FrameMask:
  """Who sees whom, on arrays padded past `seq_len` real tokens.

  Padded queries behave as the last real query (so no row is empty and the backward pass stays
  finite); padded keys are seen by nobody.
  """
  seq_len: int
  frame_size: int
  window_frames: int | None

  def query_frame(self, pos):
    return lax.div(jnp.minimum(pos, self.seq_len - 1), self.frame_size)

  def visible(self, q_pos, k_pos):
    q_frame, k_frame = self.query_frame(q_pos), lax.div(k_pos, self.frame_size)
    visible = (k_pos < self.seq_len) & (k_frame <= q_frame)
    if self.window_frames is not None:
      visible &= k_frame > q_frame - self.window_frames
    return visible

  def kv_blocks(self, q_start, block_q, block_k):
    """KV block ranges for the queries [q_start, q_start + block_q)."""
    f, n = self.frame_size, self.seq_len
    first, last = self.query_frame(q_start), self.query_frame(q_start + block_q - 1)
    end_any = jnp.minimum((last + 1) * f, n)
    end_all = jnp.minimum((first + 1) * f, n)
    if self.window_frames is None:
      start_any = start_all = 0
    else:
      start_any = jnp.maximum(first - self.window_frames + 1, 0) * f
      start_all = jnp.maximum(last - self.window_frames + 1, 0) * f
    return _block_ranges(start_any, end_any, start_all, end_all, block_k)

  def q_blocks(self, k_start, block_k, block_q):
    """Query block ranges for the keys [k_start, k_start + block_k)."""
    f, n = self.frame_size, self.seq_len
    first = lax.div(k_start, f)
    last = lax.div(jnp.minimum(k_start + block_k - 1, n - 1), f)
    # Queries up to the end of frame `fr`; the padded queries of the last real block behave as
    # the last real query, so the last frame ends with that block.
    last_row_end = _cdiv(n, block_q) * block_q
    frames_end = lambda fr: jnp.where((fr + 1) * f < n, (fr + 1) * f, last_row_end)
    if self.window_frames is None:
      end_any = end_all = last_row_end
    else:
      end_any = frames_end(last + self.window_frames - 1)
      end_all = frames_end(first + self.window_frames - 1)
    end_any = _where(k_start < n, end_any, 0)
    end_all = _where(k_start + block_k <= n, end_all, 0)  # padded keys need the mask
    return _block_ranges(first * f, end_any, last * f, end_all, block_q)


def _logits(q, k, scale, soft_cap):
  """Scaled, optionally soft-capped q @ k.T in fp32, and tanh(.) for the soft-cap derivative."""
  s = _dot(q, k, trans_b=True) * scale
  if soft_cap is None:
    return s, None
  t = jnp.tanh(s / soft_cap)
  return soft_cap * t, t


def _probs_and_dlogits(q, k, v, do, lse, delta, visible, *, scale, soft_cap):
  """Recomputes the probabilities p and d(loss)/d(q.k * scale) from the saved logsumexp."""
  s, t = _logits(q, k, scale, soft_cap)
  if visible is not None:
    s = jnp.where(visible, s, MASK_VALUE)
  p = jnp.exp(s - lse[:, None])
  ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
  if soft_cap is not None:
    ds *= 1.0 - t * t
  return p, ds


def _positions(start, shape, axis):
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, mask, scale, soft_cap, block_q, block_k):
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  q_pos = _positions(q_start, (block_q, block_k), 0)

  def body(kv_block, carry, *, masked):
    acc, m, l = carry
    k_start = kv_block * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s, _ = _logits(q, k, scale, soft_cap)
    if masked:
      s = jnp.where(mask.visible(q_pos, _positions(k_start, s.shape, 1)), s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = rescale * l + p.sum(axis=1)
    acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _visit_blocks(mask.kv_blocks(q_start, block_q, block_k), body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, mask, scale, soft_cap,
               block_q, block_k):
  q_start = pl.program_id(0) * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos = _positions(q_start, (block_q, block_k), 0)

  def body(kv_block, dq, *, masked):
    k_start = kv_block * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    visible = mask.visible(q_pos, _positions(k_start, q_pos.shape, 1)) if masked else None
    _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, visible, scale=scale, soft_cap=soft_cap)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _visit_blocks(mask.kv_blocks(q_start, block_q, block_k), body,
                     jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, mask, scale,
                soft_cap, block_q, block_k, group):
  # One program per (kv block, kv head): it sums over the `group` query heads that share the head.
  k_start = pl.program_id(0) * block_k
  k, v = k_ref[...], v_ref[...]
  k_pos = _positions(k_start, (block_q, block_k), 1)
  ranges = mask.q_blocks(k_start, block_k, block_q)

  def head(g, carry):
    def body(q_block, carry, *, masked):
      dk, dv = carry
      q_slice = pl.ds(q_block * block_q, block_q)
      q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
      visible = mask.visible(_positions(q_block * block_q, k_pos.shape, 0),
                             k_pos) if masked else None
      p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[g, q_slice], delta_ref[g, q_slice],
                                 visible, scale=scale, soft_cap=soft_cap)
      dv += _dot(p.astype(do.dtype), do, trans_a=True)
      dk += _dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv
    return _visit_blocks(ranges, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, mask, soft_cap, blocks, interpret):
  batch, seq_len, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  kernel = functools.partial(_fwd_kernel, mask=mask, scale=head_dim ** -0.5, soft_cap=soft_cap,
                             block_q=blocks.block_q, block_k=blocks.block_k)
  q_spec = pl.BlockSpec((None, blocks.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, seq_len, None, head_dim),
                         lambda i, b, h: (b, 0, lax.div(h, group), 0))
  return pl.pallas_call(
      kernel,
      grid=(seq_len // blocks.block_q, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, blocks.block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, seq_len), jnp.float32)],
      interpret=interpret,
      name="block_causal_attention_fwd",
  )(q, k, v)


def _backward(q, k, v, out, lse, do, mask, soft_cap, blocks, interpret):
  batch, seq_len, num_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = num_heads // kv_heads
  scale = head_dim ** -0.5
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32),
                     precision=HIGHEST)

  q_spec = pl.BlockSpec((None, blocks.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, seq_len, None, head_dim),
                         lambda i, b, h: (b, 0, lax.div(h, group), 0))
  row_spec = pl.BlockSpec((None, None, blocks.block_q), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, mask=mask, scale=scale, soft_cap=soft_cap,
                        block_q=blocks.block_q, block_k=blocks.block_k),
      grid=(seq_len // blocks.block_q, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      name="block_causal_attention_dq",
  )(q, k, v, do, lse, delta)

  kv_block_spec = pl.BlockSpec((None, blocks.block_k_dkv, None, head_dim),
                               lambda j, b, h: (b, j, h, 0))
  q_group_spec = pl.BlockSpec((None, seq_len, group, head_dim), lambda j, b, h: (b, 0, h, 0))
  rows_group_spec = pl.BlockSpec((None, group, seq_len), lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, mask=mask, scale=scale, soft_cap=soft_cap,
                        block_q=blocks.block_q_dkv, block_k=blocks.block_k_dkv, group=group),
      grid=(seq_len // blocks.block_k_dkv, batch, kv_heads),
      in_specs=[q_group_spec, kv_block_spec, kv_block_spec, q_group_spec, rows_group_spec,
                rows_group_spec],
      out_specs=[kv_block_spec, kv_block_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret,
      name="block_causal_attention_dkv",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, mask, soft_cap, blocks, interpret):
  return _forward(q, k, v, mask, soft_cap, blocks, interpret)[0]


def _attention_fwd(q, k, v, mask, soft_cap, blocks, interpret):
  out, lse = _forward(q, k, v, mask, soft_cap, blocks, interpret)
  return out, (q, k, v, out, lse)


def _attention_bwd(mask, soft_cap, blocks, interpret, residuals, do):
  return _backward(*residuals, do, mask, soft_cap, blocks, interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_inputs(q, k, v, frame_size, window_frames, soft_cap, block_sizes):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, tokens, heads, head_dim], got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, tokens and head_dim "
                     "(self-attention)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if frame_size < 1:
    raise ValueError(f"frame_size must be >= 1, got {frame_size}")
  if window_frames is not None and window_frames < 1:
    raise ValueError(f"window_frames must be >= 1 or None, got {window_frames}")
  if soft_cap is not None and soft_cap <= 0:
    raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap}")
  if min(dataclasses.astuple(block_sizes)) < 1:
    raise ValueError(f"block sizes must be positive, got {block_sizes}")


@functools.partial(jax.jit, static_argnames=("frame_size", "window_frames", "soft_cap",
                                             "block_sizes", "interpret"))
def block_causal_attention(q, k, v, *, frame_size: int, window_frames: int | None = None,
                           soft_cap: float | None = None, block_sizes: BlockSizes | None = None,
                           interpret: bool = False):
  """Block-causal multi-head attention with GQA, optional soft-cap and sliding window.

  Args:
    q: [batch, tokens, heads, head_dim].
    k, v: [batch, tokens, kv_heads, head_dim], heads a multiple of kv_heads.
    frame_size: tokens per frame; 1 is plain causal attention.
    window_frames: if set, a query in frame f sees only frames f - window_frames + 1 .. f.
    soft_cap: if set, logits = soft_cap * tanh(logits / soft_cap) (after the 1/sqrt(d) scale).
    block_sizes: kernel tiles, `BlockSizes()` by default.
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).

  Returns:
    [batch, tokens, heads, head_dim] in q's dtype.
  """
  block_sizes = block_sizes or BlockSizes()
  _check_inputs(q, k, v, frame_size, window_frames, soft_cap, block_sizes)
  seq_len = q.shape[1]
  smallest = 1 if interpret else MIN_COMPILED_BLOCK
  fit = lambda b: max(min(b, pl.next_power_of_2(seq_len)), smallest)
  blocks = BlockSizes(*map(fit, dataclasses.astuple(block_sizes)))
  tile = math.lcm(*dataclasses.astuple(blocks))
  padded_len = -(-seq_len // tile) * tile
  pad = [(0, 0), (0, padded_len - seq_len), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  out = _attention(q, k, v, _FrameMask(seq_len, frame_size, window_frames), soft_cap, blocks,
                   interpret)
  return out[:, :seq_len]


def block_causal_mask(seq_len: int, frame_size: int, window_frames: int | None = None):
  """Boolean [seq_len, seq_len], True where query i may see key j."""
  q_frame = jnp.arange(seq_len)[:, None] // frame_size
  k_frame = jnp.arange(seq_len)[None, :] // frame_size
  visible = k_frame <= q_frame
  if window_frames is not None:
    visible &= k_frame > q_frame - window_frames
  return visible


def reference_block_causal_attention(q, k, v, *, frame_size: int, window_frames: int | None = None,
                                     soft_cap: float | None = None):
  """Plain-jnp twin of `block_causal_attention` (dense logits, fp32 softmax)."""
  batch, seq_len, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k,
                      precision=HIGHEST) * head_dim ** -0.5
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  logits = jnp.where(block_causal_mask(seq_len, frame_size, window_frames), logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=HIGHEST).astype(q.dtype)
