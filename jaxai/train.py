"""The training loop shared by every task: sharded init, one jitted step, checkpoints, metrics.

The step is a pure function ``(state, batch) -> (state, metrics)`` jitted once with explicit
shardings and the state donated. The state is ``{'step', 'params', 'opt_state'}`` plus
``'loss_state'`` for tasks whose loss carries running statistics (``Task.init_loss_state``); its
shardings come from the logical axis names the model gives its parameters and the config's rules
table (the loss state is small and replicated).
"""
import contextlib
import json
import math
import os
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from jaxai import checkpointing, config_lib, host, metrics as metrics_lib, optimizer, sharding
from jaxai.tasks import Task


class NonFiniteLoss(RuntimeError):
  pass


def _split_microbatches(batch, num: int):
  # Micro-batch a takes rows a, a+num, a+2*num, ...: with the batch dimension sharded in
  # contiguous blocks, every device then holds an equal share of every micro-batch.
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule):
  config = task.config
  base_rng = jax.random.key(config.seed)
  accum = config.grad_accum_steps
  stateful = task.init_loss_state is not None
  if stateful:  # (params, loss_state, batch, rng) -> (loss, (metrics, loss_state))
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  else:  # the same signature around a stateless loss, so the step below has one form
    def stateless(params, loss_state, batch, rng):
      loss, metrics = task.loss(params, batch, rng)
      return loss, (metrics, loss_state)
    grad_fn = jax.value_and_grad(stateless, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    params = state["params"]
    loss_state = state.get("loss_state", {})
    if accum == 1:
      (loss, (aux, loss_state)), grads = grad_fn(params, loss_state, batch, rng)
    else:
      # Micro-batches run in sequence, so the loss state passes through each of them in turn.
      def micro_step(carry, xs):
        sums, loss_state = carry
        micro_batch, index = xs
        (loss, (aux, loss_state)), grads = grad_fn(params, loss_state, micro_batch,
                                                   jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, sums, (loss, aux, grads)), loss_state), None
      (loss, (aux, _)), grads = jax.eval_shape(grad_fn, params, loss_state, batch, rng)
      zeros = jax.tree.map(jnp.zeros_like, (loss, aux, grads))
      (sums, loss_state), _ = jax.lax.scan(
          micro_step, (zeros, loss_state), (_split_microbatches(batch, accum), jnp.arange(accum)))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    if stateful:
      new_state["loss_state"] = loss_state
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "learning_rate": schedule(state["step"]), **aux}
    return new_state, step_metrics

  return train_step


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


def _strip_boxes(tree):
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


def _config_changes(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Why a checkpoint may not fit this run: the fields changed since the run's config.json."""
  saved = config_lib.read_saved_config(workdir)
  changed = config_lib.changed_fields(saved, config) if saved is not None else []
  return f" (this config differs from the checkpoint's config.json in {'; '.join(changed)})" if changed else ""


def train(task: Task, workdir: str) -> dict:
  """Trains (or resumes) ``task`` in ``workdir``; returns the last logged metrics."""
  config = task.config
  workdir = os.path.join(workdir, task.subdir) if task.subdir else workdir
  is_chief = jax.process_index() == 0
  mesh = sharding.make_mesh(config_lib.resolve_mesh_shape(config.mesh, jax.device_count()))
  rules = tuple(tuple(r) for r in config.sharding_rules)
  schedule = optimizer.learning_rate_schedule(config.optimizer, config.total_steps)
  tx = optimizer.make_optimizer(config.optimizer, config.total_steps)

  def init_boxed_state(rng):
    params = task.init_params(rng)  # optax maps over the boxes, so moments keep the names too
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if task.init_loss_state is not None:
      state["loss_state"] = task.init_loss_state()
    return state

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init_rng = jax.random.fold_in(jax.random.key(config.seed), -1 % 2**31)
    boxed = jax.eval_shape(init_boxed_state, init_rng)
    state_shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract_state = _strip_boxes(boxed)
    sharding.check_divisible(abstract_state, state_shardings, mesh)

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    data_iter = iter(task.make_data(jax.process_index(), jax.process_count()))
    start_step = ckpt.latest_step() or 0
    if start_step:
      try:
        state = ckpt.restore(start_step, checkpointing.abstract_like(abstract_state, state_shardings),
                             data_iter)
      except checkpointing.CheckpointCorrupt as e:
        raise checkpointing.CheckpointCorrupt(f"{e}{_config_changes(workdir, config)}") from e
      print(f"resumed from {ckpt.directory}/{start_step}", file=sys.stderr, flush=True)
    else:
      state = jax.jit(lambda r: nn.unbox(init_boxed_state(r)), out_shardings=state_shardings)(init_rng)
    if is_chief:
      config_lib.write_saved_config(workdir, config)
      num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))
      print(f"{task.name}: {num_params:,} parameters, mesh {dict(mesh.shape)}, "
            f"{jax.device_count()} devices, {jax.process_count()} processes; host {host.summary()}",
            file=sys.stderr, flush=True)

    writer = metrics_lib.MetricsWriter(workdir, enabled=is_chief, resume_step=start_step)
    progress = metrics_lib.Progress(config.total_steps, start_step, enabled=is_chief)
    step_fn = jax.jit(make_train_step(task, tx, schedule), donate_argnums=0,
                      out_shardings=(state_shardings, sharding.replicated(mesh)))
    last_logged, pending = {}, None
    end_step = config.total_steps
    if config.max_steps_per_run:
      end_step = min(end_step, start_step + config.max_steps_per_run)
    try:
      with _stop_on_sigterm() as stop:
        for step in range(start_step + 1, end_step + 1):
          batch = sharding.global_batch_from_local(next(data_iter), mesh, rules)
          state, step_metrics = step_fn(state, batch)
          if pending is not None:  # check the previous step while this one runs
            _check_finite(*pending, ckpt)
          pending = (step, step_metrics)
          last = step == end_step or stop["stop"]
          evaluate = task.evaluate is not None and (
              step == config.total_steps or (config.eval_every and step % config.eval_every == 0))
          if step % config.log_every == 0 or last or evaluate:
            values = _check_finite(step, step_metrics, ckpt)
            if evaluate:
              values.update(task.evaluate(state["params"], step))
            values["steps_per_sec"] = progress.update(step, {k: values[k] for k in ("loss",) if k in values})
            writer.write(step, values)
            last_logged = {"step": step, **values}
          if step % config.checkpoint_every == 0 or last:
            _check_finite(step, step_metrics, ckpt)
            ckpt.save(step, state, data_iter)
          if stop["stop"]:
            print(f"SIGTERM: checkpointed step {step}, exiting", file=sys.stderr, flush=True)
            break
    finally:
      ckpt.close()
      writer.close()
  return last_logged


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
