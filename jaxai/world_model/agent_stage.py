"""World model, stage ``agent``: agent finetuning, Dreamer 4's third phase.

The dynamics model gains an agent token per frame carrying a task embedding
(``dynamics.DynamicsConfig.num_tasks``) and the policy, reward and value heads on it
(``agent_heads``). It starts from the dynamics stage's checkpoint (``init_from``: every array
whose path matches; the task embedding and the heads start fresh) and trains on two halves of
each batch, as the paper mixes its data:

* ``video``: uniform windows of recorded play, with the dynamics stage's own shortcut-forcing loss,
  so the world model keeps learning while the heads are fitted;
* ``task``: windows in which the window's task is achieved (``agent_tasks.relevant_starts``; the task
  drawn uniformly among those the split achieves at all), with behaviour cloning of the recorded
  actions and reward prediction, both at the multi-token-prediction distances n = 0..L
  (``agent_heads.agent_targets``): -sum_n log p(a_{t+n} | h_t) - sum_n log p(r_{t+n} | h_t), the
  reward a symexp two-hot distribution (``jaxai.rl.twohot``). These frames enter as a rollout's
  context does (signal ``rollout.context_signal``, step d_min), which is how the agent sees them
  when it acts, in imagination and in the real game.

Every term (video, BC, reward) is divided by a running estimate of its RMS, the paper's loss
normalisation (``tokenizer_loss.running_rms_normalize``, with the memory ``agent.loss_rms_decay``),
so none dominates by its scale. The
behaviour comes from all four skill levels of the dataset, as the paper used all contractor data.

Which run it reads: ``stages.agent.reads_from`` (default this run's workdir) holds the dynamics
stage, and the tokenizer is the one that dynamics read. The stage trains in ``workdir/agent``.

Evaluation (held-out split, fixed windows of every task that it achieves): policy top-1 against
the recorded action (beside the share of the most frequent action in those windows, the top-1 of
always taking it) and its NLL at n = 0 and n = L, and the reward head's decoded prediction at
n = 0: recall of the unlock steps (prediction >= 0.5 where the reward is 1), its false-positive
rate on the other steps, the mean prediction on each of the two kinds of steps, and the mean
absolute error.
"""
import functools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxai import config_lib, stages
from jaxai.craftax import dataset as craftax_dataset
from jaxai.data import pipeline
from jaxai.rl import twohot
from jaxai.world_model import agent_heads, agent_tasks, data
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import dynamics_stage
from jaxai.world_model import latents as latents_lib
from jaxai.world_model import models, noise_levels, shortcut_forcing, tokenizer_loss

TERMS = ("video", "bc", "reward")
TASK_FIELDS = ("latents", "actions", "is_first", "is_last")


def validate(config: ml_collections.ConfigDict) -> None:
  a = config.agent
  try:
    agent_tasks.check_tasks(tuple(a.tasks))
  except ValueError as e:
    raise config_lib.ConfigError("agent.tasks", str(e)) from None
  config_lib.check_positive(a, "head_hidden", "head_layers", "twohot_bins", "window_len", "eval_windows",
                            prefix="agent.")
  config_lib.check_at_least(a, 0, "mtp_length", prefix="agent.")
  config_lib.check(a.mtp_length < a.window_len, "agent.mtp_length",
                   f"{a.mtp_length} must be below agent.window_len={a.window_len}")
  config_lib.check_range(a, "loss_rms_decay", 0.0, 1.0, high_open=True, prefix="agent.")


