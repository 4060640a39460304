"""The Dreamer 4 dynamics model: noisy tokenizer latents + actions -> clean latents, frame by frame.

Token layout. Each frame contributes ``F = S_z + S_r + 2`` tokens (one more with agent tokens), in this order:

* ``S_z`` spatial tokens: the frame's ``N x C`` tokenizer latents regrouped into ``S_z`` tokens of
  ``N * C / S_z`` values (consecutive latent tokens are merged, as the paper reshapes 512 x 16 to
  256 x 32) and projected to the width;
* ``S_r`` learned register tokens;
* one noise-level token: the embeddings of the signal level tau (on the 1/K_max grid) and of the
  step size d (log2 of 1/d) concatenated;
* one action token: a learned embedding, plus the embedding of the Craftax action (17 categories)
  when the frame is labelled ("unlabelled" frames carry only the learned embedding);
* with ``num_tasks`` > 0 (the agent), one agent token: a learned embedding plus the embedding of
  the sequence's task. It attends to every token of its frame (space layers) and to the agent
  tokens of earlier frames (time layers); no other token attends to it, so the task never reaches
  the video prediction (the paper's rule). The policy, reward and value heads
  (``agent_heads.AgentHeads``) read its output.

Frame t's action token holds the action that led *into* frame t (taken at frame t - 1); the
recorded dataset stores at step t the action taken *after* frame t, see ``actions_into_frames``.

Factorised attention. Space layers attend within a frame only (bidirectional over its F tokens);
every ``time_every``-th layer is a time layer instead, in which each of the F token slots attends
causally over time to the same slot of the current and earlier frames. Why per-slot time attention
rather than block-causal attention over the whole flattened sequence: it is the paper's
"space-only + time-only" form; a time layer costs O(F T^2) rather than O(F^2 T^2); and in a rollout
a new frame attends to T cached keys per slot, not F T. Information moves between slots only in
the space layers, which is what the paper's ablation trades (FVD 71 -> 91) for its fastest model.
Together the layers are block-causal in time: nothing of frame t + 1 reaches frames <= t.

Layout ``full`` (for the speed comparison of the issue, and as the paper's slower baseline): every
layer attends block-causally over the flattened sequence of all T * F tokens instead.

Single images. A per-sequence flag ``single_image`` restricts its time layers to the frame itself,
so each frame is denoised with no context (the paper trains 30% of sequences so).

Previous frame (``previous_frame``, not in the paper). Off, copying the last frame, the strongest
baseline of next-frame prediction here, takes many steps to learn: each spatial slot can reach
its own past only through the few time layers' softmax over all past frames. On, frame t also
reads frame t - 1's noisy latents (a projection added to its spatial tokens), and the output gets
two skips, as diffusion models precondition theirs (EDM's c_skip): tau z_t + (1 - tau) g z_{t-1},
tau being frame t's signal level and g a learned gate per signal level of frame t - 1 that starts
at that level. So at tau = 0 (a new frame) the prior is a copy of the previous frame, near tau = 1
the frame itself, and the network predicts the change. Scaling the copy by 1 - tau keeps the
nearly clean frames, most of the ramp-weighted loss, from pulling the gate down. Frame t - 1 comes
from the same input sequence (or, in a rollout, from the cache), so causality is unchanged.

Layers. The layers are one ``transformer.BlockStack`` (parameters ``blocks_i``). With
``block.scan_layers`` it scans over groups of ``time_every`` layers, ``time_every - 1`` space
layers then a time layer (so ``num_layers`` must be a multiple of ``time_every``; layout ``full``:
over single layers), compiling one group however deep the model is.

KV cache. Only time layers need one (space layers see the current frame only): ``init_cache``
makes one ``attention.init_kv_cache`` per time layer over ``B * F`` slot sequences (layout
``full``: one per layer over ``B`` sequences of ``T * F`` tokens), a list, or one cache stacked
over the layers when they are scanned (``transformer.init_stack_cache``), plus the last cached
frame's noisy latents and signal level for ``previous_frame``, and
``Dynamics(...)(..., cache=cache)`` treats its frames as the next ones after those cached,
returning ``(prediction, updated cache)``; ``commit=n`` keeps only the first n frames in the
returned cache (the others' entries stay, beyond its index, hidden until overwritten), which lets
a rollout write the last frame and denoise the next one in the same pass.

Parameters are fp32 with logical axis names; blocks compute in ``config.block.dtype``; the
residual stream and the output projection stay fp32. Learned tokens start as small random
vectors, not zeros (zero vectors through RMSNorm gave exploding gradients in reimplementations).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import layers, transformer
from jaxai.world_model import agent_heads

NUM_CRAFTAX_ACTIONS = 17


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
  """Sizes of the dynamics transformer; ``num_latents x latent_channels`` is the tokenizer's output."""
  block: transformer.BlockConfig
  num_layers: int
  num_latents: int
  latent_channels: int
  spatial_tokens: int
  num_registers: int = 4
  num_actions: int = NUM_CRAFTAX_ACTIONS
  k_max: int = 64
  time_every: int = 4
  layout: str = "factorised"  # factorised (space layers + a time layer every time_every) | full
  shortcut: bool = True  # False: trained at d = d_min only (plain diffusion forcing)
  step_distribution: str = "paper"  # of d when shortcut (noise_levels.STEP_DISTRIBUTIONS)
  previous_frame: bool = False  # frame t also reads frame t - 1 directly (not in the paper)
  context_fraction: float = 0.0  # frames trained as rollout context (not in the paper)
  context_signal: float = 0.9  # their lowest signal level, on the grid as rollouts put their context
  next_frame_fraction: float = 0.0  # frames trained at tau = 0 after a context frame (not in the paper)
  loss_impl: str = "xla"  # the shortcut-forcing loss: xla | pallas | auto (the fused kernel where written)
  token_init_scale: float = 0.02
  num_tasks: int = 0  # > 0: an agent token per frame with one of num_tasks task embeddings
  heads: agent_heads.HeadsConfig = agent_heads.HeadsConfig()  # of the agent token (num_tasks > 0)

  def __post_init__(self):
    if self.k_max < 1 or self.k_max & (self.k_max - 1):
      raise ValueError(f"k_max must be a power of two, got {self.k_max}")
    if (self.num_latents * self.latent_channels) % self.spatial_tokens:
      raise ValueError(f"{self.num_latents} x {self.latent_channels} latent values do not split into "
                       f"{self.spatial_tokens} spatial tokens")
    if self.layout not in ("factorised", "full"):
      raise ValueError(f"layout must be 'factorised' or 'full', got {self.layout!r}")
    if not 1 <= self.time_every <= self.num_layers:
      raise ValueError(f"time_every={self.time_every} must be in [1, num_layers={self.num_layers}]: "
                       "otherwise no layer attends over time")
    if self.block.scan_layers and self.layout == "factorised" and self.num_layers % self.time_every:
      raise ValueError(f"scan_layers scans groups of time_every={self.time_every} layers: num_layers="
                       f"{self.num_layers} must be a multiple of it")

  @property
  def tokens_per_frame(self) -> int:
    return self.spatial_tokens + self.num_registers + 2 + (self.num_tasks > 0)

  @property
  def agent_slot(self) -> int | None:
    """The agent token's index within a frame (the last one), None without agent tokens."""
    return self.tokens_per_frame - 1 if self.num_tasks > 0 else None

  @property
  def values_per_token(self) -> int:
    return self.num_latents * self.latent_channels // self.spatial_tokens

  @property
  def num_step_sizes(self) -> int:
    """d in {1, 1/2, ..., 1/K_max}."""
    return int(math.log2(self.k_max)) + 1

  @property
  def d_min(self) -> float:
    return 1.0 / self.k_max

  def is_time_layer(self, layer: int) -> bool:
    return layer % self.time_every == self.time_every - 1

  @property
  def layer_frame_sizes(self) -> tuple[int | None, ...]:
    """The repeating pattern of ``transformer.BlockStack.frame_sizes``: time layers (causal over
    each slot's frames) every ``time_every``-th, space layers (bidirectional within a frame)
    between; layout ``full``: every layer block-causal over frames of F tokens."""
    if self.layout == "full":
      return (self.tokens_per_frame,)
    return (None,) * (self.time_every - 1) + (1,)

  @property
  def num_cached_layers(self) -> int:
    """Layers that attend over time and so keep a KV cache in rollouts."""
    if self.layout == "full":
      return self.num_layers
    return sum(self.is_time_layer(i) for i in range(self.num_layers))

  def model_step_size(self, step):
    """The step size the network is conditioned on: a model trained without shortcuts only knows d_min."""
    return step if self.shortcut else jnp.full_like(jnp.asarray(step, jnp.float32), self.d_min)


