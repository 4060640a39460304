"""The synthetic action world (jaxai/world_model/synthetic_actions.py): its frames against a plain
numpy torus shift, and a tiny config's run through training and every metric."""
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO_ROOT
from jaxai.world_model import synthetic_actions

_spec = importlib.util.spec_from_file_location("world_model_config",
                                               os.path.join(REPO_ROOT, "configs", "world_model.py"))
world_model_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world_model_config)


def test_grid_is_the_most_square_factorisation():
  assert synthetic_actions.grid_shape(32) == (4, 8)
  assert synthetic_actions.grid_shape(81) == (9, 9)
  assert synthetic_actions.grid_shape(7) == (1, 7)


def test_each_frame_is_the_last_moved_as_the_craftax_view_moves():
  latents, actions = synthetic_actions.sequences(jax.random.key(0), 6, 12, 32, 3)
  latents, actions = np.asarray(latents).reshape(6, 12, 4, 8, 3), np.asarray(actions)
  # Walking left brings the world one cell right (column c shows what c - 1 showed), and so on.
  content_move = {0: (0, 0), 1: (0, 1), 2: (0, -1), 3: (1, 0), 4: (-1, 0)}
  assert set(np.unique(actions)) == set(content_move)
  for b in range(6):
    for t in range(1, 12):
      np.testing.assert_array_equal(
          latents[b, t], np.roll(latents[b, t - 1], content_move[actions[b, t]], axis=(0, 1)))
  assert np.abs(latents).max() < 1  # tanh-squashed like the tokenizer's bottleneck


def test_tiny_config_trains_and_reports_every_metric():
  config = world_model_config.get_config("tiny")
  records = list(synthetic_actions.run(config, steps=2, eval_every=1, eval_sequences=3))
  assert [r["step"] for r in records] == [1, 2]
  for record in records:
    assert 0 <= record["action_top1"] <= 1 and 0 <= record["action_top1_mean"] <= 1
    assert record["chance"] == 0.2 and record["copy_mse"] > 0 and np.isfinite(record["loss"])
    assert record["mean_mse_other"] > 0 and record["next_mse"] > 0


def test_command_rejects_a_bad_flag_in_one_line():
  result = subprocess.run([sys.executable, "-m", "jaxai.world_model.synthetic_actions",
                           "--config=configs/world_model.py:tiny", "--eval_every=0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == "config error: eval_every: must be >= 1, got 0"


def test_command_rejects_a_bad_dynamics_field_in_one_line():
  result = subprocess.run([sys.executable, "-m", "jaxai.world_model.synthetic_actions",
                           "--config=configs/world_model.py:tiny",
                           "--config.dynamics.next_frame_fraction=1.5"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == "config error: dynamics.next_frame_fraction: must be in [0, 1), got 1.5"
