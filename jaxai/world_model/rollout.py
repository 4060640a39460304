"""Autoregressive generation with the dynamics model, frame by frame.

Each new frame starts from Gaussian noise at tau = 0 and takes K = ``num_steps`` shortcut steps
of size d = 1/K (x-prediction, so an Euler step is z += (f(z, tau, d) - z) / (1 - tau) * d and the
last one lands exactly on the prediction). A model trained without shortcuts (``config.shortcut``
False) is conditioned on d_min whatever the step it takes: it knows no other step size. The
finished frame then joins the context, noised to the signal level ``context_signal`` (the paper's
"slightly noised context", 0.9 = 10% noise) with its own noise draw, at step size d_min (the
context signal level is on the 1/K_max grid only, see ``context_signal_level``).

``rollout`` keeps a KV cache of the time layers (``dynamics.init_cache``): the context is written
once (``prefill``), and each frame (``generate_frame``, one jittable function) costs K passes over
that frame's tokens against the cache, independent of the context length except for the attention
reads. A finished frame is written with the next frame's first pass (two frames' tokens in one
pass, ``commit=1``) rather than by a pass of its own: K passes per frame instead of K + 1.
``rollout_uncached`` is the same computation (same noise) recomputing the whole context at every
pass: the reference the cached path is tested against, and the baseline of the speed comparison.

Actions follow the model's convention: ``actions[:, t]`` led into frame t (context frames
included), so ``actions`` is [B, T_context + T_generate] and sets how many frames are generated.
The cache holds T_context + T_generate frames; rolling out past the trained context length would
need a sliding window (``window_frames``), not done here.
"""
import functools

import jax
import jax.numpy as jnp

from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import noise_levels, shortcut_forcing


# Shared with training's context frames (noise_levels.with_context_frames).
context_signal_level = noise_levels.context_signal_level


def _check_num_steps(num_steps: int, k_max: int):
  if num_steps < 1 or num_steps & (num_steps - 1) or num_steps > k_max:
    raise ValueError(f"num_steps must be a power of two in [1, k_max={k_max}], got {num_steps}")


def _euler_step(z, prediction, tau, step):
  """x-prediction -> velocity (prediction - z) / (1 - tau); one step of size d along it."""
  return z + (prediction - z) / (1.0 - tau) * step


def denoise(predict_frame, z, *, start: int, num_steps: int):
  """Steps ``start`` .. K - 1 of the K = ``num_steps`` Euler steps from ``z`` (at tau = start / K);
  predict_frame(z, tau, d) -> [B, 1, N, C]."""
  step = 1.0 / num_steps
  return jax.lax.fori_loop(start, num_steps,
                           lambda k, z: _euler_step(z, predict_frame(z, k * step, step), k * step, step), z)


def _frame_noise(rng, shape):
  """(the new frame's starting noise, its noise as context): the draws both paths share."""
  noise_rng, context_rng = jax.random.split(rng)
  return (jax.random.normal(noise_rng, shape, jnp.float32),
          jax.random.normal(context_rng, shape, jnp.float32))


def _as_context(frame, context_noise, context_level):
  return shortcut_forcing.corrupt(frame, context_noise, jnp.full(frame.shape[:2], context_level))


def _noised_context_and_frame_keys(rng, context_latents, num_generate, context_level):
  """The noised context frames and one key per generated frame; shared so both paths draw alike."""
  context_rng, frames_rng = jax.random.split(rng)
  noise = jax.random.normal(context_rng, context_latents.shape, jnp.float32)
  context = shortcut_forcing.corrupt(context_latents.astype(jnp.float32), noise,
                                     jnp.full(context_latents.shape[:2], context_level))
  return context, jax.random.split(frames_rng, num_generate)


def _full(b, t, value):
  return jnp.full((b, t), value, jnp.float32)


