"""A trained agent acting on raw Craftax frames: pixels in, actions out, many games at once.

    agent = AgentPlayer.load(config, workdir, task="collect_wood", num_envs=64)
    agent.reset(slots, world_seeds)     # these slots start an episode (on these worlds)
    actions = agent.act(frames)         # uint8 [64, 63, 63, 3] -> int32 [64]

It is a ``jaxai.craftax.evaluation.Policy``: ``evaluation.play(agent, ...)`` plays it in the real
game. The randomness of a slot's episode (context noise, action samples) is drawn from its world
seed and the step within the episode, so an episode does not depend on the slot that played it.

Every real frame is encoded by the tokenizer and written, noised to the context signal level as a
rollout's context is, into the dynamics model's KV cache in one pass at step size d_min, whose
agent-token output the policy head (distance n = 0) reads; the action is sampled from it (or its
argmax with ``greedy``) and leads into the next frame. So acting costs one encode and one dynamics
pass per frame, whatever the context length.

Each slot keeps its own cache (the batch-1 step is vmapped over slots, so every slot has its own
cache index): a slot that starts an episode sets its index back to 0, which hides the old episode
(the causal mask hides positions past the index), and a slot whose cache is full slides as
interactive play does (``realtime``): a fresh cache prefilled with its last ``context_frames // 2``
frames, the first of them unlabelled, positions restarting at 0. The cache holds
``context_frames`` frames, by default the trained window: RoPE positions past it were never trained.

This object is the documented way to plug the agent into another harness: it needs only batches of
frames and a ``reset`` when a slot's episode starts.
"""
import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxai import config_lib, stages
from jaxai.world_model import dynamics_stage, imagination, models, noise_levels, realtime
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import shortcut_forcing


STAGES = ("agent", "imagination")  # after finetuning (BC), after RL in imagination


def episode_key_data(rng, world_seed: int) -> np.ndarray:
  """The raw key of one episode's randomness: the player's key folded with its world seed, so an
  episode's draws do not depend on the slot that plays it."""
  return np.asarray(jax.random.key_data(jax.random.fold_in(rng, int(world_seed))))


def step_keys(key_data, step):
  """(noise key, sampling key) of frame ``step`` of the episode of ``key_data`` (traceable)."""
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), step))


def choose_action(logits, sample_key, greedy: bool):
  """The most likely action, or one sampled from ``logits`` [A]; int32."""
  return (jnp.argmax(logits) if greedy else jax.random.categorical(sample_key, logits)).astype(jnp.int32)


class AgentRun(NamedTuple):
  """An agent as one of its stages left it, with the world-model run it was finetuned from."""
  config: ml_collections.ConfigDict      # as trained, computing in rollout.compute_dtype
  world_model: dynamics_stage.TrainedRun  # its tokenizer is the agent's
  dynamics_workdir: str                  # where that run lives (its latent caches too)
  model: dynamics_lib.Dynamics           # the dynamics model with the agent token and heads
  params: Any


def load_agent_run(config: ml_collections.ConfigDict, workdir: str, stage: str = "agent") -> AgentRun:
  """The agent as ``stage`` (of ``STAGES``) in ``workdir`` left it. The tokenizer is the one the
  dynamics run that the agent started from read."""
  config_lib.check(stage in STAGES, "stage", f"an agent is trained by {' or '.join(STAGES)}, not {stage!r}")
  trained = stages.load_stage(config, workdir, stage, sections=("dynamics", "tokenizer", "agent"),
                              absent=models.BEFORE_FIELDS)
  run_config = models.rollout_config(trained.config)
  dynamics_reads = (imagination.agent_reads_dir(trained.config, workdir) if stage == "imagination"
                    else stages.reads_dir(trained.config, workdir))
  return AgentRun(run_config, dynamics_stage.load_run(run_config, dynamics_reads), dynamics_reads,
                  models.make_dynamics(run_config, agent=True), trained.params)


