"""Autoregressive generation with the dynamics model, frame by frame.

Each new frame starts from Gaussian noise at tau = 0 and takes K = ``num_steps`` shortcut steps
of size d = 1/K (x-prediction, so an Euler step is z += (f(z, tau, d) - z) / (1 - tau) * d and the
last one lands exactly on the prediction). A model trained without shortcuts (``config.shortcut``
False) is conditioned on d_min whatever the step it takes: it knows no other step size. The finished frame then joins the context, noised to
the signal level ``context_signal`` (the paper's "slightly noised context", 0.9 = 10% noise) with
its own noise draw, at step size d_min (the context signal level is on the 1/K_max grid only,
see ``context_signal_level``).

``rollout`` keeps a KV cache of the time layers (``dynamics.init_cache``): the context is written
once (``prefill``), and each frame (``generate_frame``, one jittable function) costs K passes over
that frame's tokens against the cache plus one pass that writes the frame's keys and values,
independent of the context length except for the attention reads. ``rollout_uncached`` is the
same computation (same noise) recomputing the whole context at every pass: the reference the
cached path is tested against, and the baseline of the speed comparison.

Actions follow the model's convention: ``actions[:, t]`` led into frame t (context frames
included), so ``actions`` is [B, T_context + T_generate] and sets how many frames are generated.
The cache holds T_context + T_generate frames; rolling out past the trained context length would
need a sliding window (``window_frames``), not done here.
"""
import functools

import jax
import jax.numpy as jnp

from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import shortcut_forcing


# Shared with training's context frames (shortcut_forcing.with_context_frames).
context_signal_level = shortcut_forcing.context_signal_level


def _check_num_steps(num_steps: int, k_max: int):
  if num_steps < 1 or num_steps & (num_steps - 1) or num_steps > k_max:
    raise ValueError(f"num_steps must be a power of two in [1, k_max={k_max}], got {num_steps}")


def _denoise_and_renoise(predict_frame, rng, shape, *, num_steps: int, context_level: float):
  """(clean frame, the frame as context) for one new frame; predict_frame(z, tau, d) -> [B, 1, N, C]."""
  noise_rng, context_rng = jax.random.split(rng)
  step = 1.0 / num_steps

  def euler_step(k, z):
    tau = k * step
    return z + (predict_frame(z, tau, step) - z) / (1.0 - tau) * step

  frame = jax.lax.fori_loop(0, num_steps, euler_step, jax.random.normal(noise_rng, shape, jnp.float32))
  as_context = shortcut_forcing.corrupt(frame, jax.random.normal(context_rng, shape, jnp.float32),
                                        jnp.full(shape[:2], context_level))
  return frame, as_context


def _noised_context_and_frame_keys(rng, context_latents, num_generate, context_level):
  """The noised context frames and one key per generated frame; shared so both paths draw alike."""
  context_rng, frames_rng = jax.random.split(rng)
  noise = jax.random.normal(context_rng, context_latents.shape, jnp.float32)
  context = shortcut_forcing.corrupt(context_latents.astype(jnp.float32), noise,
                                     jnp.full(context_latents.shape[:2], context_level))
  return context, jax.random.split(frames_rng, num_generate)


def _full(b, t, value):
  return jnp.full((b, t), value, jnp.float32)


def prefill(model, params, cache, context, actions, action_mask, *, context_level: float):
  """Writes noised context frames [B, T, N, C] (signal level ``context_level``) into the cache."""
  b, t = context.shape[:2]
  _, cache = model.apply({"params": params}, context, _full(b, t, context_level),
                         _full(b, t, model.config.d_min), actions, action_mask, cache=cache)
  return cache


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "context_signal"))
def generate_frame(model, params, cache, action, action_mask, rng, *, num_steps: int = 4,
                   context_signal: float = 0.9):
  """One new frame against the cache: (clean latents [B, N, C], cache with the frame appended).

  action, action_mask: [B] the action that leads into the new frame and whether it is labelled.
  K = ``num_steps`` denoising passes read the cache without committing; one more pass writes the
  frame, noised to the context signal level, at the cache index.
  """
  c = model.config
  _check_num_steps(num_steps, c.k_max)
  context_level = context_signal_level(context_signal, c.k_max)
  b = action.shape[0]
  apply = lambda z, tau, step: model.apply(
      {"params": params}, z, _full(b, 1, tau), _full(b, 1, c.model_step_size(step)), action[:, None],
      action_mask[:, None], cache=cache)
  predict_frame = lambda z, tau, step: apply(z, tau, step)[0]  # the updated cache is dropped
  frame, as_context = _denoise_and_renoise(predict_frame, rng, (b, 1, c.num_latents, c.latent_channels),
                                           num_steps=num_steps, context_level=context_level)
  _, cache = apply(as_context, context_level, c.d_min)
  return frame[:, 0], cache


