"""TPU (Mosaic) kernels of `block_causal_attention.block_causal_attention`.

Layout inside is [batch, heads, tokens, head_dim], so every block's last two dims are
(tokens, head_dim): a token tile a multiple of 128 (compiled) and the whole head_dim.

Which blocks a tile visits depends only on static sizes, so `frame_mask.FrameMask`'s block ranges
are evaluated for every tile at trace time and handed to the kernels as scalar-prefetch tables.
The inner grid axis runs over the visited blocks, as many steps as the longest range (with a
sliding window that is the window's width, not the sequence). Step s of tile i reads block
min(lo[i] + s, hi[i] - 1): steps past the range name the block already in VMEM, so the pipeline
issues no DMA, and `pl.when` skips their compute. Blocks in [full_lo, full_hi) run unmasked; only
the partial ones on frame boundaries (and the window's edge) evaluate the mask.

The forward keeps the online-softmax statistics and the output accumulator in fp32 VMEM scratch
across the "arbitrary" kv axis and writes the logsumexp lane-broadcast ([tokens, 128] per head);
the backward takes it as a row [1, tokens]. dq walks kv blocks per query tile; dk/dv walks, per
kv tile, the query blocks of every query head sharing the kv head (GQA) on transposed logits
k @ q.T, so the row statistics broadcast along sublanes and no matmul needs a transpose.

XLA cannot partition a Mosaic kernel, so traced for a mesh of several devices (`jax.set_mesh`)
the kernels run under a shard_map that splits batch and kv heads over the mesh axes (see
`_per_device`).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

import kernels_pallas.backend as backend_lib
import kernels_pallas.frame_mask as frame_mask
from kernels_pallas.backend import mesh_split
from kernels_pallas.frame_mask import MASK_VALUE

# Token tiles are the sublane dim of q/k/v blocks and the lane dim of the row statistics, so a
# compiled tile is a multiple of the 128 lanes; the interpreter takes any size.
LANES = 128
MIN_COMPILED_BLOCK = LANES

NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))  # right operand transposed


def _dot(a, b, dims):
  """Matmul accumulating in fp32; fp32 inputs stay fp32 (Mosaic's multi-pass HIGHEST)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(a, b, scale, soft_cap):
  """Scaled, optionally soft-capped a @ b.T in fp32, and tanh(.) for the soft-cap derivative."""
  s = _dot(a, b, NT) * scale
  if soft_cap is None:
    return s, None
  t = jnp.tanh(s / soft_cap)
  return soft_cap * t, t


def _positions(start, shape, axis):
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def _block_tables(ranges_of, num_tiles, tile):
  """The (lo, full_lo, full_hi, hi) ranges of every tile as int32 [num_tiles] constants, and the
  grid steps the longest range needs. Plain Python: they depend only on static sizes, and no
  array can be evaluated eagerly while tracing for devices that are not attached."""
  ranges = [ranges_of(i * tile) for i in range(num_tiles)]
  steps = max(max(hi - lo for lo, *_, hi in ranges), 1)
  return [jnp.asarray(column, jnp.int32) for column in zip(*ranges)], steps


def _visited(tile, step, tables):
  """Block read at `step` of `tile`: steps past the range repeat the last block (no new DMA)."""
  lo, _, _, hi = (t[tile] for t in tables)
  return jnp.minimum(lo + step, jnp.maximum(hi - 1, lo))


def _run_visible(block, tile, tables, body):
  """Runs body(masked=...) if `block` is in the tile's range, masked only if it is partial."""
  _, full_lo, full_hi, hi = (t[tile] for t in tables)  # block >= lo by construction
  in_range = block < hi
  partial = (block < full_lo) | (block >= full_hi)
  pl.when(in_range & partial)(functools.partial(body, masked=True))
  pl.when(in_range & jnp.logical_not(partial))(functools.partial(body, masked=False))


# Each kernel takes the four scalar-prefetch tables, then its blocks and scratch buffers.
def _fwd_kernel(*refs, mask, scale, soft_cap, block_q, block_k, steps):
  tables, (q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:4], refs[4:]
  i, step = pl.program_id(2), pl.program_id(3)
  kv_block = tables[0][i] + step

  @pl.when(step == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(*, masked):
    v = v_ref[...]
    s, _ = _logits(q_ref[...], k_ref[...], scale, soft_cap)
    if masked:
      s = jnp.where(mask.visible(_positions(i * block_q, s.shape, 0),
                                 _positions(kv_block * block_k, s.shape, 1)), s, MASK_VALUE)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    rescale = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_ref[...] = rescale * l_ref[...] + p.sum(axis=1, keepdims=True)
    acc_ref[...] = rescale * acc_ref[...] + _dot(p.astype(v.dtype), v, NN)
    m_ref[...] = m_new

  _run_visible(kv_block, i, tables, body)

  @pl.when(step == steps - 1)
  def _():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(m_ref[...] + jnp.log(l), lse_ref.shape)


def _dq_kernel(*refs, mask, scale, soft_cap, block_q, block_k, steps):
  tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_ref) = refs[:4], refs[4:]
  i, step = pl.program_id(2), pl.program_id(3)
  kv_block = tables[0][i] + step

  @pl.when(step == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(*, masked):
    k = k_ref[...]
    s, t = _logits(q_ref[...], k, scale, soft_cap)
    if masked:
      s = jnp.where(mask.visible(_positions(i * block_q, s.shape, 0),
                                 _positions(kv_block * block_k, s.shape, 1)), s, MASK_VALUE)
    # Row statistics arrive as rows [1, block_q]; the query axis is the sublane axis here.
    p = jnp.exp(s - lse_ref[0][:, None])
    ds = p * (_dot(do_ref[...], v_ref[...], NT) - delta_ref[0][:, None])
    if soft_cap is not None:
      ds *= 1.0 - t * t
    acc_ref[...] += _dot(ds.astype(k.dtype), k, NN)

  _run_visible(kv_block, i, tables, body)

  @pl.when(step == steps - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, mask, scale, soft_cap, block_q, block_k, group, steps):
  tables = refs[:4]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[4:]
  # Grid (batch, kv head, kv block, query head of the group, query-block step): the accumulators
  # carry over the last two axes.
  j, g, step = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_block = tables[0][j] + step

  @pl.when((g == 0) & (step == 0))
  def _():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def body(*, masked):
    q, do = q_ref[...], do_ref[...]
    # Transposed logits [block_k, block_q]: lse and delta broadcast as rows.
    s, t = _logits(k_ref[...], q, scale, soft_cap)
    if masked:
      s = jnp.where(mask.visible(_positions(q_block * block_q, s.shape, 1),
                                 _positions(j * block_k, s.shape, 0)), s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[...])
    dv_acc_ref[...] += _dot(p.astype(do.dtype), do, NN)
    ds = p * (_dot(v_ref[...], do, NT) - delta_ref[...])
    if soft_cap is not None:
      ds *= 1.0 - t * t
    dk_acc_ref[...] += _dot(ds.astype(q.dtype), q, NN)

  _run_visible(q_block, j, tables, body)

  @pl.when((g == group - 1) & (step == steps - 1))
  def _():
    dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _compiler_params(parallel_axes, arbitrary_axes):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * parallel_axes + ("arbitrary",) * arbitrary_axes)


def _query_tile_specs(bq, bk, head_dim, group):
  """q-like and k/v specs of the forward and dq grids (batch, head, query tile i, step)."""
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, *_: (b, h, i, 0))
  kv_map = lambda b, h, i, step, *tables: (b, h // group, _visited(i, step, tables), 0)
  return q_spec, pl.BlockSpec((None, None, bk, head_dim), kv_map)


def _forward(q, k, v, mask, soft_cap, blocks, interpret):
  batch, num_heads, seq_len, head_dim = q.shape
  group = num_heads // k.shape[1]
  bq, bk = blocks.block_q, blocks.block_k
  tables, steps = _block_tables(lambda s: mask.kv_blocks(s, bq, bk), seq_len // bq, bq)

  q_spec, kv_spec = _query_tile_specs(bq, bk, head_dim, group)
  lse_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, *_: (b, h, i, 0))
  kernel = functools.partial(_fwd_kernel, mask=mask, scale=head_dim ** -0.5, soft_cap=soft_cap,
                             block_q=bq, block_k=bk, steps=steps)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_heads, seq_len // bq, steps),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=[q_spec, lse_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, seq_len, LANES), jnp.float32)],
      compiler_params=_compiler_params(3, 1),
      interpret=backend_lib.interpret_params("tpu", interpret),
      name="block_causal_attention_fwd",
  )(*tables, q, k, v)
  return out, lse[..., 0]


