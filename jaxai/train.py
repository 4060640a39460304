"""The training loop shared by every stage: sharded init, one jitted step, checkpoints, metrics.

The step is a pure function ``(state, batch, frozen) -> (state, metrics)`` jitted once with
explicit shardings and the state donated. The state is ``{'step', 'params', 'opt_state'}`` plus
``'ema_params'`` at ``config.ema_decay`` > 0 (starting at the initial parameters, sharded like
them, ``ema <- decay ema + (1 - decay) params`` after every update; ``ema_warmup`` lowers the decay of
the early updates, ``ema_decay_at``), ``'loss_state'`` for
stages whose loss carries running statistics (``Stage.init_loss_state``) and ``'batch_carry'`` for
those that carry per-example state across updates (``Stage.init_batch_carry``);
its shardings come from the logical axis names the model gives its parameters and the config's
rules table (the loss state is small and replicated, the batch carry sharded like the batch). ``frozen`` holds earlier stages' parameters
(``Stage.frozen``), sharded the same way and never updated or saved.

Randomness: step s uses ``fold_in(key(seed), s)`` for the loss and an independent key for
``Stage.make_batch``, so a resumed run draws exactly what an uninterrupted one did.
"""
import contextlib
import json
import math
import os
import re
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from jaxai import checkpointing, config_lib, host, metrics as metrics_lib, optimizer, sharding, stages
from jaxai.stages import Stage


class NonFiniteLoss(RuntimeError):
  pass


INIT_KEY = -1 % 2**31   # fold_in(key(seed), INIT_KEY): parameter init
BATCH_KEY = -2 % 2**31  # fold_in(fold_in(key(seed), BATCH_KEY), step): Stage.make_batch


def _split_microbatches(batch, num: int):
  # Micro-batch a takes rows a, a+num, a+2*num, ...: with the batch dimension sharded in
  # contiguous blocks, every device then holds an equal share of every micro-batch.
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), batch)


def ema_decay_at(config, step):
  """The moving average's decay for the update made at ``step`` (0-based)."""
  if not config.ema_warmup:
    return config.ema_decay
  return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


def _merge_microbatches(stacked):
  """The inverse of ``_split_microbatches``: [num, B / num, ...] -> [B, ...] in the original rows."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), stacked)


def carried_names(stage: Stage) -> tuple[str, ...]:
  """What the stage's loss carries from update to update, in the order it returns them."""
  return tuple(name for name, init in (("loss_state", stage.init_loss_state),
                                       ("batch_carry", stage.init_batch_carry)) if init is not None)


def _loss_inputs(stage: Stage, frozen, carried: dict, ema_params, step) -> dict:
  inputs = dict(carried)  # loss_state and batch_carry, those the stage has
  if stage.loss_reads_step:
    inputs["step"] = step
  if stage.frozen:
    inputs["frozen"] = frozen
  if stage.loss_reads_ema:
    inputs["ema_params"] = ema_params
  return inputs