def _frames_to_generate(context_latents, actions, action_mask):
  """(T_generate, action_mask); actions cover the context and the frames to generate."""
  num_generate = actions.shape[1] - context_latents.shape[1]
  if num_generate < 1:
    raise ValueError(f"actions ({actions.shape[1]} frames) must extend past the context "
                     f"({context_latents.shape[1]} frames): one action per generated frame")
  return num_generate, jnp.ones(actions.shape, bool) if action_mask is None else action_mask


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "context_signal"))
def rollout(model, params, context_latents, actions, rng, *, num_steps: int = 4,
            context_signal: float = 0.9, action_mask=None):
  """Generated latents [B, T_generate, N, C] after ``context_latents`` [B, T_context, N, C].

  actions (and optional action_mask, default all labelled): [B, T_context + T_generate], the
  action that led into each frame. KV-cached: one ``generate_frame`` per new frame (a scan).
  """
  c = model.config
  b, num_context = context_latents.shape[:2]
  num_generate, action_mask = _frames_to_generate(context_latents, actions, action_mask)
  context_level = context_signal_level(context_signal, c.k_max)
  context, frame_keys = _noised_context_and_frame_keys(rng, context_latents, num_generate, context_level)
  cache = dynamics_lib.init_cache(c, b, num_context + num_generate)
  if num_context:
    cache = prefill(model, params, cache, context, actions[:, :num_context],
                    action_mask[:, :num_context], context_level=context_level)

  def next_frame(cache, inputs):
    action, labelled, key = inputs
    frame, cache = generate_frame(model, params, cache, action, labelled, key, num_steps=num_steps,
                                  context_signal=context_signal)
    return cache, frame

  frame_inputs = (actions[:, num_context:].T, action_mask[:, num_context:].T, frame_keys)
  _, frames = jax.lax.scan(next_frame, cache, frame_inputs)
  return frames.swapaxes(0, 1)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "context_level"))
def _uncached_frame(model, params, context, actions, action_mask, rng, *, num_steps, context_level):
  """(frame [B, 1, N, C], frame as context) recomputing all of ``context`` at every pass."""
  c = model.config
  b, num_context = context.shape[:2]

  def predict_frame(z, tau, step):
    latents = jnp.concatenate([context, z], axis=1)
    taus = jnp.concatenate([_full(b, num_context, context_level), _full(b, 1, tau)], axis=1)
    steps = jnp.concatenate([_full(b, num_context, c.d_min), _full(b, 1, c.model_step_size(step))], axis=1)
    return model.apply({"params": params}, latents, taus, steps, actions, action_mask)[:, -1:]

  return _denoise_and_renoise(predict_frame, rng, (b, 1, c.num_latents, c.latent_channels),
                              num_steps=num_steps, context_level=context_level)


def rollout_uncached(model, params, context_latents, actions, rng, *, num_steps: int = 4,
                     context_signal: float = 0.9, action_mask=None):
  """``rollout`` without a cache: every pass reruns the model over the whole context (same noise).

  A Python loop over frames; the per-frame function is jitted once per context length.
  """
  c = model.config
  _check_num_steps(num_steps, c.k_max)
  num_context = context_latents.shape[1]
  num_generate, action_mask = _frames_to_generate(context_latents, actions, action_mask)
  context_level = context_signal_level(context_signal, c.k_max)
  context, frame_keys = _noised_context_and_frame_keys(rng, context_latents, num_generate, context_level)
  frames = []
  for i in range(num_generate):
    t = num_context + i + 1  # frames seen, the new one included
    frame, as_context = _uncached_frame(model, params, context, actions[:, :t], action_mask[:, :t],
                                        frame_keys[i], num_steps=num_steps, context_level=context_level)
    frames.append(frame)
    context = jnp.concatenate([context, as_context], axis=1)
  return jnp.concatenate(frames, axis=1)
