"""imagination_fidelity: the agent's imagined trajectories against the game played with its actions.

The references are independent of the code under test: the synthetic world's stored walk and its
one-step outcomes of every action (``outcomes_of_every_action``), and plain numpy sums of rewards.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, config_of, subprocess_env
from jaxai.world_model import data, imagination_fidelity


def test_synthetic_continuations_follow_the_walk_and_its_one_step_outcomes():
  split = data.load_split(config_of("world_model", "tiny"), "heldout")
  episode, step = 1, 3
  begin = int(split.episode_offsets[episode])
  length = int(split.episodes["length"][episode])
  recorded = split.read_steps(begin, length)
  # The stored actions give the stored walk, its rewards and achievements.
  stored = split.continue_episode(episode, recorded["actions"], step, recorded["actions"][step:length - 1])
  np.testing.assert_array_equal(stored["frame"], recorded["frames"][step])
  np.testing.assert_array_equal(stored["frames"], recorded["frames"][step + 1:])
  np.testing.assert_array_equal(stored["rewards"], recorded["rewards"][step + 1:])
  np.testing.assert_array_equal(stored["achievements"], recorded["achievements"][step + 1:])
  assert not stored["ended"].any()
  # Each other first action gives the frame the split says that action leads to.
  _, outcomes = split.outcomes_of_every_action(episode, recorded["actions"], step)
  for action in range(len(outcomes)):
    np.testing.assert_array_equal(split.continue_episode(episode, None, step, [action, 0])["frames"][0],
                                  outcomes[action])


def test_reward_scores_against_plain_sums():
  imagined = np.array([[0.0, 0.6, 0.1], [0.2, 0.0, 0.9]])
  real = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  unlocks = real > 0.5
  valid = np.array([[True, True, True], [True, True, False]])  # window 1's game ended at frame 1
  scores = imagination_fidelity.reward_scores(imagined, real, unlocks, valid)
  assert scores["imagined_reward_per_step"] == pytest.approx((0.7 + 0.2) / 5)
  assert scores["real_reward_per_step"] == pytest.approx(1 / 5)
  assert scores["imagined_return"] == pytest.approx((0.7 + 0.2) / 2)
  assert scores["real_return"] == pytest.approx(0.5)
  assert scores["real_unlocks"] == 1  # the other is past the game's end
  assert scores["imagined_reward_at_unlocks"] == pytest.approx(0.6)
  assert scores["imagined_reward_elsewhere"] == pytest.approx(0.3 / 4)
  assert scores["reward_recall"] == 1.0 and scores["reward_false_positive_rate"] == 0.0
  assert scores["return_correlation"] == pytest.approx(np.corrcoef([0.7, 0.2], [1.0, 0.0])[0, 1])


def test_fidelity_of_the_tiny_agent_replays_its_own_actions(tiny_agent):
  config = config_of("world_model", "tiny")
  record, arrays = imagination_fidelity.evaluate(config, str(tiny_agent), stage="imagination",
                                                 task="collect_wood", windows=4, context=3, horizon=4)
  assert record["windows"] == record["windows_alive"] == 4 and record["real_ended"] == 0.0
  split = data.load_split(config, "heldout")
  # The real frames are the game under the imagined actions: the first one is the split's own
  # outcome of the first imagined action from the last context frame.
  for window, start in enumerate(arrays["starts"]):
    episode = int(np.searchsorted(split.episode_offsets, start, side="right") - 1)
    step = int(start) + 3 - 1 - int(split.episode_offsets[episode])
    _, outcomes = split.outcomes_of_every_action(episode, None, step)
    np.testing.assert_array_equal(arrays["real"][window, 0], outcomes[arrays["actions"][window, 0]])
  assert arrays["imagined"].shape == arrays["real"].shape == (4, 4, 63, 63, 3)
  for key in ("psnr_h1", "psnr_h4", "copy_psnr_h4", "tokenizer_psnr_h4"):
    assert np.isfinite(record[key]), key
  for key in ("tiles_h1", "tiles_h4", "copy_tiles_h4", "tokenizer_tiles_h4"):
    assert 0.0 <= record[key] <= 1.0, key
  assert record["real_reward_per_step"] >= 0.0 and np.isfinite(record["imagined_reward_per_step"])


def test_command_prints_one_json_line(tiny_agent, tmp_path):
  png = tmp_path / "strip.png"
  out = subprocess.run(
      [sys.executable, "-m", "jaxai.world_model.imagination_fidelity", "--config=configs/world_model.py:tiny",
       f"--workdir={tiny_agent}", "--task=collect_wood", "--windows=2", "--context=3", "--horizon=2",
       f"--png={png}"], cwd=REPO_ROOT, capture_output=True, text=True, check=False, env=subprocess_env())
  assert out.returncode == 0, out.stderr[-2000:]
  (line,) = out.stdout.strip().splitlines()
  record = json.loads(line)
  assert record["benchmark"] == "imagination_fidelity" and record["windows"] == 2 and png.exists()
