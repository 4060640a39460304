"""Fused per-frame shortcut-forcing loss of Dreamer 4 (Pallas).

Convention: tau = 0 is pure noise, tau = 1 clean data, z_tau = (1 - tau) z0 + tau z1, and the
network predicts clean latents (x-prediction). With d the step size of a frame:

  d == d_min:  loss = mean((pred - z_clean)^2)
  otherwise:   b1 = (pred_half1 - z_tau) / (1 - tau),  z' = z_tau + b1 d / 2,
               b2 = (pred_half2 - z') / (1 - (tau + d / 2)),
               loss = (1 - tau)^2 mean(((pred - z_tau) / (1 - tau) - (b1 + b2) / 2)^2)

times the ramp weight 0.9 tau + 0.1 and the frame mask. Both cases are the mean square of one
per-value error e (the bootstrap one is e = (1 - tau) (v - v_target), in x-space units), and
de/dpred = 1 in both, so the backward kernel needs only e. The kernels stream a frame's N * C
values in chunks and never materialise b1, z' or b2 in memory. Only `pred` receives a gradient;
the bootstrap targets are stop-gradient.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Platforms this kernel is written for (compiled; every kernel also runs interpreted on CPU).
PLATFORMS = ("gpu",)

# d <= d_min (1 + tol) selects the x-space loss: d comes from 1 / K arithmetic in any dtype.
_D_MIN_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Each program handles block_frames frames, streaming their N * C values block_features at a
  time. Short inputs use a smaller power of two."""
  block_frames: int = 8
  block_features: int = 1024


def ramp_weight(tau):
  return 0.9 * tau + 0.1


def _frame_error(pred, z_clean, z_noisy, half1, half2, tau, d, d_min):
  """The per-value error e whose mean square is the unweighted frame loss; tau, d: [frames, 1]."""
  one_minus_tau = 1.0 - tau
  b1 = (half1 - z_noisy) / one_minus_tau
  z_mid = z_noisy + b1 * (d / 2)
  b2 = (half2 - z_mid) / (one_minus_tau - d / 2)
  bootstrap = (pred - z_noisy) - one_minus_tau * (b1 + b2) / 2
  return jnp.where(d <= d_min * (1 + _D_MIN_RTOL), pred - z_clean, bootstrap)


def _chunk_error(refs, tau, d, chunk, *, d_min, block_features):
  """Error on one chunk of values of a block of frames, in fp32."""
  cols = pl.ds(chunk * block_features, block_features)
  values = (ref[:, cols].astype(jnp.float32) for ref in refs)
  return _frame_error(*values, tau[:, None], d[:, None], d_min)


def _fwd_kernel(pred_ref, z_clean_ref, z_noisy_ref, half1_ref, half2_ref, tau_ref, d_ref,
                mask_ref, loss_ref, *, d_min, num_features, block_features):
  tau, d = tau_ref[...], d_ref[...]
  refs = (pred_ref, z_clean_ref, z_noisy_ref, half1_ref, half2_ref)

  def body(chunk, sum_sq):
    error = _chunk_error(refs, tau, d, chunk, d_min=d_min, block_features=block_features)
    return sum_sq + jnp.sum(error * error, axis=1)

  sum_sq = lax.fori_loop(0, pred_ref.shape[1] // block_features, body,
                         jnp.zeros(tau.shape, jnp.float32))
  loss_ref[...] = sum_sq / num_features * ramp_weight(tau) * mask_ref[...]


def _bwd_kernel(pred_ref, z_clean_ref, z_noisy_ref, half1_ref, half2_ref, tau_ref, d_ref,
                mask_ref, dloss_ref, dpred_ref, *, d_min, num_features, block_features):
  tau, d = tau_ref[...], d_ref[...]
  refs = (pred_ref, z_clean_ref, z_noisy_ref, half1_ref, half2_ref)
  # d(mean e^2)/d pred = 2 e / num_features, since de/dpred = 1.
  frame_scale = (2.0 / num_features * ramp_weight(tau) * mask_ref[...] * dloss_ref[...])[:, None]

  def body(chunk, _):
    error = _chunk_error(refs, tau, d, chunk, d_min=d_min, block_features=block_features)
    dpred_ref[:, pl.ds(chunk * block_features, block_features)] = (
        error * frame_scale).astype(dpred_ref.dtype)
    return ()

  lax.fori_loop(0, pred_ref.shape[1] // block_features, body, ())


def _specs(values, blocks):
  value_spec = pl.BlockSpec((None, blocks.block_frames, values.shape[2]), lambda b, i: (b, i, 0))
  frame_spec = pl.BlockSpec((None, blocks.block_frames), lambda b, i: (b, i))
  grid = (values.shape[0], values.shape[1] // blocks.block_frames)
  return grid, value_spec, frame_spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _loss(pred, z_clean, z_noisy, half1, half2, tau, d, mask, d_min, num_features, blocks,
          interpret):
  grid, value_spec, frame_spec = _specs(pred, blocks)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, d_min=d_min, num_features=num_features,
                        block_features=blocks.block_features),
      grid=grid,
      in_specs=[value_spec] * 5 + [frame_spec] * 3,
      out_specs=frame_spec,
      out_shape=jax.ShapeDtypeStruct(tau.shape, jnp.float32),
      interpret=interpret,
      name="shortcut_forcing_loss_fwd",
  )(pred, z_clean, z_noisy, half1, half2, tau, d, mask)


