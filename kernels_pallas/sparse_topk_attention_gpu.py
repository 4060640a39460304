"""GPU (Triton-dialect Pallas) kernels of `sparse_topk_attention`: the lightning indexer and the
sparse top-k attention. The public API, block sizes, checks and references are there.

Indexer: one program per [block_q, block_k] score tile (tiles above the diagonal are written as
-inf without compute); backward in a query-major dq/dw kernel and a key-major dk kernel.

Sparse attention: one program per (batch, token) gathers the token's selected rows, block_topk at
a time, with an online softmax; the heads of the token are the rows of every matmul. Two
backward passes:
- "atomic" (the default): the same query-major walk scatters dk/dv into fp32 buffers of all keys
  with atomic adds, which stays correct when many queries select the same key.
- "key_major": no atomics, and a fixed summation order. dq comes from the query-major walk alone.
  dk/dv come from one program per block of block_k keys, which reads the (query, key) pairs that
  chose a key of its block: the index is inverted in XLA by sorting the pairs by key
  (`_pairs_by_key`), so a block's pairs are one contiguous segment. The program walks it
  block_topk // heads pairs at a time, each pair a [heads, D] slab of rows: it gathers those
  queries' q/do/lse/delta rows, takes their logits (and do . v) against the whole key block by
  matmul and keeps each row's own key with a one-hot mask, then adds the one-hot-weighted p and
  ds rows into the block's dk/dv accumulators by matmul, in registers; nothing is written until
  the block is done. It has been run only in interpret mode (no GPU was at hand), so
  `gpu_backward="atomic"` stays the default until the two are measured against each other.

Index -1 means "no key": it is redirected to a zero "sink" row appended after the last key, so
gathers never go out of bounds and scattered gradients of empty slots land in a row that is
dropped.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.sparse_topk_attention_common import HIGHEST
from kernels_pallas.sparse_topk_attention_common import MASK_VALUE
from kernels_pallas.sparse_topk_attention_common import causal as _causal
from kernels_pallas.sparse_topk_attention_common import dot as _dot
from kernels_pallas.sparse_topk_attention_common import pad_axis as _pad_axis

# Triton's tl.dot needs every matmul dimension >= 16; the interpreter takes any size.
MIN_COMPILED_BLOCK = 16

BACKWARDS = ("atomic", "key_major")


def fit(block, size, interpret):
  return max(min(block, pl.next_power_of_2(size)), 1 if interpret else MIN_COMPILED_BLOCK)


def indexer_blocks(block_sizes, num_q, num_k, dtype, interpret):
  """The indexer's tiles for these lengths: powers of two no longer than needed."""
  del dtype
  return dataclasses.replace(block_sizes, block_q=fit(block_sizes.block_q, num_q, interpret),
                             block_k=fit(block_sizes.block_k, num_k, interpret))


# ----------------------------------------------------------------------------- lightning indexer


def _head_logits(q, k, q_scale, k_scale):
  """q [bq, D] . k [bk, D] for one indexer head; fp8 inputs are rescaled block by block."""
  if q_scale is None:
    return _dot(q, k, trans_b=True)
  block = q.shape[-1] // q_scale.shape[-1]
  logits = 0.0
  for c in range(q_scale.shape[-1]):
    part = slice(c * block, (c + 1) * block)
    logits += _dot(q[:, part], k[:, part], trans_b=True) * q_scale[:, c:c + 1] * k_scale[None, :, c]
  return logits


