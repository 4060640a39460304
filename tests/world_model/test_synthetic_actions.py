"""The synthetic action world (jaxai/world_model/synthetic_actions.py): its frames against a plain
numpy torus shift, and the stage through the trainer (batches made in the step) and every metric."""
import os

import jax
import numpy as np

from conftest import config_of, run_main
from jaxai import main, stages, train
from jaxai.world_model import synthetic_actions


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


def test_stage_trains_on_batches_made_in_the_step_and_reports_every_metric(tmp_path):
  config = config_of("world_model", "tiny", stage="synthetic_actions")
  config.stages.synthetic_actions.update(total_steps=2, eval_every=1)
  main.run(config, str(tmp_path))
  rows = train.read_metrics(str(tmp_path / "synthetic_actions"))
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    assert 0 <= row["eval/action_top1"] <= 1 and 0 <= row["eval/action_top1_mean"] <= 1
    assert row["eval/chance"] == 0.2 and row["eval/copy_mse"] > 0 and np.isfinite(row["loss"])
    assert row["eval/mean_mse_other"] > 0 and row["eval/next_mse"] > 0
  assert not os.path.exists(tmp_path / "tokenizer")  # no dataset, no tokenizer: it reads nothing


def test_stage_all_leaves_the_diagnostic_out():
  assert "synthetic_actions" not in stages.selected(config_of("world_model", "tiny"))


def test_command_rejects_a_bad_dynamics_field_in_one_line(tmp_path):
  result = run_main(["--config=configs/world_model.py:tiny", "--config.stage=synthetic_actions",
                     "--config.dynamics.next_frame_fraction=1.5", f"--workdir={tmp_path}"], devices=1)
  assert result.returncode == 2
  assert result.stderr.strip() == "config error: dynamics.next_frame_fraction: must be in [0.0, 1.0), got 1.5"
