"""Shortcut-forcing loss kernel vs its reference, and the reference vs the paper's formula."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET_COMPILER_OPTIONS
from kernels_pallas import shortcut_forcing as sf

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
K_MAX = 8
D_MIN = 1 / K_MAX

MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.skipif(
        jax.default_backend() == "cpu", reason="Pallas compiles only for GPU/TPU")),
]


def _inputs(batch, frames, tokens, channels, dtype=jnp.float32, *, seed=0, all_d_min=False):
  """Latents, network outputs and per-frame (tau, d, mask) as the Dreamer 4 recipe draws them."""
  keys = jax.random.split(jax.random.key(seed), 8)
  shape = (batch, frames, tokens, channels)
  z_clean, noise, pred, half1, half2 = (jax.random.normal(key, shape) for key in keys[:5])
  steps = jnp.array([1, 2, 4, K_MAX])[jax.random.randint(keys[5], (batch, frames), 0, 4)]
  d = jnp.full((batch, frames), D_MIN) if all_d_min else 1.0 / steps
  tau = jnp.floor(jax.random.uniform(keys[6], (batch, frames)) / d) * d  # {0, d, ..., 1 - d}
  z_noisy = (1 - tau[..., None, None]) * noise + tau[..., None, None] * z_clean
  mask = jax.random.uniform(keys[7], (batch, frames)) > 0.2
  values = [x.astype(dtype) for x in (pred, z_clean, z_noisy, half1, half2)]
  return (*values, tau, d, mask)


def _paper_loss(pred, z1, z_tau, f_half1, f_half2, tau, d, mask, d_min):
  """Dreamer 4's shortcut-forcing objective, frame by frame, in float64."""
  pred, z1, z_tau, f_half1, f_half2 = (np.asarray(x, np.float64)
                                       for x in (pred, z1, z_tau, f_half1, f_half2))
  loss = np.zeros(tau.shape)
  for i in np.ndindex(tau.shape):
    t, step = float(tau[i]), float(d[i])
    if step == d_min:
      frame_loss = np.mean((pred[i] - z1[i]) ** 2)
    else:
      b1 = (f_half1[i] - z_tau[i]) / (1 - t)
      z_prime = z_tau[i] + b1 * step / 2
      b2 = (f_half2[i] - z_prime) / (1 - (t + step / 2))
      frame_loss = (1 - t) ** 2 * np.mean(((pred[i] - z_tau[i]) / (1 - t) - (b1 + b2) / 2) ** 2)
    loss[i] = (0.9 * t + 0.1) * frame_loss * float(mask[i])
  return loss


@pytest.mark.parametrize("interpret", MODES)
class TestShortcutForcingLoss:

  # 11 frames and 5 * 6 = 30 values per frame are not multiples of the blocks (4, 8).
  @pytest.mark.parametrize("dtype,all_d_min", [
      (jnp.float32, False), (jnp.bfloat16, False), (jnp.float32, True)])
  def test_matches_reference(self, interpret, dtype, all_d_min):
    inputs = _inputs(2, 11, 5, 6, dtype, all_d_min=all_d_min)
    blocks = sf.BlockSizes(block_frames=4, block_features=8 if interpret else 16)
    kernel = functools.partial(sf.shortcut_forcing_loss, d_min=D_MIN, block_sizes=blocks,
                               interpret=interpret)
    reference = functools.partial(sf.reference_shortcut_forcing_loss, d_min=D_MIN)
    inputs = (*inputs[:-1], inputs[-1].astype(jnp.float32))
    cotangent = jax.random.normal(jax.random.key(9), inputs[5].shape)

    @functools.partial(jax.jit, compiler_options=INTERPRET_COMPILER_OPTIONS if interpret else None)
    def outputs_and_grads(inputs, cotangent):
      loss, vjp = jax.vjp(kernel, *inputs)
      ref_loss, ref_vjp = jax.vjp(reference, *inputs)
      return (loss, *vjp(cotangent)), (ref_loss, *ref_vjp(cotangent))

    actual, expected = outputs_and_grads(inputs, cotangent)
    for a, e in zip(actual, expected):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                                 atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert all(not np.any(g) for g in actual[2:]), "only pred may receive a gradient"


@pytest.mark.parametrize("all_d_min", [False, True])
def test_reference_matches_paper_formula(all_d_min):
  inputs = _inputs(2, 9, 4, 3, all_d_min=all_d_min)
  assert bool(jnp.any(inputs[6] == D_MIN)), "the draw should contain d == d_min frames"
  expected = _paper_loss(*inputs, D_MIN)
  actual = sf.reference_shortcut_forcing_loss(*inputs, d_min=D_MIN)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_rejects_mismatched_shapes():
  inputs = list(_inputs(1, 4, 2, 3))
  inputs[2] = inputs[2][:, :, :1]
  with pytest.raises(ValueError, match=r"\(1, 4, 2, 3\).*\(1, 4, 1, 3\)"):
    sf.shortcut_forcing_loss(*inputs, d_min=D_MIN, interpret=True)
  with pytest.raises(ValueError, match="d_min must be > 0"):
    sf.shortcut_forcing_loss(*_inputs(1, 4, 2, 3), d_min=0.0, interpret=True)
