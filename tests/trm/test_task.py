"""The trm stage through the trainer: deep supervision's carry across updates, resume, the EMA
evaluation and ``python -m jaxai.trm.evaluate``."""
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, config_of, subprocess_env
from jaxai import checkpointing, config_lib, main, train
from jaxai.trm import evaluate, supervision, task


def test_a_resumed_run_carries_the_same_examples_as_an_uninterrupted_one(tiny_trm, tmp_path):
  """The batch carry (each slot's example, y, z and step count) is checkpointed: the tiny run
  resumed from its step-2 checkpoint gives the uninterrupted run's losses and final carry."""
  config, workdir = tiny_trm
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  main.run(config_of("trm", "tiny", data__dir=config.data.dir, stages__trm__restore_step=2), str(resumed))
  rows = [train.read_metrics(str(d / "trm")) for d in (workdir, resumed)]
  assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]] == list(range(1, config.total_steps + 1))
  np.testing.assert_allclose([r["loss"] for r in rows[0]], [r["loss"] for r in rows[1]], rtol=1e-5)
  carries = [checkpointing.restore_params(str(d / "trm" / "checkpoints"), step=config.total_steps,
                                          key="batch_carry")[1] for d in (workdir, resumed)]
  for key in ("inputs", "steps", "halted", "y"):
    np.testing.assert_allclose(carries[0][key], carries[1][key], rtol=1e-5, err_msg=key)
  # Every slot took one supervision step per update, restarting when it halted.
  assert np.all((carries[0]["steps"] >= 1) & (carries[0]["steps"] <= config.supervision.max_steps))


def test_halted_slots_take_the_new_batch_and_the_others_keep_their_example():
  """Against a plain loop over the slots: a halted slot restarts on the batch's row (step 0,
  the initial y and z), the others keep their example, state and step count."""
  config = config_of("trm", "tiny")
  model_cfg = task.model_config(config)
  rng = np.random.default_rng(0)
  carry = {k: np.asarray(v) for k, v in supervision.init_carry(model_cfg, 4).items()}
  carry.update(inputs=rng.integers(0, 10, (4, 81)), labels=rng.integers(1, 10, (4, 81)),
               y=rng.normal(size=carry["y"].shape).astype(np.float32), steps=np.array([1, 3, 2, 3]),
               halted=np.array([False, True, False, True]))
  batch = {"inputs": rng.integers(0, 10, (4, 81)), "labels": rng.integers(1, 10, (4, 81)),
           "puzzle_id": np.arange(4)}
  out = supervision.reset_carry(model_cfg, carry, batch)
  y0, _ = supervision.initial_state(model_cfg)
  for slot in range(4):
    if carry["halted"][slot]:
      np.testing.assert_array_equal(out["inputs"][slot], batch["inputs"][slot])
      assert out["steps"][slot] == 0
      np.testing.assert_allclose(out["y"][slot], np.broadcast_to(y0, carry["y"][slot].shape))
    else:
      np.testing.assert_array_equal(out["inputs"][slot], carry["inputs"][slot])
      assert out["steps"][slot] == carry["steps"][slot]
      np.testing.assert_allclose(out["y"][slot], carry["y"][slot])
  assert not np.any(out["halted"])


def test_evaluation_scores_the_moving_average_and_plain_counts_agree(tiny_trm):
  """The command's scores (the EMA weights restored from the checkpoint) equal those the stage
  logged at its last step, and its accuracies are plain counts of its predictions."""
  config, workdir = tiny_trm
  record, arrays = evaluate.evaluate(config, str(workdir), puzzles=config.data.eval_puzzles)
  logged = train.read_metrics(str(workdir / "trm"))[-1]
  for key in ("eval/exact_accuracy", "eval/token_accuracy", "eval/halt_steps"):
    assert record[key] == pytest.approx(logged[key]), key
  right = arrays["predictions"] == arrays["labels"]
  assert record["eval/token_accuracy"] == pytest.approx(right.mean())
  assert record["eval/exact_accuracy"] == pytest.approx(right.all(axis=1).mean())
  assert record["step"] == config.total_steps and record["reasoner"] == "trm"
  low, high = record["eval/exact_accuracy_95"]
  assert low <= record["eval/exact_accuracy"] <= high


