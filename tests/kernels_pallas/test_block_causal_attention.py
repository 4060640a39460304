"""Block-causal flash attention kernels (GPU and TPU dialects) vs their plain-jnp reference, the
reference vs jax.nn.dot_product_attention with a dense mask, and the TPU dialect compiled for TPU
chips from this machine (libtpu's topology descriptions)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET_COMPILER_OPTIONS, TPU_TOPOLOGIES, compile_for_tpu
from kernels_pallas import block_causal_attention as bca

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.skipif(
        jax.default_backend() == "cpu", reason="Pallas compiles only for GPU/TPU")),
]


def _inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, do


def _assert_close(actual, expected, dtype):
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             atol=tol, rtol=tol)


# (batch, seq_len, heads, kv_heads, frame_size, window_frames, soft_cap, dtype). Blocks are 8 (16
# compiled): frame sizes 8 and 16 give only whole blocks, the others partial ones; 37, 29, 20, 19
# are not multiples of the block.
CASES = [
    (1, 32, 2, 2, 8, None, None, jnp.float32),
    (2, 48, 4, 2, 16, None, None, jnp.float32),
    (1, 37, 4, 1, 5, None, None, jnp.float32),
    (1, 29, 8, 1, 3, 2, 5.0, jnp.float32),
    (1, 20, 2, 1, 1, 4, None, jnp.float32),
    (1, 24, 4, 2, 6, 1, 30.0, jnp.float32),
    (1, 19, 2, 2, 32, None, None, jnp.float32),
    (1, 37, 4, 2, 5, 3, 20.0, jnp.bfloat16),
    (1, 32, 8, 2, 8, None, None, jnp.bfloat16),
]


def _check_against_reference(inputs, options, blocks, interpret, backend=None):
  """Output and the gradients of all inputs match those of the reference."""
  q, k, v, do = inputs
  kernel = lambda q, k, v: bca.block_causal_attention(q, k, v, **options, block_sizes=blocks,
                                                      interpret=interpret, backend=backend)
  reference = lambda q, k, v: bca.reference_block_causal_attention(q, k, v, **options)

  @functools.partial(jax.jit, compiler_options=INTERPRET_COMPILER_OPTIONS if interpret else None)
  def outputs_and_grads(q, k, v, do):
    out, vjp = jax.vjp(kernel, q, k, v)
    ref_out, ref_vjp = jax.vjp(reference, q, k, v)
    return (out, *vjp(do)), (ref_out, *ref_vjp(do))

  for actual, expected in zip(*outputs_and_grads(q, k, v, do)):
    _assert_close(actual, expected, q.dtype.type)


@pytest.mark.parametrize("interpret", MODES)
class TestBlockCausalAttention:

  @pytest.mark.parametrize("batch,seq_len,heads,kv_heads,frame_size,window_frames,soft_cap,dtype",
                           CASES)
  def test_matches_reference(self, interpret, batch, seq_len, heads, kv_heads, frame_size,
                             window_frames, soft_cap, dtype):
    block = 8 if interpret else 16
    _check_against_reference(
        _inputs(batch, seq_len, heads, kv_heads, 16, dtype),
        dict(frame_size=frame_size, window_frames=window_frames, soft_cap=soft_cap),
        bca.BlockSizes(block, block, block, block), interpret)

  def test_unequal_block_sizes(self, interpret):
    blocks = (bca.BlockSizes(block_q=16, block_k=8, block_q_dkv=8, block_k_dkv=16) if interpret
              else bca.BlockSizes(32, 16, 16, 32))
    _check_against_reference(_inputs(1, 40, 4, 2, 16, jnp.float32),
                             dict(frame_size=6, window_frames=2), blocks, interpret)


# The TPU dialect in Pallas' TPU interpreter, where each case costs seconds (its grid steps run
# one by one), so three cases cover what CASES does between them: batch 2, odd frame sizes and
# sequences not a multiple of the block, blocks fully visible (run unmasked), partial and skipped,
# GQA 3:1, 8:1 and 2:1, soft-cap, windows, bf16, and blocks of different sizes (the dk/dv
# kernel's tables then differ from the forward's).
TPU_CASES = [
    ((2, 29, 3, 1, 5, None, None, jnp.float32), bca.BlockSizes(16, 16, 16, 16)),
    ((1, 29, 8, 1, 3, 2, 5.0, jnp.float32), bca.BlockSizes(16, 16, 16, 16)),
    ((1, 37, 2, 1, 5, 3, 20.0, jnp.bfloat16), bca.BlockSizes(16, 8, 8, 16)),
]


@pytest.mark.parametrize("case,blocks", TPU_CASES)
def test_tpu_dialect_matches_reference(case, blocks):
  batch, seq_len, heads, kv_heads, frame_size, window_frames, soft_cap, dtype = case
  _check_against_reference(
      _inputs(batch, seq_len, heads, kv_heads, 16, dtype),
      dict(frame_size=frame_size, window_frames=window_frames, soft_cap=soft_cap), blocks,
      interpret=True, backend="tpu")


@pytest.mark.parametrize("topology", TPU_TOPOLOGIES)
def test_tpu_dialect_compiles_for_tpu_chips(topology):
  """Mosaic's layout rules are checked only when compiling: forward and backward, fp32 and bf16,
  compile for each chip, with GQA, soft-cap, a window, partial blocks and a sequence not a
  multiple of the block (one program, so one compile)."""
  options = dict(frame_size=96, window_frames=2, soft_cap=20.0,
                 block_sizes=bca.BlockSizes(128, 128, 128, 128))
  loss = lambda q, k, v: bca.block_causal_attention(q, k, v, **options).astype(jnp.float32).sum()
  grads = lambda *qkv: [jax.grad(loss, argnums=(0, 1, 2))(*qkv[i:i + 3]) for i in (0, 3)]
  shapes = [jax.ShapeDtypeStruct((1, 300, heads, 128), dtype)
            for dtype in (jnp.float32, jnp.bfloat16) for heads in (4, 2, 2)]
  text = compile_for_tpu(grads, *shapes, topology=topology)
  for name in ("block_causal_attention_fwd", "block_causal_attention_dq",
               "block_causal_attention_dkv"):
    assert text.count(f"%{name}") >= 2, name  # one per dtype


def test_tpu_dialect_runs_per_chip_on_a_multi_chip_mesh():
  """XLA cannot partition a Mosaic kernel: on a 2x2 mesh each chip runs the kernels on its batch
  and kv-head shard, and inputs already laid out that way move no data between chips."""
  layout = jax.sharding.PartitionSpec("data", None, "heads", None)
  loss = lambda q, k, v: bca.block_causal_attention(q, k, v, frame_size=128).sum()
  q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
  text = compile_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, topology="v5e:2x2",
                         mesh_shape=(2, 2), axis_names=("data", "heads"), in_specs=[layout] * 3)
  forward = [line for line in text.splitlines()
             if "%block_causal_attention_fwd" in line and "custom-call(" in line]
  assert forward and all("= (bf16[1,2,256,128]" in line for line in forward), forward
  assert not any(op in text for op in ("all-gather", "all-to-all", "collective-permute"))


def test_compiled_tpu_blocks_must_be_multiples_of_128():
  q = jnp.zeros((1, 256, 2, 128))
  with pytest.raises(ValueError, match="multiples of 128"):
    bca.block_causal_attention(q, q, q, frame_size=8, backend="tpu",
                               block_sizes=bca.BlockSizes(192, 128, 128, 128))


@pytest.mark.parametrize("frame_size,window_frames,kv_heads", [
    (1, None, 4), (4, None, 2), (5, None, 1), (3, 2, 2), (7, 1, 4), (4, 3, 1)])
def test_reference_matches_dense_masked_attention(frame_size, window_frames, kv_heads):
  q, k, v, _ = _inputs(2, 23, 4, kv_heads, 16, jnp.float32)
  mask = bca.block_causal_mask(23, frame_size, window_frames)
  dense = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
  reference = bca.reference_block_causal_attention(q, k, v, frame_size=frame_size,
                                                   window_frames=window_frames)
  np.testing.assert_allclose(reference, dense, atol=1e-5, rtol=1e-5)


def test_block_causal_mask_small_case():
  # Frames of 2 tokens, window of 2 frames: rows are queries, columns keys.
  expected = np.array([[1, 1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 1],
                       [0, 0, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(bca.block_causal_mask(6, 2, 2), expected)


def _brute_force_blocks(visible, row_block, col_block, row_ranges):
  """Per row block: (lo, hi) over column blocks with a visible entry, and the fully visible set."""
  if not row_ranges:
    visible = visible.T
    row_block, col_block = col_block, row_block
  result = []
  for r in range(visible.shape[0] // row_block):
    tiles = [visible[r * row_block:(r + 1) * row_block, c * col_block:(c + 1) * col_block]
             for c in range(visible.shape[1] // col_block)]
    seen = [c for c, tile in enumerate(tiles) if tile.any()]
    full = [c for c, tile in enumerate(tiles) if tile.all()]
    result.append(((min(seen), max(seen) + 1) if seen else None, full))
  return result


@pytest.mark.parametrize("seq_len,frame_size,window_frames,block_q,block_k", [
    (32, 8, None, 8, 8), (32, 8, 2, 8, 8), (37, 5, None, 8, 4), (37, 5, 3, 4, 8),
    (29, 3, 1, 8, 8), (20, 1, 4, 4, 4), (19, 32, None, 8, 8), (40, 6, 2, 16, 8)])
def test_visited_blocks_are_exactly_the_visible_ones(seq_len, frame_size, window_frames, block_q,
                                                     block_k):
  """Loop bounds visit every block with a visible pair and no other; only partial ones mask."""
  mask = bca._FrameMask(seq_len, frame_size, window_frames)  # pylint: disable=protected-access
  tile = np.lcm(block_q, block_k)
  padded = -(-seq_len // tile) * tile
  positions = np.arange(padded)
  visible = np.asarray(mask.visible(positions[:, None], positions[None, :]))
  # Rows past the last query block holding a real query are never visited by the dk/dv kernel.
  real_rows = -(-seq_len // block_q) * block_q

  kv_expected = _brute_force_blocks(visible, block_q, block_k, row_ranges=True)
  q_expected = _brute_force_blocks(visible[:real_rows], block_q, block_k, row_ranges=False)
  for starts, expected, ranges in [
      (range(0, padded, block_q), kv_expected, lambda s: mask.kv_blocks(s, block_q, block_k)),
      (range(0, padded, block_k), q_expected, lambda s: mask.q_blocks(s, block_k, block_q))]:
    for start, (seen, full) in zip(starts, expected):
      lo, full_lo, full_hi, hi = (int(x) for x in ranges(start))
      if seen is None:
        assert lo == hi, start
      else:
        assert (lo, hi) == seen, start
        assert list(range(full_lo, full_hi)) == full, start


def test_frame_multiple_of_block_needs_no_mask():
  mask = bca._FrameMask(64, 16, None)  # pylint: disable=protected-access
  for q_start in range(0, 64, 8):
    lo, full_lo, full_hi, hi = (int(x) for x in mask.kv_blocks(q_start, 8, 8))
    assert (lo, full_lo) == (0, 0) and full_hi == hi == (q_start // 16 + 1) * 2


@pytest.mark.parametrize("shapes,options,message", [
    (((1, 8, 3, 16), (1, 8, 2, 16)), {}, r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    (((1, 8, 2, 16), (1, 9, 2, 16)), {}, r"\(1, 8, 2, 16\).*\(1, 9, 2, 16\)"),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {"frame_size": 0}, "frame_size must be >= 1, got 0"),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {"window_frames": 0}, "window_frames must be >= 1"),
    (((8, 2, 16), (8, 2, 16)), {}, r"got shapes \(8, 2, 16\)"),
])
def test_rejects_unsupported_shapes(shapes, options, message):
  q_shape, kv_shape = shapes
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  with pytest.raises(ValueError, match=message):
    bca.block_causal_attention(q, k, k, **{"frame_size": 2, **options}, interpret=True)
