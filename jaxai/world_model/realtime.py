"""Real-time interactive rollouts: a person's actions in, imagined Craftax frames out, for ever.

``ImaginedWorld.start`` encodes real context frames with the tokenizer (each frame on its own, as
the tokenizer and the latent cache were trained) and writes them, noised to the context signal
level as ``rollout.rollout`` does, into a KV cache of the dynamics model (``rollout.prefill``: the
last one stays pending). Each ``step(action)`` is then one jitted call, the rollout state donated:
K denoising passes against the cache, the first of which also writes the pending frame
(``rollout.generate_frame``), and the tokenizer's decode to uint8 pixels.

Sliding window. The cache holds ``max_context_frames`` frames (by default the trained
``dynamics.window_len``: RoPE positions past it were never trained). When it is full, a fresh
cache is prefilled with the last ``max_context_frames // 2`` frames (re-noised with a new draw,
positions restarting at 0, the first one unlabelled as the first frame of a training window is),
so the world can be played for any number of steps.

Randomness follows ``rollout.rollout``: with the same seed, actions and no slide, a world
generates exactly the frames ``rollout.rollout(..., jax.random.key(seed))`` does (frame i uses
key i of ``jax.random.split``, which is prefix-stable under jax's partitionable threefry).
"""
import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import models, rollout
from jaxai.world_model import shortcut_forcing


