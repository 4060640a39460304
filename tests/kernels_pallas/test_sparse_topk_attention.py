"""DSA kernels (lightning indexer, top-k selection, sparse attention) vs their references: the GPU
dialect (both dk/dv backwards) and the TPU dialect in their interpreters on CPU, compiled on their
own chips, and the TPU dialect compiled for v5e, v5p and v6e from this machine (libtpu's topology
descriptions)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET_COMPILER_OPTIONS, TPU_TOPOLOGIES, compile_for_tpu
from kernels_pallas import sparse_topk_attention as dsa

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.skipif(
        jax.default_backend() != "gpu", reason="the GPU dialect compiles only for GPU")),
]
TPU_MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.skipif(
        jax.default_backend() != "tpu", reason="the TPU dialect compiles only for TPU")),
]
GPU_BACKWARDS = pytest.mark.parametrize("gpu_backward", dsa.GPU_BACKWARDS)


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _assert_close(actual, expected, dtype):
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             atol=tol, rtol=tol)


def _outputs_and_grads(kernel, reference, args, cotangent, interpret):
  """(kernel's output and input gradients, the reference's), in one compiled call."""
  @functools.partial(jax.jit, compiler_options=INTERPRET_COMPILER_OPTIONS if interpret else None)
  def run(args, cotangent):
    out, vjp = jax.vjp(kernel, *args)
    ref_out, ref_vjp = jax.vjp(reference, *args)
    return (out, *vjp(cotangent)), (ref_out, *ref_vjp(cotangent))
  return run(args, cotangent)


def _indexer_inputs(batch, seq_len, heads, dim, dtype):
  return (_normal(0, (batch, seq_len, heads, dim), dtype), _normal(1, (batch, seq_len, dim), dtype),
          _normal(2, (batch, seq_len, heads), dtype))


def _fp8_error_bound(q, k, w):
  """Worst-case |I_fp8 - I| from e4m3 rounding, per (t, s).

  e4m3 keeps 3 mantissa bits, so rounding a normal value costs at most half an ulp, 2^-4 of its
  magnitude; the power-of-two scale s < 2 * amax / 448 of a block makes subnormals cost at most
  2^-10 * s in absolute terms. With e_x = 2^-4 |x| + 2^-10 s_x, each product q_d k_d moves by at
  most e_q |k| + |q| e_k + e_q e_k, and ReLU is 1-Lipschitz, so
  |I_fp8[t, s] - I[t, s]| <= sum_j |w[t, j]| sum_d (e_q |k| + |q| e_k + e_q e_k).
  """
  def error(x):
    scale = 2 * jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 448  # one block: dim <= 128
    return 2.0 ** -4 * jnp.abs(x) + 2.0 ** -10 * scale
  e_q, e_k = error(q), error(k)
  einsum = functools.partial(jnp.einsum, precision="highest")
  per_head = (einsum("bthd,bsd->bths", e_q, jnp.abs(k)) + einsum("bthd,bsd->bths", jnp.abs(q), e_k)
              + einsum("bthd,bsd->bths", e_q, e_k))
  return einsum("bth,bths->bts", jnp.abs(w), per_head)


def _check_indexer(inputs, dtype, interpret, precision="default", backend=None):
  """Scores and gradients against the reference; fp8 also within its rounding bound of fp32."""
  block = 8 if interpret else 16  # compiled, each dialect rounds blocks up to its tiles
  blocks = dsa.BlockSizes(block_q=block, block_k=block)
  batch, seq_len = inputs[0].shape[:2]
  # A cotangent on the masked entries too: they must receive no gradient.
  cotangent = _normal(3, (batch, seq_len, seq_len))
  actual, expected = _outputs_and_grads(
      functools.partial(dsa.lightning_indexer_scores, precision=precision, block_sizes=blocks,
                        interpret=interpret, backend=backend),
      functools.partial(dsa.reference_lightning_indexer_scores, precision=precision),
      inputs, cotangent, interpret)
  for a, e in zip(actual, expected):  # fp8: the same quantised product, straight-through grads
    _assert_close(a, e, dtype)
  if precision == "fp8":
    exact = dsa.reference_lightning_indexer_scores(*inputs)
    visible = np.isfinite(np.asarray(exact))
    error = np.abs(np.where(visible, actual[0] - exact, 0.0))
    assert error.max() > 0, "the fp8 path should differ from fp32"
    bound = np.asarray(_fp8_error_bound(*inputs)) * (1 + 1e-5) + 1e-5
    assert np.all(error <= bound), (error - bound).max()


def _causal_topk(batch, seq_len, top_k):
  scores = dsa.reference_lightning_indexer_scores(*_indexer_inputs(batch, seq_len, 2, 16,
                                                                   jnp.float32))
  return dsa.select_topk_indices(scores, top_k)


def _shared_and_missing_keys(seq_len=10, top_k=4):
  """Every query picks from keys {0, 1, 2} in its own order, so the dk/dv scatter adds many
  queries into the same rows; query 0 has no key at all (zero output and gradient)."""
  order = np.argsort(np.random.default_rng(0).random((seq_len, 3)), axis=1)
  indices = np.concatenate([order, -np.ones((seq_len, top_k - 3), int)], axis=1)
  indices[0] = -1
  return jnp.asarray(indices[None], jnp.int32)


def _check_attention(indices, heads, dim, dim_v, blocks, dtype, interpret, **options):
  batch, seq_len, _ = indices.shape
  q = _normal(4, (batch, seq_len, heads, dim), dtype)
  k = _normal(5, (batch, seq_len, 1, dim), dtype)
  v = _normal(6, (batch, seq_len, 1, dim_v), dtype)
  do = _normal(7, (batch, seq_len, heads, dim_v), dtype)
  kernel = lambda q, k, v: dsa.sparse_topk_attention(q, k, v, indices, block_sizes=blocks,
                                                     interpret=interpret, **options)
  reference = lambda q, k, v: dsa.reference_sparse_topk_attention(q, k, v, indices)
  actual, expected = _outputs_and_grads(kernel, reference, (q, k, v), do, interpret)
  for a, e in zip(actual, expected):
    _assert_close(a, e, dtype)


@pytest.mark.parametrize("interpret", MODES)
class TestSparseTopkAttention:
  """The GPU dialect (backend None on CPU and GPU), with both dk/dv backwards."""

  @pytest.mark.parametrize("batch,seq_len,heads,dim,dtype", [
      (2, 21, 3, 16, jnp.float32), (1, 19, 2, 16, jnp.bfloat16)])
  def test_indexer_matches_reference(self, interpret, batch, seq_len, heads, dim, dtype):
    _check_indexer(_indexer_inputs(batch, seq_len, heads, dim, dtype), dtype, interpret)

  def test_fp8_indexer(self, interpret):
    _check_indexer(_indexer_inputs(2, 21, 3, 32, jnp.float32), jnp.float32, interpret, "fp8")

  @GPU_BACKWARDS
  @pytest.mark.parametrize("batch,seq_len,heads,dim,dim_v,top_k,block_topk,dtype", [
      (1, 13, 16, 16, 16, 4, 4, jnp.float32),    # fewer than k visible keys for t < 3
      (2, 11, 16, 16, 24, 12, 8, jnp.float32),   # k > tokens, k not a multiple of the block
      (1, 13, 16, 16, 16, 6, 4, jnp.bfloat16),
  ])
  def test_attention_matches_reference(self, interpret, gpu_backward, batch, seq_len, heads, dim,
                                       dim_v, top_k, block_topk, dtype):
    _check_attention(_causal_topk(batch, seq_len, top_k), heads, dim, dim_v,
                     dsa.BlockSizes(block_topk=block_topk), dtype, interpret,
                     gpu_backward=gpu_backward)

  @GPU_BACKWARDS
  def test_attention_scatter_with_shared_and_missing_keys(self, interpret, gpu_backward):
    _check_attention(_shared_and_missing_keys(), 16, 16, 16, dsa.BlockSizes(block_topk=2),
                     jnp.float32, interpret, gpu_backward=gpu_backward)

  def test_key_major_backward_over_several_key_blocks(self, interpret):
    """Keys in blocks of 4, so the pairs of one query land in several programs; -1 slots between
    real keys; 5 heads, so a chunk's rows (pairs x heads) are not a power of two."""
    rng = np.random.default_rng(1)
    seq_len, top_k = 11, 6
    indices = np.stack([rng.permutation(seq_len)[:top_k] for _ in range(2 * seq_len)])
    indices = indices.reshape(2, seq_len, top_k)
    indices[:, :, 1] = -1
    indices[1, 3] = -1
    _check_attention(jnp.asarray(indices, jnp.int32), 5, 16, 8,
                     dsa.BlockSizes(block_k=4, block_topk=16), jnp.float32, interpret,
                     gpu_backward="key_major")


