"""The agent's baseline without a world model (issue 23): behaviour cloning from pixels.

References: the policy recomputed over each whole episode without a carried state (the player and
the episode resets), log(17) for the zero-initialised policy, and the recorded split's own steps
(the windows the stage trains on).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config_of, play_two_slots
from jaxai import main
from jaxai.craftax import env as craftax_env
from jaxai.world_model import agent_stage, data, pixel_bc


def _random_policy(config):
  model = pixel_bc.make_model(config)
  zeros = jnp.zeros((1, 2), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2, 63, 63, 3), jnp.uint8), zeros,
                               zeros.astype(bool), jnp.zeros((1,), jnp.int32))["params"]
  # The zero-initialised policy layer would hide every dependence: give it weights.
  params["policy"]["kernel"] = jax.random.normal(jax.random.key(1), params["policy"]["kernel"].shape)
  return model, params


def test_the_player_acts_as_the_policy_over_each_episode():
  """Slot 0 plays 5 frames of one episode; slot 1 starts a new one at frame 2. Each act's logits
  equal the policy over the slot's episode so far, recomputed from its first frame."""
  config = config_of("world_model", "tiny")
  model, params = _random_policy(config)
  player = pixel_bc.PixelBCPlayer(model, params, task=1, num_envs=2, seed=3)
  frames = np.random.default_rng(0).integers(0, 256, (5, 2, 63, 63, 3), dtype=np.uint8)
  actions, logits = play_two_slots(player, frames)

  def reference(episode_frames, taken):
    into = np.concatenate([[0], taken[:-1]])[None].astype(np.int32)
    labelled = np.arange(len(taken))[None] > 0
    out, _ = model.apply({"params": params}, jnp.asarray(episode_frames)[None], jnp.asarray(into),
                         jnp.asarray(labelled), jnp.array([1]))
    return np.asarray(out[0])

  np.testing.assert_allclose(logits[:, 0], reference(frames[:, 0], actions[:, 0]), atol=1e-4)
  np.testing.assert_allclose(logits[2:, 1], reference(frames[2:, 1], actions[2:, 1]), atol=1e-4)
  # Sampled actions follow the episode's world seed, not the slot: a fresh player agrees.
  again = pixel_bc.PixelBCPlayer(model, params, task=1, num_envs=2, seed=3)
  again.reset(np.array([0, 1]), np.array([300, 100]))
  first = again.act(np.stack([frames[2, 1], frames[0, 0]]))
  assert first[0] == actions[2, 1] and first[1] == actions[0, 0]


def test_the_state_restarts_where_an_episode_starts_inside_a_window():
  config = config_of("world_model", "tiny")
  model, params = _random_policy(config)
  frames = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 6, 63, 63, 3), dtype=np.uint8))
  actions = jnp.array([[0, 3, 1, 0, 2, 4]])
  labelled = jnp.array([[False, True, True, False, True, True]])  # a new episode at frame 3
  whole, _ = model.apply({"params": params}, frames, actions, labelled, jnp.array([0]))
  second, _ = model.apply({"params": params}, frames[:, 3:], actions[:, 3:], labelled[:, 3:], jnp.array([0]))
  np.testing.assert_allclose(whole[:, 3:], second, atol=1e-5)
  # ... and before it, the frames and the previous actions do change the policy.
  changed, _ = model.apply({"params": params}, frames, actions.at[0, 2].set(7), labelled, jnp.array([0]))
  assert not np.allclose(changed[:, 2], whole[:, 2], atol=1e-4)


def test_the_stage_trains_on_the_agents_task_windows(tmp_path):
  config = config_of("world_model", "tiny", stage="pixel_bc")
  steps = pixel_bc.recorded_steps(config, "train", 0)
  split = data.load_split(config, "train")
  np.testing.assert_array_equal(steps.frames[:40], split.read_steps(0, 40)["frames"])
  windows = agent_stage.AgentWindows(steps, tuple(config.agent.tasks), config.agent.window_len, config.seed,
                                     fields=pixel_bc.FIELDS, video=False)
  n = config.agent.window_len
  for example in (windows[i]["task"] for i in range(3)):
    recorded = [split.read_steps(int(s), n) for s in windows.task_starts[int(example["task"])]]
    assert any(all(np.array_equal(example[k], r[k]) for k in pixel_bc.FIELDS) for r in recorded)

  main.run(config, str(tmp_path))
  metrics = [json.loads(line) for line in open(os.path.join(tmp_path, "pixel_bc", "metrics.jsonl"))]
  # A uniform policy at the start (the zero-initialised output layer).
  assert metrics[0]["bc_nll"] == pytest.approx(np.log(craftax_env.NUM_ACTIONS), rel=1e-3)
  for key in ("eval/bc_top1", "eval/bc_nll", "eval/bc_top1_majority"):
    assert np.isfinite(metrics[-1][key]), key
  player = pixel_bc.PixelBCPlayer.load(config, str(tmp_path), task="all_achievements", num_envs=2)
  player.reset(np.array([0, 1]))
  assert player.act(np.zeros((2, 63, 63, 3), np.uint8)).shape == (2,)
  with pytest.raises(Exception, match="not one the policy was trained for"):
    pixel_bc.PixelBCPlayer.load(config, str(tmp_path), task="collect_diamond", num_envs=2)
