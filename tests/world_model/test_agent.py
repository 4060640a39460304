"""The Dreamer 4 agent (issue 23): agent tokens, their heads' targets, tasks, the finetuning stage.

References: the same dynamics model without agent tokens (the video prediction must not change),
plain Python loops over the definitions (multi-token targets, unlocks, relevant windows), and the
tiny world model trained as written (the finetuning stage end to end).
"""
import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import config_of, play_two_slots
from jaxai import checkpointing, main, optimizer
from jaxai.craftax import env as craftax_env
from jaxai.nn import transformer
from jaxai.rl import twohot
from jaxai.world_model import agent_heads, agent_player, agent_stage, agent_tasks, bench_agent, dynamics
from jaxai.world_model import imagination, models, noise_levels, realtime, shortcut_forcing

BLOCK = transformer.BlockConfig(width=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64)
BASE = dynamics.DynamicsConfig(block=BLOCK, num_layers=4, num_latents=4, latent_channels=3,
                               spatial_tokens=2, num_registers=2, k_max=8, time_every=2)
HEADS = agent_heads.HeadsConfig(hidden=16, layers=1, mtp_length=2, bins=11)
B, T = 2, 4
AGENT_ONLY = ("task_embed", "agent_base", "heads")


@functools.partial(jax.jit, static_argnames=("model",))
def apply(model, params, *args, **kwargs):
  return model.apply({"params": params}, *args, **kwargs)


def _inputs(seed):
  keys = jax.random.split(jax.random.key(seed), 3)
  latents = jax.random.normal(keys[0], (B, T, BASE.num_latents, BASE.latent_channels))
  tau = jax.random.randint(keys[1], (B, T), 0, 8) / 8.0
  actions = jax.random.randint(keys[2], (B, T), 0, BASE.num_actions)
  return latents, tau, jnp.full((B, T), 1.0 / 8), actions


@pytest.fixture(scope="module", name="models", params=["factorised+previous_frame", "full"])
def fixture_models(request):
  layout, _, previous = request.param.partition("+")
  base_config = dataclasses.replace(BASE, layout=layout, previous_frame=bool(previous))
  agent = dynamics.Dynamics(dataclasses.replace(base_config, num_tasks=3, heads=HEADS))
  latents, tau, step, actions = _inputs(0)
  params = nn.unbox(jax.jit(agent.init)(jax.random.key(1), latents, tau, step, actions,
                                        tasks=jnp.zeros(B, jnp.int32))["params"])
  base_params = {k: v for k, v in params.items() if k not in AGENT_ONLY}
  return dynamics.Dynamics(base_config), base_params, agent, params


