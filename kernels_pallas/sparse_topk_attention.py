"""DeepSeek Sparse Attention (DSA) kernels (Pallas): lightning indexer, top-k selection, and
attention of each query over only its k selected keys.

1. `lightning_indexer_scores`: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) for s <= t, -inf
   above the diagonal, with one indexer key per token shared by all indexer heads. Tiles entirely
   above the diagonal are written as -inf without any compute. `precision="fp8"` quantises q and k
   to e4m3 with one power-of-two scale per 128 values and multiplies in fp8 (fp32 accumulation);
   its gradient is the straight-through one (the backward kernels see the dequantised inputs).
   A product of two e4m3 values is exact in fp32, so where the interpreter (CPU) upcasts the fp8
   operands it emulates the fp8 matmul up to summation order.
2. `select_topk_indices`: causal top-k per query, -1 where fewer than k keys are visible.
3. `sparse_topk_attention`: MQA form (one KV head shared by all query heads, as in MLA), so the k
   gathered KV rows of a token serve all its heads. The backward pass scatters dk/dv back to the
   selected rows with atomic adds, which stays correct when many queries select the same key.

Layout is [batch, tokens, heads, head_dim]. Index -1 means "no key": it is redirected to a zero
"sink" row appended after the last key, so gathers never go out of bounds and scattered gradients
of empty slots land in a row that is dropped. The indices of one query must be distinct (top-k's
are); only -1 may repeat.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Platforms this kernel is written for (compiled; every kernel also runs interpreted on CPU).
PLATFORMS = ("gpu",)

# Finite: a row whose first chunk is all "no key" then accumulates only zero sink rows, which the
# rescale exp(MASK_VALUE - m) == 0 wipes out once a real key arrives.
# References multiply fp32 in full fp32 on every backend (GPUs default to TF32).
HIGHEST = lax.Precision.HIGHEST
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
FP8_BLOCK = 128  # values per FP8 scale, as in DeepSeek-V3.2
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448

Precision = Literal["default", "fp8"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: the indexer tiles its [T, S] score matrix (block_q x block_k); the attention
  walks a query's selected keys block_topk at a time. Short inputs use a smaller power of two."""
  block_q: int = 64
  block_k: int = 64
  block_topk: int = 64


# Triton's tl.dot needs every matmul dimension >= 16; the interpreter takes any size.
MIN_COMPILED_BLOCK = 16