def make_train_step(stage: Stage, tx: optax.GradientTransformation, schedule):
  """``(state, batch, frozen) -> (state, metrics)``; ``frozen`` is {} for stages without it."""
  config = stage.config
  accum = config.grad_accum_steps
  names = carried_names(stage)
  pattern = re.compile(config.trainable) if config.trainable else None
  for reads, what in ((stage.loss_reads_ema, "loss reads"), (stage.evaluate_ema, "evaluation scores")):
    config_lib.check(not reads or config.ema_decay > 0, f"stages.{stage.name}.ema_decay",
                     f"the stage's {what} the parameters' moving average: set ema_decay in (0, 1)")

  def loss_fn(params, carried, frozen, batch, rng, ema_params, step):  # (loss, (metrics, carried))
    loss, aux = stage.loss(params, batch, rng, **_loss_inputs(stage, frozen, carried, ema_params, step))
    if not names:
      return loss, (aux, {})
    metrics, *new = aux
    return loss, (metrics, dict(zip(names, new)))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch, frozen):
    step = state["step"]
    base_rng = jax.random.key(config.seed)  # made in the trace: nothing runs eagerly on the devices
    batch_base_rng = jax.random.fold_in(base_rng, BATCH_KEY)
    rng = jax.random.fold_in(base_rng, step)
    params = state["params"]
    ema_params = state.get("ema_params")
    carried = {name: state[name] for name in names}
    if stage.make_batch is not None:
      batch = stage.make_batch(params, batch, jax.random.fold_in(batch_base_rng, step),
                               **({"frozen": frozen} if stage.frozen else {}))
    if accum == 1:
      (loss, (aux, carried)), grads = grad_fn(params, carried, frozen, batch, rng, ema_params, step)
    else:
      # Micro-batches run in sequence: the loss state passes through each of them in turn, and
      # each gets the batch carry's rows of its batch rows.
      rows = lambda tree: _split_microbatches(tree, accum)  # None (no batch carry) stays None
      def micro_step(carry, xs):
        sums, loss_state = carry
        micro_batch, batch_carry, index = xs
        inputs = {"loss_state": loss_state, "batch_carry": batch_carry}
        (loss, (aux, out)), grads = grad_fn(params, {k: inputs[k] for k in names}, frozen, micro_batch,
                                            jax.random.fold_in(rng, index), ema_params, step)
        return (jax.tree.map(jnp.add, sums, (loss, aux, grads)), out.get("loss_state")), out.get("batch_carry")
      (loss, (aux, _)), grads = jax.eval_shape(grad_fn, params, carried, frozen, batch, rng, ema_params, step)
      zeros = jax.tree.map(jnp.zeros_like, (loss, aux, grads))
      (sums, loss_state), batch_carry = jax.lax.scan(
          micro_step, (zeros, carried.get("loss_state")),
          (rows(batch), rows(carried.get("batch_carry")), jnp.arange(accum)))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, sums)
      merged = {"loss_state": loss_state, "batch_carry": _merge_microbatches(batch_carry)}
      carried = {k: merged[k] for k in names}
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": step + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    if ema_params is not None:
      new_state["ema_params"] = optax.incremental_update(new_state["params"], ema_params,
                                                         step_size=1.0 - ema_decay_at(config, step))
    new_state.update(carried)
    if pattern is not None:  # the norm the optimiser clips: of the trained parameters only
      grads = jax.tree_util.tree_map_with_path(
          lambda path, g: g if pattern.search(optimizer.param_path(path)) else jnp.zeros_like(g), grads)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "learning_rate": schedule(step), **aux}
    return new_state, step_metrics

  return train_step


class Preempted(Exception):
  """SIGTERM stopped a stage after its checkpoint; the run must end there, not go on to the next
  stage on an unfinished one."""


@contextlib.contextmanager
def _stop_on_sigterm():
  """SIGTERM (preemption) asks the loop to checkpoint and exit at the next step boundary."""
  requested = {"stop": False}
  def handler(signum, frame):
    del signum, frame
    requested["stop"] = True
  previous = signal.signal(signal.SIGTERM, handler) if _is_main_thread() else None
  try:
    yield requested
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _is_main_thread():
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def strip_boxes(tree):
  # nn.unbox would also apply the sharding constraint, which is only valid inside a trace.
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _check_finite(step: int, step_metrics: dict, ckpt: checkpointing.Checkpointer) -> dict:
  values = jax.device_get(step_metrics)
  if not math.isfinite(float(values["loss"])):
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else \
        "no checkpoint had been written yet"
    raise NonFiniteLoss(f"loss is {float(values['loss'])} at step {step}; stopped, {kept}")
  return values


def _config_changes(run_dir: str, config: ml_collections.ConfigDict) -> str:
  """Why a checkpoint may not fit this run: the fields changed since the run's config.json."""
  saved = config_lib.read_saved_config(run_dir)
  changed = config_lib.changed_fields(saved, config) if saved is not None else []
  return f" (this config differs from the checkpoint's config.json in {'; '.join(changed)})" if changed else ""