def _with_head_weights(params, scale=0.3):
  """The heads' zero-initialised output layers would hide every dependence: give them weights."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.normal(jax.random.key(len(path)), x.shape) * scale
      if "heads" in str(path[0]) and path[-1].key in ("out", "bias") else x, params)


def test_agent_tokens_never_change_the_video_prediction(models):
  base, base_params, agent, params = models
  latents, tau, step, actions = _inputs(2)
  expected = apply(base, base_params, latents, tau, step, actions)
  for tasks in (jnp.array([0, 1]), jnp.array([2, 2])):
    out = apply(agent, params, latents, tau, step, actions, tasks=tasks)
    np.testing.assert_allclose(out["latents"], expected, atol=1e-5)
  # Without tasks the agent model returns the prediction alone, the same one.
  np.testing.assert_allclose(apply(agent, params, latents, tau, step, actions), expected, atol=1e-5)
  # And no gradient reaches the agent's own parameters through the video prediction.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(agent.apply({"params": p}, latents, tau, step, actions,
                                                         tasks=jnp.array([1, 2]))["latents"] ** 2)))(params)
  for name in ("task_embed", "agent_base"):
    assert float(jnp.max(jnp.abs(grads[name]))) == 0.0


def test_agent_tokens_read_the_task_and_the_frames_up_to_their_own(models):
  _, _, agent, params = models
  params = _with_head_weights(params)
  latents, tau, step, actions = _inputs(3)
  policy = lambda z, tasks: apply(agent, params, z, tau, step, actions, tasks=tasks)["policy"]
  reference = policy(latents, jnp.array([0, 1]))
  assert reference.shape == (B, T, HEADS.mtp_length + 1, BASE.num_actions)
  assert not np.allclose(policy(latents, jnp.array([2, 1]))[0], reference[0], atol=1e-4)  # the task
  np.testing.assert_allclose(policy(latents, jnp.array([2, 1]))[1], reference[1], atol=1e-6)
  changed = latents.at[:, 1].add(1.0)  # frame 1 changes: frames 1.. may change, frame 0 must not
  out = policy(changed, jnp.array([0, 1]))
  np.testing.assert_allclose(out[:, 0], reference[:, 0], atol=1e-5)
  assert not np.allclose(out[:, 1], reference[:, 1], atol=1e-4)
  assert not np.allclose(out[:, 2:], reference[:, 2:], atol=1e-4)  # through the agent's time attention


def test_cached_agent_outputs_match_the_uncached_ones(models):
  _, _, agent, params = models
  params = _with_head_weights(params)
  latents, tau, step, actions = _inputs(4)
  tasks = jnp.array([2, 0])
  full = apply(agent, params, latents, tau, step, actions, tasks=tasks)
  cache = dynamics.init_cache(agent.config, B, T)
  for t in range(T):
    out = apply(agent, params, latents[:, t:t + 1], tau[:, t:t + 1], step[:, t:t + 1],
                actions[:, t:t + 1], cache=cache, tasks=tasks)
    cache = out["cache"]
    for key in ("latents", "policy", "value"):
      np.testing.assert_allclose(out[key][:, 0], full[key][:, t], atol=2e-5)


def test_multi_token_targets_line_up_with_the_future_steps():
  rng = np.random.default_rng(0)
  values = rng.integers(0, 17, (3, 7))
  valid = rng.random((3, 7)) > 0.2
  is_first = np.zeros((3, 7), bool)
  is_first[1, 4] = True  # an episode starts inside the second window
  targets, mask = agent_heads.agent_targets(jnp.asarray(values), jnp.asarray(valid), jnp.asarray(is_first), 3)
  for b in range(3):
    for t in range(7):
      for n in range(4):
        inside = t + n < 7
        expected_mask = inside and valid[b, t + n] and not is_first[b, t + 1:t + n + 1].any()
        assert bool(mask[b, t, n]) == expected_mask, (b, t, n)
        if inside:
          assert int(targets[b, t, n]) == values[b, t + n]


def test_task_rewards_unlocks_and_relevant_windows():
  wood, table = (craftax_env.ACHIEVEMENTS.index(a) for a in ("collect_wood", "place_table"))
  steps = 12
  achievements = np.zeros((steps, 22), bool)
  achievements[3:6, wood] = True   # episode 1 (steps 0-5): wood at step 3
  achievements[5, table] = True    # table at step 5
  achievements[6:, wood] = True    # episode 2 (steps 6-11) starts holding wood: no unlock at its reset
  achievements[9:, table] = True   # table at step 9
  is_first = np.zeros(steps, bool)
  is_first[[0, 6]] = True
  rewards = np.linspace(-0.1, 1.0, steps).astype(np.float32)
  tasks = ("collect_wood", "place_table", "all_achievements")
  got = agent_tasks.task_rewards(tasks, rewards, achievements, is_first)
  expected = np.zeros((steps, 3), np.float32)
  expected[3, 0] = 1.0
  expected[[5, 9], 1] = 1.0
  expected[:, 2] = rewards
  np.testing.assert_array_equal(got, expected)
  events = agent_tasks.task_events(tasks, achievements, is_first)
  starts = np.array([0, 1, 2, 6, 7, 8])  # windows of 4 inside the two episodes
  relevant = agent_tasks.relevant_starts(events, starts, 4)
  for k in range(3):
    brute = [s for s in starts if events[s:s + 4, k].any()]
    np.testing.assert_array_equal(relevant[k], brute)
  np.testing.assert_array_equal(relevant[0], [0, 1, 2])
  np.testing.assert_array_equal(relevant[1], [2, 6, 7, 8])  # the tables at steps 5 and 9
  np.testing.assert_array_equal(relevant[2], starts)  # every window holds an unlock
  with pytest.raises(ValueError, match="unknown tasks"):
    agent_tasks.check_tasks(("collect_wood", "fly"))


@pytest.fixture(scope="module", name="random_player_parts")
def fixture_random_player_parts():
  """A tiny tokenizer and agent model at random init, the heads' output layers given weights."""
  config = config_of("world_model", "tiny")
  tokenizer, tokenizer_params, _, _ = realtime.random_world_model(config)
  model = models.make_dynamics(config, agent=True)
  init = jax.jit(functools.partial(agent_stage.init_agent_params, model))
  params = _with_head_weights(nn.unbox(init(jax.random.key(5))), scale=0.5)
  return config, tokenizer, tokenizer_params, model, params