# The TPU dialect in Pallas' TPU interpreter (compiled on a TPU). Each case costs seconds of
# compile there, so these few cover what the GPU cases do between them: causal -1 padding, top_k
# beyond the sequence and not a multiple of the chunk, bf16, value_dim != head_dim, batch 2,
# many queries on the same keys, a query with no key, heads off the sublane tile, token blocks
# that do not divide the sequence, and several dk/dv key windows (dq in a pass of its own).
@pytest.mark.parametrize("interpret", TPU_MODES)
@pytest.mark.parametrize("precision,dim,dtype", [
    ("default", 16, jnp.bfloat16), ("fp8", 32, jnp.float32)])
def test_tpu_indexer_matches_reference(interpret, precision, dim, dtype):
  """fp8's backward runs the default kernels on the dequantised fp32 inputs."""
  _check_indexer(_indexer_inputs(1, 21, 3, dim, dtype), dtype, interpret, precision, "tpu")


@pytest.mark.parametrize("interpret", TPU_MODES)
@pytest.mark.parametrize("case", ["causal_f32", "causal_bf16", "shared_keys_in_windows"])
def test_tpu_attention_matches_reference(interpret, case):
  if case == "causal_f32":  # k > tokens, k not a multiple of the chunk, 2 chunks a token
    _check_attention(_causal_topk(2, 11, 12), 16, 16, 24, dsa.BlockSizes(block_topk=8),
                     jnp.float32, interpret, backend="tpu")
  elif case == "causal_bf16":
    _check_attention(_causal_topk(1, 13, 6), 16, 16, 16, dsa.BlockSizes(block_topk=4),
                     jnp.bfloat16, interpret, backend="tpu")
  else:  # windows of 2 keys: rows 0-1 and 2 of the shared keys sum in different programs
    _check_attention(_shared_and_missing_keys(), 5, 16, 16,
                     dsa.BlockSizes(block_topk=2, block_tokens=4, block_dkv=2), jnp.float32,
                     interpret, backend="tpu")


