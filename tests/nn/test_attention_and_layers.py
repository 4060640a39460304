"""Shared building blocks against plain formulas and jax's own attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxai.nn import attention, layers, transformer


def test_rmsnorm_matches_formula():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  norm = layers.RMSNorm()
  params = norm.init(jax.random.key(1), x)
  scale = jax.random.uniform(jax.random.key(2), (16,))
  params = {"params": {"scale": nn.Partitioned(scale, ("embed",))}}
  expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(norm.apply(params, x), expected, rtol=1e-5, atol=1e-6)


def test_rope_is_a_rotation_by_position_times_frequency():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  positions = jnp.arange(6)[None]
  got = layers.rope(x, positions, base=100.0)
  # Independent form: pairs (x_i, x_{i+half}) as complex numbers times exp(i * pos * base^(-i/half)).
  half = 4
  z = np.asarray(x[..., :half]) + 1j * np.asarray(x[..., half:])
  freq = 100.0 ** (-np.arange(half) / half)
  z = z * np.exp(1j * np.arange(6)[None, :, None, None] * freq)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
  # Relative: q.k depends only on the position difference.
  q, k = x[:, :1], x[:, 1:2, :1]
  dot = lambda p, s: jnp.sum(layers.rope(q, jnp.array([[p]])) * layers.rope(k, jnp.array([[s]])))
  np.testing.assert_allclose(dot(5, 3), dot(2, 0), rtol=1e-5)


def test_soft_cap_bounds_logits():
  x = jnp.linspace(-100, 100, 11)
  np.testing.assert_allclose(layers.soft_cap(x, 5.0), 5.0 * np.tanh(np.asarray(x) / 5.0), rtol=1e-6)
  assert layers.soft_cap(x, None) is x


@pytest.mark.parametrize("frame_size, window", [(1, None), (3, None), (4, 2), (None, None)])
def test_frame_mask_matches_definition(frame_size, window):
  got = np.asarray(attention.frame_mask(10, 10, frame_size=frame_size, window_frames=window))
  for i in range(10):
    for j in range(10):
      if frame_size is None:
        want = True
      else:
        fi, fj = i // frame_size, j // frame_size
        want = fj <= fi and (window is None or fi - fj < window)
      assert got[i, j] == want, (i, j)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("frame_size", [1, 3])
def test_xla_attention_matches_jax_dot_product_attention(heads, kv_heads, frame_size):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 12, heads, 16))
  k = jax.random.normal(keys[1], (2, 12, kv_heads, 16))
  v = jax.random.normal(keys[2], (2, 12, kv_heads, 16))
  mask = attention.frame_mask(12, 12, frame_size=frame_size)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")
  got = attention.xla_attention(q, k, v, frame_size=frame_size)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  head_major = lambda x: x.transpose(0, 2, 1, 3)  # the KV cache's layout
  got = attention.xla_attention(q, head_major(k), head_major(v), frame_size=frame_size, kv_head_major=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# The specs the models use: Dense over one and two axes (layers.Dense), and attention's two products.
EINSUM_CASES = [("abc,cd->abd", (2, 5, 8), (8, 6)), ("abc,cdf->abdf", (2, 5, 8), (8, 3, 4)),
                ("abcd,cde->abe", (2, 5, 3, 4), (3, 4, 8)), ("bkqd,bkds->bkqs", (2, 2, 6, 8), (2, 2, 8, 5)),
                ("bkqd,bksd->bkqs", (2, 2, 6, 8), (2, 2, 5, 8)),
                ("bkqs,bksd->bkqd", (2, 2, 6, 5), (2, 2, 5, 8))]


@pytest.mark.parametrize("spec, a_shape, b_shape", EINSUM_CASES)
def test_einsum_value_and_gradients_match_autodiff_of_jnp_einsum(spec, a_shape, b_shape):
  ka, kb, kg = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  weights = jax.random.normal(kg, jnp.einsum(spec, a, b).shape)
  loss = lambda f: lambda a, b: jnp.sum(weights * f(a, b))
  want, want_grads = jax.value_and_grad(loss(lambda a, b: jnp.einsum(spec, a, b)), (0, 1))(a, b)
  got, got_grads = jax.value_and_grad(loss(lambda a, b: layers.einsum(spec, a, b, jnp.float32)), (0, 1))(a, b)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # bf16 products (fp32 accumulation): XLA:CPU must run them (some layouts of a bf16 x bf16 -> fp32
  # dot are unimplemented there), and they round only the inputs and the cotangent to bf16.
  got, got_grads = jax.jit(jax.value_and_grad(
      loss(lambda a, b: layers.einsum(spec, a, b, jnp.bfloat16)), (0, 1)))(a, b)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=0.1)
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=2e-2, atol=0.1)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_xla_attention_gradients_match_jax_dot_product_attention(heads, kv_heads, dtype, tol):
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (2, 12, heads, 16))
  k = jax.random.normal(keys[1], (2, 12, kv_heads, 16))
  v = jax.random.normal(keys[2], (2, 12, kv_heads, 16))
  weights = jax.random.normal(keys[3], q.shape)
  mask = attention.frame_mask(12, 12, frame_size=3) & (jnp.arange(12)[None, :] % 4 != 1)  # + a dense mask
  def loss(attend):
    return lambda q, k, v: jnp.sum(weights * attend(q, k, v).astype(jnp.float32))
  want = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask[None, None], implementation="xla")), (0, 1, 2))(q, k, v)
  cast = lambda x: x.astype(dtype)
  got = jax.jit(jax.grad(loss(lambda q, k, v: attention.xla_attention(
      cast(q), cast(k), cast(v), frame_size=3, mask=mask)), (0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_soft_capped_attention_matches_explicit_formula():
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (1, 5, 2, 8)) * 4 for kk in keys)
  got = attention.xla_attention(q, k, v, frame_size=1, soft_cap=2.0)
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
  logits = 2.0 * np.tanh(logits / 2.0)
  logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bhts,bshd->bthd", probs, v), rtol=1e-5, atol=1e-5)


def test_block_causal_transformer_block_never_sees_later_frames():
  cfg = transformer.BlockConfig(width=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_hidden=32)
  block = transformer.TransformerBlock(cfg, frame_size=3)
  x = jax.random.normal(jax.random.key(0), (1, 9, 16))
  positions = jnp.arange(9)[None]
  params = block.init(jax.random.key(1), x, positions)
  y = block.apply(params, x, positions)
  y2 = block.apply(params, x.at[:, 6:].add(1.0), positions)  # change frame 2 only
  np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-6)
  assert not np.allclose(y[:, 6:], y2[:, 6:])
