"""DeepSeek Sparse Attention (DSA) kernels (Pallas): lightning indexer, top-k selection, and
attention of each query over only its k selected keys. One API, a GPU and a TPU dialect.

1. `lightning_indexer_scores`: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) for s <= t, -inf
   above the diagonal, with one indexer key per token shared by all indexer heads. Tiles entirely
   above the diagonal are written as -inf without any compute. `precision="fp8"` quantises q and k
   to e4m3 with one power-of-two scale per 128 values and multiplies in fp8 (fp32 accumulation);
   its gradient is the straight-through one (the backward kernels see the dequantised inputs).
   A product of two e4m3 values is exact in fp32, so where the interpreter (CPU) upcasts the fp8
   operands it emulates the fp8 matmul up to summation order (and so does Mosaic on TPUs without
   an e4m3 MXU mode, v5e/v5p/v6e, which widens them to bf16).
2. `select_topk_indices`: causal top-k per query, -1 where fewer than k keys are visible.
3. `sparse_topk_attention`: MQA form (one KV head shared by all query heads, as in MLA), so the k
   gathered KV rows of a token serve all its heads, which are the rows of every matmul. Index -1
   means "no key"; the indices of one query must be distinct (top-k's are); only -1 may repeat.

The kernels are `sparse_topk_attention_gpu` (Triton: one program per token gathers its rows; the
backward scatters dk/dv with atomic adds, or with `gpu_backward="key_major"` sums them per key
block from the (query, key) pairs sorted by key, without atomics) and `sparse_topk_attention_tpu`
(Mosaic: row DMAs from HBM driven by a per-program index schedule in SMEM, double-buffered; the
backward accumulates dk/dv of a key window in VMEM across the sequential token axis of the
grid). `backend` picks one (`backend.resolve`: None means the platform being traced for). Layout
is [batch, tokens, heads, head_dim].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas.backend import mesh_split
from kernels_pallas.backend import resolve as _resolve_backend
import kernels_pallas.sparse_topk_attention_gpu as _gpu
import kernels_pallas.sparse_topk_attention_tpu as _tpu
from kernels_pallas.sparse_topk_attention_common import HIGHEST
from kernels_pallas.sparse_topk_attention_common import pad_axis as _pad_axis

# Platforms this kernel is written for (compiled; every kernel also runs interpreted on CPU).
PLATFORMS = ("gpu", "tpu")

_DIALECTS = {"gpu": _gpu, "tpu": _tpu}
FP8_BLOCK = 128  # values per FP8 scale, as in DeepSeek-V3.2
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
GPU_BACKWARDS = _gpu.BACKWARDS  # "atomic", "key_major"

Precision = Literal["default", "fp8"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. The indexer tiles its [T, S] score matrix (block_q x block_k); the attention
  walks a query's selected keys block_topk at a time. GPU: the key-major backward sums dk/dv per
  block of block_k keys. TPU: a program takes block_tokens queries, and the backward holds dk/dv
  of block_dkv keys in VMEM. Short inputs use a smaller power of two (compiled for TPU: a
  multiple of the hardware tile instead). `DEFAULT_BLOCK_SIZES` has each backend's defaults."""
  block_q: int = 64
  block_k: int = 64
  block_topk: int = 64
  block_tokens: int = 8
  block_dkv: int = 8192


# TPU: 128-lane score tiles and chunks keep the vector units dense; dk/dv windows are capped to
# their VMEM share in the kernel.
DEFAULT_BLOCK_SIZES = {"gpu": BlockSizes(), "tpu": BlockSizes(block_q=256, block_k=512,
                                                              block_topk=128)}


def _per_device(fn, batch: int):
  """fn under a shard_map over the mesh being traced for (``backend.mesh_split``): every input and
  output leads with the batch, and one KV head leaves nothing else to split."""
  split = mesh_split(batch)
  if split is None:
    return fn
  axes, on_batch, _ = split
  spec = P(on_batch or None)
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, axis_names=axes, check_vma=False)


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