def _indexer_fwd_kernel(q_ref, k_ref, w_ref, q_scale_ref, k_scale_ref, o_ref, *, block_q,
                        block_k):
  q_start, k_start = pl.program_id(1) * block_q, pl.program_id(2) * block_k
  above_diagonal = k_start > q_start + block_q - 1

  @pl.when(above_diagonal)
  def _():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, o_ref.dtype)

  @pl.when(jnp.logical_not(above_diagonal))
  def _():
    k = k_ref[...]
    k_scale = None if k_scale_ref is None else k_scale_ref[...]

    def head(h, scores):
      q_scale = None if q_scale_ref is None else q_scale_ref[:, h, :]
      logits = _head_logits(q_ref[:, h, :], k, q_scale, k_scale)
      return scores + w_ref[:, h].astype(jnp.float32)[:, None] * jnp.maximum(logits, 0.0)

    scores = lax.fori_loop(0, q_ref.shape[1], head, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = jnp.where(_causal(q_start, k_start, o_ref.shape), scores, -jnp.inf)


def _indexer_dq_kernel(q_ref, k_ref, w_ref, ds_ref, dq_ref, dw_ref, *, block_q, block_k):
  # One program per query tile: loops over heads, then over the key tiles up to the diagonal.
  q_start = pl.program_id(1) * block_q
  num_k_blocks = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k),
                             k_ref.shape[0] // block_k)

  def head(h, _):
    q = q_ref[:, h, :]

    def body(j, carry):
      dq, dw = carry
      k = k_ref[pl.ds(j * block_k, block_k), :]
      ds = ds_ref[:, pl.ds(j * block_k, block_k)]
      ds = jnp.where(_causal(q_start, j * block_k, ds.shape), ds, 0.0)
      logits = _dot(q, k, trans_b=True)
      dw += jnp.sum(ds * jnp.maximum(logits, 0.0), axis=1)
      dq += _dot(jnp.where(logits > 0, ds, 0.0).astype(k.dtype), k)
      return dq, dw

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    dq, dw = lax.fori_loop(0, num_k_blocks, body, init)
    dq_ref[:, h, :] = (dq * w_ref[:, h].astype(jnp.float32)[:, None]).astype(dq_ref.dtype)
    dw_ref[:, h] = dw.astype(dw_ref.dtype)
    return ()

  lax.fori_loop(0, q_ref.shape[1], head, ())


def _indexer_dk_kernel(q_ref, k_ref, w_ref, ds_ref, dk_ref, *, block_q, block_k):
  # One program per key tile: loops over the query tiles from the diagonal down, then heads.
  k_start = pl.program_id(1) * block_k
  k = k_ref[...]

  def body(i, dk):
    q_slice = pl.ds(i * block_q, block_q)
    ds = ds_ref[q_slice, :]
    ds = jnp.where(_causal(i * block_q, k_start, ds.shape), ds, 0.0)

    def head(h, dk):
      q = q_ref[q_slice, h, :]
      logits = _dot(q, k, trans_b=True)
      dlogits = jnp.where(logits > 0, ds * w_ref[q_slice, h].astype(jnp.float32)[:, None], 0.0)
      return dk + _dot(dlogits.astype(q.dtype), q, trans_a=True)

    return lax.fori_loop(0, q_ref.shape[1], head, dk)

  dk = lax.fori_loop(lax.div(k_start, block_q), q_ref.shape[0] // block_q, body,
                     jnp.zeros(k.shape, jnp.float32))
  dk_ref[...] = dk.astype(dk_ref.dtype)


