"""Pieces the GPU (Triton) and TPU (Mosaic) dialects of the DSA kernels share: the mask value, the
fp32-accumulating matmul, the causal test, padding."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# References multiply fp32 in full fp32 on every backend (GPUs default to TF32).
HIGHEST = lax.Precision.HIGHEST
# Finite: a row whose first chunk is all "no key" then accumulates only zero sink rows, which the
# rescale exp(MASK_VALUE - m) == 0 wipes out once a real key arrives.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot(a, b, *, trans_a=False, trans_b=False, precision=HIGHEST):
  """2-D matmul accumulating in fp32 (the form every Pallas backend lowers). HIGHEST keeps fp32
  inputs in fp32 (Triton's default would round them to TF32); bf16/fp8 inputs are unaffected."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def causal(q_start, k_start, shape):
  """[bq, bk] tile mask: key position <= query position."""
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  return k_pos <= q_pos


def pad_axis(x, axis, multiple, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, pad, constant_values=value)