def prefill(model, params, cache, context, actions, action_mask, *, context_level: float) -> dict:
  """The rollout state after noised context frames [B, T, N, C] (signal level ``context_level``).

  All frames but the last go into the cache now; the last one stays ``pending`` and goes in with
  the first pass of the next frame (``generate_frame``), which saves a pass per generated frame.
  The cache needs room for every frame, the pending one included.
  """
  b, t = context.shape[:2]
  if t > 1:
    _, cache = model.apply({"params": params}, context[:, :-1], _full(b, t - 1, context_level),
                           _full(b, t - 1, model.config.d_min), actions[:, :-1], action_mask[:, :-1],
                           cache=cache)
  return {"cache": cache, "pending": {"latents": context[:, -1:], "action": actions[:, -1],
                                      "action_mask": action_mask[:, -1]}}


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "context_signal"))
def generate_frame(model, params, state, action, action_mask, rng, *, num_steps: int = 4,
                   context_signal: float = 0.9):
  """One new frame: (clean latents [B, N, C], the state after it).

  state: ``prefill``'s (or a previous call's) ``{"cache", "pending"}``. action, action_mask: [B]
  the action that leads into the new frame and whether it is labelled. The first of the K =
  ``num_steps`` denoising passes also runs the pending frame (noised to the context signal level)
  and commits it to the cache; the other passes read the cache without committing; the new frame,
  noised to the context level, becomes the pending one.
  """
  c = model.config
  _check_num_steps(num_steps, c.k_max)
  context_level = context_signal_level(context_signal, c.k_max)
  b = action.shape[0]
  cache, pending = state["cache"], state["pending"]
  noise, context_noise = _frame_noise(rng, (b, 1, c.num_latents, c.latent_channels))
  step = 1.0 / num_steps
  # First pass: [pending frame, new frame at tau = 0] together, committing only the pending one.
  latents = jnp.concatenate([pending["latents"], noise], axis=1)
  taus = jnp.concatenate([_full(b, 1, context_level), _full(b, 1, 0.0)], axis=1)
  steps = jnp.concatenate([_full(b, 1, c.d_min), _full(b, 1, c.model_step_size(step))], axis=1)
  actions = jnp.stack([pending["action"], action], axis=1)
  masks = jnp.stack([pending["action_mask"], action_mask], axis=1)
  prediction, cache = model.apply({"params": params}, latents, taus, steps, actions, masks, cache=cache,
                                  commit=1)
  predict_frame = lambda z, tau, step: model.apply(  # reads the cache; its update is dropped
      {"params": params}, z, _full(b, 1, tau), _full(b, 1, c.model_step_size(step)), action[:, None],
      action_mask[:, None], cache=cache)[0]
  frame = denoise(predict_frame, _euler_step(noise, prediction[:, 1:], 0.0, step), start=1,
                   num_steps=num_steps)
  return frame[:, 0], {"cache": cache, "pending": {
      "latents": _as_context(frame, context_noise, context_level), "action": action,
      "action_mask": action_mask}}


def _frames_to_generate(context_latents, actions, action_mask):
  """(T_generate, action_mask); actions cover the context and the frames to generate."""
  num_generate = actions.shape[1] - context_latents.shape[1]
  if context_latents.shape[1] < 1:
    raise ValueError("a rollout starts from at least one context frame")
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
  state = prefill(model, params, dynamics_lib.init_cache(c, b, num_context + num_generate), context,
                  actions[:, :num_context], action_mask[:, :num_context], context_level=context_level)

  def next_frame(state, inputs):
    action, labelled, key = inputs
    frame, state = generate_frame(model, params, state, action, labelled, key, num_steps=num_steps,
                                  context_signal=context_signal)
    return state, frame

  frame_inputs = (actions[:, num_context:].T, action_mask[:, num_context:].T, frame_keys)
  _, frames = jax.lax.scan(next_frame, state, frame_inputs)
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

  noise, context_noise = _frame_noise(rng, (b, 1, c.num_latents, c.latent_channels))
  frame = denoise(predict_frame, noise, start=0, num_steps=num_steps)
  return frame, _as_context(frame, context_noise, context_level)


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


def rollout_windowed(model, params, context_latents, actions, rng, *, window_frames: int,
                     num_steps: int = 4, context_signal: float = 0.9, action_mask=None):
  """``rollout`` past the trained context length: generated latents [B, T_generate, N, C].

  The cache holds at most ``window_frames`` frames. Whenever a segment has filled it, the next
  segment starts from a fresh cache prefilled with the last ``window_frames // 2`` frames (clean
  latents, re-noised to the context level with a new draw; the first one unlabelled, as the first
  frame of a training window is), exactly as interactive play slides (``realtime``). Each segment
  is one ``rollout`` call with key ``fold_in(rng, segment)``; with a context of ``window_frames //
  2`` frames every segment has the same shapes, so one compilation serves them all.
  """
  b, num_context = context_latents.shape[:2]
  keep = window_frames // 2
  if not 1 <= num_context <= window_frames - 1 or keep < 1:
    raise ValueError(f"{num_context} context frames need window_frames={window_frames} > them (and >= 2)")
  num_generate, action_mask = _frames_to_generate(context_latents, actions, action_mask)
  latents = jnp.asarray(context_latents, jnp.float32)
  actions, action_mask = jnp.asarray(actions), jnp.asarray(action_mask)
  known, segment, generated = num_context, 0, []
  context, context_actions, context_mask = latents, actions[:, :known], action_mask[:, :known]
  while known < num_context + num_generate:
    count = min(window_frames - context.shape[1], num_context + num_generate - known)
    frames = rollout(model, params, context, jnp.concatenate([context_actions, actions[:, known:known + count]], 1),
                     jax.random.fold_in(rng, segment), num_steps=num_steps, context_signal=context_signal,
                     action_mask=jnp.concatenate([context_mask, action_mask[:, known:known + count]], 1))
    generated.append(frames)
    latents = jnp.concatenate([latents, frames], axis=1)
    known += count
    segment += 1
    context = latents[:, -keep:]
    context_actions = actions[:, known - keep:known]
    context_mask = action_mask[:, known - keep:known].at[:, 0].set(False)
  return jnp.concatenate(generated, axis=1)