def _reference_logits(model, params, tokenizer, tokenizer_params, frames, actions_into, labelled, noise, task):
  """The policy logits (n = 0) of every frame, the whole sequence recomputed without a cache."""
  c = model.config
  latents = realtime.encode_frames(tokenizer, tokenizer_params, jnp.asarray(frames))[None].astype(jnp.float32)
  t = latents.shape[1]
  tau = jnp.full((1, t), noise_levels.context_signal_level(0.9, c.k_max))
  out = apply(model, params, shortcut_forcing.corrupt(latents, noise, tau), tau, jnp.full((1, t), c.d_min),
              jnp.asarray(actions_into)[None], jnp.asarray(labelled)[None], tasks=jnp.array([task]))
  return np.asarray(out["policy"][0, :, 0])


def test_agent_player_acts_as_the_model_over_its_episode(random_player_parts):
  """Slot 0 plays 5 frames with a 4-frame context (one slide, keeping 2); slot 1 restarts after 2
  frames. Each act's logits equal the uncached model over what the slot's cache should hold, with
  the noise the player draws: the episode's frames (the old episode hidden), or after the slide the
  2 kept frames (re-noised, the first unlabelled) and the new one."""
  config, tokenizer, tokenizer_params, model, params = random_player_parts
  player = agent_player.AgentPlayer(tokenizer, tokenizer_params, model, params, task=1, num_envs=2,
                                    context_frames=4, context_signal=0.9, seed=3)
  frames = np.random.default_rng(0).integers(0, 256, (5, 2, 63, 63, 3), dtype=np.uint8)
  shape = (1, 1, model.config.num_latents, model.config.latent_channels)
  episode_key = lambda world: jax.random.fold_in(jax.random.key(3), world)
  step_noise = lambda world, step: jax.random.normal(jax.random.split(
      jax.random.fold_in(episode_key(world), step))[0], shape)
  actions, logits = play_two_slots(player, frames)
  ref = functools.partial(_reference_logits, model, params, tokenizer, tokenizer_params, task=1)
  # Slot 0, frames 0-3: one episode in the cache.
  into = np.concatenate([[0], actions[:3, 0]])
  noise = jnp.concatenate([step_noise(100, s) for s in range(4)], axis=1)
  expected = ref(frames[:4, 0], into, np.array([False, True, True, True]), noise)
  np.testing.assert_allclose(logits[:4, 0], expected, atol=2e-4)
  # Slot 0, frame 4: the slide kept frames 2 and 3, noised anew.
  slide_noise = jax.random.normal(jax.random.fold_in(episode_key(100), 2**31 + 4), (1, 2, *shape[2:]))
  noise = jnp.concatenate([slide_noise, step_noise(100, 4)], axis=1)
  expected = ref(frames[2:5, 0], np.array([actions[1, 0], actions[2, 0], actions[3, 0]]),
                 np.array([False, True, True]), noise)
  np.testing.assert_allclose(logits[4, 0], expected[-1], atol=2e-4)
  # Slot 1 from its reset at frame 2: only the new episode, seeded by its new world.
  noise = jnp.concatenate([step_noise(300, s) for s in range(3)], axis=1)
  expected = ref(frames[2:5, 1], np.concatenate([[0], actions[2:4, 1]]), np.array([False, True, True]), noise)
  np.testing.assert_allclose(logits[2:, 1], expected, atol=2e-4)