def signal_index(tau: jax.Array, k_max: int) -> jax.Array:
  """tau on the grid {0, 1/K_max, ..., 1 - 1/K_max} -> its index; off-grid values round to it."""
  return jnp.clip(jnp.round(tau * k_max), 0, k_max - 1).astype(jnp.int32)


def step_index(step: jax.Array, k_max: int) -> jax.Array:
  """d = 1 / 2^i -> i, for d in {1, ..., 1/K_max}."""
  return jnp.clip(jnp.round(-jnp.log2(step)), 0, math.log2(k_max)).astype(jnp.int32)


def actions_into_frames(actions: jax.Array, is_first: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dataset convention -> model convention: (actions [B, T], labelled [B, T]).

  The dataset's step t holds the action taken after seeing frame t; the model's frame t carries
  the action taken at frame t - 1. The first frame of a window and of an episode has none.
  """
  previous = jnp.concatenate([jnp.zeros_like(actions[:, :1]), actions[:, :-1]], axis=1)
  labelled = jnp.concatenate([jnp.zeros_like(is_first[:, :1]), ~is_first[:, 1:]], axis=1)
  return previous, labelled


def init_cache(config: DynamicsConfig, batch: int, max_frames: int) -> dict:
  """An empty cache: ``layers``, the KV caches of the layers that attend over time
  (``num_cached_layers``; ``transformer.init_stack_cache``: a list, or stacked when the blocks
  are scanned), and the last frame written (``previous_latents`` [B, N, C], ``previous_level``
  [B], its signal index; K_max: no frame yet)."""
  if config.layout == "full":
    sequences, length = batch, max_frames * config.tokens_per_frame
  else:
    sequences, length = batch * config.tokens_per_frame, max_frames
  return {"layers": transformer.init_stack_cache(config.block, config.num_cached_layers, sequences, length),
          "previous_latents": jnp.zeros((batch, config.num_latents, config.latent_channels), jnp.float32),
          "previous_level": jnp.full((batch,), config.k_max, jnp.int32)}


def _single_image_mask(single_image, frame_size, repeat, q_len, kv_len, q_offset):
  """[B * repeat, 1, 1, q_len, kv_len]: flagged sequences see only their own frame.

  Time layers: one token per frame (``frame_size=1``), ``repeat`` = F slot sequences per sequence;
  layout ``full``: ``frame_size=F`` tokens per frame, ``repeat=1``.
  """
  q_frame = (q_offset + jnp.arange(q_len)) // frame_size
  own_frame = q_frame[:, None] == (jnp.arange(kv_len) // frame_size)[None, :]
  mask = own_frame | ~single_image[:, None, None]  # [B, q_len, kv_len]
  return jnp.repeat(mask, repeat, axis=0)[:, None, None]


def agent_visibility(config: DynamicsConfig, q_len: int, kv_len: int, q_offset=0) -> jax.Array | None:
  """[q_len, kv_len] bool over token positions laid out in frames of F tokens (slot = position mod
  F): an agent token is seen by agent tokens only. None without agent tokens."""
  if config.agent_slot is None:
    return None
  f = config.tokens_per_frame
  q_is_agent = (q_offset + jnp.arange(q_len)) % f == config.agent_slot
  k_is_agent = jnp.arange(kv_len) % f == config.agent_slot
  return ~k_is_agent[None, :] | q_is_agent[:, None]


def _signal_levels(key, shape, dtype=jnp.float32):
  """[K_max + 1]: the signal level of each index, and 0 for the last one (no previous frame)."""
  del key
  k_max = shape[0] - 1
  return jnp.concatenate([jnp.arange(k_max) / k_max, jnp.zeros(1)]).astype(dtype)


class Dynamics(nn.Module):
  """``(latents, tau, step, actions, action_mask=None, single_image=None, cache=None, commit=None,
  tasks=None)`` -> predicted clean latents [B, T, N, C] (fp32), or ``(prediction, cache)`` when a
  cache is given (holding the first ``commit`` frames of this call; default all).

  latents: [B, T, N, C] noisy latents z_tau; tau, step: [B, T] signal level and step size of each
  frame; actions: [B, T] int, the action that led into each frame; action_mask: [B, T] bool, False
  for unlabelled frames (default: all labelled); single_image: [B] bool (default: none).

  With agent tokens (``num_tasks`` > 0) the frames always hold them (task 0 unless ``tasks`` [B]
  says), and with ``tasks`` given the call returns a dict instead: ``latents`` (the prediction),
  ``agent`` (the agent tokens' outputs [B, T, D]), the heads' ``policy``, ``reward`` and ``value``
  logits (``agent_heads.AgentHeads``) and, with a cache, ``cache``. ``Dynamics.agent_heads``
  applies the heads alone to saved agent outputs.
  """
  config: DynamicsConfig

  def setup(self):
    c = self.config
    width = c.block.width
    small = lambda axes: layers.partitioned(nn.initializers.normal(c.token_init_scale), axes)
    self.latent_in = layers.Dense(width, (None, "embed"), dtype=c.block.dtype)
    self.registers = self.param("registers", small((None, "embed")), (c.num_registers, width), jnp.float32)
    # Two halves concatenated, as in the paper: signal level, then step size.
    self.signal_embed = self.param("signal_embed", small((None, "embed")), (c.k_max, width // 2), jnp.float32)
    self.step_embed = self.param("step_embed", small((None, "embed")),
                                 (c.num_step_sizes, width - width // 2), jnp.float32)
    self.action_embed = self.param("action_embed", small((None, "embed")), (c.num_actions, width),
                                   jnp.float32)
    self.action_base = self.param("action_base", small(("embed",)), (width,), jnp.float32)
    self.blocks = transformer.BlockStack(
        c.block, c.num_layers, frame_sizes=c.layer_frame_sizes,
        layer_fn=transformer.apply_block if c.layout == "full" else _factorised_layer)
    self.out_norm = layers.RMSNorm(dtype=jnp.float32)
    self.latent_out = layers.Dense(c.values_per_token, ("embed", None), dtype=jnp.float32)
    if c.previous_frame:
      self.previous_in = layers.Dense(width, (None, "embed"), dtype=c.block.dtype)
      # Per signal level of frame t - 1 (index K_max: none), how much of it the output copies.
      # It starts at the level tau itself: Adam moves a parameter by ~lr per step, so from 0 the
      # copy would take hundreds of steps to open.
      self.copy_gate = self.param("copy_gate", layers.partitioned(_signal_levels, (None,)),
                                  (c.k_max + 1,), jnp.float32)
    if c.num_tasks > 0:
      self.task_embed = self.param("task_embed", small((None, "embed")), (c.num_tasks, width), jnp.float32)
      self.agent_base = self.param("agent_base", small(("embed",)), (width,), jnp.float32)
      self.heads = agent_heads.AgentHeads(c.heads, c.num_actions)

  def agent_heads(self, agent):
    """The heads' logits of agent-token outputs [..., D] (see ``agent_heads.AgentHeads``)."""
    return self.heads(agent)

  def embed_frames(self, latents, tau, step, actions, action_mask, previous=None, tasks=None):
    """[B, T, F, width] fp32 input tokens; ``previous``: frame t - 1's latents for frame t;
    ``tasks`` [B]: each sequence's task (agent tokens only)."""
    c = self.config
    b, t = latents.shape[:2]
    regroup = lambda z: z.reshape(b, t, c.spatial_tokens, c.values_per_token)
    spatial = self.latent_in(regroup(latents)).astype(jnp.float32)
    if previous is not None:
      spatial = spatial + self.previous_in(regroup(previous)).astype(jnp.float32)
    registers = jnp.broadcast_to(self.registers, (b, t, *self.registers.shape))
    noise_level = jnp.concatenate([self.signal_embed[signal_index(tau, c.k_max)],
                                   self.step_embed[step_index(step, c.k_max)]], axis=-1)
    action = self.action_base + jnp.where(action_mask[..., None], self.action_embed[actions], 0.0)
    tokens = [spatial, registers, noise_level[:, :, None], action[:, :, None]]
    if c.num_tasks > 0:
      task = self.agent_base + self.task_embed[jnp.zeros((b,), jnp.int32) if tasks is None else tasks]
      tokens.append(jnp.broadcast_to(task[:, None, None], (b, t, 1, task.shape[-1])))
    return jnp.concatenate(tokens, axis=2)

  def __call__(self, latents, tau, step, actions, action_mask=None, single_image=None, cache=None,
               commit=None, tasks=None):
    c = self.config
    if tasks is not None and c.num_tasks == 0:
      raise ValueError("tasks given to a dynamics model without agent tokens (num_tasks=0)")
    b, t = latents.shape[:2]
    if action_mask is None:
      action_mask = jnp.ones((b, t), bool)
    previous, previous_level = self._previous_frames(latents, tau, single_image, cache) \
        if c.previous_frame else (None, None)
    x = self.embed_frames(latents, tau, step, actions, action_mask, previous, tasks)
    layer_caches = None if cache is None else cache["layers"]
    if c.layout == "full":
      x, new_layer_caches = self._full(x, single_image, layer_caches)
    else:
      x, new_layer_caches = self._factorised(x, single_image, layer_caches)
    agent = None if tasks is None else x[:, :, c.agent_slot]
    out = self.latent_out(self.out_norm(x[:, :, :c.spatial_tokens]))
    out = out.reshape(b, t, c.num_latents, c.latent_channels)
    if previous is not None:  # skips: tau z_t + (1 - tau) gate(tau_{t-1}) z_{t-1}, with tau of frame t
      own = tau.astype(jnp.float32)[..., None, None]
      out = out + own * latents + (1.0 - own) * self.copy_gate[previous_level][..., None, None] * previous
    if cache is None:
      return out if agent is None else {"latents": out, "agent": agent, **self.heads(agent)}
    commit = t if commit is None else commit
    if not 1 <= commit <= t:
      raise ValueError(f"commit={commit}: must be in [1, {t}] (the frames of this call)")
    if commit < t:  # the index goes back; the causal mask hides what lies past it
      per_frame = c.tokens_per_frame if c.layout == "full" else 1
      new_layer_caches = transformer.rewind_cache(new_layer_caches, (t - commit) * per_frame)
    new_cache = {"layers": new_layer_caches, "previous_latents": latents[:, commit - 1].astype(jnp.float32),
                 "previous_level": signal_index(tau[:, commit - 1], c.k_max)}
    if agent is None:
      return out, new_cache
    return {"latents": out, "agent": agent, **self.heads(agent), "cache": new_cache}

  def _previous_frames(self, latents, tau, single_image, cache):
    """Frame t - 1's noisy latents [B, T, N, C] and signal index [B, T] for every frame t (zeros and
    index K_max where there is none: a sequence's first frame, single images)."""
    c = self.config
    b = latents.shape[0]
    if cache is None:
      first, first_level = jnp.zeros_like(latents[:, :1]), jnp.full((b, 1), c.k_max, jnp.int32)
    else:
      first, first_level = cache["previous_latents"][:, None], cache["previous_level"][:, None]
    previous = jnp.concatenate([first.astype(latents.dtype), latents[:, :-1]], axis=1)
    level = jnp.concatenate([first_level, signal_index(tau[:, :-1], c.k_max)], axis=1)
    if single_image is not None:
      previous = jnp.where(single_image[:, None, None, None], 0.0, previous)
      level = jnp.where(single_image[:, None], c.k_max, level)
    return previous, level

  def _factorised(self, x, single_image, cache):
    b, t, f, _ = x.shape
    time_offset = 0 if cache is None else transformer.cache_index(cache)
    kv_len = t if cache is None else transformer.cache_length(cache)
    time_positions = (time_offset + jnp.arange(t))[None]
    time_mask = None if single_image is None else _single_image_mask(single_image, 1, f, t, kv_len, time_offset)
    # Time layers need no agent mask: each slot's sequence over time holds only that slot's tokens.
    space_mask = agent_visibility(self.config, f, f)
    out = self.blocks(x, time_positions, (space_mask, time_mask), cache=cache)
    return out if cache is not None else (out, None)

  def _full(self, x, single_image, cache):
    """Every layer block-causal over all T * F tokens; RoPE position = frame * F + slot, where F
    and slot leave the agent token out: it takes its frame's last position (the action token's), so
    adding it moves no other token (it is the key of no other token, so only its own queries see
    where it sits)."""
    b, t, f, width = x.shape
    token_offset = 0 if cache is None else transformer.cache_index(cache)
    kv_len = t * f if cache is None else transformer.cache_length(cache)
    tokens = token_offset + jnp.arange(t * f)
    video_tokens = f - (self.config.agent_slot is not None)
    positions = (tokens // f * video_tokens + jnp.minimum(tokens % f, video_tokens - 1))[None]
    mask = None if single_image is None else _single_image_mask(single_image, f, 1, t * f, kv_len, token_offset)
    agent_mask = agent_visibility(self.config, t * f, kv_len, token_offset)
    if agent_mask is not None:
      mask = agent_mask if mask is None else mask & agent_mask
    out = self.blocks(x.reshape(b, t * f, width), positions, mask, cache=cache)
    h, new_cache = out if cache is not None else (out, None)
    return h.reshape(b, t, f, width), new_cache


def _factorised_layer(block, x, time_positions, masks, cache):
  """One layer of the factorised layout on x [B, T, F, D]: a space layer (frame_size None) over
  each frame's F tokens, a time layer over each of the B * F slot sequences of T frames.
  ``masks``: (space mask [F, F] or None, time mask or None)."""
  b, t, f, width = x.shape
  space_mask, time_mask = masks
  if block.frame_size is None:
    out = block(x.reshape(b * t, f, width), jnp.arange(f)[None], space_mask)
    return out.reshape(b, t, f, width), cache
  h = x.swapaxes(1, 2).reshape(b * f, t, width)
  h, cache = transformer.apply_block(block, h, time_positions, time_mask, cache)
  return h.reshape(b, f, t, width).swapaxes(1, 2), cache