class AgentWindows(grain.sources.RandomAccessDataSource):
  """Example i: ``video``, uniform window i of the split, and ``task``, a window in which a task is
  achieved, with that task (``task``) and its reward per step (``reward``). The task and its window
  are drawn from (seed, i), so an example is the same whatever order it is read in.

  ``steps``: latents (``latents_lib.LatentSteps``) or any steps with the same per-step fields and
  ``read_steps(start, count, fields)``; a task window holds ``fields``. ``video=False`` leaves the
  video half out (``pixel_bc``, which trains on task windows alone)."""

  def __init__(self, steps: latents_lib.LatentSteps, tasks, window_len: int, seed: int, *,
               fields=TASK_FIELDS, video: bool = True):
    self.steps, self.window_len, self.seed, self.fields, self.video = steps, window_len, seed, fields, video
    self.starts = craftax_dataset.window_starts(steps.episode_offsets, window_len)
    if len(self.starts) == 0:
      raise ValueError(f"no episode has {window_len} steps")
    self.rewards = agent_tasks.task_rewards(tasks, steps.rewards, steps.achievements, steps.is_first)
    events = agent_tasks.task_events(tasks, steps.achievements, steps.is_first)
    self.task_starts = agent_tasks.relevant_starts(events, self.starts, window_len)
    self.available = np.asarray([k for k, s in enumerate(self.task_starts) if len(s)], np.int64)
    if len(self.available) == 0:
      raise ValueError(f"no window of {window_len} steps achieves any of the tasks {', '.join(tasks)}")

  def __len__(self) -> int:
    return len(self.starts)

  def task_window(self, task: int, start: int) -> dict:
    window = self.steps.read_steps(start, self.window_len, self.fields)
    return {**window, "reward": self.rewards[start:start + self.window_len, task],
            "task": np.int32(task)}

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    task = int(self.available[rng.integers(len(self.available))])
    start = int(self.task_starts[task][rng.integers(len(self.task_starts[task]))])
    example = {"task": self.task_window(task, start)}
    if self.video:
      example["video"] = self.steps.read_steps(int(self.starts[index]), self.window_len)
    return example


def task_outputs(model, params, task_batch, rng, *, context_signal: float) -> dict:
  """The dynamics outputs (``tasks`` given: latents, agent, policy, reward, value) of task windows
  whose frames are noised as a rollout's context is."""
  c = model.config
  z = task_batch["latents"].astype(jnp.float32)
  b, t = z.shape[:2]
  tau = jnp.full((b, t), noise_levels.context_signal_level(context_signal, c.k_max), jnp.float32)
  noisy = shortcut_forcing.corrupt(z, jax.random.normal(rng, z.shape, jnp.float32), tau)
  actions, labelled = dynamics_lib.actions_into_frames(task_batch["actions"], task_batch["is_first"])
  return model.apply({"params": params}, noisy, tau, jnp.full((b, t), c.d_min), actions, labelled,
                     tasks=task_batch["task"])


def head_terms(outputs: dict, task_batch: dict, mtp_length: int) -> dict:
  """Per-entry BC and reward NLL [B, T, L + 1] and their masks."""
  is_first = task_batch["is_first"]
  # The recorded action after an episode's last frame is a placeholder (NOOP): not a target.
  actions, action_mask = agent_heads.agent_targets(task_batch["actions"], ~task_batch["is_last"], is_first,
                                                   mtp_length)
  rewards, reward_mask = agent_heads.agent_targets(task_batch["reward"], jnp.ones_like(is_first), is_first,
                                                   mtp_length)
  log_p = jax.nn.log_softmax(outputs["policy"].astype(jnp.float32))
  bc = -jnp.take_along_axis(log_p, actions[..., None], axis=-1)[..., 0]
  return {"bc": bc, "bc_mask": action_mask, "reward": twohot.loss(outputs["reward"], rewards),
          "reward_mask": reward_mask, "actions": actions, "rewards": rewards}