@pytest.mark.parametrize("top_k", [3, 25])
def test_select_topk_indices(top_k):
  scores = np.asarray(_normal(0, (2, 20, 20)))
  indices = np.asarray(dsa.select_topk_indices(jnp.asarray(scores), top_k))
  assert indices.shape == (2, 20, top_k) and indices.dtype == np.int32
  for b in range(2):
    for t in range(20):
      best = np.argsort(-scores[b, t, :t + 1])[:top_k]  # causal: keys 0..t
      expected = np.full(top_k, -1)
      expected[:len(best)] = best
      np.testing.assert_array_equal(indices[b, t], expected)


def test_sparse_reference_with_all_keys_is_dense_causal_attention():
  q, k, v = _normal(0, (2, 12, 4, 16)), _normal(1, (2, 12, 1, 16)), _normal(2, (2, 12, 1, 16))
  scores = dsa.reference_lightning_indexer_scores(*_indexer_inputs(2, 12, 2, 16, jnp.float32))
  sparse = dsa.reference_sparse_topk_attention(q, k, v, dsa.select_topk_indices(scores, 16))
  dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)


def test_quantize_fp8_uses_power_of_two_block_scales():
  x = _normal(0, (3, 256)) * jnp.array([[1e-3], [1.0], [300.0]])
  values, scales = dsa.quantize_fp8(x)
  assert values.dtype == jnp.float8_e4m3fn and scales.shape == (3, 2)
  np.testing.assert_array_equal(np.log2(scales), np.round(np.log2(scales)))
  assert float(jnp.max(jnp.abs(values.astype(jnp.float32)))) <= 448
  relative = jnp.abs(dsa.dequantize_fp8(values, scales) - x) / jnp.abs(x)
  normal = jnp.abs(x) >= 2.0 ** -6 * jnp.repeat(scales, 128, axis=1)
  assert float(jnp.max(jnp.where(normal, relative, 0.0))) <= 2.0 ** -4


