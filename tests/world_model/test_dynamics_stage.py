"""The world model's dynamics stage end to end (issue 5): data, alternating batches, evaluation."""
import json
import os

import chex
import numpy as np
import pytest

from conftest import config_of
from jaxai import checkpointing, main
from jaxai.craftax import dataset as craftax_dataset
from jaxai.world_model import dynamics_stage, rollout_eval



def test_window_starts_stay_inside_episodes():
  offsets = np.array([0, 5, 7, 15])
  starts = craftax_dataset.window_starts(offsets, 3)
  np.testing.assert_array_equal(starts, [0, 1, 2, 7, 8, 9, 10, 11, 12])  # episode 2 (5..7) is too short


def test_short_batches_are_the_long_windows_cut_in_order():
  batch = {"latents": np.arange(2 * 8 * 3).reshape(2, 8, 3), "actions": np.arange(16).reshape(2, 8)}
  assert dynamics_stage.cut_short(4, batch, long_every=4, short_len=2) is batch  # every 4th stays long
  short = dynamics_stage.cut_short(5, batch, long_every=4, short_len=2)
  assert short["latents"].shape == (8, 2, 3) and short["actions"].shape == (8, 2)
  for row in range(2):  # window r, frames [2k, 2k + 2) -> short window 4r + k
    for k in range(4):
      np.testing.assert_array_equal(short["actions"][4 * row + k], batch["actions"][row, 2 * k:2 * k + 2])


def _moving_fields(rng, windows: int, frames: int) -> np.ndarray:
  """[W, T, L, C] latents of a random field that slides one cell per frame, each window its own
  direction and start: the kind of motion a view of the game makes."""
  fields = rng.normal(size=(windows, 16, 2))
  steps = rng.choice([-1, 1], size=windows)
  return np.stack([np.stack([np.roll(f, s * t, axis=0) for t in range(frames)])
                   for f, s in zip(fields, steps)]).astype(np.float32)


def test_change_distance_sees_the_motion_the_frame_distance_cannot():
  rng = np.random.default_rng(0)
  real = _moving_fields(rng, 96, 17)
  last, future = real[:, 0], real[:, 1:]
  changes = lambda frames: rollout_eval.frame_changes(last, frames)
  np.testing.assert_allclose(changes(future), np.diff(real, axis=1))
  # The same frames in a random order within each window: the same set of frames (FLD 0), but they
  # jump instead of sliding.
  shuffled = np.stack([w[rng.permutation(16)] for w in future])
  assert rollout_eval.latent_frechet(shuffled, future) == pytest.approx(0.0, abs=1e-6)
  # Another draw of the same process: the right motion, on other fields.
  other = _moving_fields(rng, 96, 17)
  sample_noise = rollout_eval.latent_frechet(rollout_eval.frame_changes(other[:, 0], other[:, 1:]),
                                             changes(future))
  assert rollout_eval.latent_frechet(changes(shuffled), changes(future)) > 5 * sample_noise
  copy = np.repeat(last[:, None], 16, axis=1)  # no change at all: |mu|^2 + tr(S) of the real changes
  expected = np.trace(np.cov(np.diff(real, axis=1).reshape(-1, 32), rowvar=False)) + \
      np.sum(np.diff(real, axis=1).reshape(-1, 32).mean(0) ** 2)
  assert rollout_eval.latent_frechet(changes(copy), changes(future)) == pytest.approx(expected, rel=1e-6)


