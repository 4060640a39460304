"""World model, stage ``pixel_bc``: behaviour cloning from pixels without a world model.

The baseline issue 23 measures the agent against: a plain convolutional encoder and a recurrent
policy, trained on the same recorded frames, actions and task windows as the agent's finetuning
(``agent_stage.AgentWindows``: the first ``pixel_bc.train_episodes`` train episodes, by default
the ``dynamics.train_episodes`` the agent's latent cache holds), with the same task embedding and
the same held-out windows for its evaluation. It needs no tokenizer and no dynamics run.

Per frame t: the frame (uint8, scaled to [-0.5, 0.5]) through ``len(channels)`` stride-2 3x3
convolutions with ReLU, flattened, a dense layer of ``hidden``; plus an embedding of the action
that led into the frame (none at an episode's first frame) and of the task; then a GRU over the
frames (its state zeroed at every episode start) and a policy layer over the 17 actions, zero-
initialised so the policy starts uniform as the agent's does. The loss is the NLL of the recorded
action a_t (n = 0 only; the recorded action after an episode's last frame is no target).

Evaluation: held-out top-1 and NLL on exactly the agent stage's held-out task windows (same
tasks, seed and count), beside the top-1 of always taking the windows' most frequent action, so
``eval/bc_top1`` compares with the agent stage's figure of the same name.

``PixelBCPlayer`` plays it in the real game (an ``evaluation.Policy``; ``evaluate_agent
--stage=pixel_bc``): one encoder pass and one GRU step per frame, the GRU state kept per slot for
the whole episode.
"""
import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from jaxai import config_lib, stages
from jaxai.craftax import env as craftax_env
from jaxai.data import pipeline
from jaxai.world_model import agent_player, agent_stage, data, models
from jaxai.world_model import dynamics as dynamics_lib

FIELDS = ("frames", "actions", "is_first", "is_last")  # what a task window holds here
RECORDED = ("actions", "is_first", "is_last", "rewards", "achievements")


def validate(config: ml_collections.ConfigDict) -> None:
  """Its own section; the tasks and windows it shares are checked by ``agent_stage.validate``."""
  p = config.pixel_bc
  config_lib.check(len(p.channels) > 0 and all(int(c) > 0 for c in p.channels), "pixel_bc.channels",
                   f"needs positive channel counts, got {tuple(p.channels)}")
  config_lib.check_positive(p, "hidden", prefix="pixel_bc.")
  config_lib.check_at_least(p, -1, "train_episodes", prefix="pixel_bc.")


@dataclasses.dataclass(frozen=True)
class PixelPolicyConfig:
  channels: tuple[int, ...] = (32, 64, 64, 128)
  hidden: int = 256
  num_tasks: int = 9
  num_actions: int = craftax_env.NUM_ACTIONS


class _GRUStep(nn.Module):
  """One frame of the recurrence: the state zeroed where an episode starts, then a GRU cell."""
  hidden: int

  @nn.compact
  def __call__(self, state, inputs):
    x, first = inputs
    state = jnp.where(first[:, None], 0.0, state)
    state, y = nn.GRUCell(self.hidden, name="cell")(state, x)
    return state, y


