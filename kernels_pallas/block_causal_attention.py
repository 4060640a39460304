"""Block-causal flash attention (Pallas), for video world models: one API, a GPU and a TPU dialect.

Tokens are laid out frame after frame, `frame_size` tokens per frame: a query sees every key of its
own frame and of earlier frames (frame(i) = i // frame_size), or with `window_frames=W` only of the
last W frames. For each query block the kernels visit only the KV blocks that hold a visible key
(hidden blocks cost nothing), run the blocks that are visible to every query of the block without
a mask, and mask only the partial blocks on the frame boundaries. When frame_size is a multiple of
both block sizes there are no partial blocks except at the window's edge. The mask and the block
ranges are `frame_mask.FrameMask`, shared by both dialects: `block_causal_attention_gpu` (Triton:
in-kernel loop bounds) and `block_causal_attention_tpu` (Mosaic: a grid axis over the visited
blocks, from scalar-prefetched tables). `backend` picks one (`backend.resolve`: None means the
platform being traced for).

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

# Modules, not names from the package: importing the package would import its __init__, which
# imports this module (an import cycle in BUILD's graph).
import kernels_pallas.backend as backend_lib
import kernels_pallas.block_causal_attention_gpu as gpu_dialect
import kernels_pallas.block_causal_attention_tpu as tpu_dialect
import kernels_pallas.frame_mask as frame_mask

# Platforms this kernel is written for (compiled; every kernel also runs interpreted on CPU).
PLATFORMS = ("gpu", "tpu")

# References multiply fp32 in full fp32 on every backend (GPUs default to TF32).
HIGHEST = lax.Precision.HIGHEST

_DIALECTS = {"gpu": gpu_dialect, "tpu": tpu_dialect}
_FrameMask = frame_mask.FrameMask


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: the forward and dq kernels tile (block_q x block_k), the dk/dv kernel
  (block_q_dkv x block_k_dkv). Sequences shorter than a block use a smaller power of two (on TPU
  compiled, never below 128). The defaults are the GPU's; `DEFAULT_BLOCK_SIZES` has each
  backend's."""
  block_q: int = 64
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64


# TPU tiles are larger: each grid step costs a fixed overhead that a 512 x 512 tile's matmuls
# outweigh, while its fp32 logits (1 MiB) still fit VMEM beside the pipelined blocks. A choice
# from those sizes, not a measured optimum.
DEFAULT_BLOCK_SIZES = {"gpu": BlockSizes(), "tpu": BlockSizes(512, 512, 512, 512)}


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


def block_causal_attention(q, k, v, *, frame_size: int, window_frames: int | None = None,
                           soft_cap: float | None = None, block_sizes: BlockSizes | None = None,
                           interpret: bool = False, backend: str | None = None):
  """Block-causal multi-head attention with GQA, optional soft-cap and sliding window.

  Args:
    q: [batch, tokens, heads, head_dim].
    k, v: [batch, tokens, kv_heads, head_dim], heads a multiple of kv_heads.
    frame_size: tokens per frame; 1 is plain causal attention.
    window_frames: if set, a query in frame f sees only frames f - window_frames + 1 .. f.
    soft_cap: if set, logits = soft_cap * tanh(logits / soft_cap) (after the 1/sqrt(d) scale).
    block_sizes: kernel tiles, the backend's `DEFAULT_BLOCK_SIZES` by default. Compiled for TPU
      they must be multiples of 128.
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).
    backend: "gpu" (Triton) or "tpu" (Mosaic) kernels; None: the platform being traced for
      (`backend.resolve`), so the GPU dialect on CPU.

  Returns:
    [batch, tokens, heads, head_dim] in q's dtype.
  """
  # Resolved before jit: the platform comes from the mesh being traced for, not from the args.
  return _block_causal_attention(q, k, v, frame_size=frame_size, window_frames=window_frames,
                                 soft_cap=soft_cap, block_sizes=block_sizes, interpret=interpret,
                                 backend=backend_lib.resolve(backend))


@functools.partial(jax.jit, static_argnames=("frame_size", "window_frames", "soft_cap",
                                             "block_sizes", "interpret", "backend"))
def _block_causal_attention(q, k, v, *, frame_size, window_frames, soft_cap, block_sizes,
                            interpret, backend):
  dialect = _DIALECTS[backend]
  block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[backend]
  _check_inputs(q, k, v, frame_size, window_frames, soft_cap, block_sizes)
  seq_len = q.shape[1]
  smallest = 1 if interpret else dialect.MIN_COMPILED_BLOCK
  fit = lambda b: max(min(b, pl.next_power_of_2(seq_len)), smallest)
  blocks = BlockSizes(*map(fit, dataclasses.astuple(block_sizes)))
  if backend == "tpu" and not interpret and any(b % smallest for b in dataclasses.astuple(blocks)):
    raise ValueError(f"compiled TPU block sizes must be multiples of {smallest}, got {blocks}")
  tile = math.lcm(*dataclasses.astuple(blocks))
  padded_len = -(-seq_len // tile) * tile
  pad = [(0, 0), (0, padded_len - seq_len), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  out = dialect.attention(q, k, v, _FrameMask(seq_len, frame_size, window_frames), soft_cap,
                          blocks, interpret)
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