class TrainState:
  """The abstract train state of a stage on a mesh: what init makes and checkpoints hold."""

  def __init__(self, stage: Stage, mesh, rules):
    config = stage.config
    self.tx = optimizer.make_optimizer(config.optimizer, config.total_steps, config.trainable)
    self.schedule = optimizer.learning_rate_schedule(config.optimizer, config.total_steps)
    self.stage = stage
    boxed = jax.eval_shape(self.init_boxed)
    self.shardings = sharding.logical_shardings(boxed, mesh, rules)
    self.abstract = strip_boxes(boxed)
    sharding.check_divisible(self.abstract, self.shardings, mesh)
    if config.trainable:
      labels = optimizer.trainable_labels(self.abstract["params"], config.trainable)
      config_lib.check("train" in jax.tree.leaves(labels), "trainable",
                       f"{config.trainable!r} matches no parameter path")
    self.frozen_shardings, self.abstract_frozen = {}, {}
    for name, frozen in stage.frozen.items():
      boxed_frozen = jax.eval_shape(lambda init=frozen.init_params: init(self.init_rng()))
      self.frozen_shardings[name] = sharding.logical_shardings(boxed_frozen, mesh, rules)
      self.abstract_frozen[name] = checkpointing.abstract_like(strip_boxes(boxed_frozen),
                                                                self.frozen_shardings[name])

  def init_rng(self):
    return jax.random.fold_in(jax.random.key(self.stage.config.seed), INIT_KEY)

  def init_boxed(self):
    params = self.stage.init_params(self.init_rng())  # optax maps over the boxes: moments keep the names
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}
    if self.stage.config.ema_decay > 0:
      state["ema_params"] = params  # the same boxes: sharded like the parameters
    if self.stage.init_loss_state is not None:
      state["loss_state"] = self.stage.init_loss_state()
    if self.stage.init_batch_carry is not None:
      state["batch_carry"] = self.stage.init_batch_carry()  # boxed: sharded like the batch
    return state

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract["params"]))

  def jitted_step(self, mesh):
    return jax.jit(make_train_step(self.stage, self.tx, self.schedule), donate_argnums=0,
                   out_shardings=(self.shardings, sharding.replicated(mesh)))


def _initial_state(train_state: TrainState, workdir: str):
  """A fresh state; with ``stages.<name>.init_from``, parameters whose paths that stage's latest
  checkpoint has start from its values."""
  stage = train_state.stage
  state = jax.jit(lambda: nn.unbox(train_state.init_boxed()), out_shardings=train_state.shardings)()
  source = stage.config.stages[stage.name].init_from
  if not source:
    return state
  directory = os.path.join(stages.reads_dir(stage.config, workdir), source, "checkpoints")
  step, earlier = checkpointing.restore_params(directory)
  flat_earlier = {optimizer.param_path(path): value
                  for path, value in jax.tree_util.tree_flatten_with_path(earlier)[0]}
  taken = []

  def take(path, value, target_sharding):
    key = optimizer.param_path(path)
    if key in flat_earlier and flat_earlier[key].shape == value.shape:
      taken.append(key)
      return jax.device_put(np.asarray(flat_earlier[key], value.dtype), target_sharding)
    return value

  state["params"] = jax.tree_util.tree_map_with_path(take, state["params"],
                                                     train_state.shardings["params"])
  print(f"{stage.name}: {len(taken)} of {len(flat_earlier)} parameter arrays start from "
        f"{directory}/{step}", file=sys.stderr, flush=True)
  return state


def _restore(train_state: TrainState, ckpt: checkpointing.Checkpointer, data_iter, run_dir: str):
  """(state, start step) from the stage's checkpoints: the latest, or ``restore_step``."""
  config, name = train_state.stage.config, train_state.stage.name
  latest = ckpt.latest_step()
  start = config.restore_step or latest
  if not start:
    return None, 0
  steps = ckpt.all_steps()
  config_lib.check(start in steps, f"stages.{name}.restore_step", f"no checkpoint {start} in "
                   f"{ckpt.directory} (there are: {', '.join(map(str, steps)) or 'none'})")
  try:
    state = ckpt.restore(start, checkpointing.abstract_like(train_state.abstract, train_state.shardings),
                         data_iter)
  except checkpointing.CheckpointCorrupt as e:
    older = ckpt.readable_steps(before=start)
    hint = (f"; intact older checkpoints: {', '.join(map(str, older))} (resume from one with "
            f"--config.stages.{name}.restore_step=N, which sets the later ones aside and deletes "
            "nothing)") if older else "; no older checkpoint is intact"
    raise checkpointing.CheckpointCorrupt(f"{e}{_config_changes(run_dir, config)}{hint}") from e
  if start != latest and jax.process_index() == 0:
    for path in ckpt.set_aside_after(start):
      print(f"set aside {path} (a run resumed from step {start} writes its own)", file=sys.stderr,
            flush=True)
  print(f"resumed from {ckpt.directory}/{start}", file=sys.stderr, flush=True)
  return state, start