def test_action_top1_counts_equivalent_actions_as_right():
  # 3 states; outcomes[s, a] is the real next frame of action a (actions 0 and 1 do the same thing).
  n, h = 3, 2
  outcomes = np.zeros((n, 17, h, h, 3), np.uint8)
  for a in range(17):
    outcomes[:, a] = 10 * min(a, 16) if a != 1 else 0
  states = {"context": np.zeros((n, 1)), "actions": np.zeros((n, 1), np.int32),
            "labelled": np.ones((n, 1), bool), "outcomes": outcomes, "taken": np.array([0, 1, 5])}

  def oracle(params, context, actions, labelled, rng, num_steps):  # predicts each action's real outcome
    del params, context, labelled, rng, num_steps
    return (outcomes[np.arange(n), actions[:, -1]] / 255.0)[:, None]

  def action_blind(params, context, actions, labelled, rng, num_steps):  # always predicts action 16's
    del params, context, actions, labelled, rng, num_steps
    return (outcomes[:, 16] / 255.0)[:, None]

  top1 = rollout_eval._action_top1  # pylint: disable=protected-access
  result = top1(None, states, oracle, None, 4)
  assert result["eval/action_top1"] == 1.0
  # Chance: 2/17 for the two states whose action shares its outcome, 1/17 for the other.
  assert result["eval/action_top1_chance"] == pytest.approx((2 + 2 + 1) / 17 / 3)
  # A model that ignores the action ties all 17: it scores chance, not the luck of the first index.
  assert top1(None, states, action_blind, None, 4)["eval/action_top1"] == pytest.approx(
      result["eval/action_top1_chance"])


def test_tiny_stage_all_on_recorded_play_trains_both_stages_and_evaluates(tmp_path, capsys, tiny_craftax_data):
  """The recorded-data path: the tiny Craftax dataset (recorded here), action top-1 from states
  replayed in the real game, the latent cache, an ablation reading the first run's tokenizer."""
  config = config_of("world_model", "tiny")
  config.stage = "all"
  config.data.update(source="craftax", variant="tiny", dir=tiny_craftax_data, generate=False)
  config.stages.dynamics.update(total_steps=6, log_every=1)
  workdir = tmp_path / "run"
  main.run(config, str(workdir))
  with open(workdir / "dynamics" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) for r in rows)
  final = rows[-1]
  for key in ("eval/rollout_psnr", "eval/rollout_psnr_k8", "eval/rollout_psnr_repeat_last",
              "eval/tokenizer_psnr_future", "eval/rollout_psnr_h1", "eval/action_top1",
              "eval/action_top1_chance", "eval/next_latent_mse", "eval/next_latent_mse_k1",
              "eval/next_latent_mse_repeat_last", "eval/rollout_psnr_repeat_last_pixels",
              "eval/frechet_latent_distance", "eval/frechet_latent_distance_k8",
              "eval/frechet_latent_distance_real", "eval/frechet_latent_distance_repeat_last",
              "eval/frechet_change_distance", "eval/frechet_change_distance_k8",
              "eval/frechet_change_distance_real", "eval/frechet_change_distance_repeat_last"):
    assert key in final, key
  assert 0.0 <= final["eval/action_top1"] <= 1.0 and final["eval/action_states"] == 2
  assert os.path.exists(workdir / "dynamics" / "rollout_step_6.png")
  cache = os.listdir(workdir / "tokenizer" / "latents")
  assert sorted(cache) == ["heldout_2ep_tokenizer5.npz", "train_4ep_tokenizer5.npz"]
  # A second dynamics run (the ablation) reads the same frozen tokenizer and its latent cache.
  config.stage = "dynamics"
  config.dynamics.update(shortcut=False)
  config.stages.dynamics.update(total_steps=2, reads_from=str(workdir))
  main.run(config, str(tmp_path / "ablation"))
  assert not os.path.exists(tmp_path / "ablation" / "tokenizer")
  # Loading that run for rollouts finds the tokenizer it was trained on without being told.
  fresh = config_of("world_model", "tiny")
  fresh.data.update(config.data)
  # A tokenizer field that changes no parameter shape: the model must still be built as trained.
  fresh.tokenizer.max_mask_prob = 0.5
  tokenizer, tokenizer_params, dynamics, _ = dynamics_stage.load_world_model(fresh, str(tmp_path / "ablation"))
  _, expected = checkpointing.restore_params(str(workdir / "tokenizer" / "checkpoints"))
  chex.assert_trees_all_equal(tokenizer_params, expected)
  assert tokenizer.config.max_mask_prob == config.tokenizer.max_mask_prob != 0.5
  # Nor is the ablation run as a shortcut model (same parameters, told other step sizes) because
  # this config does not say shortcut=False.
  assert fresh.dynamics.shortcut and not dynamics.config.shortcut
  assert "dynamics: built as trained" in capsys.readouterr().err