def fake_quantize_fp8(x):
  """x through the fp8 round trip (the indexer's blocks of its head_dim, ``_fp8_block``), with the
  straight-through gradient: fp8's arithmetic emulated in x's dtype."""
  block = _fp8_block(x.shape[-1])
  return x + lax.stop_gradient(dequantize_fp8(*quantize_fp8(x, block)).astype(x.dtype) - x)


def dequantize_fp8(values, scales):
  blocks = values.astype(jnp.float32).reshape(*scales.shape, -1)
  return (blocks * scales[..., None]).reshape(values.shape)


def _fp8_block(dim):
  if dim > FP8_BLOCK and dim % FP8_BLOCK:
    raise ValueError(f"fp8 indexer needs the indexer head_dim ({dim}) to be at most {FP8_BLOCK} "
                     f"or a multiple of it")
  return min(dim, FP8_BLOCK)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _indexer(q, k, w, precision, blocks, backend, interpret):
  return _indexer_fwd(q, k, w, precision, blocks, backend, interpret)[0]


def _indexer_fwd(q, k, w, precision, blocks, backend, interpret):
  forward = _DIALECTS[backend].indexer_forward
  if precision == "fp8":
    block = _fp8_block(q.shape[-1])
    (q8, q_scale), (k8, k_scale) = quantize_fp8(q, block), quantize_fp8(k, block)
    scores = forward(q8, k8, w, q_scale, k_scale, blocks, interpret)
    # Straight-through: the backward pass differentiates the dequantised product.
    return scores, (dequantize_fp8(q8, q_scale).astype(q.dtype),
                    dequantize_fp8(k8, k_scale).astype(k.dtype), w)
  return forward(q, k, w, None, None, blocks, interpret), (q, k, w)


def _indexer_bwd(precision, blocks, backend, interpret, residuals, dscores):
  del precision
  return _DIALECTS[backend].indexer_backward(*residuals, dscores, blocks, interpret)


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


def lightning_indexer_scores(q_index, k_index, weights, *, precision: Precision = "default",
                             block_sizes: BlockSizes | None = None, interpret: bool = False,
                             backend: str | None = None):
  """Causal lightning-indexer scores.

  Args:
    q_index: [batch, tokens, indexer_heads, indexer_dim].
    k_index: [batch, key_tokens, indexer_dim], one key per token shared by all indexer heads.
    weights: [batch, tokens, indexer_heads].
    precision: "default" multiplies in the inputs' dtype; "fp8" in e4m3 with block scales.
    block_sizes: kernel tiles (block_q, block_k are used), the backend's `DEFAULT_BLOCK_SIZES`
      by default.
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).
    backend: "gpu" (Triton) or "tpu" (Mosaic) kernels; None: the platform being traced for
      (`backend.resolve`), so the GPU dialect on CPU.

  Returns:
    fp32 [batch, tokens, key_tokens]; I[t, s] for s <= t, -inf elsewhere.
  """
  # Resolved before jit: the platform comes from the mesh being traced for, not from the args.
  scores = functools.partial(_lightning_indexer_scores, precision=precision, block_sizes=block_sizes,
                             interpret=interpret, backend=_resolve_backend(backend))
  return _per_device(scores, q_index.shape[0])(q_index, k_index, weights)


@functools.partial(jax.jit, static_argnames=("precision", "block_sizes", "interpret", "backend"))
def _lightning_indexer_scores(q_index, k_index, weights, *, precision, block_sizes, interpret,
                              backend):
  block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[backend]
  _check_indexer_inputs(q_index, k_index, weights, precision, block_sizes)
  num_q, num_k = q_index.shape[1], k_index.shape[1]
  dtype = jnp.float8_e4m3fn if precision == "fp8" else q_index.dtype
  blocks = _DIALECTS[backend].indexer_blocks(block_sizes, num_q, num_k, dtype, interpret)
  scores = _indexer(_pad_axis(q_index, 1, blocks.block_q), _pad_axis(k_index, 1, blocks.block_k),
                    _pad_axis(weights, 1, blocks.block_q), precision, blocks, backend, interpret)
  return scores[:, :num_q, :num_k]