def test_raw_weights_are_the_trained_ones_and_not_their_average(tiny_trm):
  """``weights="raw"`` (the no-EMA ablation) scores the checkpoint's trained parameters: the
  same scores as solving with them directly, from weights that differ from their average."""
  config, workdir = tiny_trm
  record, _ = evaluate.evaluate(config, str(workdir), puzzles=config.data.eval_puzzles, weights="raw")
  directory = str(workdir / "trm" / "checkpoints")
  _, params = checkpointing.restore_params(directory, key="params")
  _, averaged = checkpointing.restore_params(directory, key="ema_params")
  differences = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(averaged))]
  assert max(differences) > 1e-4
  model = task.make_model(config)
  scores, _ = task.evaluate_puzzles(config, task.solver(model, config.supervision.max_steps), params,
                                    config.data.eval_puzzles)
  assert record["weights"] == "raw"
  for key in ("eval/exact_accuracy", "eval/token_accuracy", "eval/halt_steps"):
    assert record[key] == pytest.approx(scores[key]), key
  with pytest.raises(ValueError, match="weights"):
    evaluate.evaluate(config, str(workdir), puzzles=1, weights="best")


def test_scores_of_solve_outputs_against_a_hand_count():
  exact = np.array([[0, 0, 1], [1, 0, 1], [1, 0, 0]], bool)  # [steps, puzzles]
  halt = np.array([[-1, -1, 2], [3, -1, 1], [1, -2, 1]], float)
  scores = task.evaluation_scores({"exact": exact, "halt_logit": halt})
  assert scores["eval/exact_accuracy"] == pytest.approx(1 / 3)
  # Puzzle 0 halts at step 2 (right), puzzle 1 never (step 3, wrong), puzzle 2 at step 1 (right).
  assert scores["eval/halt_steps"] == pytest.approx((2 + 3 + 1) / 3)
  assert scores["eval/halted_exact_accuracy"] == pytest.approx(2 / 3)
  assert scores["eval/exact_at_step_1"] == pytest.approx(1 / 3)
  assert scores["eval/exact_at_step_2"] == pytest.approx(2 / 3)


def test_command_prints_one_json_line_and_a_picture(tiny_trm, tmp_path):
  config, workdir = tiny_trm
  png = tmp_path / "puzzles.png"
  args = [sys.executable, "-m", "jaxai.trm.evaluate", "--config=configs/trm.py:tiny",
          f"--config.data.dir={config.data.dir}", f"--workdir={workdir}", "--puzzles=2", f"--png={png}"]
  out = subprocess.run(args, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, check=True)
  (line,) = out.stdout.strip().splitlines()
  record = json.loads(line)
  assert record["eval/puzzles"] == 2 and png.stat().st_size > 0
  missing = subprocess.run(args[:4] + [f"--workdir={tmp_path / 'none'}"], cwd=REPO_ROOT,
                           env=subprocess_env(), capture_output=True, text=True)
  assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("checkpoint error:")


@pytest.mark.parametrize("overrides, field", [
    (dict(model__reasoner="rnn"), "model"),
    (dict(data__task="chess"), "data.task"),
    (dict(data__task="maze", data__copies=9), "data.copies"),
    (dict(ema_decay=0.0), "ema_decay"),
    (dict(supervision__max_steps=0), "supervision"),
])
def test_bad_config_values_name_their_field(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field):
    task.validate(config_of("trm", "tiny", **overrides))


def test_the_single_pass_takes_trms_parameter_count():
  from jaxai.trm import model as model_lib  # pylint: disable=g-import-not-at-top
  trm = model_lib.param_count(task.model_config(config_of("trm", "tiny")))
  single = model_lib.param_count(task.model_config(config_of("trm", "tiny", model__reasoner="single_pass")))
  assert abs(single - trm) / trm < 0.01


def test_the_maze_cpu_default_is_12x12_and_full_the_papers_30x30():
  for variant, cells in (("maze", 144), ("maze,full", 900), ("maze,tiny", 900)):
    config = config_of("trm", variant)
    task.validate(config)
    model_cfg = task.model_config(config)
    assert model_cfg.mixer == "attention" and model_cfg.seq_len == cells, variant
  with pytest.raises(config_lib.ConfigError, match="data.variant"):
    task.validate(config_of("trm", "maze", data__variant="easy"))  # a Sudoku variant
