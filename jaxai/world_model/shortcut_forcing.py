"""Shortcut forcing (Dreamer 4): the training objective of the dynamics model.

Convention: tau = 0 is pure noise, tau = 1 clean data; z_tau = (1 - tau) z0 + tau z1 with
z0 ~ N(0, I). Diffusion forcing: every frame draws its own step size d = 1 / U{1, 2, 4, ..., K_max}
and signal level tau ~ U{0, d, ..., 1 - d} (``sample_tau_and_step``). The network predicts clean
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
"""
import jax
import jax.numpy as jnp

from jaxai.nn import dispatch
from kernels_pallas import shortcut_forcing as kernel


def sample_tau_and_step(rng: jax.Array, shape: tuple[int, ...], k_max: int,
                        bootstrap_fraction: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Per frame (tau, d), fp32: d = 1 / 2^U{0..log2 K_max}, tau = U{0, ..., 1/d - 1} * d.

  ``bootstrap_fraction`` None is the paper's d, uniform over all 1 + log2 K_max sizes (so 6/7 of
  the frames bootstrap at K_max = 64). A number f instead gives d_min to a fraction 1 - f of the
  frames and a uniform d > d_min to the rest, as the shortcut-models paper (Frans et al., 2024)
  does with f = 1/4: more frames then learn from the data rather than from the model itself.
  """
  step_rng, tau_rng, split_rng = jax.random.split(rng, 3)
  levels = k_max.bit_length()  # d in {1, 1/2, ..., 1/K_max}
  if bootstrap_fraction is None:
    num_steps = 2 ** jax.random.randint(step_rng, shape, 0, levels)
  else:
    bootstrap = jax.random.uniform(split_rng, shape) < bootstrap_fraction
    num_steps = jnp.where(bootstrap, 2 ** jax.random.randint(step_rng, shape, 0, levels - 1), k_max)
  tau = jax.random.randint(tau_rng, shape, 0, num_steps) / num_steps
  return tau.astype(jnp.float32), (1.0 / num_steps).astype(jnp.float32)


def context_signal_level(context_signal: float, k_max: int) -> float:
  """The trained signal level nearest ``context_signal``: tau is embedded on {0, ..., 1 - 1/K_max}."""
  if not 0.0 <= context_signal <= 1.0:
    raise ValueError(f"context_signal must be in [0, 1], got {context_signal}")
  return min(round(context_signal * k_max), k_max - 1) / k_max


def _context_levels(rng, shape, context_signal: float, k_max: int) -> jax.Array:
  """Signal levels uniform on the grid from where rollouts put their context up to 1 - 1/K_max."""
  lowest = round(context_signal_level(context_signal, k_max) * k_max)
  return jax.random.randint(rng, shape, lowest, k_max) / k_max


def with_context_frames(rng: jax.Array, tau: jax.Array, step: jax.Array, *, fraction: float,
                        context_signal: float, k_max: int) -> tuple[jax.Array, jax.Array]:
  """Redraws a ``fraction`` of the frames as rollout-like context: d = d_min and tau uniform on the
  grid from the level rollouts give their context (``context_signal_level``) up to 1 - 1/K_max.

  Not in the paper. With tau independent and uniform per frame, a frame's predecessor is as clean
  as a rollout's context (signal >= 0.9) for only 10% of the frames, so the next-frame prediction
  that rollouts ask for (clean context, noisy new frame) gets little training signal; see the
  docs/world_model.md for what it changes.
  """
  context_rng, tau_rng = jax.random.split(rng)
  is_context = jax.random.uniform(context_rng, tau.shape) < fraction
  context_tau = _context_levels(tau_rng, tau.shape, context_signal, k_max)
  return (jnp.where(is_context, context_tau, tau).astype(jnp.float32),
          jnp.where(is_context, 1.0 / k_max, step).astype(jnp.float32))


def with_next_frames(rng: jax.Array, tau: jax.Array, step: jax.Array, *, fraction: float,
                     context_signal: float, k_max: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Redraws frames [B, T] as a rollout's first step: tau = 0 (pure noise) and d = d_min, their
  predecessor as rollout context (``with_context_frames``' levels). Each frame after the first is
  drawn with probability ``fraction`` and kept unless its predecessor was drawn too (it would have
  to be context and pure noise at once): fraction x (1 - fraction) of them. Returns (tau, step,
  is_next_frame).

  Not in the paper. At tau >~ 0.1 the noisy frame itself already shows where the view moved, so
  only frames near tau = 0 need the action, and the ramp weight gives them 0.1: the action gets
  little of the gradient.
  """
  next_rng, tau_rng = jax.random.split(rng)
  drawn = jax.random.uniform(next_rng, tau.shape) < fraction
  drawn = drawn.at[:, 0].set(False)
  is_next = drawn & ~jnp.pad(drawn[:, :-1], ((0, 0), (1, 0)))
  is_context = jnp.pad(is_next[:, 1:], ((0, 0), (0, 1)))
  context_tau = _context_levels(tau_rng, tau.shape, context_signal, k_max)
  tau = jnp.where(is_next, 0.0, jnp.where(is_context, context_tau, tau))
  step = jnp.where(is_next | is_context, 1.0 / k_max, step)
  return tau.astype(jnp.float32), step.astype(jnp.float32), is_next


