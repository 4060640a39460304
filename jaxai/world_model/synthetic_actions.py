"""Can a dynamics config learn action effects at all? A synthetic world that isolates the question.

  python -m jaxai.world_model.synthetic_actions --config=configs/world_model.py [--steps=2000]
      [--eval_every=250] [--config.dynamics.previous_frame=False ...]

On recorded Craftax play the paper's dynamics model did not learn what the action does (issue 5:
eval/action_top1 near chance). That could be the data, the tokenizer's latents, or the model and
objective. Here the tokenizer and the data are taken out: each sequence starts from random latents
tanh(N(0, 1)) of the tokenizer's size [num_latents, latent_channels], laid out as a torus grid
(rows x columns of latent tokens), and each next frame is the last one shifted by one grid cell as
the Craftax move action that led into it moves the view (NOOP stays; LEFT, RIGHT, UP, DOWN shift).
Actions are drawn uniformly from those five. The next frame is a known function of the previous
frame and the action, so a model that learned the action predicts it exactly, and nothing else
can (copying the last frame is right only for NOOP).

The config's dynamics model trains on these sequences with ``shortcut_forcing.dynamics_loss`` (batch
``dynamics_train.batch_size`` x ``dynamics.short_window_len`` frames, the config's optimizer with
``dynamics_train``'s learning rate and warm-up). Every ``--eval_every`` steps one JSON line reports,
on fixed held-out sequences (4 context frames at the rollout's context level, then the frame to
predict, for each of the five actions):

* ``action_top1``: the share of sequences whose K = ``rollout.num_steps`` sampled prediction is
  closest to the truth for the action actually taken (chance: 0.2);
* ``action_top1_mean``: the same for one pass at tau = 0, d = d_min, the conditional mean the loss
  trains (no sampling noise);
* ``next_mse`` (sampled, true action), ``mean_mse_true`` / ``mean_mse_other`` (one pass, the true
  action / all five), and ``copy_mse``, the error of repeating the last context frame.

Measured on this 2-core CPU (default config, ~0.35 s per step): see the README, World model: what
was measured and tried.
"""
from __future__ import annotations

import json
import logging
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from jaxai import config_lib, optimizer
from jaxai.world_model import dynamics_stage, rollout, shortcut_forcing

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
  level = shortcut_forcing.context_signal_level(context_signal, c.k_max)
  noise = jax.random.normal(rng, latents.shape)
  context = shortcut_forcing.corrupt(latents[:, :CONTEXT_FRAMES], noise[:, :CONTEXT_FRAMES],
                                     jnp.full((b, CONTEXT_FRAMES), level))
  one_pass_inputs = (jnp.concatenate([context, noise[:, CONTEXT_FRAMES:]], axis=1),
                     jnp.concatenate([jnp.full((b, CONTEXT_FRAMES), level), jnp.zeros((b, 1))], axis=1),
                     jnp.full((b, CONTEXT_FRAMES + 1), c.d_min))
  sampled, mean = [], []
  for action in MOVES:
    these = actions.at[:, CONTEXT_FRAMES].set(action)
    frame = rollout.rollout(model, params, latents[:, :CONTEXT_FRAMES], these, rng,
                            num_steps=num_steps, context_signal=context_signal)[:, 0]
    sampled.append(jnp.mean(jnp.square(frame - target), axis=(1, 2)))
    frame = model.apply({"params": params}, *one_pass_inputs, these)[:, CONTEXT_FRAMES]
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


def run(config: ml_collections.ConfigDict, *, steps: int, eval_every: int, eval_sequences: int,
        seed: int = 0):
  """Trains the config's dynamics model on the synthetic world; yields one dict per evaluation."""
  dynamics_stage.validate_model(config)
  d, t = config.dynamics, config.tokenizer
  model = dynamics_stage.make_dynamics(config)
  stage = dynamics_stage.stage_config(config)
  batch_size, frames = stage.batch_size, max(d.short_window_len, CONTEXT_FRAMES + 1)
  make = lambda rng, b, f: sequences(rng, b, f, t.num_latents, t.latent_channels)
  latents, actions = make(jax.random.key(seed), batch_size, frames)
  labelled = jnp.ones((batch_size, frames), bool).at[:, 0].set(False)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed + 1), latents, jnp.ones((batch_size, frames)),
                                        jnp.full((batch_size, frames), model.config.d_min), actions,
                                        labelled)["params"])
  tx = optimizer.make_optimizer(stage.optimizer, steps)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, rng):
    data_rng, loss_rng = jax.random.split(rng)
    latents, actions = make(data_rng, batch_size, frames)
    batch = {"latents": latents, "actions": actions, "action_mask": labelled}
    loss_fn = lambda p: shortcut_forcing.dynamics_loss(model, p, batch, loss_rng,
                                                       single_image_fraction=d.single_image_fraction)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  held_out = make(jax.random.key(seed + 2), eval_sequences, CONTEXT_FRAMES + 1)
  rng, start, losses = jax.random.key(seed + 3), time.perf_counter(), []
  for step in range(1, steps + 1):
    rng, step_rng = jax.random.split(rng)
    params, opt_state, loss = train_step(params, opt_state, step_rng)
    losses.append(loss)
    if step % eval_every == 0 or step == steps:
      record = {"step": step, "loss": float(np.mean(jax.device_get(losses)))}
      record.update(_evaluate(model, params, *held_out, num_steps=config.rollout.num_steps,
                              context_signal=config.rollout.context_signal,
                              rng=jax.random.key(seed + 4)))
      record["seconds"] = round(time.perf_counter() - start, 1)
      losses = []
      yield record


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/world_model.py.",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 2000, "Training steps.")
  flags.DEFINE_integer("eval_every", 250, "Steps between evaluations (and after the last step).")
  flags.DEFINE_integer("eval_sequences", 64, "Held-out sequences per evaluation.")
  flags.DEFINE_integer("seed", 0, "Seed of the data, the parameters and the noise.")


def main(argv):
  del argv
  args = flags.FLAGS
  if not args["verbosity"].present:
    logging.getLogger("absl").setLevel(logging.WARNING)
  if args.config is None:
    config_lib.fail("config error", "config: --config=configs/world_model.py[:variant] is required")
  for name in ("steps", "eval_every", "eval_sequences"):
    if args[name].value < 1:
      config_lib.fail("config error", f"{name}: must be >= 1, got {args[name].value}")
  try:
    for record in run(args.config, steps=args.steps, eval_every=args.eval_every,
                      eval_sequences=args.eval_sequences, seed=args.seed):
      print(json.dumps(record), flush=True)
  except config_lib.ConfigError as e:
    config_lib.fail("config error", str(e))


if __name__ == "__main__":
  define_flags()
  app.run(main)
