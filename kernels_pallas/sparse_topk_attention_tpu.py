"""TPU (Mosaic-dialect Pallas) kernels of `sparse_topk_attention`: the lightning indexer and the
sparse top-k attention. The public API, block sizes, checks and references are there.

Indexer: a dense causal tiled matmul + ReLU + weighted sum, one [block_q, block_k] score tile per
grid step with the heads in an inner loop (q is laid out [B, H, T, D] so a head is a leading-axis
index). Tiles above the diagonal are written as -inf without compute, and their index maps
repeat the last needed block so that no DMA is issued for them either. The backward runs a dq/dw
kernel over (query tile, key tile) and a dk kernel over (key tile, query tile), the second axis
of each a sequential reduction into VMEM scratch. A head's weight column is taken from the
[block_q, heads] weight tile by a lane mask and sum, which keeps every array in its natural
layout. fp8 multiplies the e4m3 values as the GPU dialect does. v5e, v5p and v6e have no e4m3
arithmetic in the MXU: Mosaic lowers the matmul to its e4m3-to-bf16 format, which widens the
operands to bf16 as they enter the MXU. bf16 holds every e4m3 value exactly, so the products and
fp32 sums are those of the GPU path.

Sparse attention: the selected K/V rows are gathered by DMA straight from HBM. K and V are
concatenated into one table of rows [S + 1, D + Dv] (lanes padded to 128, a zero sink row last),
so one row DMA fetches both. bf16 rows are packed two values per 32-bit word: Mosaic slices VMEM
only at whole 32-bit rows, and bf16 packs two rows into one. The selected indices are sorted per
query in XLA, -1 becoming the sink index S, which sorts last; a per-program schedule (the sorted
indices of block_tokens queries, and per query where its list crosses each window of block_dkv
keys, the last crossing being its number of real keys) is fed to every grid step as an SMEM
block. (A blocked input, not a `PrefetchScalarGridSpec` scalar prefetch: the whole index array,
T * top_k ints, does not fit the 1 MiB of SMEM at realistic sizes.) Each program walks its tokens
and each token its chunks of block_topk rows, double-buffered: the row DMAs of the next chunk (of
the same or the next token) are issued before the current chunk is computed, and one semaphore
wait per chunk covers all its rows. Positions past a query's real keys are masked, and chunks
past them are never fetched. The heads of a token are the rows of every matmul (padded to a
multiple of 8 for fp32, 16 for bf16). Each token multiplies on its own, since tokens select
different keys; a program takes block_tokens of them so that the per-step overhead and the
pipeline's first fetch are paid once per block, and the next token's first chunk is in flight
while the last chunk of this one computes.

The backward needs no atomics: the programs of one TensorCore run in order, so dk/dv of a window
of block_dkv keys are accumulated in fp32 output blocks that stay in VMEM across the token axis of
the grid (marked "arbitrary"), row by row at the selected indices, and written back once. The
grid is (batch, key window, token block), the first two parallel (a v5p megacore splits them
between its cores); a program visits only its tokens' indices that fall in its window, so each
selected row is fetched once per pass. block_dkv is capped so that a window's dk/dv take at most
16 MiB of VMEM. With one window (S <= block_dkv, as at 4K tokens) dq comes out of the same pass;
with several it takes a separate query-major pass, since a query's dq sums over all windows. A
key-major pass was not chosen: it would gather the [heads, head_dim] q and do rows of every
(query, key) pair, `heads` times the bytes of gathering key rows, and it needs the index
inverted.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.backend import interpret_params
from kernels_pallas.sparse_topk_attention_common import HIGHEST
from kernels_pallas.sparse_topk_attention_common import MASK_VALUE
from kernels_pallas.sparse_topk_attention_common import causal as _causal
from kernels_pallas.sparse_topk_attention_common import dot as _common_dot
from kernels_pallas.sparse_topk_attention_common import pad_axis as _pad_axis

LANES = 128
SMEM_BYTES = 1 << 20  # per TensorCore on v5e, v5p and v6e
# dk/dv of one key window (fp32, double-buffered by the pipeline) get this much VMEM.
DKV_VMEM_BYTES = 16 << 20
VMEM_LIMIT_BYTES = (32 << 20, 56 << 20)  # the scoped-VMEM request is clipped to this range


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def _sublanes(dtype):
  """Rows of a native VMEM tile: 8 for 32-bit types, 16 for 16-bit, 32 for 8-bit."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


