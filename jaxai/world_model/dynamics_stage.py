"""World model, stage ``dynamics``: shortcut forcing on frozen-tokenizer latents of recorded play.

The stage reads the tokenizer stage (``stages.dynamics.reads``): its latest checkpoint in
``reads_dir`` (``stages.dynamics.reads_from``, default this run's workdir, which ``stage=all`` has
just filled), built as it was trained (``stages.load_stage``). The recorded episodes are encoded
once into a latent cache next to that checkpoint (``jaxai.world_model.latents``), so several
dynamics runs (the shortcut model and its ablation) share it. Training trains in
``workdir/dynamics``.

Batches alternate lengths as in the paper: every ``long_every``-th batch holds ``batch_size``
windows of ``window_len`` frames, the others the same frames cut into windows of
``short_window_len`` (``batch_size * window_len / short_window_len`` of them); a fraction
``single_image_fraction`` of the sequences is trained with no time context.

Evaluation: ``jaxai.world_model.rollout_eval``.
"""
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxai import config_lib, stages
from jaxai.data import pipeline
from jaxai.world_model import data
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import latents as latents_lib
from jaxai.world_model import models, noise_levels, rollout_eval
from jaxai.world_model import shortcut_forcing


def validate(config: ml_collections.ConfigDict) -> None:
  """The dynamics and rollout fields."""
  d = config.dynamics
  config_lib.validate_attention_heads("dynamics", d)
  config_lib.validate_block_stack("dynamics", d)
  config_lib.check_positive(d, "width", "num_layers", "spatial_tokens", "num_registers", "window_len",
                            "short_window_len", "mlp_hidden", prefix="dynamics.")
  values = config.tokenizer.num_latents * config.tokenizer.latent_channels
  config_lib.check(values % d.spatial_tokens == 0, "dynamics.spatial_tokens", f"the tokenizer's {values} "
                   f"latent values per frame do not split into {d.spatial_tokens} tokens")
  config_lib.check(config_lib.is_power_of_two(d.k_max), "dynamics.k_max", f"must be a power of two, got {d.k_max}")
  config_lib.check_range(d, "time_every", 1, d.num_layers, prefix="dynamics.")
  config_lib.check(not d.scan_layers or d.layout != "factorised" or d.num_layers % d.time_every == 0,
                   "dynamics.num_layers", f"scan_layers scans groups of time_every={d.time_every} layers: "
                   f"{d.num_layers} is not a multiple of it")
  config_lib.check_choice(d, "layout", ("factorised", "full"), prefix="dynamics.")
  config_lib.check_choice(d, "shortcut_loss_impl", ("auto", "xla", "pallas"), prefix="dynamics.")
  config_lib.check(d.window_len % d.short_window_len == 0, "dynamics.short_window_len",
                   f"{d.short_window_len} does not divide window_len={d.window_len}")
  config_lib.check_at_least(d, 0, "long_every", prefix="dynamics.")
  config_lib.check_choice(d, "step_distribution", noise_levels.STEP_DISTRIBUTIONS, prefix="dynamics.")
  config_lib.check_choice(d, "bootstrap_teacher", ("online", "ema"), prefix="dynamics.")
  config_lib.check(not (d.shortcut and d.bootstrap_teacher == "ema")
                   or stages.stage_config(config, "dynamics").ema_decay > 0, "stages.dynamics.ema_decay",
                   "bootstrap_teacher='ema' needs the moving average: set it in (0, 1), e.g. 0.999")
  for field in ("context_fraction", "next_frame_fraction"):
    config_lib.check_range(d, field, 0.0, 1.0, high_open=True, prefix="dynamics.")
  config_lib.check_range(d, "single_image_fraction", 0.0, 1.0, prefix="dynamics.")
  r = config.rollout
  for field in ("num_steps", "baseline_steps"):
    models.check_num_steps(f"rollout.{field}", r[field], d.k_max)
  config_lib.check_positive(r, "context_frames", "horizon", prefix="rollout.")
  config_lib.check(r.context_frames + r.horizon <= d.window_len, "rollout.horizon",
                   f"context_frames + horizon = {r.context_frames} + {r.horizon} exceeds the trained "
                   f"window_len={d.window_len}")
  config_lib.check_choice(r, "compute_dtype", ("float32", "bfloat16"), prefix="rollout.")
  config_lib.check_range(r, "context_signal", 0.0, 1.0, prefix="rollout.")