def load_agent(config: ml_collections.ConfigDict, workdir: str, stage: str = "agent"):
  """(config as trained, tokenizer, tokenizer params, agent dynamics model, its params) of
  ``load_agent_run``'s agent."""
  run = load_agent_run(config, workdir, stage)
  return run.config, run.world_model.tokenizer.model, run.world_model.tokenizer.params, run.model, run.params


class AgentPlayer:
  """The agent of one task on ``num_envs`` slots; see the module docstring."""

  def __init__(self, tokenizer, tokenizer_params, model, params, *, task: int, num_envs: int,
               context_frames: int, context_signal: float, seed: int = 0, greedy: bool = False):
    if context_frames < 2:
      raise ValueError(f"context_frames must be >= 2 (the window slides by half), got {context_frames}")
    if not 0 <= task < model.config.num_tasks:
      raise ValueError(f"task {task} is not one of the model's {model.config.num_tasks} tasks")
    self.tokenizer, self.tokenizer_params = tokenizer, tokenizer_params
    self.model, self.params = model, params
    self.task, self.num_envs, self.context_frames, self.greedy = task, num_envs, context_frames, greedy
    c = model.config
    self.context_level = noise_levels.context_signal_level(context_signal, c.k_max)
    self._rng = jax.random.key(seed)
    self.episode_keys = np.zeros((num_envs, 2), np.uint32)  # raw keys: one per slot's episode
    self.episode_steps = np.zeros(num_envs, np.int64)       # frames seen in each slot's episode
    empty = dynamics_lib.init_cache(c, 1, context_frames)
    self._empty = empty
    self.caches = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_envs, *x.shape)), empty)
    self.cached = np.zeros(num_envs, np.int64)         # frames in each slot's cache
    self.started = np.zeros(num_envs, bool)            # a slot has seen a frame of its episode
    self.last_actions = np.zeros(num_envs, np.int32)   # the action that leads into the next frame
    self.logits = np.zeros((num_envs, model.config.num_actions), np.float32)  # the policy's, last act
    self.history = [collections.deque(maxlen=context_frames // 2) for _ in range(num_envs)]
    self._act = jax.jit(self._act_fn)
    self._prefill = jax.jit(self._prefill_fn)

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, workdir: str, *, task: str, num_envs: int,
           stage: str = "agent", context_frames: int | None = None, seed: int = 0,
           greedy: bool = False) -> "AgentPlayer":
    """The agent ``stage`` trained in ``workdir`` (``STAGES``), told ``task`` (one of ``agent.tasks``)."""
    return cls.from_loaded(load_agent(config, workdir, stage), task=task, num_envs=num_envs,
                           context_frames=context_frames, seed=seed, greedy=greedy)

  @classmethod
  def from_loaded(cls, loaded, *, task: str, num_envs: int, context_frames: int | None = None, seed: int = 0,
                  greedy: bool = False) -> "AgentPlayer":
    """An agent of ``load_agent``'s result (several players can share one load)."""
    run_config, tokenizer, tokenizer_params, model, params = loaded
    tasks = tuple(run_config.agent.tasks)
    if task not in tasks:
      raise config_lib.ConfigError("task", f"{task!r} is not one the agent was trained for: {', '.join(tasks)}")
    return cls(tokenizer, tokenizer_params, model, params, task=tasks.index(task), num_envs=num_envs,
               context_frames=context_frames or run_config.agent.window_len,
               context_signal=run_config.rollout.context_signal, seed=seed, greedy=greedy)

  def reset(self, slots, world_seeds=None) -> None:
    """The given slots start a new episode (on ``world_seeds``, which seed its randomness; default
    the slot numbers): their next frame is the episode's first."""
    slots = np.asarray(slots, np.int64).reshape(-1)
    seeds = slots if world_seeds is None else np.asarray(world_seeds, np.int64).reshape(-1)
    for slot, world_seed in zip(slots, seeds):
      self.episode_keys[slot] = episode_key_data(self._rng, world_seed)
      self.episode_steps[slot] = 0
      self._set_cache(slot, self._empty)
      self.cached[slot] = 0
      self.started[slot] = False
      self.history[slot].clear()

  def act(self, frames, views=None, active=None) -> np.ndarray:
    """uint8 frames [num_envs, 63, 63, 3], each slot's current frame -> int32 actions [num_envs].
    (``views`` and ``active``, of ``evaluation.Policy``, are not read: idle slots act too.)"""
    del views, active
    frames = np.asarray(frames)
    if frames.shape != (self.num_envs, *models.FRAME_SHAPE) or frames.dtype != np.uint8:
      raise ValueError(f"act takes uint8 frames [{self.num_envs}, 63, 63, 3], got {frames.dtype} {frames.shape}")
    for slot in np.flatnonzero(self.cached == self.context_frames):
      self._slide(slot)
    labelled = self.started.copy()  # an episode's first frame has no action leading into it
    actions, logits, latents, self.caches = self._act(
        self.params, self.tokenizer_params, self.caches, jnp.asarray(frames),
        jnp.asarray(self.last_actions), jnp.asarray(labelled), jnp.asarray(self.episode_keys),
        jnp.asarray(self.episode_steps))
    actions, latents, self.logits = np.asarray(actions), np.asarray(latents), np.asarray(logits)
    for slot in range(self.num_envs):
      self.history[slot].append((latents[slot], int(self.last_actions[slot]), bool(labelled[slot])))
    self.episode_steps += 1
    self.cached += 1
    self.started[:] = True
    self.last_actions = actions.astype(np.int32)
    return self.last_actions.copy()

  # --- jitted pieces ---------------------------------------------------------------------------

  def _one_pass(self, params, cache, latents, action, labelled, noise_key):
    """One slot: its frame [1, 1, N, C] noised to the context level, written to ``cache``."""
    c = self.model.config
    t = latents.shape[1]
    tau = jnp.full((1, t), self.context_level, jnp.float32)
    noisy = shortcut_forcing.corrupt(latents, jax.random.normal(noise_key, latents.shape), tau)
    return self.model.apply({"params": params}, noisy, tau, jnp.full((1, t), c.d_min), action, labelled,
                            cache=cache, tasks=jnp.full((1,), self.task, jnp.int32))

  def _act_fn(self, params, tokenizer_params, caches, frames, last_actions, labelled, episode_keys,
              episode_steps):
    latents = realtime.encode_frames(self.tokenizer, tokenizer_params, frames).astype(jnp.float32)

    def slot(cache, z, action, is_labelled, key_data, step):
      noise_key, sample_key = step_keys(key_data, step)
      out = self._one_pass(params, cache, z[None, None], action[None, None], is_labelled[None, None],
                           noise_key)
      logits = out["policy"][0, 0, 0]
      return choose_action(logits, sample_key, self.greedy), logits, out["cache"]

    actions, logits, caches = jax.vmap(slot)(caches, latents, last_actions, labelled, episode_keys,
                                             episode_steps)
    return actions, logits, latents, caches

  def _prefill_fn(self, params, latents, actions, labelled, noise_key):
    """A fresh batch-1 cache holding latents [1, T, N, C] (the frames a slide keeps)."""
    cache = dynamics_lib.init_cache(self.model.config, 1, self.context_frames)
    return self._one_pass(params, cache, latents, actions, labelled, noise_key)["cache"]

  def _set_cache(self, slot: int, cache) -> None:
    self.caches = jax.tree.map(lambda all_slots, one: all_slots.at[slot].set(one), self.caches, cache)

  def _slide(self, slot: int) -> None:
    kept = list(self.history[slot])
    latents = jnp.asarray(np.stack([z for z, _, _ in kept]))[None]
    actions = jnp.asarray([[a for _, a, _ in kept]], jnp.int32)
    labelled = jnp.asarray([[False] + [l for _, _, l in kept[1:]]])
    # A key of its own: the episode's key folded with 2^31 + the step at which it slides (act
    # folds in steps below 2^31).
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(self.episode_keys[slot])),
                             2**31 + int(self.episode_steps[slot]))
    self._set_cache(slot, self._prefill(self.params, latents, actions, labelled, key))
    self.cached[slot] = len(kept)

