"""World model, stage ``dynamics``: shortcut forcing on frozen-tokenizer latents of recorded play.

The tokenizer is read, frozen, from ``<tokenizer_workdir>/tokenizer/checkpoints`` (its latest
step; ``dynamics.tokenizer_workdir`` defaults to this run's workdir, which ``stage=all`` has just
filled). The recorded episodes are encoded once into a latent cache next to that checkpoint
(``jaxai.world_model.latents``), so several dynamics runs (the shortcut model and its ablation)
share it. Training trains in ``workdir/dynamics``.

Batches alternate lengths as in the paper: every ``long_every``-th batch holds ``batch_size``
windows of ``window_len`` frames, the others the same frames cut into windows of
``short_window_len`` (``batch_size * window_len / short_window_len`` of them); a fraction
``single_image_fraction`` of the sequences is trained with no time context. Trainer fields of this
stage (batch, steps, schedule, eval cadence) come from ``dynamics_train``, so that ``stage=all``
trains each stage with its own.

Evaluation: ``jaxai.world_model.rollout_eval``.
"""
import functools
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxai import checkpointing, config_lib
from jaxai.data import pipeline
from jaxai.tasks import Task
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import latents as latents_lib
from jaxai.world_model import shortcut_forcing

STAGE_TRAINER_FIELDS = ("batch_size", "total_steps", "eval_every", "checkpoint_every", "log_every")


def validate(config: ml_collections.ConfigDict) -> None:
  if config.data.source != "craftax":
    raise config_lib.ConfigError("data.source", f"the dynamics stage trains on recorded play with "
                                 f"actions: needs craftax, got {config.data.source!r}")
  validate_model(config)


def validate_model(config: ml_collections.ConfigDict) -> None:
  """The dynamics, rollout and dynamics_train fields, whatever the data."""
  d = config.dynamics
  config_lib.validate_attention_heads("dynamics", d)
  for field in ("width", "num_layers", "spatial_tokens", "num_registers", "window_len",
                "short_window_len", "mlp_hidden"):
    if d[field] <= 0:
      raise config_lib.ConfigError(f"dynamics.{field}", f"must be positive, got {d[field]}")
  values = config.tokenizer.num_latents * config.tokenizer.latent_channels
  if values % d.spatial_tokens:
    raise config_lib.ConfigError("dynamics.spatial_tokens", f"the tokenizer's {values} latent values "
                                 f"per frame do not split into {d.spatial_tokens} tokens")
  if d.k_max < 1 or d.k_max & (d.k_max - 1):
    raise config_lib.ConfigError("dynamics.k_max", f"must be a power of two, got {d.k_max}")
  if not 1 <= d.time_every <= d.num_layers:
    raise config_lib.ConfigError("dynamics.time_every", f"must be in [1, num_layers={d.num_layers}]")
  if d.layout not in ("factorised", "full"):
    raise config_lib.ConfigError("dynamics.layout", f"must be factorised or full, got {d.layout!r}")
  if d.window_len % d.short_window_len:
    raise config_lib.ConfigError("dynamics.short_window_len", f"{d.short_window_len} does not divide "
                                 f"window_len={d.window_len}")
  if d.long_every < 0:
    raise config_lib.ConfigError("dynamics.long_every", f"must be >= 0, got {d.long_every}")
  if d.bootstrap_fraction > 1.0 or (d.bootstrap_fraction < 0 and d.bootstrap_fraction != -1):
    raise config_lib.ConfigError("dynamics.bootstrap_fraction", f"must be in [0, 1], or -1 for the "
                                 f"paper's uniform step sizes, got {d.bootstrap_fraction}")
  if not 0.0 <= d.context_fraction < 1.0:
    raise config_lib.ConfigError("dynamics.context_fraction", f"must be in [0, 1), got {d.context_fraction}")
  if not 0.0 <= d.next_frame_fraction < 1.0:
    raise config_lib.ConfigError("dynamics.next_frame_fraction",
                                 f"must be in [0, 1), got {d.next_frame_fraction}")
  if not 0.0 <= d.single_image_fraction <= 1.0:
    raise config_lib.ConfigError("dynamics.single_image_fraction",
                                 f"must be in [0, 1], got {d.single_image_fraction}")
  r = config.rollout
  for field in ("num_steps", "baseline_steps"):
    if r[field] < 1 or r[field] & (r[field] - 1) or r[field] > d.k_max:
      raise config_lib.ConfigError(f"rollout.{field}", f"must be a power of two in [1, "
                                   f"dynamics.k_max={d.k_max}], got {r[field]}")
  if r.context_frames + r.horizon > d.window_len:
    raise config_lib.ConfigError("rollout.horizon", f"context_frames + horizon = {r.context_frames} + "
                                 f"{r.horizon} exceeds the trained window_len={d.window_len}")
  if r.context_frames < 1 or r.horizon < 1:
    raise config_lib.ConfigError("rollout.horizon", "context_frames and horizon must be positive")
  if r.compute_dtype not in ("float32", "bfloat16"):
    raise config_lib.ConfigError("rollout.compute_dtype", f"must be float32 or bfloat16, got {r.compute_dtype!r}")
  if not 0.0 <= r.context_signal <= 1.0:
    raise config_lib.ConfigError("rollout.context_signal", f"must be in [0, 1], got {r.context_signal}")
  validate_stage_trainer(config)