# --- the frozen tokenizer and its latents ---------------------------------------------------------

class FrozenTokenizer(NamedTuple):
  model: Any
  step: int
  params: Any


def load_tokenizer(config, workdir: str) -> FrozenTokenizer:
  """The tokenizer the dynamics stage of ``config`` reads, built as it was trained."""
  trained = stages.load_stage(config, stages.reads_dir(config, workdir), "tokenizer", sections=("tokenizer",),
                              absent=models.BEFORE_FIELDS)
  return FrozenTokenizer(models.make_tokenizer(trained.config), trained.step, trained.params)


def encoder_fn(tokenizer):
  """Jitted (params, uint8 frames [B, H, W, C]) -> latents [B, L, C], each frame on its own."""
  return jax.jit(lambda params, frames: tokenizer.apply({"params": params}, frames[:, None],
                                                        method=tokenizer.encode)[:, 0])


def load_latents(config, workdir: str, split: str, tokenizer: FrozenTokenizer,
                 max_episodes: int) -> latents_lib.LatentSteps:
  encode = encoder_fn(tokenizer.model)
  cache_dir = os.path.join(stages.reads_dir(config, workdir), "tokenizer", "latents")
  return latents_lib.load_or_encode(
      lambda frames: encode(tokenizer.params, frames), data.load_split(config, split),
      name=data.cache_prefix(config) + split, max_episodes=max_episodes,
      tokenizer_step=tokenizer.step, cache_dir=cache_dir)