class PixelPolicy(nn.Module):
  """(frames uint8 [B, T, 63, 63, 3], actions into them [B, T], labelled [B, T], tasks [B],
  GRU state [B, hidden] or None) -> (policy logits [B, T, 17], state after the last frame).
  ``labelled`` is False where no action led into the frame: an episode's first frame, where the
  GRU state is zeroed too."""
  config: PixelPolicyConfig

  @nn.compact
  def __call__(self, frames, actions, labelled, tasks, state=None):
    c = self.config
    b, t = frames.shape[:2]
    x = frames.reshape(b * t, *frames.shape[2:]).astype(jnp.float32) / 255.0 - 0.5
    for i, channels in enumerate(c.channels):
      x = jax.nn.relu(nn.Conv(channels, (3, 3), strides=(2, 2), name=f"conv_{i}")(x))
    x = jax.nn.relu(nn.Dense(c.hidden, name="encoded")(x.reshape(b, t, -1)))
    previous = nn.Embed(c.num_actions, c.hidden, name="action_embed")(actions) * labelled[..., None]
    task = nn.Embed(c.num_tasks, c.hidden, name="task_embed")(tasks)[:, None]
    x = jax.nn.relu(nn.Dense(c.hidden, name="inputs")(jnp.concatenate(
        [x, previous, jnp.broadcast_to(task, x.shape)], axis=-1)))
    if state is None:
      state = jnp.zeros((b, c.hidden), jnp.float32)
    scan = nn.scan(_GRUStep, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    state, y = scan(c.hidden, name="gru")(state, (x, ~labelled))
    logits = nn.Dense(c.num_actions, kernel_init=nn.initializers.zeros, name="policy")(y)
    return logits, state


def make_model(config: ml_collections.ConfigDict) -> PixelPolicy:
  p = config.pixel_bc
  return PixelPolicy(PixelPolicyConfig(channels=tuple(int(c) for c in p.channels), hidden=p.hidden,
                                       num_tasks=len(config.agent.tasks)))


@dataclasses.dataclass(frozen=True)
class RecordedSteps:
  """The first episodes of a split in memory: frames uint8 [S, 63, 63, 3] and the per-step fields
  the agent's windows read (``RECORDED``), ``episode_offsets`` [E + 1]."""
  frames: np.ndarray
  actions: np.ndarray
  is_first: np.ndarray
  is_last: np.ndarray
  rewards: np.ndarray
  achievements: np.ndarray
  episode_offsets: np.ndarray

  def read_steps(self, start: int, count: int, fields=FIELDS) -> dict[str, np.ndarray]:
    return {name: getattr(self, name)[start:start + count] for name in fields}


def recorded_steps(config: ml_collections.ConfigDict, split: str, max_episodes: int,
                   chunk: int = 4096) -> RecordedSteps:
  """The first ``max_episodes`` episodes (0: all) of ``split`` of ``data.source``."""
  steps = data.load_split(config, split)
  total = len(steps.episodes["length"])
  episodes = total if max_episodes <= 0 else min(max_episodes, total)
  num_steps = int(steps.episode_offsets[episodes])
  parts = [steps.read_steps(s, min(chunk, num_steps - s)) for s in range(0, num_steps, chunk)]
  return RecordedSteps(**{k: np.concatenate([p[k] for p in parts]) for k in ("frames", *RECORDED)},
                       episode_offsets=np.asarray(steps.episode_offsets[:episodes + 1], np.int64))


def _per_step(model, params, batch):
  """Per step of task windows: the NLL of the recorded action, whether it is the policy's most
  likely one, and the mask of steps with a target (the action after an episode's last frame is
  a placeholder)."""
  actions_into, labelled = dynamics_lib.actions_into_frames(batch["actions"], batch["is_first"])
  logits, _ = model.apply({"params": params}, batch["frames"], actions_into, labelled, batch["task"])
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_p, batch["actions"][..., None], axis=-1)[..., 0]
  return nll, logits.argmax(-1) == batch["actions"], ~batch["is_last"]


def pixel_bc_loss(model, params, batch, rng):
  """(NLL of the recorded actions, metrics) of task windows (``AgentWindows``' task half)."""
  del rng
  nll, hits, mask = _per_step(model, params, batch)
  mask = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum(nll * mask) / count
  return loss, {"bc_nll": loss, "bc_top1": jnp.sum(hits * mask) / count}


def make_evaluate(model, examples: dict, batch_size: int = 16):
  """(params, step) -> held-out top-1, NLL and the majority action's top-1 on ``examples``."""

  @jax.jit
  def sums(params, batch):
    nll, hits, mask = _per_step(model, params, batch)
    return {"correct": jnp.sum(hits & mask),
            "nll": jnp.sum(nll * mask), "count": jnp.sum(mask),
            "action_counts": jnp.zeros(model.config.num_actions).at[batch["actions"]].add(mask)}

  def evaluate(params, step):
    del step
    total = None
    for begin in range(0, len(examples["task"]), batch_size):
      part = jax.device_get(sums(params, jax.tree.map(lambda x: x[begin:begin + batch_size], examples)))
      total = part if total is None else jax.tree.map(np.add, total, part)
    count = max(float(total["count"]), 1.0)
    return {"eval/bc_top1": float(total["correct"]) / count, "eval/bc_nll": float(total["nll"]) / count,
            "eval/bc_top1_majority": float(total["action_counts"].max()) / count,
            "eval/heldout_windows": len(examples["task"])}

  return evaluate


def train_episodes(config: ml_collections.ConfigDict) -> int:
  """-1: the episodes the agent's latent cache holds (``dynamics.train_episodes``)."""
  p = config.pixel_bc
  return config.dynamics.train_episodes if p.train_episodes < 0 else p.train_episodes