def to_uint8(frames: jax.Array) -> jax.Array:
  """Decoded frames (nominally in [0, 1]) -> uint8 pixels."""
  return jnp.round(jnp.clip(frames, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("tokenizer",))
def encode_frames(tokenizer, params, frames):
  """uint8 frames [T, H, W, C] -> latents [T, L, C], each frame encoded on its own."""
  return tokenizer.apply({"params": params}, frames[:, None], method=tokenizer.encode)[:, 0]


@functools.partial(jax.jit, static_argnames=("tokenizer",))
def decode_frames(tokenizer, params, latents):
  """latents [T, L, C] -> uint8 frames [T, H, W, C], each frame decoded on its own."""
  return to_uint8(tokenizer.apply({"params": params}, latents[:, None], method=tokenizer.decode)[:, 0])


@functools.partial(jax.jit, static_argnames=("dynamics", "max_frames", "context_level"))
def _prefilled_state(dynamics, params, latents, actions, labelled, noise_key, *, max_frames: int,
                     context_level: float):
  """The rollout state (a cache of ``max_frames`` frames) after latents [1, T, N, C] noised to
  ``context_level``."""
  noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
  context = shortcut_forcing.corrupt(latents.astype(jnp.float32), noise,
                                     jnp.full(latents.shape[:2], context_level))
  cache = dynamics_lib.init_cache(dynamics.config, 1, max_frames)
  return rollout.prefill(dynamics, params, cache, context, actions, labelled, context_level=context_level)


@functools.partial(jax.jit, static_argnames=("tokenizer", "dynamics", "num_steps", "context_signal"),
                   donate_argnames=("state",))
def _imagine_frame(tokenizer, dynamics, tokenizer_params, dynamics_params, state, action, key_data, *,
                   num_steps: int, context_signal: float):
  """All the work of one frame: (latents [N, C], uint8 pixels [H, W, C], the state after it)."""
  latents, state = rollout.generate_frame(
      dynamics, dynamics_params, state, action[None], jnp.ones((1,), bool),
      jax.random.wrap_key_data(key_data), num_steps=num_steps, context_signal=context_signal)
  pixels = tokenizer.apply({"params": tokenizer_params}, latents[:, None], method=tokenizer.decode)
  return latents[0], to_uint8(pixels[0, 0]), state


class ImaginedWorld:
  """A dynamics model played one action at a time: ``start(frames, actions, seed)``, then ``step``.

  ``state`` is the rollout state (``rollout.prefill``: the dynamics KV cache and the pending
  frame) and ``cached_frames`` how many frames it holds, the pending one included (at most
  ``max_context_frames``).
  """

  def __init__(self, tokenizer, tokenizer_params, dynamics, dynamics_params, *, num_steps: int,
               context_signal: float, max_context_frames: int):
    if max_context_frames < 2:
      raise ValueError(f"max_context_frames must be >= 2 (the window slides by half), got "
                       f"{max_context_frames}")
    self.tokenizer, self.tokenizer_params = tokenizer, tokenizer_params
    self.dynamics, self.dynamics_params = dynamics, dynamics_params
    self.num_steps, self.context_signal = num_steps, context_signal
    self.max_context_frames = max_context_frames
    self.context_level = rollout.context_signal_level(context_signal, dynamics.config.k_max)
    self.state = None
    self.cached_frames = 0
    # The frames a slide keeps, the last max_context_frames // 2: (clean latents [N, C], action
    # into the frame, labelled).
    self._history = collections.deque(maxlen=max_context_frames // 2)

  def start(self, context_frames, context_actions, seed: int = 0) -> None:
    """Starts from real frames: uint8 [T, H, W, C] and int [T] actions in the dataset convention
    (``context_actions[t]`` taken after frame t; the last one is not used: ``step`` gives it)."""
    context_frames = np.asarray(context_frames)
    t = len(context_frames)
    if not 1 <= t <= self.max_context_frames:
      raise ValueError(f"{t} context frames: need 1 to max_context_frames={self.max_context_frames}")
    if len(context_actions) != t:
      raise ValueError(f"{len(context_actions)} context actions for {t} frames")
    latents = encode_frames(self.tokenizer, self.tokenizer_params, jnp.asarray(context_frames))
    actions, labelled = dynamics_lib.actions_into_frames(jnp.asarray(context_actions, jnp.int32)[None],
                                                         jnp.zeros((1, t), bool))
    # The same draws as rollout.rollout: context noise from the first half, frame keys from the second.
    self._context_rng, frames_rng = jax.random.split(jax.random.key(seed))
    self._frames_rng, self._frame_keys = frames_rng, np.zeros((0, 2), np.uint32)
    self._num_generated = self._num_slides = 0
    self._history.clear()
    for frame_latents, action, is_labelled in zip(latents, np.asarray(actions[0]), np.asarray(labelled[0])):
      self._history.append((frame_latents, int(action), bool(is_labelled)))
    self._prefill(latents[None], actions, labelled, self._context_rng)

  def step(self, action: int) -> np.ndarray:
    """The next imagined frame, uint8 [H, W, C], after the player takes ``action``."""
    if self.state is None:
      raise RuntimeError("call start() before step()")
    if self.cached_frames == self.max_context_frames:
      self._slide()
    latents, frame, self.state = _imagine_frame(
        self.tokenizer, self.dynamics, self.tokenizer_params, self.dynamics_params, self.state,
        np.int32(action), self._frame_key(self._num_generated), num_steps=self.num_steps,
        context_signal=self.context_signal)
    self._num_generated += 1
    self.cached_frames += 1
    self._history.append((latents, int(action), True))
    return np.asarray(frame)

  def _prefill(self, latents, actions, labelled, noise_key):
    self.state = _prefilled_state(self.dynamics, self.dynamics_params, latents, actions, labelled,
                                  noise_key, max_frames=self.max_context_frames,
                                  context_level=self.context_level)
    self.cached_frames = latents.shape[1]

  def _slide(self):
    """A fresh cache from the last half of the frames; the first one kept loses its action label."""
    kept = list(self._history)
    latents = jnp.stack([z for z, _, _ in kept])[None]
    actions = jnp.asarray([[a for _, a, _ in kept]], jnp.int32)
    labelled = jnp.asarray([[False] + [l for _, _, l in kept[1:]]])
    self._num_slides += 1
    self._prefill(latents, actions, labelled, jax.random.fold_in(self._context_rng, self._num_slides))

  def _frame_key(self, index: int) -> np.ndarray:
    """Raw key ``index`` of ``jax.random.split(frames_rng, n)`` (any n > index), as rollout draws it."""
    if index >= len(self._frame_keys):  # doubling: amortised O(1) per frame
      count = max(2 * len(self._frame_keys), index + 1, 64)
      self._frame_keys = np.asarray(jax.random.key_data(jax.random.split(self._frames_rng, count)))
    return self._frame_keys[index]


def from_config(config: ml_collections.ConfigDict, tokenizer, tokenizer_params, dynamics, dynamics_params,
                **overrides) -> ImaginedWorld:
  """A world with K, the context signal and the window of ``config`` (``overrides`` replace them)."""
  options = dict(num_steps=config.rollout.num_steps, context_signal=config.rollout.context_signal,
                 max_context_frames=config.dynamics.window_len)
  options.update(overrides)
  return ImaginedWorld(tokenizer, tokenizer_params, dynamics, dynamics_params, **options)


def random_world_model(config: ml_collections.ConfigDict, seed: int = 0):
  """(tokenizer, params, dynamics, params) of ``config`` at random init, computing in
  ``rollout.compute_dtype``: for timings and tests."""
  config = models.rollout_config(config)
  tokenizer, dynamics = models.make_tokenizer(config), models.make_dynamics(config)
  c = dynamics.config
  tokenizer_rng, dynamics_rng = jax.random.split(jax.random.key(seed))
  tokenizer_params = jax.jit(tokenizer.init)(tokenizer_rng, jnp.zeros((1, 1, *models.FRAME_SHAPE), jnp.uint8))
  zeros = jnp.zeros((1, 1))
  dynamics_params = jax.jit(dynamics.init)(
      dynamics_rng, jnp.zeros((1, 1, c.num_latents, c.latent_channels)), zeros, zeros + c.d_min,
      zeros.astype(jnp.int32))
  return (tokenizer, nn.unbox(tokenizer_params["params"]), dynamics, nn.unbox(dynamics_params["params"]))
