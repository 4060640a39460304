"""GPU (Triton) kernels of `block_causal_attention.block_causal_attention`.

One program per (query block, batch, head) for the forward and dq kernels, one per (kv block,
batch, kv head) for the dk/dv kernel, which sums over the query heads sharing its kv head. Each
program walks only the blocks that hold a visible pair, with `fori_loop` bounds from
`frame_mask.FrameMask` evaluated in the kernel, and masks only the partial blocks. Layout is
[batch, tokens, heads, head_dim], padded by the caller to a multiple of every block size.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import kernels_pallas.frame_mask as frame_mask
from kernels_pallas.frame_mask import MASK_VALUE

# Triton's tl.dot needs every matmul dimension >= 16; the interpreter takes any size.
MIN_COMPILED_BLOCK = 16

HIGHEST = lax.Precision.HIGHEST


def _dot(a, b, *, trans_a=False, trans_b=False):
  """2-D matmul accumulating in fp32 (the form every Pallas backend lowers). HIGHEST keeps fp32
  inputs in fp32 (Triton's default would round them to TF32); bf16 inputs are unaffected."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=HIGHEST,
                         preferred_element_type=jnp.float32)


def _visit_blocks(ranges, body, carry):
  """Runs body(block, carry, masked=...) over the visible blocks, masking only the partial ones."""
  # Static (Python int) bounds would give a weak-typed loop index, which Triton fails to lower.
  lo, full_lo, full_hi, hi = (lax.convert_element_type(b, jnp.int32) for b in ranges)
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


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


attention = frame_mask.flash_attention(_forward, _backward)
