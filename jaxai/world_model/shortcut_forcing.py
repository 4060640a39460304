"""Shortcut forcing (Dreamer 4): the training objective of the dynamics model.

Convention: tau = 0 is pure noise, tau = 1 clean data; z_tau = (1 - tau) z0 + tau z1 with
z0 ~ N(0, I). Diffusion forcing: every frame draws its own step size d (a power of two 1/n,
n <= K_max) and signal level tau ~ U{0, d, ..., 1 - d} (``noise_levels``). The network predicts clean
latents (x-prediction). Frames with d = d_min = 1 / K_max regress the clean latents (x-space loss);
the others regress, in v-space, the average of two half steps of size d / 2 taken by the network
itself under stop-gradient (bootstrap), times (1 - tau)^2 to bring it back to x-space scale; every
frame is weighted by the ramp 0.9 tau + 0.1. The formula lives once, in
``kernels_pallas/shortcut_forcing.py``: its fused Pallas kernel or its plain-jnp reference, by the
model's ``loss_impl`` (default XLA: on an H100 XLA's own fusion of the reference was faster than
the kernel, and on CPU the kernel could only be interpreted).

The two half steps need two extra forward passes, over the whole sequence at once:
  pass 1: f(z_tau, tau, d / 2) for every frame;
  pass 2: f(z', tau + d / 2, d / 2) with z' = z_tau + b1 d / 2, b1 = (pass 1 - z_tau) / (1 - tau).
In pass 2 every bootstrapped frame has moved half a step, so a frame's context frames are their
half-stepped versions too (slightly cleaner than in the main pass) rather than exactly the main
pass's context: the price of one pass instead of one per frame, and still a context the model
trains on (each context frame is a sample at its own grid signal level). Frames with d = d_min
keep (z_tau, tau, d) in both passes: their half steps are not used and d_min / 2 is off the grid.

Teacher. The half steps use the parameters being trained, as Dreamer 4 does not say otherwise, or
an exponential moving average of them (``dynamics.teacher_ema``, the trunk's ``ema_decay``), as
the shortcut-models paper (Frans et al., 2024) does: a slower-moving bootstrap target.
"""
import jax
import jax.numpy as jnp

from jaxai.nn import dispatch
from jaxai.world_model import noise_levels
from kernels_pallas import shortcut_forcing as kernel


def is_x_space(step: jax.Array, k_max: int) -> jax.Array:
  """Frames trained with the x-space loss: d == d_min (with the kernel's tolerance for 1/K rounding)."""
  return step <= (1.0 + 1e-6) / k_max


def corrupt(z_clean: jax.Array, noise: jax.Array, tau: jax.Array) -> jax.Array:
  """z_tau = (1 - tau) noise + tau z_clean; tau has the leading (frame) axes of z_clean."""
  tau = tau.reshape(tau.shape + (1,) * (z_clean.ndim - tau.ndim))
  return (1.0 - tau) * noise + tau * z_clean


def sample_single_image(rng: jax.Array, batch: int, fraction: float) -> jax.Array:
  """[batch] bool: which sequences are trained as independent single images (no time context)."""
  return jax.random.uniform(rng, (batch,)) < fraction


def shortcut_forcing_loss(predict, z_clean, noise, tau, step, frame_mask, *, k_max: int,
                          impl: str = "xla", shortcut: bool = True, teacher=None):
  """Per-frame shortcut-forcing loss [B, T] and the prediction f(z_tau, tau, d) [B, T, N, C].

  Args:
    predict: (z_noisy, tau, step) -> predicted clean latents [B, T, N, C] (the model with its
      parameters and actions bound); the gradient flows only through its call on (z_tau, tau, d).
    z_clean, noise: [B, T, N, C] latents z1 and Gaussian noise z0.
    tau, step: [B, T] per-frame signal level and step size (``noise_levels.training_frames``).
    frame_mask: [B, T] weight of each frame (0 for padding).
    k_max: d_min = 1 / k_max selects the x-space loss.
    impl: "pallas" uses the fused kernel (interpreted on CPU), "xla" its jnp reference, "auto" the
      kernel where it is written for the platform (``dispatch``).
    shortcut: False when every frame has d = d_min (plain diffusion forcing): the two bootstrap
      passes are skipped, the loss is the same.
    teacher: the predictor of the two half steps (e.g. ``predict`` with EMA parameters); default
      ``predict`` itself.
  """
  d_min = 1.0 / k_max
  z_clean = z_clean.astype(jnp.float32)
  z_noisy = corrupt(z_clean, noise.astype(jnp.float32), tau)
  pred = predict(z_noisy, tau, step).astype(jnp.float32)
  if shortcut:
    bootstrap = ~is_x_space(step, k_max)
    half = jnp.where(bootstrap, step / 2, step)
    teacher = predict if teacher is None else teacher
    sg_predict = lambda *args: jax.lax.stop_gradient(teacher(*args).astype(jnp.float32))
    pred_half1 = sg_predict(z_noisy, tau, half)
    # Only the network input z' is formed here; the kernel recomputes b1 and b2 from pred_half1/2.
    b1 = (pred_half1 - z_noisy) / (1.0 - tau)[..., None, None]
    z_mid = jnp.where(bootstrap[..., None, None], z_noisy + b1 * half[..., None, None], z_noisy)
    pred_half2 = sg_predict(z_mid, jnp.where(bootstrap, tau + half, tau), half)
  else:  # every frame is at d_min, so the loss reads neither half step: skip both passes
    pred_half1 = pred_half2 = jax.lax.stop_gradient(pred)
  args = (pred, z_clean, z_noisy, pred_half1, pred_half2, tau, step, frame_mask.astype(jnp.float32))
  if dispatch.resolve(impl, kernel.PLATFORMS) == "pallas":
    loss = kernel.shortcut_forcing_loss(*args, d_min=d_min, interpret=dispatch.interpret())
  else:
    loss = kernel.reference_shortcut_forcing_loss(*args, d_min=d_min)
  return loss, pred