def load_frozen(train_state: TrainState, workdir: str) -> dict:
  """Each ``Stage.frozen`` entry's latest checkpoint, restored sharded on the stage's mesh."""
  stage = train_state.stage
  out = {}
  for name, frozen in stage.frozen.items():
    directory = os.path.join(stages.reads_dir(stage.config, workdir), frozen.stage, "checkpoints")
    try:
      _, out[name] = checkpointing.restore_params(directory, abstract_params=train_state.abstract_frozen[name])
    except FileNotFoundError as e:
      raise config_lib.ConfigError(f"stages.{stage.name}.reads_from", f"{e}: stage {frozen.stage!r} "
                                   "must be trained first") from None
  return out


def train(stage: Stage, workdir: str) -> dict:
  """Trains (or resumes) ``stage`` in ``workdir/<stage.name>``; returns the last logged metrics.
  Raises ``Preempted`` after checkpointing when SIGTERM arrives."""
  config = stage.config
  run_dir = stages.stage_dir(workdir, stage.name)
  is_chief = jax.process_index() == 0
  mesh = sharding.make_mesh(config_lib.resolve_mesh_shape(config.mesh, jax.device_count()))
  rules = tuple(tuple(r) for r in config.sharding_rules)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_state = TrainState(stage, mesh, rules)
    frozen = load_frozen(train_state, workdir)
    ckpt = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=config.keep_checkpoints)
    data_iter = iter(stage.make_data(jax.process_index(), jax.process_count())) \
        if stage.make_data is not None else None
    state, start_step = _restore(train_state, ckpt, data_iter, run_dir)
    if state is None:
      state = _initial_state(train_state, workdir)
    if is_chief:
      config_lib.write_saved_config(run_dir, config)
      print(f"{stage.name}: {train_state.num_params():,} parameters, mesh {dict(mesh.shape)}, "
            f"{jax.device_count()} devices, {jax.process_count()} processes; host {host.summary()}",
            file=sys.stderr, flush=True)

    writer = metrics_lib.MetricsWriter(run_dir, enabled=is_chief, resume_step=start_step)
    progress = metrics_lib.Progress(config.total_steps, start_step, enabled=is_chief)
    step_fn = train_state.jitted_step(mesh)
    eval_inputs = {"frozen": frozen} if stage.frozen else {}
    last_logged, pending = {}, None
    end_step = config.total_steps
    if config.max_steps_per_run:
      end_step = min(end_step, start_step + config.max_steps_per_run)
    try:
      with _stop_on_sigterm() as stop:
        for step in range(start_step + 1, end_step + 1):
          batch = sharding.global_batch_from_local(next(data_iter), mesh, rules) \
              if data_iter is not None else None
          state, step_metrics = step_fn(state, batch, frozen)
          if pending is not None:  # check the previous step while this one runs
            _check_finite(*pending, ckpt)
          pending = (step, step_metrics)
          last = step == end_step or stop["stop"]
          evaluate = stage.evaluate is not None and (
              step == config.total_steps or (config.eval_every and step % config.eval_every == 0))
          if step % config.log_every == 0 or last or evaluate:
            values = _check_finite(step, step_metrics, ckpt)
            if evaluate:
              values.update(stage.evaluate(state["ema_params" if stage.evaluate_ema else "params"],
                                           step, **eval_inputs))
            values["steps_per_sec"] = progress.update(step, {k: values[k] for k in ("loss",) if k in values})
            writer.write(step, values)
            last_logged = {"step": step, **values}
          if step % config.checkpoint_every == 0 or last or stop["stop"]:  # SIGTERM may come mid-evaluation
            _check_finite(step, step_metrics, ckpt)
            ckpt.save(step, state, data_iter)
          if stop["stop"]:
            raise Preempted(f"{stage.name} checkpointed at step {step} after SIGTERM; the same command resumes it")
    finally:
      ckpt.close()
      writer.close()
  return last_logged


def read_metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