def _masked_mean(x, mask, axis=None):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def agent_loss(model, params, batch, rng, *, loss_state, single_image_fraction: float,
               context_signal: float, rms_decay: float = tokenizer_loss.RMS_DECAY):
  """(loss, (metrics, RMS state)) of one batch {'video': dynamics window, 'task': task window}."""
  video_rng, task_rng = jax.random.split(rng)
  video_loss, video_metrics = shortcut_forcing.dynamics_loss(
      model, params, dynamics_stage.model_inputs(batch["video"]), video_rng,
      single_image_fraction=single_image_fraction)
  outputs = task_outputs(model, params, batch["task"], task_rng, context_signal=context_signal)
  h = head_terms(outputs, batch["task"], model.config.heads.mtp_length)
  per_window = {"video": video_loss[None],
                "bc": _masked_mean(h["bc"], h["bc_mask"], axis=(1, 2)),
                "reward": _masked_mean(h["reward"], h["reward_mask"], axis=(1, 2))}
  normalized, rms, loss_state = tokenizer_loss.running_rms_normalize(per_window, loss_state, decay=rms_decay)
  objective = sum(normalized.values())
  raw = sum(jnp.mean(v) for v in per_window.values())
  loss = objective + jax.lax.stop_gradient(raw - objective)  # value: the raw sum; gradient: normalised
  top1 = outputs["policy"][:, :, 0].argmax(-1) == h["actions"][:, :, 0]
  metrics = {**{f"video/{k}": v for k, v in video_metrics.items()},
             "bc_nll": jnp.mean(per_window["bc"]), "reward_nll": jnp.mean(per_window["reward"]),
             "bc_top1": _masked_mean(top1, h["bc_mask"][:, :, 0]),
             **{f"rms/{k}": v for k, v in rms.items()}}
  return loss, (metrics, loss_state)


