"""World model, stage ``imagination``: the agent's RL inside its frozen world model (Dreamer 4's
fourth phase).

Each training step imagines a batch of trajectories (``Stage.make_batch``, inside the jitted step):

* a context of ``imagination.context_frames`` recorded frames (held-out play never: the train
  split) is written into the dynamics model's KV cache, noised to the context level as in every
  rollout;
* then, ``horizon`` times: one pass over the newest frame (at the context level, d_min) gives its
  agent-token output, from which the policy head samples the action, the reward head reads the
  reward of arriving at the frame and the value head its value; the next frame is generated with
  that action, K = ``rollout.num_steps`` shortcut steps, and becomes the newest frame.

The loss trains only the policy and value heads (``trainable``); the transformer, the task
embedding and the reward head stay as finetuning left them. TD(lambda) returns
(``jaxai.rl.returns``, gamma and lambda from the config) bootstrap from the value head; the
policy loss is PMPO (``jaxai.rl.pmpo``: the advantages' signs split the states, alpha, beta, reverse
KL to the finetuned policy, a frozen copy of the agent stage's parameters); the value head learns
the returns as symexp two-hot targets (``jaxai.rl.twohot``). For the first
``imagination.value_warmup_steps`` updates only the value learns: PMPO reads nothing but the signs
of R - v, and a value still far below the returns (it starts at 0) puts every state in D+. There
is no continuation head (the paper names none), so imagined trajectories never end: every c_t is 1.

The stage starts from the agent stage (``init_from``) of the run in ``stages.imagination.reads_from``
(default this run's workdir), whose dynamics and tokenizer it uses as trained.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections

from jaxai import config_lib, stages
from jaxai.data import pipeline
from jaxai.rl import pmpo, returns, twohot
from jaxai.world_model import agent_stage, data, dynamics_stage, models, noise_levels, rollout
from jaxai.world_model import shortcut_forcing
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import latents as latents_lib


def validate(config: ml_collections.ConfigDict) -> None:
  m = config.imagination
  config_lib.check(m.task in config.agent.tasks, "imagination.task",
                   f"{m.task!r} is not one of agent.tasks ({', '.join(config.agent.tasks)})")
  config_lib.check_positive(m, "horizon", "context_frames", prefix="imagination.")
  config_lib.check_range(m, "gamma", 0.0, 1.0, prefix="imagination.")
  config_lib.check_range(m, "lambda_", 0.0, 1.0, prefix="imagination.")
  config_lib.check_range(m, "alpha", 0.0, 1.0, prefix="imagination.")
  config_lib.check_at_least(m, 0.0, "beta", prefix="imagination.")
  config_lib.check_at_least(m, 0, "value_warmup_steps", prefix="imagination.")
  config_lib.check(m.context_frames + m.horizon + 1 <= config.agent.window_len * 2, "imagination.horizon",
                   f"context_frames + horizon + 1 = {m.context_frames + m.horizon + 1} frames in one "
                   f"cache: keep them within twice the trained window ({config.agent.window_len})")


def imagine(model, params, context, actions, labelled, tasks, rng, *, horizon: int, num_steps: int,
            context_signal: float) -> dict:
  """Imagined trajectories from clean context latents [B, T, N, C] (``actions``/``labelled`` [B, T]
  in the model's convention: into each frame), under the policy of ``params``.

  Returns ``agent`` [B, H + 1, D] (the agent-token outputs of the last context frame and of the H
  imagined frames), ``actions`` [B, H] (sampled at frames 0..H-1), ``rewards`` [B, H + 1] and
  ``values`` [B, H + 1] (decoded: the reward of arriving at each frame, its value), ``latents``
  [B, H, N, C] (the imagined frames) and ``inputs`` [B, T + H, N, C] (every frame as the model
  read it: noised to the context level).
  """
  c = model.config
  b, t = context.shape[:2]
  level = noise_levels.context_signal_level(context_signal, c.k_max)
  context_rng, steps_rng = jax.random.split(rng)
  noisy_context = shortcut_forcing.corrupt(context, jax.random.normal(context_rng, context.shape),
                                           jnp.full((b, t), level))
  cache = dynamics_lib.init_cache(c, b, t + horizon)
  full = lambda value, frames=1: jnp.full((b, frames), value, jnp.float32)
  apply = lambda *args, **kwargs: model.apply({"params": params}, *args, tasks=tasks, **kwargs)
  if t > 1:
    cache = apply(noisy_context[:, :-1], full(level, t - 1), full(c.d_min, t - 1), actions[:, :-1],
                  labelled[:, :-1], cache=cache)["cache"]

  def one_frame(carry, key):
    cache, newest, action_into, is_labelled = carry
    policy_key, noise_key, context_key = jax.random.split(key, 3)
    out = apply(newest, full(level), full(c.d_min), action_into[:, None], is_labelled[:, None], cache=cache)
    cache = out["cache"]
    action = jax.random.categorical(policy_key, out["policy"][:, 0, 0]).astype(jnp.int32)
    predict = lambda z, tau, d: apply(z, full(tau), full(c.model_step_size(d)), action[:, None],
                                      jnp.ones((b, 1), bool), cache=cache)["latents"]
    frame = rollout.denoise(predict, jax.random.normal(noise_key, newest.shape), start=0, num_steps=num_steps)
    next_newest = shortcut_forcing.corrupt(frame, jax.random.normal(context_key, frame.shape), full(level))
    record = {"agent": out["agent"][:, 0], "reward": twohot.decode(out["reward"][:, 0, 0]),
              "value": twohot.decode(out["value"][:, 0]), "action": action, "latents": frame[:, 0],
              "input": next_newest[:, 0]}
    return (cache, next_newest, action, jnp.ones((b,), bool)), record

  carry = (cache, noisy_context[:, -1:], actions[:, -1], labelled[:, -1])
  carry, records = jax.lax.scan(one_frame, carry, jax.random.split(steps_rng, horizon))
  # The last imagined frame's own outputs: one more pass over it.
  cache, newest, action_into, is_labelled = carry
  last = apply(newest, full(level), full(c.d_min), action_into[:, None], is_labelled[:, None], cache=cache)
  move = lambda x: jnp.moveaxis(x, 0, 1)  # [H, B, ...] -> [B, H, ...]
  return {"agent": jnp.concatenate([move(records["agent"]), last["agent"]], axis=1),
          "actions": move(records["action"]),
          "rewards": jnp.concatenate([move(records["reward"]), twohot.decode(last["reward"][:, :, 0])], axis=1),
          "values": jnp.concatenate([move(records["value"]), twohot.decode(last["value"])], axis=1),
          "latents": move(records["latents"]),
          "inputs": jnp.concatenate([noisy_context, move(records["input"])], axis=1)}


def rl_loss(model, params, batch, *, prior_params, gamma: float, lambda_: float, alpha: float, beta: float,
            policy_weight=1.0):
  """(loss, metrics) of PMPO and the value regression on an imagined batch (``imagine``'s);
  ``policy_weight`` scales PMPO's term (0 while the value warms up)."""
  features = jax.lax.stop_gradient(batch["agent"])
  heads = model.apply({"params": params}, features, method=model.agent_heads)
  prior = model.apply({"params": prior_params}, features, method=model.agent_heads)
  b, frames = batch["rewards"].shape
  # R_h for frames h = 0..H-1: the reward of arriving at frame h + 1, bootstrapped from v_{h+1}.
  lambda_return = jax.lax.stop_gradient(returns.lambda_returns(
      batch["rewards"][:, 1:], jnp.ones((b, frames - 1)), batch["values"], gamma=gamma, lambda_=lambda_))
  advantages = lambda_return - batch["values"][:, :-1]
  policy_loss, policy_metrics = pmpo.pmpo_loss(heads["policy"][:, :-1, 0], batch["actions"], advantages,
                                               jax.lax.stop_gradient(prior["policy"][:, :-1, 0]),
                                               alpha=alpha, beta=beta)
  value_loss = jnp.mean(twohot.loss(heads["value"][:, :-1], lambda_return))
  metrics = {"policy_loss": policy_loss, "value_loss": value_loss,
             "imagined_return": jnp.mean(lambda_return[:, 0]),
             "imagined_reward_per_step": jnp.mean(batch["rewards"][:, 1:]),
             "value": jnp.mean(batch["values"][:, :-1]),
             "policy_weight": jnp.asarray(policy_weight, jnp.float32),
             **{f"pmpo/{k}": v for k, v in policy_metrics.items()}}
  return policy_weight * policy_loss + value_loss, metrics


def world_model_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """``config`` with the dynamics, tokenizer and agent sections of the agent stage it starts from."""
  directory = stages.stage_dir(stages.reads_dir(config, workdir), "agent")
  return stages.as_trained(config, directory, ("dynamics", "tokenizer", "agent"), models.BEFORE_FIELDS)


def agent_reads_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the agent stage that this stage starts from read its dynamics."""
  agent_workdir = stages.reads_dir(config, workdir)
  saved = config_lib.read_saved_config(stages.stage_dir(agent_workdir, "agent")) or {}
  return saved.get("stages", {}).get("agent", {}).get("reads_from") or agent_workdir


def build(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  config = trained = world_model_config(config, workdir)
  m = config.imagination
  model = models.make_dynamics(trained, agent=True)
  config_lib.check(m.task in trained.agent.tasks, "imagination.task", f"{m.task!r} is not one of the "
                   f"tasks the agent was finetuned for ({', '.join(trained.agent.tasks)})")
  task = tuple(trained.agent.tasks).index(m.task)
  dynamics_reads = agent_reads_dir(config, workdir)
  run = functools.cache(lambda: dynamics_stage.load_run(trained, dynamics_reads))

  init_params = functools.partial(agent_stage.init_agent_params, model)

  def make_data(process_index, process_count):
    data.ensure_dataset(config)
    r = run()
    steps = dynamics_stage.load_latents(r.config, dynamics_reads, "train", r.tokenizer,
                                        max_episodes=trained.dynamics.train_episodes)
    return pipeline.process_local_batches(latents_lib.window_dataset(steps, m.context_frames),
                                          config.batch_size, seed=config.seed,
                                          process_index=process_index, process_count=process_count)

  def abstract_batch():
    t = trained.tokenizer
    shape = (config.batch_size, m.context_frames)
    return {"latents": jax.ShapeDtypeStruct((*shape, t.num_latents, t.latent_channels), jnp.float16),
            "actions": jax.ShapeDtypeStruct(shape, jnp.int32),
            "is_first": jax.ShapeDtypeStruct(shape, jnp.bool_)}

  def make_batch(params, batch, rng, frozen):
    del frozen
    actions, labelled = dynamics_lib.actions_into_frames(batch["actions"], batch["is_first"])
    b = actions.shape[0]
    imagined = imagine(model, params, batch["latents"].astype(jnp.float32), actions, labelled,
                       jnp.full((b,), task, jnp.int32), rng, horizon=m.horizon,
                       num_steps=trained.rollout.num_steps, context_signal=trained.rollout.context_signal)
    return jax.lax.stop_gradient({k: imagined[k] for k in ("agent", "actions", "rewards", "values")})

  def loss(params, batch, rng, frozen, step):
    del rng
    return rl_loss(model, params, batch, prior_params=frozen["prior"], gamma=m.gamma, lambda_=m.lambda_,
                   alpha=m.alpha, beta=m.beta, policy_weight=(step >= m.value_warmup_steps).astype(jnp.float32))

  return stages.Stage(name="imagination", config=config, init_params=init_params, loss=loss,
                      make_data=make_data, abstract_batch=abstract_batch, make_batch=make_batch,
                      frozen={"prior": stages.Frozen(stage="agent", init_params=init_params)},
                      loss_reads_step=True)

