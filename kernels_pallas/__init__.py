"""Pallas kernels, each beside its plain-jnp reference. Imports only jax.

Every kernel runs compiled on the platforms its module's `PLATFORMS` names and with
`interpret=True` on CPU; each module has its own `BlockSizes` dataclass. The attention kernels
(block-causal, and DSA's indexer and sparse top-k) are written in both dialects, GPU (Triton,
`*_gpu.py`) and TPU (Mosaic, `*_tpu.py`), behind one public module each, and take
`backend="gpu" | "tpu" | None`, None meaning the platform being traced for (`backend.resolve`).
The fused shortcut-forcing loss is a GPU kernel only.

The two attention kernels share their module's name, and a package attribute can only be one of
the two, so it stays the module (the path model code imports): call
`block_causal_attention.block_causal_attention(...)` and
`sparse_topk_attention.sparse_topk_attention(...)`. Everything else is exported by name.
"""
from kernels_pallas import block_causal_attention
from kernels_pallas import shortcut_forcing
from kernels_pallas import sparse_topk_attention
from kernels_pallas.block_causal_attention import block_causal_mask
from kernels_pallas.block_causal_attention import reference_block_causal_attention
from kernels_pallas.shortcut_forcing import reference_shortcut_forcing_loss
from kernels_pallas.shortcut_forcing import shortcut_forcing_loss
from kernels_pallas.sparse_topk_attention import dequantize_fp8
from kernels_pallas.sparse_topk_attention import lightning_indexer_scores
from kernels_pallas.sparse_topk_attention import quantize_fp8
from kernels_pallas.sparse_topk_attention import reference_lightning_indexer_scores
from kernels_pallas.sparse_topk_attention import reference_sparse_topk_attention
from kernels_pallas.sparse_topk_attention import select_topk_indices