def validate_stage_trainer(config: ml_collections.ConfigDict) -> None:
  t = config.dynamics_train
  for field in STAGE_TRAINER_FIELDS:
    minimum = 0 if field == "eval_every" else 1
    if t[field] < minimum:
      raise config_lib.ConfigError(f"dynamics_train.{field}", f"must be >= {minimum}, got {t[field]}")
  if t.learning_rate <= 0:
    raise config_lib.ConfigError("dynamics_train.learning_rate", f"must be positive, got {t.learning_rate}")


def tokenizer_checkpoints(config, workdir: str) -> str:
  return os.path.join(config.dynamics.tokenizer_workdir or workdir, "tokenizer", "checkpoints")


def stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose trainer fields are those of ``dynamics_train``."""
  c = ml_collections.ConfigDict(config.to_dict())
  t = config.dynamics_train
  for field in STAGE_TRAINER_FIELDS:
    c[field] = t[field]
  c.optimizer.learning_rate = t.learning_rate
  c.optimizer.warmup_steps = t.warmup_steps
  return c


def make_dynamics(config: ml_collections.ConfigDict) -> dynamics_lib.Dynamics:
  from jaxai.world_model import task as task_lib  # pylint: disable=g-import-not-at-top
  d, t = config.dynamics, config.tokenizer
  return dynamics_lib.Dynamics(dynamics_lib.DynamicsConfig(
      block=task_lib.block_config(config, d), num_layers=d.num_layers, num_latents=t.num_latents,
      latent_channels=t.latent_channels, spatial_tokens=d.spatial_tokens, num_registers=d.num_registers,
      k_max=d.k_max, time_every=d.time_every, layout=d.layout, shortcut=d.shortcut,
      bootstrap_fraction=None if d.bootstrap_fraction < 0 else d.bootstrap_fraction,
      previous_frame=d.previous_frame, context_fraction=d.context_fraction,
      context_signal=config.rollout.context_signal, next_frame_fraction=d.next_frame_fraction))


def load_tokenizer(config, workdir: str):
  """(tokenizer model, checkpoint step, params) of the frozen tokenizer this stage reads.

  The model is built from the ``tokenizer`` section the tokenizer was trained with (its
  config.json), not from ``config``'s: some switches (``aligned_inputs``) add no parameter, so a
  checkpoint would load into the wrong model without an error.
  """
  from jaxai.world_model import task as task_lib  # pylint: disable=g-import-not-at-top
  checkpoints = tokenizer_checkpoints(config, workdir)
  step, params = checkpointing.restore_params(checkpoints)
  config = _section_as_trained(config, os.path.dirname(checkpoints), "tokenizer")
  return task_lib.make_tokenizer(config), step, params


def _section_as_trained(config: ml_collections.ConfigDict, stage_dir: str, section: str,
                        keep: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``section`` is the one the stage in ``stage_dir`` was trained with
  (its config.json), but for the fields in ``keep`` and those the file does not have (added since);
  ``config`` itself if the file is missing. A difference is said on stderr."""
  saved = (config_lib.read_saved_config(stage_dir) or {}).get(section)
  if not isinstance(saved, dict):
    return config
  now = config[section].to_dict()
  saved = {**now, **saved, **{k: now[k] for k in keep}}
  changed = config_lib.changed_fields({section: saved}, ml_collections.ConfigDict({section: now}))
  if changed:
    print(f"{section}: built as trained ({stage_dir}/config.json), not as this "
          f"config says ({'; '.join(changed)})", file=sys.stderr, flush=True)
  config = ml_collections.ConfigDict(config.to_dict())
  config[section] = ml_collections.ConfigDict(saved)
  return config


def encoder_fn(tokenizer):
  """Jitted (params, uint8 frames [B, H, W, C]) -> latents [B, L, C], each frame on its own."""
  return jax.jit(lambda params, frames: tokenizer.apply({"params": params}, frames[:, None],
                                                        method=tokenizer.encode)[:, 0])


def load_latents(config, workdir: str, split: str, tokenizer, tokenizer_step: int, tokenizer_params,
                 max_episodes: int) -> latents_lib.LatentSteps:
  encode = encoder_fn(tokenizer)
  return latents_lib.load_or_encode(
      lambda frames: encode(tokenizer_params, frames), data_dir=config.data.dir,
      variant=config.data.variant, split=split, max_episodes=max_episodes,
      tokenizer_step=tokenizer_step, cache_dir=os.path.join(os.path.dirname(tokenizer_checkpoints(
          config, workdir)), "latents"))


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