def _loss_fwd(*args):
  return _loss(*args), args[:8]  # the eight arrays; the rest are nondiff_argnums


def _loss_bwd(d_min, num_features, blocks, interpret, residuals, dloss):
  pred = residuals[0]
  grid, value_spec, frame_spec = _specs(pred, blocks)
  dpred = pl.pallas_call(
      functools.partial(_bwd_kernel, d_min=d_min, num_features=num_features,
                        block_features=blocks.block_features),
      grid=grid,
      in_specs=[value_spec] * 5 + [frame_spec] * 4,
      out_specs=value_spec,
      out_shape=jax.ShapeDtypeStruct(pred.shape, pred.dtype),
      interpret=interpret,
      name="shortcut_forcing_loss_bwd",
  )(*residuals, dloss)
  return (dpred,) + (None,) * 7  # the targets, tau, d and the mask are stop-gradient


_loss.defvjp(_loss_fwd, _loss_bwd)


def _check_inputs(values, frame_inputs, d_min, block_sizes):
  shapes = [x.shape for x in values]
  if values[0].ndim != 4 or len(set(shapes)) != 1:
    raise ValueError("pred, z_clean, z_noisy, pred_half1, pred_half2 must all be [B, T, N, C], "
                     f"got {shapes}")
  frame_shapes = [x.shape for x in frame_inputs]
  if any(s != shapes[0][:2] for s in frame_shapes):
    raise ValueError(f"tau, d, frame_mask must be [B, T] = {shapes[0][:2]}, got {frame_shapes}")
  if not d_min > 0:
    raise ValueError(f"d_min must be > 0, got {d_min}")
  if min(dataclasses.astuple(block_sizes)) < 1:
    raise ValueError(f"block sizes must be positive, got {block_sizes}")


def _pad_to(x, axis, multiple):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, pad)


@functools.partial(jax.jit, static_argnames=("d_min", "interpret", "block_sizes"))
def shortcut_forcing_loss(pred, z_clean, z_noisy, pred_half1, pred_half2, tau, d, frame_mask, *,
                          d_min: float, interpret: bool = False,
                          block_sizes: BlockSizes | None = None):
  """Shortcut-forcing loss per frame, [B, T] fp32; gradient only to `pred`.

  Args:
    pred: [B, T, N, C], f(z_tau, tau, d), the clean-latent prediction being trained.
    z_clean: [B, T, N, C], the clean latents z1 (target where d == d_min).
    z_noisy: [B, T, N, C], the network input z_tau.
    pred_half1: [B, T, N, C], f(z_tau, tau, d / 2).
    pred_half2: [B, T, N, C], f(z', tau + d / 2, d / 2) with z' = z_tau + b1 d / 2.
    tau, d, frame_mask: [B, T] signal level (on the grid {0, d, ..., 1 - d}), step size, and
      weight of each frame (0 for padding).
    d_min: the smallest step size, 1 / K_max.
    interpret: run the kernels in the Pallas interpreter (the only way on CPU).
    block_sizes: kernel tiles.
  """
  block_sizes = block_sizes or BlockSizes()
  values = (pred, z_clean, z_noisy, pred_half1, pred_half2)
  _check_inputs(values, (tau, d, frame_mask), d_min, block_sizes)
  batch, num_frames, tokens, channels = pred.shape
  num_features = tokens * channels
  blocks = BlockSizes(min(block_sizes.block_frames, pl.next_power_of_2(num_frames)),
                      min(block_sizes.block_features, pl.next_power_of_2(num_features)))
  # Zero padding is inert: every error term of a zero value with tau = d = 0 is zero.
  values = [_pad_to(_pad_to(x.reshape(batch, num_frames, num_features), 1, blocks.block_frames),
                    2, blocks.block_features) for x in values]
  frame_inputs = [_pad_to(x.astype(jnp.float32), 1, blocks.block_frames)
                  for x in (tau, d, frame_mask)]
  loss = _loss(*values, *frame_inputs, float(d_min), num_features, blocks, interpret)
  return loss[:, :num_frames]


def reference_shortcut_forcing_loss(pred, z_clean, z_noisy, pred_half1, pred_half2, tau, d,
                                    frame_mask, *, d_min: float):
  """Plain-jnp twin of `shortcut_forcing_loss`."""
  sg = lambda x: lax.stop_gradient(jnp.asarray(x, jnp.float32))
  pred = pred.astype(jnp.float32)
  z_clean, z_noisy, half1, half2 = map(sg, (z_clean, z_noisy, pred_half1, pred_half2))
  tau, d, frame_mask = map(sg, (tau, d, frame_mask))
  tau_, d_ = tau[..., None, None], d[..., None, None]
  x_loss = jnp.mean((pred - z_clean) ** 2, axis=(2, 3))
  b1 = (half1 - z_noisy) / (1 - tau_)
  z_mid = z_noisy + b1 * d_ / 2
  b2 = (half2 - z_mid) / (1 - (tau_ + d_ / 2))
  v_loss = jnp.mean(((pred - z_noisy) / (1 - tau_) - (b1 + b2) / 2) ** 2, axis=(2, 3))
  loss = jnp.where(d <= d_min * (1 + _D_MIN_RTOL), x_loss, (1 - tau) ** 2 * v_loss)
  return loss * ramp_weight(tau) * frame_mask