def dynamics_loss(model, params, batch, rng, *, single_image_fraction: float = 0.0, teacher_params=None):
  """(scalar loss, metrics) of a ``dynamics.Dynamics`` model on a batch of tokenizer latents.

  batch: ``latents`` [B, T, N, C] (frozen tokenizer output), ``actions`` [B, T] int (the action
  that led into each frame, see ``dynamics.actions_into_frames``), optional ``action_mask`` [B, T]
  bool (False: unlabelled) and ``frame_mask`` [B, T] (0: padding). ``single_image_fraction`` of
  the sequences (drawn from ``rng``) are trained without time context. ``teacher_params``: the
  parameters of the bootstrap's half steps (default ``params``). K_max, the step distribution,
  the redraws, shortcut or plain diffusion forcing (``shortcut``) and the loss implementation
  (``loss_impl``) come from ``model.config``.
  """
  c = model.config
  z_clean = batch["latents"].astype(jnp.float32)
  b, t = z_clean.shape[:2]
  action_mask = batch.get("action_mask", jnp.ones((b, t), bool))
  frame_mask = batch.get("frame_mask", jnp.ones((b, t), jnp.float32)).astype(jnp.float32)
  tau_rng, noise_rng, image_rng = jax.random.split(rng, 3)
  tau, step, is_next = noise_levels.training_frames(
      tau_rng, (b, t), k_max=c.k_max, distribution=c.step_distribution if c.shortcut else "d_min",
      context_fraction=c.context_fraction, next_frame_fraction=c.next_frame_fraction,
      context_signal=c.context_signal)
  noise = jax.random.normal(noise_rng, z_clean.shape, jnp.float32)
  single_image = (sample_single_image(image_rng, b, single_image_fraction)
                  if single_image_fraction > 0 else None)
  loss_weight = frame_mask
  if is_next is not None:
    if single_image is not None:  # no context to predict from: keep the ramp's weight
      is_next = is_next & ~single_image[:, None]
    # Weight 1 instead of the ramp's 0.1 at tau = 0 (the kernel's loss is ramp x loss_weight).
    loss_weight = frame_mask * jnp.where(is_next, 1.0 / kernel.ramp_weight(0.0), 1.0)

  def predictor(params):
    return lambda z_noisy, tau, step: model.apply({"params": params}, z_noisy, tau, step, batch["actions"],
                                                  action_mask, single_image)

  frame_loss, pred = shortcut_forcing_loss(
      predictor(params), z_clean, noise, tau, step, loss_weight, k_max=c.k_max, impl=c.loss_impl,
      shortcut=c.shortcut, teacher=None if teacher_params is None else predictor(teacher_params))
  masked_mean = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  x_space = is_x_space(step, c.k_max) * frame_mask
  loss = jnp.sum(frame_loss) / jnp.maximum(jnp.sum(frame_mask), 1.0)
  clean_mse = jnp.mean(jnp.square(jax.lax.stop_gradient(pred) - z_clean), axis=(2, 3))
  metrics = {
      "x_space_loss": masked_mean(frame_loss, x_space),
      "bootstrap_loss": masked_mean(frame_loss, frame_mask - x_space),
      "clean_mse": masked_mean(clean_mse, frame_mask),  # distance to the data at every tau and d
      **noise_levels.step_share_metrics(step, frame_mask, c.k_max),
  }
  if is_next is not None:  # the one-step prediction from context and action alone
    metrics["next_frame_mse"] = masked_mean(clean_mse, is_next * frame_mask)
  return loss, metrics