def heldout_evaluator(config, workdir: str, model, tokenizer, tokenizer_step: int, tokenizer_params, *,
                      out_dir: str):
  """``rollout_eval.make_evaluate`` over the held-out split, encoded by the frozen tokenizer (or read
  from its latent cache): (dynamics params, step, seed=None) -> metrics."""
  from jaxai.world_model import rollout_eval  # pylint: disable=g-import-not-at-top
  heldout = load_latents(config, workdir, "heldout", tokenizer, tokenizer_step, tokenizer_params,
                         max_episodes=0)
  return rollout_eval.make_evaluate(config, model, tokenizer, tokenizer_params, heldout, out_dir)


def dynamics_stage(config: ml_collections.ConfigDict, workdir: str) -> Task:
  d = config.dynamics
  model = make_dynamics(config)
  cache = {}

  def frozen_tokenizer():  # read when the stage starts, not when it is built (stage=all trains it first)
    if "tokenizer" not in cache:
      cache["tokenizer"] = load_tokenizer(config, workdir)
    return cache["tokenizer"]

  def init_params(rng):
    c = model.config
    latents = jnp.zeros((1, d.window_len, c.num_latents, c.latent_channels))
    zeros = jnp.zeros((1, d.window_len))
    return model.init(rng, latents, zeros, zeros + c.d_min, zeros.astype(jnp.int32))["params"]

  def make_data(process_index, process_count):
    steps = load_latents(config, workdir, "train", *frozen_tokenizer(), max_episodes=d.train_episodes)
    return pipeline.process_local_batches(
        latents_lib.window_dataset(steps, d.window_len), config.dynamics_train.batch_size,
        seed=config.seed, process_index=process_index, process_count=process_count,
        transform=functools.partial(cut_short, long_every=d.long_every, short_len=d.short_window_len))

  def loss(params, batch, rng):
    return shortcut_forcing.dynamics_loss(model, params, model_inputs(batch), rng,
                                          single_image_fraction=d.single_image_fraction)

  def evaluate(params, step):
    if "evaluate" not in cache:
      cache["evaluate"] = heldout_evaluator(config, workdir, model, *frozen_tokenizer(),
                                            out_dir=os.path.join(workdir, "dynamics"))
    return cache["evaluate"](params, step)

  return Task(name="dynamics", config=stage_config(config), init_params=init_params, loss=loss,
              make_data=make_data, evaluate=evaluate, subdir="dynamics")


def rollout_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the compute dtype of rollouts outside training (``rollout.compute_dtype``)."""
  if config.rollout.compute_dtype == config.compute_dtype:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.compute_dtype = config.rollout.compute_dtype
  return config


def as_trained(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``dynamics`` section is the one the run in ``workdir`` was trained
  with (its dynamics/config.json), to load that run: some fields change what the model computes and
  no parameter shape (``shortcut``: the step size the network is told), so a checkpoint would
  otherwise run as another model without an error. ``dynamics.tokenizer_workdir`` stays
  ``config``'s if it names one, else it is the one the run read."""
  keep = ("tokenizer_workdir",) if config.dynamics.tokenizer_workdir else ()
  return _section_as_trained(config, os.path.join(workdir, "dynamics"), "dynamics", keep=keep)


class TrainedRun(NamedTuple):
  """A trained world-model run, built as it was trained (``as_trained``)."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  tokenizer_step: int
  tokenizer_params: Any
  dynamics: dynamics_lib.Dynamics
  step: int                 # of the dynamics checkpoint
  params: Any               # the dynamics parameters


def load_run(config: ml_collections.ConfigDict, workdir: str) -> TrainedRun:
  """The latest checkpoints of the run in ``workdir``, computing in ``config.compute_dtype``. The
  tokenizer is the one the run was trained on (a run whose dynamics read another run's tokenizer
  finds it there) unless ``dynamics.tokenizer_workdir`` names one."""
  config = as_trained(config, workdir)
  tokenizer, tokenizer_step, tokenizer_params = load_tokenizer(config, workdir)
  step, params = checkpointing.restore_params(os.path.join(workdir, "dynamics", "checkpoints"))
  return TrainedRun(config, tokenizer, tokenizer_step, tokenizer_params, make_dynamics(config), step,
                    params)


def load_world_model(config: ml_collections.ConfigDict, workdir: str):
  """(tokenizer, tokenizer params, dynamics, dynamics params) of ``load_run``, computing in
  ``rollout.compute_dtype``."""
  run = load_run(rollout_config(config), workdir)
  return run.tokenizer, run.tokenizer_params, run.dynamics, run.params