def _dot(a, b, *, trans_a=False, trans_b=False):
  """2-D matmul accumulating in fp32 (the form every Pallas backend lowers). HIGHEST keeps fp32
  inputs in fp32 (Triton's default would round them to TF32); bf16/fp8 inputs are unaffected."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=HIGHEST,
                         preferred_element_type=jnp.float32)


def _fit(block, size, interpret):
  return max(min(block, pl.next_power_of_2(size)), 1 if interpret else MIN_COMPILED_BLOCK)


def _pad_axis(x, axis, multiple, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, pad, constant_values=value)


# ----------------------------------------------------------------------------- lightning indexer


def quantize_fp8(x, block: int = FP8_BLOCK):
  """Quantises the last axis in blocks of `block` values to float8_e4m3fn.

  Each block gets the power-of-two scale 2^ceil(log2(amax / 448)), so that scaling is exact and
  the block's largest value lands in (224, 448]. Returns (values [..., D] e4m3,
  scales [..., D // block] fp32) with x ~= values * scales.
  """
  blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, block)
  amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.where(amax > 0, amax / FP8_MAX, 1.0))))
  values = (blocks / scale).astype(jnp.float8_e4m3fn).reshape(x.shape)
  # The barrier keeps XLA (GPU, which allows excess precision) from folding a later
  # f32 -> e4m3 -> f32 round trip into no rounding at all.
  return lax.optimization_barrier((values, scale[..., 0]))


def dequantize_fp8(values, scales):
  blocks = values.astype(jnp.float32).reshape(*scales.shape, -1)
  return (blocks * scales[..., None]).reshape(values.shape)


def _fp8_block(dim):
  if dim > FP8_BLOCK and dim % FP8_BLOCK:
    raise ValueError(f"fp8 indexer needs the indexer head_dim ({dim}) to be at most {FP8_BLOCK} "
                     f"or a multiple of it")
  return min(dim, FP8_BLOCK)


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


def _causal(q_start, k_start, shape):
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  return k_pos <= q_pos


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


def _indexer_forward(q, k, w, q_scale, k_scale, blocks, interpret):
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


def _indexer_backward(q, k, w, dscores, blocks, interpret):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _indexer(q, k, w, precision, blocks, interpret):
  return _indexer_fwd(q, k, w, precision, blocks, interpret)[0]


def _indexer_fwd(q, k, w, precision, blocks, interpret):
  if precision == "fp8":
    block = _fp8_block(q.shape[-1])
    (q8, q_scale), (k8, k_scale) = quantize_fp8(q, block), quantize_fp8(k, block)
    scores = _indexer_forward(q8, k8, w, q_scale, k_scale, blocks, interpret)
    # Straight-through: the backward pass differentiates the dequantised product.
    return scores, (dequantize_fp8(q8, q_scale).astype(q.dtype),
                    dequantize_fp8(k8, k_scale).astype(k.dtype), w)
  return _indexer_forward(q, k, w, None, None, blocks, interpret), (q, k, w)


def _indexer_bwd(precision, blocks, interpret, residuals, dscores):
  del precision
  return _indexer_backward(*residuals, dscores, blocks, interpret)


_indexer.defvjp(_indexer_fwd, _indexer_bwd)


def _check_indexer_inputs(q_index, k_index, weights, precision, block_sizes):
  if q_index.ndim != 4 or k_index.ndim != 3 or weights.ndim != 3:
    raise ValueError(f"expected q_index [B, T, H_I, D_I], k_index [B, S, D_I], weights [B, T, H_I]"
                     f", got {q_index.shape}, {k_index.shape}, {weights.shape}")
  if q_index.shape[0] != k_index.shape[0] or q_index.shape[-1] != k_index.shape[-1]:
    raise ValueError(f"q_index {q_index.shape} and k_index {k_index.shape} must agree in batch "
                     "and head_dim")
  if weights.shape != q_index.shape[:3]:
    raise ValueError(f"weights {weights.shape} must be q_index's [B, T, H_I] = {q_index.shape[:3]}")
  if precision not in ("default", "fp8"):
    raise ValueError(f"precision must be 'default' or 'fp8', got {precision!r}")
  if precision == "fp8":
    _fp8_block(q_index.shape[-1])
  if min(dataclasses.astuple(block_sizes)) < 1:
    raise ValueError(f"block sizes must be positive, got {block_sizes}")


@functools.partial(jax.jit, static_argnames=("precision", "block_sizes", "interpret"))
def lightning_indexer_scores(q_index, k_index, weights, *, precision: Precision = "default",
                             block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Causal lightning-indexer scores.

  Args:
    q_index: [batch, tokens, indexer_heads, indexer_dim].
    k_index: [batch, key_tokens, indexer_dim], one key per token shared by all indexer heads.
    weights: [batch, tokens, indexer_heads].
    precision: "default" multiplies in the inputs' dtype; "fp8" in e4m3 with block scales.
    block_sizes: kernel tiles (block_q, block_k are used).
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).

  Returns:
    fp32 [batch, tokens, key_tokens]; I[t, s] for s <= t, -inf elsewhere.
  """
  block_sizes = block_sizes or BlockSizes()
  _check_indexer_inputs(q_index, k_index, weights, precision, block_sizes)
  num_q, num_k = q_index.shape[1], k_index.shape[1]
  blocks = dataclasses.replace(block_sizes, block_q=_fit(block_sizes.block_q, num_q, interpret),
                               block_k=_fit(block_sizes.block_k, num_k, interpret))
  scores = _indexer(_pad_axis(q_index, 1, blocks.block_q), _pad_axis(k_index, 1, blocks.block_k),
                    _pad_axis(weights, 1, blocks.block_q), precision, blocks, interpret)
  return scores[:, :num_q, :num_k]


def reference_lightning_indexer_scores(q_index, k_index, weights, *,
                                       precision: Precision = "default"):
  """Plain-jnp twin of `lightning_indexer_scores`. fp8 runs as quantise -> dequantise, then fp32,
  with the straight-through gradient of the kernel."""
  if precision == "fp8":
    block = _fp8_block(q_index.shape[-1])
    straight_through = lambda x: x + lax.stop_gradient(dequantize_fp8(*quantize_fp8(x, block)) - x)
    q_index, k_index = straight_through(q_index), straight_through(k_index)
  logits = jnp.einsum("bthd,bsd->bths", q_index.astype(jnp.float32), k_index.astype(jnp.float32),
                      precision=HIGHEST)
  scores = jnp.einsum("bth,bths->bts", weights.astype(jnp.float32), jax.nn.relu(logits),
                      precision=HIGHEST)
  causal = jnp.arange(k_index.shape[1])[None, :] <= jnp.arange(q_index.shape[1])[:, None]
  return jnp.where(causal, scores, -jnp.inf)


# ----------------------------------------------------------------------------- top-k selection


def select_topk_indices(scores, k: int):
  """Indices [..., T, k] (int32) of each query's k best keys s <= t, best first; -1 pads the
  queries that see fewer than k keys (t < k - 1)."""
  num_q, num_k = scores.shape[-2:]
  causal = jnp.arange(num_k)[None, :] <= jnp.arange(num_q)[:, None]
  values, indices = lax.top_k(jnp.where(causal, scores, -jnp.inf), min(k, num_k))
  indices = jnp.where(values == -jnp.inf, -1, indices).astype(jnp.int32)
  return _pad_axis(indices, indices.ndim - 1, k, value=-1) if k > num_k else indices


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


def _sparse_bwd_kernel(q_ref, idx_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_init_ref,
                       dv_init_ref, dq_ref, dk_ref, dv_ref, *, scale, block_topk):
  # dk_ref/dv_ref alias zero-filled fp32 buffers holding all keys of the batch row; queries
  # selecting the same key add into it concurrently, hence the atomics.
  del dk_init_ref, dv_init_ref
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  k_cols = lax.broadcasted_iota(jnp.int32, (1, dk_ref.shape[1]), 1)
  v_cols = lax.broadcasted_iota(jnp.int32, (1, dv_ref.shape[1]), 1)

  def body(chunk, dq):
    idx, k, v, logits = _selected_rows(idx_ref, k_ref, v_ref, q, chunk, block_topk=block_topk,
                                       scale=scale)
    p = jnp.exp(logits - lse[:, None])
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    rows = idx[:, None]
    plgpu.atomic_add(dv_ref, (rows, v_cols), _dot(p.astype(do.dtype), do, trans_a=True))
    plgpu.atomic_add(dk_ref, (rows, k_cols), _dot(ds.astype(q.dtype), q, trans_a=True) * scale)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, idx_ref.shape[0] // block_topk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


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


def _sparse_backward(q, k, v, indices, out, lse, do, block_topk, interpret):
  batch, num_q = q.shape[:2]
  q_spec, o_spec, k_spec, v_spec, lse_spec, idx_spec = _sparse_specs(q, k, v, indices)
  delta = jnp.einsum("bthd,bthd->bth", out.astype(jnp.float32), do.astype(jnp.float32),
                     precision=HIGHEST)
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
  )(q, indices, k, v, do, lse, delta, jnp.zeros(k.shape, jnp.float32),
    jnp.zeros(v.shape, jnp.float32))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_attention(q, k, v, indices, block_topk, interpret):
  return _sparse_forward(q, k, v, indices, block_topk, interpret)[0]