@pytest.mark.parametrize("topology", TPU_TOPOLOGIES)
def test_tpu_dialect_compiles_for_tpu_chips(topology):
  """Mosaic's layout rules are checked only when compiling: forward and backward of the indexer
  (default and fp8) and of the sparse attention compile for each chip, in bf16, with heads not a
  multiple of the sublane tile, top_k not a multiple of the chunk, and two dk/dv key windows."""
  def loss(q, k, v, indices, q_index, k_index, weights):
    scores = sum(dsa.lightning_indexer_scores(q_index, k_index, weights, precision=precision)
                 for precision in ("default", "fp8"))
    out = dsa.sparse_topk_attention(q, k, v, indices,
                                    block_sizes=dsa.BlockSizes(block_topk=32, block_dkv=128))
    return jnp.sum(jnp.where(jnp.isfinite(scores), scores, 0.0)) + jnp.sum(out.astype(jnp.float32))

  seq_len, dtype = 200, jnp.bfloat16
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape in (
      (1, seq_len, 12, 128), (1, seq_len, 1, 128), (1, seq_len, 1, 64))]
  args.append(jax.ShapeDtypeStruct((1, seq_len, 40), jnp.int32))
  args += [jax.ShapeDtypeStruct(shape, dtype) for shape in (
      (1, seq_len, 5, 64), (1, seq_len, 64), (1, seq_len, 5))]
  text = compile_for_tpu(jax.grad(loss, argnums=(0, 1, 2, 4, 5, 6)), *args, topology=topology)
  for name in ("lightning_indexer_fwd", "lightning_indexer_dq", "lightning_indexer_dk",
               "sparse_topk_attention_fwd", "sparse_topk_attention_bwd_dq",
               "sparse_topk_attention_bwd"):
    assert name in text, name


@pytest.mark.parametrize("call,message", [
    (lambda: dsa.sparse_topk_attention(jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16)),
                                       jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2), jnp.int32)),
     r"\(1, 4, 2, 16\).*one KV head"),
    (lambda: dsa.sparse_topk_attention(jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 1, 16)),
                                       jnp.zeros((1, 4, 1, 16)), jnp.zeros((1, 5, 2), jnp.int32)),
     r"indices \(1, 5, 2\)"),
    (lambda: dsa.lightning_indexer_scores(jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 8)),
                                          jnp.zeros((1, 4, 2))), r"\(1, 4, 2, 16\).*\(1, 4, 8\)"),
    (lambda: dsa.lightning_indexer_scores(jnp.zeros((1, 4, 2, 192)), jnp.zeros((1, 4, 192)),
                                          jnp.zeros((1, 4, 2)), precision="fp8"),
     r"head_dim \(192\)"),
    (lambda: dsa.sparse_topk_attention(jnp.zeros((1, 4, 2, 16), jnp.float16),
                                       jnp.zeros((1, 4, 1, 16), jnp.float16),
                                       jnp.zeros((1, 4, 1, 16), jnp.float16),
                                       jnp.zeros((1, 4, 2), jnp.int32), backend="tpu"),
     r"float32 or bfloat16, got float16"),
    (lambda: dsa.sparse_topk_attention(jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 1, 16)),
                                       jnp.zeros((1, 4, 1, 16)), jnp.zeros((1, 4, 2), jnp.int32),
                                       gpu_backward="scatter"), r"gpu_backward .*'scatter'"),
])
def test_rejects_unsupported_shapes(call, message):
  with pytest.raises(ValueError, match=message):
    call()
