"""Who sees whom in block-causal attention, and which kernel tiles that leaves to visit.

Shared by the GPU (Triton) and TPU (Mosaic) kernels of `block_causal_attention`: `FrameMask` is
the per-element mask on arrays padded past the real tokens, and its `kv_blocks` / `q_blocks`
turn it into the block ranges a kernel visits. The GPU kernels evaluate them inside the kernel (as
loop bounds); the TPU kernels evaluate them for every tile at trace time (scalar-prefetch tables).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp

# Finite, so that a row whose first visited block is entirely masked produces no NaN: what it
# accumulates there is scaled by exp(MASK_VALUE - m) == 0 as soon as a visible key arrives.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# Python ints stay Python ints in these helpers: an op on constants alone inside a kernel does not
# lower on Triton, and the TPU wrapper evaluates the block ranges of every tile in plain Python.


def _static(*xs):
  return all(isinstance(x, int) for x in xs)


def _div(a, b):
  """a // b for a >= 0."""
  return a // b if _static(a) else lax.div(a, b)


def _cdiv(a, b):
  return _div(a + b - 1, b)


def _maximum(a, b):
  return max(a, b) if _static(a, b) else jnp.maximum(a, b)


def _minimum(a, b):
  return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def _where(pred, a, b):
  """Scalar jnp.where; between two static ints it uses arithmetic, since Triton does not lower a
  select between two constants."""
  if isinstance(pred, bool):  # bool before int: a bool is an int
    return a if pred else b
  if _static(a, b):
    return b + (a - b) * lax.convert_element_type(pred, jnp.int32)
  return jnp.where(pred, a, b)


def block_ranges(start_any, end_any, start_all, end_all, block):
  """Turns token ranges into block ranges (lo, full_lo, full_hi, hi).

  [start_any, end_any) holds every token visible to some row of the tile, [start_all, end_all)
  the tokens visible to all of them: blocks [lo, hi) must be visited, [full_lo, full_hi) of those
  need no mask.
  """
  lo = _div(start_any, block)
  hi = _maximum(_cdiv(end_any, block), lo)
  full_lo = _minimum(_maximum(_cdiv(start_all, block), lo), hi)
  full_hi = _minimum(_maximum(_div(end_all, block), full_lo), hi)
  return lo, full_lo, full_hi, hi


@dataclasses.dataclass(frozen=True)
class FrameMask:
  """Who sees whom, on arrays padded past `seq_len` real tokens.

  Padded queries behave as the last real query (so no row is empty and the backward pass stays
  finite); padded keys are seen by nobody. Positions may be arrays; the block ranges of a
  static (Python int) tile start are Python ints.
  """
  seq_len: int
  frame_size: int
  window_frames: int | None

  def query_frame(self, pos):
    return _div(_minimum(pos, self.seq_len - 1), self.frame_size)

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
    end_any = _minimum((last + 1) * f, n)
    end_all = _minimum((first + 1) * f, n)
    if self.window_frames is None:
      start_any = start_all = 0
    else:
      start_any = _maximum(first - self.window_frames + 1, 0) * f
      start_all = _maximum(last - self.window_frames + 1, 0) * f
    return block_ranges(start_any, end_any, start_all, end_all, block_k)

  def q_blocks(self, k_start, block_k, block_q):
    """Query block ranges for the keys [k_start, k_start + block_k)."""
    f, n = self.frame_size, self.seq_len
    first = _div(k_start, f)
    last = _div(_minimum(k_start + block_k - 1, n - 1), f)
    # Queries up to the end of frame `fr`; the padded queries of the last real block behave as
    # the last real query, so the last frame ends with that block.
    last_row_end = _cdiv(n, block_q) * block_q
    frames_end = lambda fr: _where((fr + 1) * f < n, (fr + 1) * f, last_row_end)
    if self.window_frames is None:
      end_any = end_all = last_row_end
    else:
      end_any = frames_end(last + self.window_frames - 1)
      end_all = frames_end(first + self.window_frames - 1)
    end_any = _where(k_start < n, end_any, 0)
    end_all = _where(k_start + block_k <= n, end_all, 0)  # padded keys need the mask
    return block_ranges(first * f, end_any, last * f, end_all, block_q)


def flash_attention(forward, backward):
  """The differentiable attention(q, k, v, mask, soft_cap, blocks, interpret) of a dialect from
  its kernels: forward(...) -> (out, lse); backward(q, k, v, out, lse, do, mask, soft_cap, blocks,
  interpret) -> (dq, dk, dv)."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
  def attention(q, k, v, mask, soft_cap, blocks, interpret):
    return forward(q, k, v, mask, soft_cap, blocks, interpret)[0]

  def attention_fwd(q, k, v, mask, soft_cap, blocks, interpret):
    out, lse = forward(q, k, v, mask, soft_cap, blocks, interpret)
    return out, (q, k, v, out, lse)

  def attention_bwd(mask, soft_cap, blocks, interpret, residuals, do):
    return backward(*residuals, do, mask, soft_cap, blocks, interpret)

  attention.defvjp(attention_fwd, attention_bwd)
  return attention