def build(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  del workdir
  a = config.agent
  model = make_model(config)
  tasks = tuple(a.tasks)

  def init_params(rng):
    zeros = jnp.zeros((1, a.window_len), jnp.int32)
    return model.init(rng, jnp.zeros((1, a.window_len, *models.FRAME_SHAPE), jnp.uint8), zeros,
                      zeros.astype(bool), jnp.zeros((1,), jnp.int32))["params"]

  def make_data(process_index, process_count):
    data.ensure_dataset(config)
    windows = agent_stage.AgentWindows(recorded_steps(config, "train", train_episodes(config)), tasks,
                                       a.window_len, config.seed, fields=FIELDS, video=False)
    return pipeline.process_local_batches(
        grain.MapDataset.source(windows).map(lambda example: example["task"]), config.batch_size,
        seed=config.seed, process_index=process_index, process_count=process_count)

  def abstract_batch():
    shape = (config.batch_size, a.window_len)
    return {"frames": jax.ShapeDtypeStruct((*shape, *models.FRAME_SHAPE), jnp.uint8),
            "actions": jax.ShapeDtypeStruct(shape, jnp.int32), "is_first": jax.ShapeDtypeStruct(shape, jnp.bool_),
            "is_last": jax.ShapeDtypeStruct(shape, jnp.bool_), "reward": jax.ShapeDtypeStruct(shape, jnp.float32),
            "task": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}

  # The agent stage's held-out windows: the same tasks, seed and count, read as frames.
  evaluator = functools.cache(lambda: make_evaluate(model, agent_stage.heldout_examples(
      agent_stage.AgentWindows(recorded_steps(config, "heldout", 0), tasks, a.window_len, config.seed,
                               fields=FIELDS, video=False), a.eval_windows)))
  return stages.Stage(name="pixel_bc", config=config, init_params=init_params,
                      loss=functools.partial(pixel_bc_loss, model), make_data=make_data,
                      abstract_batch=abstract_batch, evaluate=lambda params, step: evaluator()(params, step))


class PixelBCPlayer:
  """The pixel BC policy of one task on ``num_envs`` slots, an ``evaluation.Policy``. Action
  samples are drawn from each episode's world seed and step, as ``AgentPlayer`` draws them."""

  def __init__(self, model: PixelPolicy, params, *, task: int, num_envs: int, seed: int = 0,
               greedy: bool = False):
    if not 0 <= task < model.config.num_tasks:
      raise ValueError(f"task {task} is not one of the model's {model.config.num_tasks} tasks")
    self.model, self.params, self.task, self.num_envs, self.greedy = model, params, task, num_envs, greedy
    self._rng = jax.random.key(seed)
    self.episode_keys = np.zeros((num_envs, 2), np.uint32)
    self.episode_steps = np.zeros(num_envs, np.int64)
    self.state = np.zeros((num_envs, model.config.hidden), np.float32)
    self.last_actions = np.zeros(num_envs, np.int32)
    self.logits = np.zeros((num_envs, model.config.num_actions), np.float32)
    self._act = jax.jit(self._act_fn)

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, workdir: str, *, task: str, num_envs: int,
           seed: int = 0, greedy: bool = False) -> "PixelBCPlayer":
    """The ``pixel_bc`` stage trained in ``workdir``, told ``task`` (one of ``agent.tasks``)."""
    trained = stages.load_stage(config, workdir, "pixel_bc", sections=("pixel_bc", "agent"))
    tasks = tuple(trained.config.agent.tasks)
    if task not in tasks:
      raise config_lib.ConfigError("task", f"{task!r} is not one the policy was trained for: {', '.join(tasks)}")
    return cls(make_model(trained.config), trained.params, task=tasks.index(task), num_envs=num_envs,
               seed=seed, greedy=greedy)

  def reset(self, slots, world_seeds=None) -> None:
    slots = np.asarray(slots, np.int64).reshape(-1)
    seeds = slots if world_seeds is None else np.asarray(world_seeds, np.int64).reshape(-1)
    for slot, world_seed in zip(slots, seeds):
      self.episode_keys[slot] = agent_player.episode_key_data(self._rng, world_seed)
      self.episode_steps[slot] = 0

  def act(self, frames, views=None, active=None) -> np.ndarray:
    del views, active
    frames = np.asarray(frames)
    if frames.shape != (self.num_envs, *models.FRAME_SHAPE) or frames.dtype != np.uint8:
      raise ValueError(f"act takes uint8 frames [{self.num_envs}, 63, 63, 3], got {frames.dtype} {frames.shape}")
    actions, logits, state = self._act(self.params, jnp.asarray(frames), jnp.asarray(self.last_actions),
                                       jnp.asarray(self.episode_steps > 0), jnp.asarray(self.state),
                                       jnp.asarray(self.episode_keys), jnp.asarray(self.episode_steps))
    self.state, self.logits = np.asarray(state), np.asarray(logits)
    self.last_actions = np.asarray(actions, np.int32)
    self.episode_steps += 1
    return self.last_actions.copy()

  def _act_fn(self, params, frames, last_actions, labelled, state, episode_keys, episode_steps):
    logits, state = self.model.apply({"params": params}, frames[:, None], last_actions[:, None],
                                     labelled[:, None], jnp.full((self.num_envs,), self.task, jnp.int32), state)
    logits = logits[:, 0]

    def sample(key_data, step, slot_logits):
      _, sample_key = agent_player.step_keys(key_data, step)
      return agent_player.choose_action(slot_logits, sample_key, self.greedy)

    return jax.vmap(sample)(episode_keys, episode_steps, logits), logits, state
