"""Can a dynamics config learn action effects at all? A synthetic world that isolates the question.

  python -m jaxai.main --config=configs/world_model.py --config.stage=synthetic_actions --workdir=DIR
      [--config.stages.synthetic_actions.total_steps=2000] [--config.dynamics.previous_frame=False ...]

On recorded Craftax play the paper's dynamics model did not learn what the action does
(eval/action_top1 near chance). That could be the data, the tokenizer's latents, or the model and
objective. Here the tokenizer and the data are taken out: each sequence starts from random latents
tanh(N(0, 1)) of the tokenizer's size [num_latents, latent_channels], laid out as a torus grid
(rows x columns of latent tokens), and each next frame is the last one shifted by one grid cell as
the Craftax move action that led into it moves the view (NOOP stays; LEFT, RIGHT, UP, DOWN shift).
Actions are drawn uniformly from those five. The next frame is a known function of the previous
frame and the action, so a model that learned the action predicts it exactly, and nothing else
can (copying the last frame is right only for NOOP).

A stage of the world-model task that ``stage=all`` leaves out: the config's dynamics model trains
on these sequences with ``shortcut_forcing.dynamics_loss``, each batch (``batch_size`` x
``dynamics.short_window_len`` frames) drawn inside the jitted step from the step's key
(``Stage.make_batch``: no dataset, and a resumed run draws what an uninterrupted one did). Every
evaluation logs, on fixed held-out sequences (4 context frames at the rollout's context level,
then the frame to predict, for each of the five actions):

* ``eval/action_top1``: the share of sequences whose K = ``rollout.num_steps`` sampled prediction
  is closest to the truth for the action actually taken (chance: 0.2);
* ``eval/action_top1_mean``: the same for one pass at tau = 0, d = d_min, the conditional mean the
  loss trains (no sampling noise);
* ``eval/next_mse`` (sampled, true action), ``eval/mean_mse_true`` / ``eval/mean_mse_other`` (one
  pass, the true action / all five), and ``eval/copy_mse``, the error of repeating the last context
  frame.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxai import stages
from jaxai.world_model import models, noise_levels, rollout, shortcut_forcing

# Craftax-Classic action ids of the moves, and the (row, column) shift of the view's content each
# causes: the player stays centred, so walking left moves the world one cell right.
MOVES = {0: (0, 0), 1: (0, 1), 2: (0, -1), 3: (1, 0), 4: (-1, 0)}  # NOOP, LEFT, RIGHT, UP, DOWN
CONTEXT_FRAMES = 4


def grid_shape(num_latents: int) -> tuple[int, int]:
  """(rows, columns) of the latent grid: the most square factorisation, columns >= rows."""
  rows = max(r for r in range(1, math.isqrt(num_latents) + 1) if num_latents % r == 0)
  return rows, num_latents // rows


def shifted(grid: jax.Array, actions: jax.Array) -> jax.Array:
  """grid [B, rows, columns, C] moved one cell per ``MOVES[action]`` (torus), for actions [B]."""
  options = jnp.stack([jnp.roll(grid, move, axis=(1, 2)) for move in MOVES.values()])
  return options[actions, jnp.arange(grid.shape[0])]


def sequences(rng: jax.Array, batch: int, frames: int, num_latents: int, channels: int):
  """(latents [B, T, N, C], actions [B, T]): actions[:, t] led into frame t (the model's
  convention); actions[:, 0] leads into nothing seen and is unlabelled in training."""
  rows, columns = grid_shape(num_latents)
  grid_key, action_key = jax.random.split(rng)
  grid = jnp.tanh(jax.random.normal(grid_key, (batch, rows, columns, channels)))
  actions = jax.random.randint(action_key, (batch, frames), 0, len(MOVES))
  grids = [grid]
  for t in range(1, frames):
    grids.append(shifted(grids[-1], actions[:, t]))
  return jnp.stack(grids, axis=1).reshape(batch, frames, num_latents, channels), actions


def _evaluate(model, params, latents, actions, *, num_steps: int, context_signal: float, rng) -> dict:
  """The metrics of the module docstring on held-out (latents [B, 5, N, C], actions [B, 5])."""
  c = model.config
  b = latents.shape[0]
  target, taken = latents[:, CONTEXT_FRAMES], actions[:, CONTEXT_FRAMES]
  level = noise_levels.context_signal_level(context_signal, c.k_max)
  noise = jax.random.normal(rng, latents.shape)
  context = shortcut_forcing.corrupt(latents[:, :CONTEXT_FRAMES], noise[:, :CONTEXT_FRAMES],
                                     jnp.full((b, CONTEXT_FRAMES), level))
  one_pass_inputs = (jnp.concatenate([context, noise[:, CONTEXT_FRAMES:]], axis=1),
                     jnp.concatenate([jnp.full((b, CONTEXT_FRAMES), level), jnp.zeros((b, 1))], axis=1),
                     jnp.full((b, CONTEXT_FRAMES + 1), c.d_min))
  one_pass = jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs))
  sampled, mean = [], []
  for action in MOVES:
    these = actions.at[:, CONTEXT_FRAMES].set(action)
    frame = rollout.rollout(model, params, latents[:, :CONTEXT_FRAMES], these, rng,
                            num_steps=num_steps, context_signal=context_signal)[:, 0]
    sampled.append(jnp.mean(jnp.square(frame - target), axis=(1, 2)))
    frame = one_pass(params, *one_pass_inputs, these)[:, CONTEXT_FRAMES]
    mean.append(jnp.mean(jnp.square(frame - target), axis=(1, 2)))
  sampled, mean = np.asarray(jnp.stack(sampled, 1)), np.asarray(jnp.stack(mean, 1))
  rows = np.arange(b)
  taken = np.asarray(taken)
  return {"action_top1": float(np.mean(sampled.argmin(1) == taken)),
          "action_top1_mean": float(np.mean(mean.argmin(1) == taken)),
          "next_mse": float(sampled[rows, taken].mean()),
          "mean_mse_true": float(mean[rows, taken].mean()), "mean_mse_other": float(mean.mean()),
          "copy_mse": float(jnp.mean(jnp.square(latents[:, CONTEXT_FRAMES - 1] - target))),
          "chance": 1.0 / len(MOVES)}


def build(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  del workdir
  d, t = config.dynamics, config.tokenizer
  model = models.make_dynamics(config)
  batch_size, frames = config.batch_size, max(d.short_window_len, CONTEXT_FRAMES + 1)
  make = lambda rng, b, f: sequences(rng, b, f, t.num_latents, t.latent_channels)
  labelled = jnp.ones((batch_size, frames), bool).at[:, 0].set(False)

  def init_params(rng):
    c = model.config
    zeros = jnp.zeros((1, frames))
    return model.init(rng, jnp.zeros((1, frames, c.num_latents, c.latent_channels)), zeros,
                      zeros + c.d_min, zeros.astype(jnp.int32))["params"]

  def make_batch(params, batch, rng):
    del params, batch
    latents, actions = make(rng, batch_size, frames)
    return {"latents": latents, "actions": actions, "action_mask": labelled}

  def loss(params, batch, rng):
    return shortcut_forcing.dynamics_loss(model, params, batch, rng,
                                          single_image_fraction=d.single_image_fraction)

  held_out = functools.cache(lambda: make(jax.random.key(config.seed + 2),
                                          config.synthetic_actions.eval_sequences, CONTEXT_FRAMES + 1))

  def evaluate(params, step):
    del step
    record = _evaluate(model, params, *held_out(), num_steps=config.rollout.num_steps,
                       context_signal=config.rollout.context_signal,
                       rng=jax.random.key(config.seed + 4))
    return {f"eval/{k}": v for k, v in record.items()}

  return stages.Stage(name="synthetic_actions", config=config, init_params=init_params, loss=loss,
                      make_data=None, make_batch=make_batch, evaluate=evaluate)