def heldout_examples(source: AgentWindows, count: int) -> dict:
  """About ``count`` fixed held-out task windows, spread over every task the split achieves."""
  per_task = max(1, count // len(source.available))
  windows = []
  for task in source.available:
    starts = source.task_starts[task]
    windows += [source.task_window(int(task), int(starts[i]))
                for i in pipeline.evenly_spaced(len(starts), per_task)]
  return jax.tree.map(lambda *x: np.stack(x), *windows)


def make_evaluate(model, examples: dict, *, context_signal: float, batch_size: int = 16):
  """(params, step) -> held-out metrics of the heads on ``examples`` (``heldout_examples``)."""
  mtp = model.config.heads.mtp_length

  @jax.jit
  def sums(params, batch, rng):
    outputs = task_outputs(model, params, batch, rng, context_signal=context_signal)
    h = head_terms(outputs, batch, mtp)
    correct = outputs["policy"].argmax(-1) == h["actions"]
    predicted = twohot.decode(outputs["reward"][:, :, 0])
    target = h["rewards"][:, :, 0]
    unlock = target >= 0.5
    ones = lambda m: jnp.sum(m.astype(jnp.float32))
    return {"bc_top1_n0": ones(correct[:, :, 0] & h["bc_mask"][:, :, 0]),
            "bc_top1_nL": ones(correct[:, :, mtp] & h["bc_mask"][:, :, mtp]),
            "bc_nll_n0": jnp.sum(h["bc"][:, :, 0] * h["bc_mask"][:, :, 0]),
            "bc_nll_nL": jnp.sum(h["bc"][:, :, mtp] * h["bc_mask"][:, :, mtp]),
            "count_n0": ones(h["bc_mask"][:, :, 0]), "count_nL": ones(h["bc_mask"][:, :, mtp]),
            "reward_hits": ones(unlock & (predicted >= 0.5)), "unlocks": ones(unlock),
            "false_alarms": ones(~unlock & (predicted >= 0.5)), "others": ones(~unlock),
            "reward_abs_error": jnp.sum(jnp.abs(predicted - target)), "steps": ones(jnp.ones_like(unlock)),
            "reward_at_unlocks": jnp.sum(jnp.where(unlock, predicted, 0.0)),
            "reward_elsewhere": jnp.sum(jnp.where(unlock, 0.0, predicted)),
            "action_counts": jnp.zeros(model.config.num_actions).at[h["actions"][:, :, 0]].add(
                h["bc_mask"][:, :, 0].astype(jnp.float32))}

  def evaluate(params, step):
    n = len(examples["task"])
    total = None
    for begin in range(0, n, batch_size):
      batch = jax.tree.map(lambda x: x[begin:begin + batch_size], examples)
      part = jax.device_get(sums(params, batch, jax.random.key(begin)))
      total = part if total is None else jax.tree.map(np.add, total, part)
    ratio = lambda a, b: float(total[a] / max(total[b], 1.0))
    return {"eval/bc_top1": ratio("bc_top1_n0", "count_n0"),
            # Always the most frequent action of these windows: the baseline top-1 must beat.
            "eval/bc_top1_majority": float(total["action_counts"].max() / max(total["count_n0"], 1.0)),
            f"eval/bc_top1_n{mtp}": ratio("bc_top1_nL", "count_nL"),
            "eval/bc_nll": ratio("bc_nll_n0", "count_n0"), f"eval/bc_nll_n{mtp}": ratio("bc_nll_nL", "count_nL"),
            "eval/reward_recall": ratio("reward_hits", "unlocks"),
            "eval/reward_false_positive_rate": ratio("false_alarms", "others"),
            "eval/reward_abs_error": ratio("reward_abs_error", "steps"),
            # Below the 0.5 of recall, does the prediction still rise where the task is achieved?
            "eval/reward_mean_at_unlocks": ratio("reward_at_unlocks", "unlocks"),
            "eval/reward_mean_elsewhere": ratio("reward_elsewhere", "others"),
            "eval/heldout_windows": n}

  return evaluate


def init_agent_params(model, rng, frames: int = 1):
  """The agent dynamics model's parameters (boxed with their logical axes), traced on ``frames``
  zero frames of one sequence."""
  c = model.config
  zeros = jnp.zeros((1, frames))
  return model.init(rng, jnp.zeros((1, frames, c.num_latents, c.latent_channels)), zeros, zeros + c.d_min,
                    zeros.astype(jnp.int32), tasks=jnp.zeros((1,), jnp.int32))["params"]


def world_model_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """``config`` with the dynamics and tokenizer sections of the dynamics run it starts from."""
  directory = stages.stage_dir(stages.reads_dir(config, workdir), "dynamics")
  return stages.as_trained(config, directory, ("dynamics", "tokenizer"), models.BEFORE_FIELDS)


def build(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  a = config.agent
  # The stage's config.json then holds the model as trained, which is how it is loaded again.
  config = trained = world_model_config(config, workdir)
  model = models.make_dynamics(trained, agent=True)
  reads = stages.reads_dir(config, workdir)
  # The tokenizer the dynamics read, its latents with rewards and achievements.
  run = functools.cache(lambda: dynamics_stage.load_run(trained, reads))

  def split_latents(split: str, max_episodes: int):
    r = run()
    return dynamics_stage.load_latents(r.config, reads, split, r.tokenizer, max_episodes=max_episodes)

  init_params = functools.partial(init_agent_params, model, frames=a.window_len)

  def make_data(process_index, process_count):
    data.ensure_dataset(config)
    steps = split_latents("train", trained.dynamics.train_episodes)
    return pipeline.process_local_batches(
        grain.MapDataset.source(AgentWindows(steps, tuple(a.tasks), a.window_len, config.seed)),
        config.batch_size, seed=config.seed, process_index=process_index, process_count=process_count)

  def abstract_batch():
    t = trained.tokenizer
    shape = (config.batch_size, a.window_len)
    window = lambda: {"latents": jax.ShapeDtypeStruct((*shape, t.num_latents, t.latent_channels), jnp.float16),
                      "actions": jax.ShapeDtypeStruct(shape, jnp.int32),
                      "is_first": jax.ShapeDtypeStruct(shape, jnp.bool_)}
    return {"video": window(), "task": {**window(), "is_last": jax.ShapeDtypeStruct(shape, jnp.bool_),
                                        "reward": jax.ShapeDtypeStruct(shape, jnp.float32),
                                        "task": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}}

  evaluator = functools.cache(lambda: make_evaluate(
      model, heldout_examples(AgentWindows(split_latents("heldout", 0), tuple(a.tasks), a.window_len,
                                           config.seed), a.eval_windows),
      context_signal=trained.rollout.context_signal))

  loss = functools.partial(agent_loss, model, single_image_fraction=trained.dynamics.single_image_fraction,
                           context_signal=trained.rollout.context_signal, rms_decay=a.loss_rms_decay)
  return stages.Stage(name="agent", config=config, init_params=init_params, loss=loss,
                      make_data=make_data, abstract_batch=abstract_batch,
                      evaluate=lambda params, step: evaluator()(params, step),
                      init_loss_state=lambda: tokenizer_loss.init_rms_state(TERMS))