def cut_short(index: int, batch: dict, *, long_every: int, short_len: int) -> dict:
  """Batch ``index`` unchanged if it is a long one, else each window cut into windows of ``short_len``."""
  if long_every and index % long_every == 0:
    return batch
  return {k: v.reshape(v.shape[0] * (v.shape[1] // short_len), short_len, *v.shape[2:])
          for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
  """Dataset windows -> ``shortcut_forcing.dynamics_loss`` inputs (actions shifted into frames)."""
  actions, labelled = dynamics_lib.actions_into_frames(batch["actions"], batch["is_first"])
  return {"latents": batch["latents"].astype(jnp.float32), "actions": actions, "action_mask": labelled}


def heldout_evaluator(config, workdir: str, model, tokenizer: FrozenTokenizer, *, out_dir: str):
  """``rollout_eval.make_evaluate`` over the held-out split, encoded by the frozen tokenizer (or read
  from its latent cache): (dynamics params, step, seed=None) -> metrics."""
  heldout = load_latents(config, workdir, "heldout", tokenizer, max_episodes=0)
  return rollout_eval.make_evaluate(config, model, tokenizer.model, tokenizer.params, heldout,
                                    data.load_split(config, "heldout"), out_dir)


def build(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  d = config.dynamics
  model = models.make_dynamics(config)
  # Read when the stage starts, not when it is built (and never by --dry_run).
  frozen_tokenizer = functools.cache(lambda: load_tokenizer(config, workdir))
  evaluator = functools.cache(lambda: heldout_evaluator(
      config, workdir, model, frozen_tokenizer(), out_dir=stages.stage_dir(workdir, "dynamics")))

  def init_params(rng):
    c = model.config
    latents = jnp.zeros((1, d.window_len, c.num_latents, c.latent_channels))
    zeros = jnp.zeros((1, d.window_len))
    return model.init(rng, latents, zeros, zeros + c.d_min, zeros.astype(jnp.int32))["params"]

  def make_data(process_index, process_count):
    data.ensure_dataset(config)
    steps = load_latents(config, workdir, "train", frozen_tokenizer(), max_episodes=d.train_episodes)
    return pipeline.process_local_batches(
        latents_lib.window_dataset(steps, d.window_len), config.batch_size,
        seed=config.seed, process_index=process_index, process_count=process_count,
        transform=functools.partial(cut_short, long_every=d.long_every, short_len=d.short_window_len))

  def abstract_batch():  # a long batch: the larger of the two shapes the step is compiled for
    t = config.tokenizer
    shape = (config.batch_size, d.window_len)
    return {"latents": jax.ShapeDtypeStruct((*shape, t.num_latents, t.latent_channels), jnp.float16),
            "actions": jax.ShapeDtypeStruct(shape, jnp.int32),
            "is_first": jax.ShapeDtypeStruct(shape, jnp.bool_)}

  def loss(params, batch, rng, ema_params=None):
    return shortcut_forcing.dynamics_loss(model, params, model_inputs(batch), rng,
                                          single_image_fraction=d.single_image_fraction,
                                          teacher_params=ema_params)

  return stages.Stage(name="dynamics", config=config, init_params=init_params, loss=loss,
                      make_data=make_data, abstract_batch=abstract_batch,
                      evaluate=lambda params, step: evaluator()(params, step),
                      loss_reads_ema=d.shortcut and d.bootstrap_teacher == "ema")


def expected_shares(config: ml_collections.ConfigDict) -> dict:
  """``noise_levels.expected_shares`` of the dynamics stage of ``config``: {(tau, d): share}."""
  d = config.dynamics
  return noise_levels.expected_shares(
      k_max=d.k_max, distribution=d.step_distribution if d.shortcut else "d_min",
      context_fraction=d.context_fraction, next_frame_fraction=d.next_frame_fraction,
      context_signal=config.rollout.context_signal,
      window_lens=noise_levels.window_shares(d.window_len, d.short_window_len, d.long_every))


# --- loading a trained run ------------------------------------------------------------------------

class TrainedRun(NamedTuple):
  """A trained world-model run, built as it was trained."""
  config: ml_collections.ConfigDict
  tokenizer: FrozenTokenizer
  dynamics: dynamics_lib.Dynamics
  step: int                 # of the dynamics checkpoint
  params: Any               # the dynamics parameters


def load_run(config: ml_collections.ConfigDict, workdir: str) -> TrainedRun:
  """The latest checkpoints of the run in ``workdir``, computing in ``config.compute_dtype``. The
  tokenizer is the one the run's dynamics read (a run whose dynamics read another run's tokenizer
  finds it there) unless ``stages.dynamics.reads_from`` names one."""
  # The tokenizer section too: the dynamics model's sizes come from the latents it was trained on.
  trained = stages.load_stage(config, workdir, "dynamics", sections=("dynamics", "tokenizer"),
                              absent=models.BEFORE_FIELDS)
  saved = config_lib.read_saved_config(trained.directory) or {}
  older_reads = saved.get("dynamics", {}).get("tokenizer_workdir")  # the field's name before stages
  if older_reads and not trained.config.stages.dynamics.reads_from:
    trained.config.stages.dynamics.reads_from = older_reads
  tokenizer = load_tokenizer(trained.config, workdir)
  return TrainedRun(trained.config, tokenizer, models.make_dynamics(trained.config), trained.step,
                    trained.params)


def load_world_model(config: ml_collections.ConfigDict, workdir: str):
  """(tokenizer, tokenizer params, dynamics, dynamics params) of ``load_run``, computing in
  ``rollout.compute_dtype``."""
  run = load_run(models.rollout_config(config), workdir)
  return run.tokenizer.model, run.tokenizer.params, run.dynamics, run.params