def _backward(q, k, v, out, lse, do, mask, soft_cap, blocks, interpret):
  batch, num_heads, seq_len, head_dim = q.shape
  kv_heads = k.shape[1]
  group = num_heads // kv_heads
  scale = head_dim ** -0.5
  interpret = backend_lib.interpret_params("tpu", interpret)
  delta = jnp.einsum("bhtd,bhtd->bht", out.astype(jnp.float32), do.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
  # Rows [batch, heads, 1, tokens]: a block (1, block_q) is lane-dense.
  lse, delta = lse[:, :, None, :], delta[:, :, None, :]

  bq, bk = blocks.block_q, blocks.block_k
  tables, steps = _block_tables(lambda s: mask.kv_blocks(s, bq, bk), seq_len // bq, bq)

  q_spec, kv_spec = _query_tile_specs(bq, bk, head_dim, group)
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, *_: (b, h, 0, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_k=bk, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_heads, seq_len // bq, steps),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="block_causal_attention_dq",
  )(*tables, q, k, v, do, lse, delta)

  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  tables, steps = _block_tables(lambda s: mask.q_blocks(s, bk, bq), seq_len // bk, bk)

  # Grid (batch, kv head, kv block j, query head g of the group, step).
  q_map = lambda b, h, j, g, step, *tables: (b, h * group + g, _visited(j, step, tables), 0)
  row_map = lambda b, h, j, g, step, *tables: (b, h * group + g, 0, _visited(j, step, tables))

  q_spec = pl.BlockSpec((None, None, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, *_: (b, h, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), row_map)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_k=bk, group=group, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, kv_heads, seq_len // bk, group, steps),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                          pltpu.VMEM((bk, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(3, 2),
      interpret=interpret,
      name="block_causal_attention_dkv",
  )(*tables, q, k, v, do, lse, delta)
  return dq, dk, dv


_attention = frame_mask.flash_attention(_forward, _backward)


def _per_device(fn, q, k):
  """fn under a shard_map over the mesh being traced for, if it has several devices: XLA cannot
  partition a Mosaic kernel. The kernel is independent across batch and kv heads, so each mesh
  axis, in mesh order, splits the batch if it divides what is left of it, else the kv heads
  (query heads follow their kv head), else replicates the work. A caller with another layout in
  mind wraps the call in its own shard_map, inside which this one is not needed."""
  split = mesh_split(q.shape[0], k.shape[2])
  if split is None:
    return fn
  axes, on_batch, on_heads = split
  spec = P(on_batch or None, None, on_heads or None, None)
  # check_vma off: pallas_call's outputs carry no varying-axes type; over an axis that splits
  # neither dim every device computes the same, so the output is replicated there as declared.
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, axis_names=axes, check_vma=False)


def attention(q, k, v, mask, soft_cap, blocks, interpret):
  """q [batch, tokens, heads, head_dim], k/v [batch, tokens, kv_heads, head_dim], tokens a
  multiple of every block size; differentiable in q, k, v."""
  def local(q, k, v):
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    out = _attention(*map(heads_major, (q, k, v)), mask, soft_cap, blocks, interpret)
    return heads_major(out)
  return _per_device(local, q, k)(q, k, v)