def indexer_forward(q, k, w, q_scale, k_scale, blocks, interpret):
  """Scores [B, T, S] fp32 of padded inputs (T, S multiples of the tiles)."""
  batch, num_q, num_heads, dim = q.shape
  num_k = k.shape[1]
  q_spec = pl.BlockSpec((None, blocks.block_q, num_heads, dim), lambda b, i, j: (b, i, 0, 0))
  k_spec = pl.BlockSpec((None, blocks.block_k, dim), lambda b, i, j: (b, j, 0))
  w_spec = pl.BlockSpec((None, blocks.block_q, num_heads), lambda b, i, j: (b, i, 0))
  scale_specs = None
  if q_scale is not None:
    scale_specs = [
        pl.BlockSpec((None, blocks.block_q, num_heads, q_scale.shape[-1]),
                     lambda b, i, j: (b, i, 0, 0)),
        pl.BlockSpec((None, blocks.block_k, k_scale.shape[-1]), lambda b, i, j: (b, j, 0)),
    ]
  return pl.pallas_call(
      functools.partial(_indexer_fwd_kernel, block_q=blocks.block_q, block_k=blocks.block_k),
      grid=(batch, num_q // blocks.block_q, num_k // blocks.block_k),
      in_specs=[q_spec, k_spec, w_spec, *(scale_specs or [None, None])],
      out_specs=pl.BlockSpec((None, blocks.block_q, blocks.block_k), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((batch, num_q, num_k), jnp.float32),
      interpret=interpret,
      name="lightning_indexer_fwd",
  )(q, k, w, q_scale, k_scale)


def indexer_backward(q, k, w, dscores, blocks, interpret):
  """(dq, dk, dw) of padded inputs."""
  batch, num_q, num_heads, dim = q.shape
  num_k = k.shape[1]
  dq, dw = pl.pallas_call(
      functools.partial(_indexer_dq_kernel, block_q=blocks.block_q, block_k=blocks.block_k),
      grid=(batch, num_q // blocks.block_q),
      in_specs=[
          pl.BlockSpec((None, blocks.block_q, num_heads, dim), lambda b, i: (b, i, 0, 0)),
          pl.BlockSpec((None, num_k, dim), lambda b, i: (b, 0, 0)),
          pl.BlockSpec((None, blocks.block_q, num_heads), lambda b, i: (b, i, 0)),
          pl.BlockSpec((None, blocks.block_q, num_k), lambda b, i: (b, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, blocks.block_q, num_heads, dim), lambda b, i: (b, i, 0, 0)),
          pl.BlockSpec((None, blocks.block_q, num_heads), lambda b, i: (b, i, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype)],
      interpret=interpret,
      name="lightning_indexer_dq",
  )(q, k, w, dscores)
  dk = pl.pallas_call(
      functools.partial(_indexer_dk_kernel, block_q=blocks.block_q, block_k=blocks.block_k),
      grid=(batch, num_k // blocks.block_k),
      in_specs=[
          pl.BlockSpec((None, num_q, num_heads, dim), lambda b, j: (b, 0, 0, 0)),
          pl.BlockSpec((None, blocks.block_k, dim), lambda b, j: (b, j, 0)),
          pl.BlockSpec((None, num_q, num_heads), lambda b, j: (b, 0, 0)),
          pl.BlockSpec((None, num_q, blocks.block_k), lambda b, j: (b, 0, j)),
      ],
      out_specs=pl.BlockSpec((None, blocks.block_k, dim), lambda b, j: (b, j, 0)),
      out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype),
      interpret=interpret,
      name="lightning_indexer_dk",
  )(q, k, w, dscores)
  return dq, dk, dw


# ----------------------------------------------------------------------------- sparse attention


def _selected_rows(idx_ref, k_ref, v_ref, q, chunk, *, block_topk, scale):
  """Gathers one chunk of selected rows and returns (indices, k, v, masked logits [H, chunk])."""
  idx = idx_ref[pl.ds(chunk * block_topk, block_topk)]
  k, v = k_ref[idx, :], v_ref[idx, :]
  sink = k_ref.shape[0] - 1
  logits = jnp.where((idx < sink)[None, :], _dot(q, k, trans_b=True) * scale, MASK_VALUE)
  return idx, k, v, logits


def _sparse_fwd_kernel(q_ref, idx_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_topk):
  # One program per (batch, token): its heads form the rows of every matmul.
  q = q_ref[...]

  def body(chunk, carry):
    acc, m, l = carry
    _, _, v, logits = _selected_rows(idx_ref, k_ref, v_ref, q, chunk, block_topk=block_topk,
                                     scale=scale)
    m_new = jnp.maximum(m, logits.max(axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    l = rescale * l + p.sum(axis=1)
    acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  num_heads = q.shape[0]
  init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((num_heads,), -jnp.inf, jnp.float32),
          jnp.zeros((num_heads,), jnp.float32))
  acc, m, l = lax.fori_loop(0, idx_ref.shape[0] // block_topk, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _chunk_grads(idx_ref, k_ref, v_ref, q, do, lse, delta, chunk, *, block_topk, scale):
  """One chunk of a query's backward: (indices, k, p, ds), p and ds [H, chunk]."""
  idx, k, v, logits = _selected_rows(idx_ref, k_ref, v_ref, q, chunk, block_topk=block_topk,
                                     scale=scale)
  p = jnp.exp(logits - lse[:, None])
  ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
  return idx, k, p, ds


def _sparse_bwd_kernel(q_ref, idx_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_init_ref,
                       dv_init_ref, dq_ref, dk_ref, dv_ref, *, scale, block_topk):
  # dk_ref/dv_ref alias zero-filled fp32 buffers holding all keys of the batch row; queries
  # selecting the same key add into it concurrently, hence the atomics.
  del dk_init_ref, dv_init_ref
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  k_cols = lax.broadcasted_iota(jnp.int32, (1, dk_ref.shape[1]), 1)
  v_cols = lax.broadcasted_iota(jnp.int32, (1, dv_ref.shape[1]), 1)

  def body(chunk, dq):
    idx, k, p, ds = _chunk_grads(idx_ref, k_ref, v_ref, q, do, lse, delta, chunk,
                                 block_topk=block_topk, scale=scale)
    rows = idx[:, None]
    plgpu.atomic_add(dv_ref, (rows, v_cols), _dot(p.astype(do.dtype), do, trans_a=True))
    plgpu.atomic_add(dk_ref, (rows, k_cols), _dot(ds.astype(q.dtype), q, trans_a=True) * scale)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, idx_ref.shape[0] // block_topk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _sparse_dq_kernel(q_ref, idx_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
                      block_topk):
  # The query-major half of the key-major backward: dq only, nothing scattered.
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(chunk, dq):
    _, k, _, ds = _chunk_grads(idx_ref, k_ref, v_ref, q, do, lse, delta, chunk,
                               block_topk=block_topk, scale=scale)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, idx_ref.shape[0] // block_topk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _sparse_dkv_kernel(bounds_ref, pair_query_ref, pair_key_ref, q_ref, do_ref, lse_ref,
                       delta_ref, k_ref, v_ref, dk_ref, dv_ref, *, scale, num_heads,
                       pairs_per_chunk):
  # One program per block of keys [k_start, k_start + block_k): the pairs that chose them are
  # pair_*_ref[bounds[j]:bounds[j + 1]], walked pairs_per_chunk pairs (x heads rows) at a time.
  j = pl.program_id(1)
  block_k = k_ref.shape[0]
  k_start = j * block_k
  start, end = bounds_ref[j], bounds_ref[j + 1]
  num_pairs = pair_query_ref.shape[0]
  k, v = k_ref[...], v_ref[...]
  rows = lax.broadcasted_iota(jnp.int32, (pairs_per_chunk * num_heads,), 0)
  head = rows % num_heads
  keys = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

  def body(chunk, carry):
    dk, dv = carry
    position = start + chunk * pairs_per_chunk + rows // num_heads
    valid = position < end
    position = jnp.minimum(position, num_pairs - 1)
    query_row = pair_query_ref[position] * num_heads + head  # row of [T * H] flattened q
    own_key = valid[:, None] & (pair_key_ref[position][:, None] - k_start == keys)  # [rows, bk]
    q, do = q_ref[query_row, :], do_ref[query_row, :]
    # Every row against the whole key block; the one-hot keeps the row's own key.
    logits = jnp.sum(jnp.where(own_key, _dot(q, k, trans_b=True), 0.0), axis=1) * scale
    dp = jnp.sum(jnp.where(own_key, _dot(do, v, trans_b=True), 0.0), axis=1)
    p = jnp.where(valid, jnp.exp(logits - lse_ref[query_row]), 0.0)
    ds = p * (dp - delta_ref[query_row])
    p_rows = jnp.where(own_key, p[:, None], 0.0).astype(do.dtype)  # [rows, bk]
    ds_rows = jnp.where(own_key, ds[:, None], 0.0).astype(q.dtype)
    return dk + _dot(ds_rows, q, trans_a=True), dv + _dot(p_rows, do, trans_a=True)

  num_chunks = lax.div(end - start + pairs_per_chunk - 1, pairs_per_chunk)
  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, num_chunks, body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _sparse_specs(q, k, v, indices):
  num_heads, dim = q.shape[2:]
  num_rows, dim_v = k.shape[1], v.shape[2]
  token = lambda width: pl.BlockSpec((None, None, num_heads, width), lambda b, t: (b, t, 0, 0))
  rows = lambda width: pl.BlockSpec((None, num_rows, width), lambda b, t: (b, 0, 0))
  per_head = pl.BlockSpec((None, None, num_heads), lambda b, t: (b, t, 0))
  idx = pl.BlockSpec((None, None, indices.shape[2]), lambda b, t: (b, t, 0))
  return token(dim), token(dim_v), rows(dim), rows(dim_v), per_head, idx


def _sparse_forward(q, k, v, indices, block_topk, interpret):
  batch, num_q, num_heads, _ = q.shape
  q_spec, o_spec, k_spec, v_spec, lse_spec, idx_spec = _sparse_specs(q, k, v, indices)
  return pl.pallas_call(
      functools.partial(_sparse_fwd_kernel, scale=q.shape[-1] ** -0.5, block_topk=block_topk),
      grid=(batch, num_q),
      in_specs=[q_spec, idx_spec, k_spec, v_spec],
      out_specs=[o_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct((*q.shape[:3], v.shape[2]), q.dtype),
                 jax.ShapeDtypeStruct((batch, num_q, num_heads), jnp.float32)],
      interpret=interpret,
      name="sparse_topk_attention_fwd",
  )(q, indices, k, v)


def _delta(out, do):
  return jnp.einsum("bthd,bthd->bth", out.astype(jnp.float32), do.astype(jnp.float32),
                    precision=HIGHEST)


def _atomic_backward(q, k, v, indices, out, lse, do, block_topk, interpret):
  batch, num_q = q.shape[:2]
  q_spec, o_spec, k_spec, v_spec, lse_spec, idx_spec = _sparse_specs(q, k, v, indices)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_sparse_bwd_kernel, scale=q.shape[-1] ** -0.5, block_topk=block_topk),
      grid=(batch, num_q),
      in_specs=[q_spec, idx_spec, k_spec, v_spec, o_spec, lse_spec, lse_spec, k_spec, v_spec],
      out_specs=[q_spec, k_spec, v_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, jnp.float32)],
      input_output_aliases={7: 1, 8: 2},
      interpret=interpret,
      name="sparse_topk_attention_bwd",
  )(q, indices, k, v, do, lse, _delta(out, do), jnp.zeros(k.shape, jnp.float32),
    jnp.zeros(v.shape, jnp.float32))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def _pairs_by_key(indices, num_keys, block_k):
  """The (query, key) pairs of `indices` [B, T, K] (sink = num_keys), sorted by key: the query
  and key of each pair [B, T * K] and, per block of block_k keys, where its pairs start
  [B, num_blocks + 1]. Sink pairs sort last and belong to no block."""
  batch, num_q, top_k = indices.shape
  keys = indices.reshape(batch, num_q * top_k)
  order = jnp.argsort(keys, axis=1, stable=True).astype(jnp.int32)
  pair_key = jnp.take_along_axis(keys, order, axis=1)
  num_blocks = -(-num_keys // block_k)
  edges = jnp.minimum(jnp.arange(num_blocks + 1, dtype=jnp.int32) * block_k, num_keys)
  bounds = jax.vmap(lambda row: jnp.searchsorted(row, edges).astype(jnp.int32))(pair_key)
  return order // top_k, pair_key, bounds


def _key_major_backward(q, k, v, indices, out, lse, do, block_topk, block_k, interpret):
  batch, num_q, num_heads, dim = q.shape
  num_keys, dim_v = k.shape[1] - 1, v.shape[2]  # k, v end with the sink row
  scale = dim ** -0.5
  q_spec, o_spec, k_spec, v_spec, lse_spec, idx_spec = _sparse_specs(q, k, v, indices)
  delta = _delta(out, do)
  dq = pl.pallas_call(
      functools.partial(_sparse_dq_kernel, scale=scale, block_topk=block_topk),
      grid=(batch, num_q),
      in_specs=[q_spec, idx_spec, k_spec, v_spec, o_spec, lse_spec, lse_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      name="sparse_topk_attention_dq",
  )(q, indices, k, v, do, lse, delta)

  pair_query, pair_key, bounds = _pairs_by_key(indices, num_keys, block_k)
  num_blocks = bounds.shape[1] - 1
  k_rows, v_rows = (_pad_axis(x[:, :num_keys], 1, block_k) for x in (k, v))
  flat = lambda x: x.reshape(batch, num_q * num_heads, *x.shape[3:])  # [B, T * H, ...]
  pairs_per_chunk = max(1, block_topk // num_heads)  # rows of a chunk: pairs x heads
  whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda b, j: (b,) + (0,) * (x.ndim - 1))
  per_block = lambda width: pl.BlockSpec((None, block_k, width), lambda b, j: (b, j, 0))
  inputs = (bounds, pair_query, pair_key, flat(q), flat(do), flat(lse), flat(delta))
  dk, dv = pl.pallas_call(
      functools.partial(_sparse_dkv_kernel, scale=scale, num_heads=num_heads,
                        pairs_per_chunk=pairs_per_chunk),
      grid=(batch, num_blocks),
      in_specs=[*map(whole, inputs), per_block(dim), per_block(dim_v)],
      out_specs=[per_block(dim), per_block(dim_v)],
      out_shape=[jax.ShapeDtypeStruct(k_rows.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v_rows.shape, jnp.float32)],
      interpret=interpret,
      name="sparse_topk_attention_dkv_key_major",
  )(*inputs, k_rows, v_rows)
  # Back to the [B, S + 1, D] layout of k and v; the sink row gets no gradient.
  dk, dv = (jnp.pad(x[:, :num_keys], [(0, 0), (0, 1), (0, 0)]) for x in (dk, dv))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _sparse_attention(q, k, v, indices, block_topk, block_k, backward, interpret):
  return _sparse_forward(q, k, v, indices, block_topk, interpret)[0]


def _sparse_attention_fwd(q, k, v, indices, block_topk, block_k, backward, interpret):
  out, lse = _sparse_forward(q, k, v, indices, block_topk, interpret)
  return out, (q, k, v, indices, out, lse)


def _sparse_attention_bwd(block_topk, block_k, backward, interpret, residuals, do):
  if backward == "atomic":
    dq, dk, dv = _atomic_backward(*residuals, do, block_topk, interpret)
  else:
    dq, dk, dv = _key_major_backward(*residuals, do, block_topk, block_k, interpret)
  return dq, dk, dv, None


_sparse_attention.defvjp(_sparse_attention_fwd, _sparse_attention_bwd)


def sparse_topk_attention(q, k, v, indices, block_sizes, backward, interpret):
  """The GPU kernels on checked inputs (see the public function)."""
  num_heads, head_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
  if not interpret:
    # Triton tiles are powers of two >= 16: heads (the rows of every matmul) and value_dim are
    # zero-padded here; head_dim cannot be (it sets the 1/sqrt(d) scale), so it must already be.
    if head_dim < MIN_COMPILED_BLOCK or head_dim & (head_dim - 1):
      raise ValueError(f"compiled sparse_topk_attention needs head_dim to be a power of two >= "
                       f"{MIN_COMPILED_BLOCK}, got {head_dim}")
    q = _pad_axis(q, 2, max(pl.next_power_of_2(num_heads), MIN_COMPILED_BLOCK))
    v = _pad_axis(v, 3, max(pl.next_power_of_2(value_dim), MIN_COMPILED_BLOCK))
  num_keys = k.shape[1]
  block_topk = fit(block_sizes.block_topk, indices.shape[2], interpret)
  # The key-major dk/dv kernel's key block; its rows (pairs x heads) are >= block_topk.
  block_k = fit(block_sizes.block_k, num_keys, interpret)
  indices = jnp.where(indices < 0, num_keys, indices).astype(jnp.int32)
  indices = _pad_axis(indices, 2, block_topk, value=num_keys)
  k, v = (jnp.pad(x[:, :, 0], [(0, 0), (0, 1), (0, 0)]) for x in (k, v))  # + the sink row
  out = _sparse_attention(q, k, v, indices, block_topk, block_k, backward, interpret)
  return out[:, :, :num_heads, :value_dim]