def _sparse_attention_fwd(q, k, v, indices, block_topk, interpret):
  out, lse = _sparse_forward(q, k, v, indices, block_topk, interpret)
  return out, (q, k, v, indices, out, lse)


def _sparse_attention_bwd(block_topk, interpret, residuals, do):
  dq, dk, dv = _sparse_backward(*residuals, do, block_topk, interpret)
  return dq, dk, dv, None


_sparse_attention.defvjp(_sparse_attention_fwd, _sparse_attention_bwd)


def _check_sparse_inputs(q, k, v, indices, block_sizes):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or indices.ndim != 3:
    raise ValueError(f"expected q [B, T, H, D], k [B, S, 1, D], v [B, S, 1, Dv], indices [B, T, K]"
                     f", got {q.shape}, {k.shape}, {v.shape}, {indices.shape}")
  if k.shape[2] != 1 or v.shape[2] != 1:
    raise ValueError(f"k {k.shape} and v {v.shape} must have one KV head shared by all query heads")
  if k.shape[:2] != v.shape[:2] or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"k {k.shape} must match v {v.shape} in batch and tokens, and q {q.shape} in "
                     "batch and head_dim")
  if indices.shape[:2] != q.shape[:2]:
    raise ValueError(f"indices {indices.shape} must be [B, T, K] with q's B, T = {q.shape[:2]}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got {indices.dtype}")
  if block_sizes.block_topk < 1:
    raise ValueError(f"block_topk must be positive, got {block_sizes.block_topk}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_topk_attention(q, k, v, indices, *, block_sizes: BlockSizes | None = None,
                          interpret: bool = False):
  """Attention of each query over its selected keys only (MQA: one KV head for all query heads).

  Args:
    q: [batch, tokens, heads, head_dim].
    k: [batch, key_tokens, 1, head_dim]; v: [batch, key_tokens, 1, value_dim].
    indices: int [batch, tokens, k], the keys each query attends to, distinct per query; -1 for
      none. A query with no key at all gets a zero output.
    block_sizes: kernel tiles (block_topk is used).
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).

  Returns:
    [batch, tokens, heads, value_dim] in q's dtype. Scale 1/sqrt(head_dim).
  """
  block_sizes = block_sizes or BlockSizes()
  _check_sparse_inputs(q, k, v, indices, block_sizes)
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
  block_topk = _fit(block_sizes.block_topk, indices.shape[2], interpret)
  indices = jnp.where(indices < 0, num_keys, indices).astype(jnp.int32)
  indices = _pad_axis(indices, 2, block_topk, value=num_keys)
  k, v = (jnp.pad(x[:, :, 0], [(0, 0), (0, 1), (0, 0)]) for x in (k, v))  # + the sink row
  return _sparse_attention(q, k, v, indices, block_topk, interpret)[:, :, :num_heads, :value_dim]


def reference_sparse_topk_attention(q, k, v, indices):
  """Plain-jnp twin of `sparse_topk_attention`: gather, masked softmax in fp32."""
  valid = indices >= 0
  gather = jax.vmap(lambda rows, idx: rows[idx])  # over batch: [S, D], [T, K] -> [T, K, D]
  k_sel, v_sel = (gather(x[:, :, 0].astype(jnp.float32), jnp.maximum(indices, 0)) for x in (k, v))
  logits = jnp.einsum("bthd,btkd->bthk", q.astype(jnp.float32), k_sel,
                      precision=HIGHEST) * q.shape[-1] ** -0.5
  logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights /= jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  return jnp.einsum("bthk,btkd->bthd", weights, v_sel, precision=HIGHEST).astype(q.dtype)