def _dot(a, b, **kwargs):
  # Mosaic takes HIGHEST (an fp32 contraction) only for fp32 operands.
  precision = HIGHEST if a.dtype == b.dtype == jnp.float32 else None
  return _common_dot(a, b, precision=precision, **kwargs)


def _column(x, h):
  """x[:, h:h + 1] for a traced h: a lane mask and a sum keep x in its [rows, lanes] layout."""
  lanes = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(lanes == h, x, 0.0), axis=1, keepdims=True)


def _compiler_params(semantics, vmem_bytes):
  low, high = VMEM_LIMIT_BYTES
  return pltpu.CompilerParams(dimension_semantics=semantics,
                              vmem_limit_bytes=int(min(max(vmem_bytes * 3 // 2, low), high)))


def _fit(block, size, interpret, multiple):
  """Interpreted: a power of two no longer than needed. Compiled: a multiple of `multiple`, or
  the whole (padded) length when that is shorter."""
  if interpret:
    return max(min(block, pl.next_power_of_2(size)), 1)
  return min(_round_up(block, multiple), _round_up(size, multiple))


def indexer_blocks(block_sizes, num_q, num_k, dtype, interpret):
  """The indexer's tiles for these lengths: block_q rows a multiple of the dtype's sublane tile,
  block_k (the lanes of a score tile) a multiple of 128 unless one tile holds every key."""
  block_q = _fit(block_sizes.block_q, num_q, interpret, _sublanes(dtype))
  block_k = _fit(block_sizes.block_k, num_k, interpret, LANES)
  if not interpret and block_k >= num_k:
    block_k = _round_up(num_k, 8)
  return dataclasses.replace(block_sizes, block_q=block_q, block_k=block_k)


# ----------------------------------------------------------------------------- lightning indexer


def _head_logits(q, k, q_scale, k_scale):
  """q [bq, D] . k [bk, D] for one indexer head; fp8 inputs are rescaled block by block
  (q_scale [bq, D // block], k_scale [D // block, bk])."""
  if q_scale is None:
    return _dot(q, k, trans_b=True)
  block = q.shape[-1] // q_scale.shape[-1]
  logits = 0.0
  for c in range(q_scale.shape[-1]):
    part = slice(c * block, (c + 1) * block)
    logits += _dot(q[:, part], k[:, part], trans_b=True) * q_scale[:, c:c + 1] * k_scale[c:c + 1]
  return logits


def _indexer_fwd_kernel(q_ref, k_ref, w_ref, q_scale_ref, k_scale_ref, o_ref, *, block_q,
                        block_k):
  # q_ref [H, bq, D], w_ref [bq, H], q_scale_ref [H, bq, nb], k_scale_ref [nb, bk].
  q_start, k_start = pl.program_id(1) * block_q, pl.program_id(2) * block_k
  above_diagonal = k_start > q_start + block_q - 1

  @pl.when(above_diagonal)
  def _():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, o_ref.dtype)

  @pl.when(jnp.logical_not(above_diagonal))
  def _():
    k, w = k_ref[...], w_ref[...].astype(jnp.float32)
    k_scale = None if k_scale_ref is None else k_scale_ref[...]

    def head(h, scores):
      q_scale = None if q_scale_ref is None else q_scale_ref[h]
      logits = _head_logits(q_ref[h], k, q_scale, k_scale)
      return scores + _column(w, h) * jnp.maximum(logits, 0.0)

    scores = lax.fori_loop(0, q_ref.shape[0], head, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = jnp.where(_causal(q_start, k_start, o_ref.shape), scores, -jnp.inf)


def _indexer_dq_kernel(q_ref, k_ref, w_ref, ds_ref, dq_ref, dw_ref, dq_acc, dw_acc, *, block_q,
                       block_k):
  # Grid (batch, query tile, key tile); dq/dw sum over the key tiles in VMEM scratch.
  q_start, k_start = pl.program_id(1) * block_q, pl.program_id(2) * block_k

  @pl.when(pl.program_id(2) == 0)
  def _():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
    dw_acc[...] = jnp.zeros(dw_acc.shape, jnp.float32)

  @pl.when(k_start <= q_start + block_q - 1)
  def _():
    k = k_ref[...]
    ds = jnp.where(_causal(q_start, k_start, ds_ref.shape), ds_ref[...], 0.0)
    lanes = lax.broadcasted_iota(jnp.int32, dw_acc.shape, 1)

    def head(h, dw):
      logits = _dot(q_ref[h], k, trans_b=True)
      dq_acc[h] += _dot(jnp.where(logits > 0, ds, 0.0).astype(k.dtype), k)
      dw_h = jnp.sum(ds * jnp.maximum(logits, 0.0), axis=1, keepdims=True)
      return dw + jnp.where(lanes == h, dw_h, 0.0)

    dw_acc[...] = lax.fori_loop(0, q_ref.shape[0], head, dw_acc[...])

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    w = w_ref[...].astype(jnp.float32)

    def head(h, _):
      dq_ref[h] = (dq_acc[h] * _column(w, h)).astype(dq_ref.dtype)
      return ()

    lax.fori_loop(0, q_ref.shape[0], head, ())
    dw_ref[...] = dw_acc[...].astype(dw_ref.dtype)


def _indexer_dk_kernel(q_ref, k_ref, w_ref, ds_ref, dk_ref, dk_acc, *, block_q, block_k):
  # Grid (batch, key tile, query tile); dk sums over the query tiles in VMEM scratch.
  k_start, q_start = pl.program_id(1) * block_k, pl.program_id(2) * block_q

  @pl.when(pl.program_id(2) == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)

  @pl.when(k_start <= q_start + block_q - 1)
  def _():
    k, w = k_ref[...], w_ref[...].astype(jnp.float32)
    ds = jnp.where(_causal(q_start, k_start, ds_ref.shape), ds_ref[...], 0.0)

    def head(h, dk):
      q = q_ref[h]
      logits = _dot(q, k, trans_b=True)
      dlogits = jnp.where(logits > 0, ds * _column(w, h), 0.0)
      return dk + _dot(dlogits.astype(q.dtype), q, trans_a=True)

    dk_acc[...] = lax.fori_loop(0, q_ref.shape[0], head, dk_acc[...])

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)


def _nbytes(shape, dtype):
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def indexer_forward(q, k, w, q_scale, k_scale, blocks, interpret):
  """Scores [B, T, S] fp32 of padded inputs (T, S multiples of the tiles)."""
  batch, num_q, num_heads, dim = q.shape
  num_k = k.shape[1]
  bq, bk = blocks.block_q, blocks.block_k
  last_k = lambda i: lax.div(i * bq + bq - 1, bk)  # the last key tile query tile i sees
  kj = lambda i, j: jnp.minimum(j, last_k(i))  # tiles above it re-use that block: no DMA
  in_specs = [
      pl.BlockSpec((None, num_heads, bq, dim), lambda b, i, j: (b, 0, i, 0)),
      pl.BlockSpec((None, bk, dim), lambda b, i, j: (b, kj(i, j), 0)),
      pl.BlockSpec((None, bq, num_heads), lambda b, i, j: (b, i, 0)),
      None, None,
  ]
  inputs = [q.transpose(0, 2, 1, 3), k, w, None, None]
  if q_scale is not None:
    num_scales = q_scale.shape[-1]
    in_specs[3:] = [
        pl.BlockSpec((None, num_heads, bq, num_scales), lambda b, i, j: (b, 0, i, 0)),
        pl.BlockSpec((None, num_scales, bk), lambda b, i, j: (b, 0, kj(i, j))),
    ]
    inputs[3:] = [q_scale.transpose(0, 2, 1, 3), k_scale.transpose(0, 2, 1)]
  vmem = 2 * (_nbytes((num_heads, bq, dim), q.dtype) + _nbytes((bk, dim), k.dtype)
              + _nbytes((bq, bk), jnp.float32)) + 4 * _nbytes((bq, bk), jnp.float32)
  return pl.pallas_call(
      functools.partial(_indexer_fwd_kernel, block_q=bq, block_k=bk),
      grid=(batch, num_q // bq, num_k // bk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, bk), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((batch, num_q, num_k), jnp.float32),
      compiler_params=_compiler_params(("parallel", "parallel", "parallel"), vmem),
      interpret=interpret_params("tpu", interpret),
      name="lightning_indexer_fwd",
  )(*inputs)


def indexer_backward(q, k, w, dscores, blocks, interpret):
  """(dq, dk, dw) of padded inputs."""
  batch, num_q, num_heads, dim = q.shape
  num_k = k.shape[1]
  bq, bk = blocks.block_q, blocks.block_k
  q_heads = q.transpose(0, 2, 1, 3)
  last_k = lambda i: lax.div(i * bq + bq - 1, bk)
  first_q = lambda j: lax.div(j * bk, bq)  # the first query tile key tile j is seen by
  tile_bytes = _nbytes((bq, bk), jnp.float32)
  q_bytes = _nbytes((num_heads, bq, dim), q.dtype)

  kj = lambda i, j: jnp.minimum(j, last_k(i))
  dq, dw = pl.pallas_call(
      functools.partial(_indexer_dq_kernel, block_q=bq, block_k=bk),
      grid=(batch, num_q // bq, num_k // bk),
      in_specs=[
          pl.BlockSpec((None, num_heads, bq, dim), lambda b, i, j: (b, 0, i, 0)),
          pl.BlockSpec((None, bk, dim), lambda b, i, j: (b, kj(i, j), 0)),
          pl.BlockSpec((None, bq, num_heads), lambda b, i, j: (b, i, 0)),
          pl.BlockSpec((None, bq, bk), lambda b, i, j: (b, i, kj(i, j))),
      ],
      out_specs=[
          pl.BlockSpec((None, num_heads, bq, dim), lambda b, i, j: (b, 0, i, 0)),
          pl.BlockSpec((None, bq, num_heads), lambda b, i, j: (b, i, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q_heads.shape, q.dtype),
                 jax.ShapeDtypeStruct(w.shape, w.dtype)],
      scratch_shapes=[pltpu.VMEM((num_heads, bq, dim), jnp.float32),
                      pltpu.VMEM((bq, num_heads), jnp.float32)],
      compiler_params=_compiler_params(
          ("parallel", "parallel", "arbitrary"),
          4 * q_bytes + 2 * _nbytes((num_heads, bq, dim), jnp.float32) + 6 * tile_bytes),
      interpret=interpret_params("tpu", interpret),
      name="lightning_indexer_dq",
  )(q_heads, k, w, dscores)

  qi = lambda j, i: jnp.maximum(i, first_q(j))
  dk = pl.pallas_call(
      functools.partial(_indexer_dk_kernel, block_q=bq, block_k=bk),
      grid=(batch, num_k // bk, num_q // bq),
      in_specs=[
          pl.BlockSpec((None, num_heads, bq, dim), lambda b, j, i: (b, 0, qi(j, i), 0)),
          pl.BlockSpec((None, bk, dim), lambda b, j, i: (b, j, 0)),
          pl.BlockSpec((None, bq, num_heads), lambda b, j, i: (b, qi(j, i), 0)),
          pl.BlockSpec((None, bq, bk), lambda b, j, i: (b, qi(j, i), j)),
      ],
      out_specs=pl.BlockSpec((None, bk, dim), lambda b, j, i: (b, j, 0)),
      out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype),
      scratch_shapes=[pltpu.VMEM((bk, dim), jnp.float32)],
      compiler_params=_compiler_params(("parallel", "parallel", "arbitrary"),
                                       2 * q_bytes + 6 * tile_bytes),
      interpret=interpret_params("tpu", interpret),
      name="lightning_indexer_dk",
  )(q_heads, k, w, dscores)
  return dq.transpose(0, 2, 1, 3), dk, dw


# ----------------------------------------------------------------------------- sparse attention


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static shapes of one call: tokens per program, rows per chunk, padded sizes, key windows."""
  num_keys: int
  head_dim: int
  value_dim: int
  tokens: int  # query tokens per program (block_tokens)
  chunk: int  # selected rows per DMA chunk (block_topk)
  top_k: int  # padded top_k, a multiple of chunk
  window: int  # keys per dk/dv window (block_dkv)
  num_windows: int
  schedule: int  # ints of SMEM schedule per program
  dim: int  # head_dim padded to lanes
  dim_v: int
  width: int  # lanes of a K/V table row (32-bit words)
  unroll: int  # of the loop issuing a chunk's row DMAs (1 interpreted: it only costs compile time)


def _schedule_size(tokens, top_k, num_windows, interpret):
  """A legal 1-D SMEM block length for tokens * (top_k + num_windows + 1) ints."""
  need = tokens * (top_k + num_windows + 1)
  if interpret:
    return need
  return pl.next_power_of_2(max(need, LANES)) if need <= 1024 else _round_up(need, 1024)


def _layout(q, v, top_k, num_keys, block_sizes, interpret):
  num_q, dim, dim_v = q.shape[1], q.shape[3], v.shape[3]
  dim_p, dim_vp = _round_up(dim, LANES), _round_up(dim_v, LANES)
  # dk/dv of a window, fp32 and double-buffered, must fit their VMEM share.
  window_cap = max(8, DKV_VMEM_BYTES // (8 * (dim_p + dim_vp)) // 8 * 8)
  tokens = _fit(block_sizes.block_tokens, num_q, interpret, 8)
  chunk = _fit(block_sizes.block_topk, top_k, interpret, 8)
  window = _fit(min(block_sizes.block_dkv, window_cap), num_keys, interpret, 8)
  num_windows = -(-num_keys // window)
  top_k = _round_up(top_k, chunk)
  width = dim_p + dim_vp
  if q.dtype == jnp.bfloat16:
    width = _round_up(width, 2 * LANES) // 2
  return _Layout(num_keys, dim, dim_v, tokens, chunk, top_k, window, num_windows,
                 _schedule_size(tokens, top_k, num_windows, interpret), dim_p, dim_vp, width,
                 unroll=1 if interpret else min(chunk, 8))


def _schedule(indices, num_keys, layout):
  """Per program, flattened: its tokens' selected keys sorted ascending ([tokens, top_k], -1
  -> the sink row num_keys, which sorts last), then per token where its sorted list crosses
  each window edge ([tokens, num_windows + 1]: starts of windows 0.., the last entry the number
  of real keys)."""
  batch, num_q, _ = indices.shape
  idx = jnp.sort(jnp.where(indices < 0, num_keys, indices).astype(jnp.int32), axis=-1)
  idx = _pad_axis(_pad_axis(idx, 2, layout.top_k, num_keys), 1, layout.tokens, num_keys)
  edges = jnp.minimum(jnp.arange(layout.num_windows + 1, dtype=jnp.int32) * layout.window,
                      num_keys)
  bounds = jax.vmap(lambda row: jnp.searchsorted(row, edges))(idx.reshape(-1, layout.top_k))
  programs = idx.shape[1] // layout.tokens
  table = jnp.concatenate([idx.reshape(batch, programs, -1),
                           bounds.astype(jnp.int32).reshape(batch, programs, -1)], axis=2)
  return _pad_axis(table, 2, layout.schedule).reshape(-1)


def _kv_table(k, v, layout):
  """[B, S + 1, width]: k and v side by side (each lane-padded), a zero sink row last. bf16 rows
  are packed two values per uint32 word: word i holds value i (low half) and value
  i + width (high half)."""
  rows = jnp.concatenate([_pad_axis(k[:, :, 0], 2, layout.dim),
                          _pad_axis(v[:, :, 0], 2, layout.dim_v)], axis=2)
  # The sink row, and enough rows for one chunk-sized wait descriptor.
  rows = jnp.pad(rows, [(0, 0), (0, max(1, layout.chunk - rows.shape[1])), (0, 0)])
  if rows.dtype != jnp.bfloat16:
    return rows
  bits = lax.bitcast_convert_type(_pad_axis(rows, 2, 2 * layout.width), jnp.uint16)
  bits = bits.astype(jnp.uint32)
  return bits[..., :layout.width] | (bits[..., layout.width:] << 16)


def _unpack(rows, dtype):
  """Table rows [n, width] as values [n, lanes] of `dtype` (inverse of `_kv_table`)."""
  if rows.dtype != jnp.uint32:
    return rows
  low = lax.bitcast_convert_type(rows << 16, jnp.float32)
  high = lax.bitcast_convert_type(rows & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.concatenate([low, high], axis=1).astype(dtype)


def _walk(sched_ref, kv_hbm, buf, sems, layout, *, segment, chunk_fn, init_fn, finish_fn):
  """Runs chunk_fn over each chunk of each token of the program, in order, double-buffered.

  segment(j) -> (lo, hi): the positions of token j's sorted keys to visit. Chunk c holds the
  rows at positions lo + c * chunk + [0, chunk) (clamped to the list; the caller masks those
  >= hi). init_fn(j) -> state; chunk_fn(j, c, lo, hi, rows [chunk, width], state) -> state;
  finish_fn(j, state). Every token gets init_fn and finish_fn, even with nothing to visit.
  """
  tokens, size, top_k = layout.tokens, layout.chunk, layout.top_k

  def num_chunks(j):
    lo, hi = segment(j)
    return lax.div(hi - lo + size - 1, size)

  def fetch(j, c, slot):
    first = segment(j)[0] + c * size

    def issue(r, _):
      row = sched_ref[j * top_k + jnp.minimum(first + r, top_k - 1)]
      pltpu.make_async_copy(kv_hbm.at[pl.ds(row, 1)], buf.at[slot, pl.ds(r, 1)],
                            sems.at[slot]).start()
      return ()

    lax.fori_loop(0, size, issue, (), unroll=layout.unroll)

  def wait(slot):  # one wait for all `size` rows: the semaphore counts bytes
    pltpu.make_async_copy(kv_hbm.at[pl.ds(0, size)], buf.at[slot], sems.at[slot]).wait()

  def next_token(j):  # the first token >= j with something to visit, else `tokens`
    empty = lambda j: jnp.logical_and(j < tokens, num_chunks(jnp.minimum(j, tokens - 1)) == 0)
    return lax.while_loop(empty, lambda j: j + 1, j)

  first = next_token(0)

  @pl.when(first < tokens)
  def _():
    fetch(first, 0, 0)

  def token(j, slot):
    n = num_chunks(j)
    lo, hi = segment(j)

    def body(c, carry):
      slot, state = carry
      nj, nc = lax.cond(c + 1 < n, lambda: (j, c + 1),
                        lambda: (next_token(j + 1), jnp.int32(0)))

      @pl.when(nj < tokens)
      def _():
        fetch(nj, nc, 1 - slot)

      wait(slot)
      return 1 - slot, chunk_fn(j, c, lo, hi, buf[slot], state)

    slot, state = lax.fori_loop(0, n, body, (slot, init_fn(j)))
    finish_fn(j, state)
    return slot

  lax.fori_loop(0, tokens, token, 0)


def _bound(sched_ref, layout, j, w):
  """Position in token j's sorted list where key window w starts (w = num_windows: its end)."""
  return sched_ref[layout.tokens * layout.top_k + j * (layout.num_windows + 1) + w]


def _split_kv(rows, layout, dtype):
  x = _unpack(rows, dtype)
  return x[:, :layout.dim], x[:, layout.dim:layout.dim + layout.dim_v]


def _sparse_fwd_kernel(sched_ref, q_ref, kv_hbm, o_ref, lse_ref, buf, sems, *, scale, layout):
  # One program per (batch, block of tokens); q_ref [tokens, H, D], lse_ref [tokens, H].
  kv_hbm = kv_hbm.at[pl.program_id(0)]
  heads = q_ref.shape[1]
  count = lambda j: _bound(sched_ref, layout, j, layout.num_windows)

  def init(j):
    del j
    return (jnp.zeros((heads, layout.dim_v), jnp.float32),
            jnp.full((heads, 1), -jnp.inf, jnp.float32), jnp.zeros((heads, 1), jnp.float32))

  def chunk(j, c, lo, hi, rows, state):
    acc, m, l = state
    k, v = _split_kv(rows, layout, q_ref.dtype)
    position = lo + c * layout.chunk + lax.broadcasted_iota(jnp.int32, (1, layout.chunk), 1)
    logits = jnp.where(position < hi, _dot(q_ref[j], k, trans_b=True) * scale, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new)
    l = rescale * l + jnp.sum(p, axis=1, keepdims=True)
    acc = rescale * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  def finish(j, state):
    acc, m, l = state
    o_ref[j] = jnp.where(l > 0, acc / l, 0.0).astype(o_ref.dtype)  # no key at all: zero
    lse_ref[pl.ds(j, 1), :] = (m + jnp.log(l)).reshape(1, heads)

  _walk(sched_ref, kv_hbm, buf, sems, layout, segment=lambda j: (0, count(j)), chunk_fn=chunk,
        init_fn=init, finish_fn=finish)


def _sparse_bwd_kernel(sched_ref, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, *refs, scale,
                       layout, with_dq, with_dkv):
  # Grid (batch, key window, block of tokens). dk_ref/dv_ref [window, D] fp32 stay in VMEM
  # across the token axis ("arbitrary": one core runs it in order), so adding a row needs no
  # atomics. A dq-only pass has one window spanning every key.
  refs = list(refs)
  dq_ref = refs.pop(0) if with_dq else None
  dk_ref, dv_ref = (refs.pop(0), refs.pop(0)) if with_dkv else (None, None)
  buf, sems = refs.pop(0), refs.pop(0)
  stage_dk, stage_dv = refs if with_dkv else (None, None)
  kv_hbm = kv_hbm.at[pl.program_id(0)]
  heads = q_ref.shape[1]
  window = pl.program_id(1)
  key_start = window * layout.window
  if with_dkv:
    segment = lambda j: (_bound(sched_ref, layout, j, window),
                         _bound(sched_ref, layout, j, window + 1))

    @pl.when(pl.program_id(2) == 0)
    def _():
      dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
      dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)
  else:
    segment = lambda j: (0, _bound(sched_ref, layout, j, layout.num_windows))

  column = lambda ref, j: ref[pl.ds(j, 1), :].reshape(heads, 1)

  def chunk(j, c, lo, hi, rows, dq):
    k, v = _split_kv(rows, layout, q_ref.dtype)
    q, do = q_ref[j], do_ref[j]
    first = lo + c * layout.chunk
    position = first + lax.broadcasted_iota(jnp.int32, (1, layout.chunk), 1)
    logits = jnp.where(position < hi, _dot(q, k, trans_b=True) * scale, MASK_VALUE)
    p = jnp.exp(logits - column(lse_ref, j))
    ds = p * (_dot(do, v, trans_b=True) - column(delta_ref, j))
    if with_dkv:
      stage_dv[...] = _dot(p.astype(do.dtype), do, trans_a=True)
      stage_dk[...] = _dot(ds.astype(q.dtype), q, trans_a=True) * scale

      def scatter(r, _):
        @pl.when(first + r < hi)
        def _():
          row = sched_ref[j * layout.top_k + first + r] - key_start
          dk_ref[pl.ds(row, 1), :] += stage_dk[pl.ds(r, 1), :]
          dv_ref[pl.ds(row, 1), :] += stage_dv[pl.ds(r, 1), :]
        return ()

      lax.fori_loop(0, layout.chunk, scatter, ())
    return dq + _dot(ds.astype(k.dtype), k) if with_dq else dq

  def finish(j, dq):
    if with_dq:
      dq_ref[j] = (dq * scale).astype(dq_ref.dtype)

  init = lambda j: jnp.zeros((heads, layout.dim) if with_dq else (), jnp.float32)
  _walk(sched_ref, kv_hbm, buf, sems, layout, segment=segment, chunk_fn=chunk, init_fn=init,
        finish_fn=finish)


def _token_spec(layout, heads, width, grid_rank):
  index = (lambda b, t: (b, t, 0, 0)) if grid_rank == 2 else (lambda b, w, t: (b, t, 0, 0))
  return pl.BlockSpec((None, layout.tokens, heads, width), index)


def _sched_spec(layout, programs, grid_rank):
  index = ((lambda b, t: (b * programs + t,)) if grid_rank == 2
           else (lambda b, w, t: (b * programs + t,)))
  return pl.BlockSpec((layout.schedule,), index, memory_space=pltpu.SMEM)


def _dma_scratch(layout, table):
  return [pltpu.VMEM((2, layout.chunk, layout.width), table.dtype), pltpu.SemaphoreType.DMA((2,))]


def _sparse_forward(q, table, sched, layout, interpret, *, scale):
  batch, num_q, heads, _ = q.shape
  programs = num_q // layout.tokens
  token_bytes = layout.tokens * heads * (layout.dim + layout.dim_v) * q.dtype.itemsize
  vmem = 2 * token_bytes + 2 * layout.chunk * layout.width * 4
  return pl.pallas_call(
      functools.partial(_sparse_fwd_kernel, scale=scale, layout=layout),
      grid=(batch, programs),
      in_specs=[_sched_spec(layout, programs, 2), _token_spec(layout, heads, layout.dim, 2),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[_token_spec(layout, heads, layout.dim_v, 2),
                 pl.BlockSpec((None, layout.tokens, heads), lambda b, t: (b, t, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, num_q, heads, layout.dim_v), q.dtype),
                 jax.ShapeDtypeStruct((batch, num_q, heads), jnp.float32)],
      scratch_shapes=_dma_scratch(layout, table),
      compiler_params=_compiler_params(("parallel", "parallel"), vmem),
      interpret=interpret_params("tpu", interpret),
      name="sparse_topk_attention_fwd",
  )(sched, q, table)


def _sparse_backward_pass(q, table, sched, do, lse, delta, layout, interpret, *, scale, with_dq,
                          with_dkv):
  batch, num_q, heads, _ = q.shape
  programs = num_q // layout.tokens
  windows = layout.num_windows if with_dkv else 1
  per_token = pl.BlockSpec((None, layout.tokens, heads), lambda b, w, t: (b, t, 0))
  out_specs, out_shape, scratch = [], [], _dma_scratch(layout, table)
  if with_dq:
    out_specs.append(_token_spec(layout, heads, layout.dim, 3))
    out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
  if with_dkv:
    for width in (layout.dim, layout.dim_v):
      out_specs.append(pl.BlockSpec((None, layout.window, width), lambda b, w, t: (b, w, 0)))
      out_shape.append(jax.ShapeDtypeStruct((batch, windows * layout.window, width),
                                            jnp.float32))
    scratch += [pltpu.VMEM((layout.chunk, layout.dim), jnp.float32),
                pltpu.VMEM((layout.chunk, layout.dim_v), jnp.float32)]
  token_bytes = layout.tokens * heads * (2 * layout.dim + layout.dim_v) * q.dtype.itemsize
  vmem = (2 * token_bytes + 2 * layout.chunk * layout.width * 4
          + (2 * layout.window + layout.chunk) * (layout.dim + layout.dim_v) * 4 * with_dkv)
  # The token axis accumulates dk/dv; a dq-only pass has nothing to carry across steps.
  semantics = ("parallel", "parallel", "arbitrary" if with_dkv else "parallel")
  return pl.pallas_call(
      functools.partial(_sparse_bwd_kernel, scale=scale, layout=layout, with_dq=with_dq,
                        with_dkv=with_dkv),
      grid=(batch, windows, programs),
      in_specs=[_sched_spec(layout, programs, 3), _token_spec(layout, heads, layout.dim, 3),
                _token_spec(layout, heads, layout.dim_v, 3), per_token, per_token,
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=_compiler_params(semantics, vmem),
      interpret=interpret_params("tpu", interpret),
      name="sparse_topk_attention_bwd" + ("_dq" if not with_dkv else ""),
  )(sched, q, do, lse, delta, table)


def _pad_q(x, layout, width):
  """[B, T, H, d] -> [B, T padded to the token block, H padded to the sublane tile, width]."""
  x = _pad_axis(_pad_axis(x, 1, layout.tokens), 2, _sublanes(x.dtype))
  return _pad_axis(x, 3, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_attention(q, k, v, sched, layout, interpret):
  return _sparse_attention_fwd(q, k, v, sched, layout, interpret)[0]


def _sparse_attention_fwd(q, k, v, sched, layout, interpret):
  num_q, heads = q.shape[1:3]
  qp, table = _pad_q(q, layout, layout.dim), _kv_table(k, v, layout)
  out, lse = _sparse_forward(qp, table, sched, layout, interpret,
                             scale=layout.head_dim ** -0.5)
  return out[:, :num_q, :heads, :layout.value_dim], (qp, table, sched, out, lse)


def _sparse_attention_bwd(layout, interpret, residuals, do):
  qp, table, sched, out, lse = residuals
  num_q, heads = do.shape[1:3]
  dop = _pad_q(do, layout, layout.dim_v)
  delta = jnp.einsum("bthd,bthd->bth", out.astype(jnp.float32), dop.astype(jnp.float32),
                     precision=HIGHEST)
  run = functools.partial(_sparse_backward_pass, qp, table, sched, dop, lse, delta, layout,
                          interpret, scale=layout.head_dim ** -0.5)
  if layout.num_windows == 1:
    dq, dk, dv = run(with_dq=True, with_dkv=True)
  else:
    (dq,) = run(with_dq=True, with_dkv=False)
    dk, dv = run(with_dq=False, with_dkv=True)
  keys = slice(0, layout.num_keys)
  return (dq[:, :num_q, :heads, :layout.head_dim],
          dk[:, keys, None, :layout.head_dim].astype(qp.dtype),
          dv[:, keys, None, :layout.value_dim].astype(qp.dtype), None)


_sparse_attention.defvjp(_sparse_attention_fwd, _sparse_attention_bwd)


def sparse_topk_attention(q, k, v, indices, block_sizes, interpret):
  """The TPU kernels on checked inputs (see the public function)."""
  if q.dtype not in (jnp.float32, jnp.bfloat16) or not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"the TPU sparse_topk_attention takes q, k, v of one dtype, float32 or "
                     f"bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
  num_keys = k.shape[1]
  layout = _layout(q, v, indices.shape[2], num_keys, block_sizes, interpret)
  if not interpret and 2 * layout.schedule * 4 > SMEM_BYTES // 2:
    raise ValueError(f"block_tokens x top_k = {layout.tokens} x {layout.top_k} indices per "
                     f"program overflow SMEM ({SMEM_BYTES} bytes, double-buffered): lower "
                     "block_tokens")
  sched = _schedule(indices, num_keys, layout)
  return _sparse_attention(q, k, v, sched, layout, interpret)