def reference_lightning_indexer_scores(q_index, k_index, weights, *,
                                       precision: Precision = "default"):
  """Plain-jnp twin of `lightning_indexer_scores`. fp8 runs as quantise -> dequantise, then fp32,
  with the straight-through gradient of the kernel."""
  if precision == "fp8":
    q_index, k_index = fake_quantize_fp8(q_index), fake_quantize_fp8(k_index)
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
  return topk_indices(jnp.where(causal, scores, -jnp.inf), k)


def topk_indices(scores, k: int):
  """Indices [..., k] (int32) of each row's k best scores, best first, where -inf marks a key it
  may not select (any mask: causal, a decode step's offset); -1 pads rows with fewer than k."""
  num_k = scores.shape[-1]
  values, indices = lax.top_k(scores, min(k, num_k))
  indices = jnp.where(values == -jnp.inf, -1, indices).astype(jnp.int32)
  return _pad_axis(indices, indices.ndim - 1, k, value=-1) if k > num_k else indices


# ----------------------------------------------------------------------------- sparse attention


def _check_sparse_inputs(q, k, v, indices, block_sizes, gpu_backward):
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
  if min(dataclasses.astuple(block_sizes)) < 1:
    raise ValueError(f"block sizes must be positive, got {block_sizes}")
  if gpu_backward not in GPU_BACKWARDS:
    raise ValueError(f"gpu_backward must be one of {', '.join(GPU_BACKWARDS)}, got "
                     f"{gpu_backward!r}")


def sparse_topk_attention(q, k, v, indices, *, block_sizes: BlockSizes | None = None,
                          interpret: bool = False, backend: str | None = None,
                          gpu_backward: str = "atomic"):
  """Attention of each query over its selected keys only (MQA: one KV head for all query heads).

  Args:
    q: [batch, tokens, heads, head_dim].
    k: [batch, key_tokens, 1, head_dim]; v: [batch, key_tokens, 1, value_dim].
    indices: int [batch, tokens, k], the keys each query attends to, distinct per query; -1 for
      none. A query with no key at all gets a zero output.
    block_sizes: kernel tiles (block_topk; GPU key-major backward: block_k; TPU: block_tokens,
      block_dkv), the backend's `DEFAULT_BLOCK_SIZES` by default.
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).
    backend: "gpu" (Triton) or "tpu" (Mosaic) kernels; None: the platform being traced for
      (`backend.resolve`), so the GPU dialect on CPU. TPU takes float32 or bfloat16.
    gpu_backward: the GPU dk/dv pass, "atomic" (scatter with atomic adds) or "key_major" (no
      atomics, deterministic; tested in interpret mode only so far).

  Returns:
    [batch, tokens, heads, value_dim] in q's dtype. Scale 1/sqrt(head_dim).
  """
  attend = functools.partial(_sparse_topk_attention, block_sizes=block_sizes, interpret=interpret,
                             backend=_resolve_backend(backend), gpu_backward=gpu_backward)
  return _per_device(attend, q.shape[0])(q, k, v, indices)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "backend",
                                             "gpu_backward"))
def _sparse_topk_attention(q, k, v, indices, *, block_sizes, interpret, backend, gpu_backward):
  block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[backend]
  _check_sparse_inputs(q, k, v, indices, block_sizes, gpu_backward)
  if backend == "tpu":
    return _tpu.sparse_topk_attention(q, k, v, indices, block_sizes, interpret)
  return _gpu.sparse_topk_attention(q, k, v, indices, block_sizes, gpu_backward, interpret)


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