def sample_tau_at_d_min(rng: jax.Array, shape: tuple[int, ...], k_max: int) -> tuple[jax.Array, jax.Array]:
  """Plain diffusion forcing (the ablation without shortcuts): tau = U{0, ..., K_max - 1} / K_max, d = d_min."""
  tau = jax.random.randint(rng, shape, 0, k_max) / k_max
  return tau.astype(jnp.float32), jnp.full(shape, 1.0 / k_max, jnp.float32)


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
                          impl: str = "xla", shortcut: bool = True):
  """Per-frame shortcut-forcing loss [B, T] and the prediction f(z_tau, tau, d) [B, T, N, C].

  Args:
    predict: (z_noisy, tau, step) -> predicted clean latents [B, T, N, C] (the model with its
      parameters and actions bound); the gradient flows only through its call on (z_tau, tau, d).
    z_clean, noise: [B, T, N, C] latents z1 and Gaussian noise z0.
    tau, step: [B, T] per-frame signal level and step size (``sample_tau_and_step``).
    frame_mask: [B, T] weight of each frame (0 for padding).
    k_max: d_min = 1 / k_max selects the x-space loss.
    impl: "pallas" uses the fused kernel (interpreted on CPU), "xla" its jnp reference, "auto" the
      kernel where it is written for the platform (``dispatch``).
    shortcut: False when every frame has d = d_min (plain diffusion forcing): the two bootstrap
      passes are skipped, the loss is the same.
  """
  d_min = 1.0 / k_max
  z_clean = z_clean.astype(jnp.float32)
  z_noisy = corrupt(z_clean, noise.astype(jnp.float32), tau)
  pred = predict(z_noisy, tau, step).astype(jnp.float32)
  if shortcut:
    bootstrap = ~is_x_space(step, k_max)
    half = jnp.where(bootstrap, step / 2, step)
    sg_predict = lambda *args: jax.lax.stop_gradient(predict(*args).astype(jnp.float32))
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


def dynamics_loss(model, params, batch, rng, *, single_image_fraction: float = 0.0):
  """(scalar loss, metrics) of a ``dynamics.Dynamics`` model on a batch of tokenizer latents.

  batch: ``latents`` [B, T, N, C] (frozen tokenizer output), ``actions`` [B, T] int (the action
  that led into each frame, see ``dynamics.actions_into_frames``), optional ``action_mask`` [B, T]
  bool (False: unlabelled) and ``frame_mask`` [B, T] (0: padding). ``single_image_fraction`` of
  the sequences (drawn from ``rng``) are trained without time context. K_max, shortcut or plain
  diffusion forcing (``shortcut``) and the loss implementation (``loss_impl``) come from
  ``model.config``.
  """
  c = model.config
  z_clean = batch["latents"].astype(jnp.float32)
  b, t = z_clean.shape[:2]
  action_mask = batch.get("action_mask", jnp.ones((b, t), bool))
  frame_mask = batch.get("frame_mask", jnp.ones((b, t), jnp.float32)).astype(jnp.float32)
  tau_rng, noise_rng, image_rng, context_rng, next_rng = jax.random.split(rng, 5)
  if c.shortcut:
    tau, step = sample_tau_and_step(tau_rng, (b, t), c.k_max, c.bootstrap_fraction)
  else:
    tau, step = sample_tau_at_d_min(tau_rng, (b, t), c.k_max)
  if c.context_fraction > 0:
    tau, step = with_context_frames(context_rng, tau, step, fraction=c.context_fraction,
                                    context_signal=c.context_signal, k_max=c.k_max)
  noise = jax.random.normal(noise_rng, z_clean.shape, jnp.float32)
  single_image = (sample_single_image(image_rng, b, single_image_fraction)
                  if single_image_fraction > 0 else None)
  loss_weight, is_next = frame_mask, None
  if c.next_frame_fraction > 0:
    tau, step, is_next = with_next_frames(next_rng, tau, step, fraction=c.next_frame_fraction,
                                          context_signal=c.context_signal, k_max=c.k_max)
    if single_image is not None:  # no context to predict from: keep the ramp's weight
      is_next = is_next & ~single_image[:, None]
    # Weight 1 instead of the ramp's 0.1 at tau = 0 (the kernel's loss is ramp x loss_weight).
    loss_weight = frame_mask * jnp.where(is_next, 1.0 / kernel.ramp_weight(0.0), 1.0)

  def predict(z_noisy, tau, step):
    return model.apply({"params": params}, z_noisy, tau, step, batch["actions"], action_mask, single_image)

  frame_loss, pred = shortcut_forcing_loss(predict, z_clean, noise, tau, step, loss_weight,
                                           k_max=c.k_max, impl=c.loss_impl, shortcut=c.shortcut)
  masked_mean = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  x_space = is_x_space(step, c.k_max) * frame_mask
  loss = jnp.sum(frame_loss) / jnp.maximum(jnp.sum(frame_mask), 1.0)
  clean_mse = jnp.mean(jnp.square(jax.lax.stop_gradient(pred) - z_clean), axis=(2, 3))
  metrics = {
      "x_space_loss": masked_mean(frame_loss, x_space),
      "bootstrap_loss": masked_mean(frame_loss, frame_mask - x_space),
      "clean_mse": masked_mean(clean_mse, frame_mask),  # distance to the data at every tau and d
  }
  if is_next is not None:  # the one-step prediction from context and action alone
    metrics["next_frame_mse"] = masked_mean(clean_mse, is_next * frame_mask)
  return loss, metrics