def test_imagined_trajectories_are_what_the_model_computes_over_them(random_player_parts):
  """Every imagined frame's agent outputs equal the uncached model over the frames as it read
  them (context and imagined, noised to the context level), each sampled action leading into the
  next frame."""
  config, _, _, model, params = random_player_parts
  c = model.config
  b, t, horizon = 2, 3, 4
  keys = jax.random.split(jax.random.key(7), 2)
  context = jax.random.normal(keys[0], (b, t, c.num_latents, c.latent_channels))
  actions = jax.random.randint(keys[1], (b, t), 0, c.num_actions)
  labelled = jnp.array([[False, True, True]] * b)
  tasks = jnp.array([1, 0])
  imagine = jax.jit(functools.partial(imagination.imagine, model, horizon=horizon, num_steps=2, context_signal=0.9))
  out = imagine(params, context, actions, labelled, tasks, jax.random.key(8))
  assert out["agent"].shape[:2] == (b, horizon + 1) and out["actions"].shape == (b, horizon)
  frames = t + horizon
  level = noise_levels.context_signal_level(0.9, c.k_max)
  reference = apply(model, params, out["inputs"], jnp.full((b, frames), level), jnp.full((b, frames), c.d_min),
                    jnp.concatenate([actions, out["actions"]], axis=1),
                    jnp.concatenate([labelled, jnp.ones((b, horizon), bool)], axis=1), tasks=tasks)
  np.testing.assert_allclose(out["agent"], reference["agent"][:, t - 1:], atol=2e-4)
  np.testing.assert_allclose(out["values"], twohot.decode(reference["value"][:, t - 1:]), rtol=1e-5, atol=2e-4)
  np.testing.assert_allclose(out["rewards"], twohot.decode(reference["reward"][:, t - 1:, 0]), rtol=1e-5, atol=2e-4)
  # The imagined frames are those the inputs re-noise: the inputs stay near them.
  assert float(jnp.mean((out["inputs"][:, t:] - level * out["latents"]) ** 2)) < 0.05


def test_agent_then_imagination_stages_on_the_tiny_world_model(tiny_agent):
  """Finetuning starts from the dynamics checkpoint and trains BC, reward and video terms; RL in
  imagination then changes only the policy and value heads, starting from the finetuned policy,
  and the policy only after the value's warm-up."""
  workdir = tiny_agent
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "agent", "metrics.jsonl"))]
  assert [m["step"] for m in metrics] == [1, 2, 3]
  for key in ("bc_nll", "reward_nll", "video/x_space_loss", "rms/bc", "rms/reward", "rms/video",
              "eval/bc_top1", "eval/bc_top1_majority", "eval/reward_recall", "eval/reward_abs_error"):
    assert np.isfinite(metrics[-1][key]), key
  # A uniform policy at the start (the zero-initialised output layer): NLL log(17) at step 1.
  assert metrics[0]["bc_nll"] == pytest.approx(np.log(craftax_env.NUM_ACTIONS), rel=1e-3)

  metrics = [json.loads(line) for line in open(os.path.join(workdir, "imagination", "metrics.jsonl"))]
  # It starts as the prior, which the value's warm-up update (the first) leaves exactly as it is
  # (no gradient reaches the zero-initialised policy layer); the next update moves it.
  assert [m["policy_weight"] for m in metrics] == [0.0, 1.0, 1.0]
  assert metrics[0]["pmpo/prior_kl"] == metrics[1]["pmpo/prior_kl"] == 0.0 < metrics[2]["pmpo/prior_kl"]
  for key in ("policy_loss", "value_loss", "imagined_return", "pmpo/positive_share"):
    assert np.isfinite(metrics[-1][key]), key
  _, before = checkpointing.restore_params(os.path.join(workdir, "agent", "checkpoints"))
  _, after = checkpointing.restore_params(os.path.join(workdir, "imagination", "checkpoints"))
  changed = {optimizer.param_path(path) for path, a in jax.tree_util.tree_flatten_with_path(after)[0]
             if not np.array_equal(a, _at(before, path))}
  assert changed and all(re.match(r"heads/(policy|value)/", p) for p in changed), sorted(changed)


def _at(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


def test_agent_benchmark_prints_its_figures():
  records = list(bench_agent.measure(config_of("world_model", "tiny"), batch=2, runs=1))
  assert [r["benchmark"] for r in records] == ["imagined_fps", "agent_act"]
  imagined, act = records
  assert imagined["imagined_fps"] == pytest.approx(2 * imagined["horizon"] / imagined["ms_per_call"] * 1e3, rel=1e-3)
  assert act["game_steps_per_sec"] == pytest.approx(2 / act["ms_per_call"] * 1e3, rel=1e-3)
