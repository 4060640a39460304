"""Small layers shared by every model: RMSNorm, SwiGLU, RoPE, soft-capping, logically-partitioned dense.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ...) through
``nn.with_logical_partitioning``; the config's sharding rules map them to mesh axes.
Parameters are stored in fp32; ``dtype`` is the compute dtype.
"""
import functools
import string
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

def partitioned(init_fn, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init_fn, tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """Two-operand ``jnp.einsum(spec)`` multiplying in ``dtype`` and accumulating in fp32 (fp32
  output), in the forward pass and in both products of the backward pass.

  Under plain autodiff the backward products get an fp32 cotangent against a ``dtype`` operand,
  which XLA:CPU runs as fp32 matmuls; and it rewrites a product with bf16 output into an fp32 one
  plus casts. Either way it leaves its bf16 (AMX) kernels, 3-4x faster here for these shapes.
  Every index of an operand must appear in the other operand or in the output (no index summed
  within one operand), so that both gradients are einsums of the same kind.
  """
  return _product(spec, a, b, dtype)


def _product(spec, a, b, dtype):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_fwd(spec, a, b, dtype):
  return einsum(spec, a, b, dtype), (a, b)


def _einsum_bwd(spec, dtype, residuals, grad):
  a, b = residuals
  inputs, out = spec.replace(" ", "").split("->")
  a_sub, b_sub = inputs.split(",")
  grad_a = _product(f"{out},{b_sub}->{a_sub}", grad, b, dtype)
  grad_b = _product(f"{a_sub},{out}->{b_sub}", a, grad, dtype)
  return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


einsum.defvjp(_einsum_fwd, _einsum_bwd)


class Dense(nn.Module):
  """Linear map without bias whose kernel is named by logical axes (contracted inputs, then outputs).

  The kernel is created at its full multi-dimensional shape (e.g. [embed, heads, head_dim]) so the
  logical names annotate the real array; the init scales by the fan-in of the contracted axes.
  """
  features: int | Sequence[int]
  axes: Sequence[str | None]
  in_axis: int | Sequence[int] = -1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_axes = (self.in_axis,) if isinstance(self.in_axis, int) else tuple(self.in_axis)
    in_axes = tuple(a % x.ndim for a in in_axes)
    num_in = len(in_axes)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(num_in)),
        out_axis=tuple(range(num_in, num_in + len(features))))
    kernel = self.param("kernel", partitioned(init, self.axes),
                        tuple(x.shape[a] for a in in_axes) + features, jnp.float32)
    x_sub = string.ascii_letters[:x.ndim]
    out_sub = string.ascii_letters[x.ndim:x.ndim + len(features)]
    kernel_sub = "".join(x_sub[a] for a in in_axes) + out_sub
    kept = "".join(l for i, l in enumerate(x_sub) if i not in in_axes)
    return einsum(f"{x_sub},{kernel_sub}->{kept}{out_sub}", x, kernel, self.dtype).astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm computed in fp32 (bf16 mean-of-squares loses too much precision), cast back after."""
  axis_name: str | None = "embed"
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), (self.axis_name,)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class SwiGLU(nn.Module):
  """Gated MLP: down(silu(gate(x)) * up(x))."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    gate = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
    up = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="down")(h)


def soft_cap(logits, cap: float | None):
  """cap * tanh(logits / cap): bounds logits smoothly (Gemma 2); identity when cap is None."""
  if cap is None:
    return logits
  return cap * jnp.tanh(logits / cap)


def rope(x, positions, *, base: float = 10_000.0):
  """Rotary position embedding, non-interleaved halves. x: [..., T, H, D], positions: [..., T]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [..., T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
