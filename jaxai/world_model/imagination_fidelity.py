"""The world model along the agent's own trajectories: what it imagined against the real game.

  python -m jaxai.world_model.imagination_fidelity --config=configs/world_model.py --workdir=AGENT \
      [--stage=imagination] [--task=all_achievements] [--windows=64] [--context=8] [--horizon=16] \
      [--seed=0] [--png=PATH.png]

RL in imagination learns from the frames and rewards its world model invents for the actions the
agent picks, not from the recorded play the model was scored on. This measures that world where the
agent lives: ``--windows`` held-out windows (evenly spread over the split, each inside one episode)
give ``--context`` recorded frames; from them the agent imagines ``--horizon`` frames as the
imagination stage does (``imagination.imagine``: its own sampled actions, K = ``rollout.num_steps``),
and then the real game is rebuilt at the last context frame (the episode replayed from its world
seed) and played with the same actions (``continue_episode`` of the split). One JSON line compares:

* the frames: PSNR and per-tile Craftax class agreement (``tile_classes``, overall and per class)
  of the decoded imagined frames with the real ones at horizons 1, 4, 16 and 64 (those within
  ``--horizon``; ``nfe_curve.frame_scores``), beside the decoded copy
  of the last context frame (``copy_``) and the tokenizer's own reconstruction of the real frames
  (``tokenizer_``, the ceiling), over the windows whose game did not end within the horizon;
* the rewards of the task (the reward head's decoded prediction against the task's real reward of
  arriving at each frame, up to the frame where the game ended): per step, per window (the
  return, undiscounted) with the correlation of imagined and real returns across windows, and at
  the real unlocks (``agent_tasks``: the steps a milestone is reached; for ``all_achievements``
  any achievement) against elsewhere, with the reward head's recall of them (prediction >= 0.5)
  and its false positives;
* ``real_ended``: the share of windows whose game ended (death) within the horizon: imagined
  trajectories never end (there is no continuation head).
"""
import functools
import json
import sys

import numpy as np
from absl import flags

from jaxai import cli, config_lib

def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A run with a trained agent stage.")
  flags.DEFINE_enum("stage", "imagination", ["agent", "imagination"], "The agent after finetuning or after RL.")
  flags.DEFINE_string("task", "all_achievements", "The task the agent is told (one of agent.tasks).")
  flags.DEFINE_integer("windows", 64, "Held-out windows (imagined trajectories).")
  flags.DEFINE_integer("context", 8, "Recorded frames before imagining (imagination.context_frames).")
  flags.DEFINE_integer("horizon", 16, "Imagined frames per window (imagination.horizon).")
  flags.DEFINE_integer("seed", 0, "Seed of the imagination (noise, action samples).")
  flags.DEFINE_string("png", "", "Write the first 4 windows here: real frames above imagined ones.")


def heldout_windows(run, windows: int, length: int):
  """(held-out latents, split, window starts): ``windows`` windows of ``length`` steps inside one
  episode each, evenly spread, each followed by one more step of its episode (so the last frame
  of the window is no game over)."""
  from jaxai.craftax import dataset as craftax_dataset  # pylint: disable=g-import-not-at-top
  from jaxai.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import data, dynamics_stage  # pylint: disable=g-import-not-at-top
  heldout = dynamics_stage.load_latents(run.config, run.dynamics_workdir, "heldout", run.world_model.tokenizer,
                                        max_episodes=0)
  starts = craftax_dataset.window_starts(heldout.episode_offsets, length + 1)
  config_lib.check(len(starts) >= windows, "windows", f"the held-out split has {len(starts)} windows "
                   f"of {length + 1} steps, fewer than {windows}")
  return heldout, data.load_split(run.config, "heldout"), starts[pipeline.evenly_spaced(len(starts), windows)]


def real_continuations(split, heldout, starts, context: int, actions: np.ndarray, task: str) -> dict:
  """The real game from each window's last context frame on under ``actions`` [W, H]: frames
  [W, H, ...], the task's reward of arriving at each frame [W, H], its real unlocks, and ``valid``
  (the frame is play: the game had not ended before it)."""
  from jaxai.world_model import agent_tasks  # pylint: disable=g-import-not-at-top
  frames, rewards, unlocks, valid, ended = [], [], [], [], []
  for start, continuation in zip(starts, actions):
    episode = int(np.searchsorted(heldout.episode_offsets, start, side="right") - 1)
    begin = int(heldout.episode_offsets[episode])
    step = int(start) + context - 1 - begin
    episode_actions = heldout.actions[begin:begin + step]
    real = split.continue_episode(episode, episode_actions, step, continuation)
    recorded = split.read_steps(begin + step, 1)
    # The replay must land on the recorded frame (up to float rounding), or the state is wrong.
    if np.mean(np.abs(real["frame"].astype(int) - recorded["frames"][0]) > 1) > 0.01:
      raise RuntimeError(f"held-out episode {episode} does not replay to its recorded frame at step {step}")
    # The recorded step first, so that an unlock is a change from it; no episode starts inside.
    achievements = np.concatenate([recorded["achievements"], real["achievements"]])
    game_rewards = np.concatenate([[0.0], real["rewards"]]).astype(np.float32)
    no_start = np.zeros(len(achievements), bool)
    rewards.append(agent_tasks.task_rewards((task,), game_rewards, achievements, no_start)[1:, 0])
    unlocks.append(agent_tasks.task_events((task,), achievements, no_start)[1:, 0])
    frames.append(real["frames"])
    valid.append(np.concatenate([[True], ~real["ended"][:-1]]))
    ended.append(bool(real["ended"].any()))
  return {"frames": np.stack(frames), "rewards": np.stack(rewards), "unlocks": np.stack(unlocks),
          "valid": np.stack(valid), "ended": np.array(ended)}


def _with_prefix(prefix: str, scores: dict) -> dict:
  return {prefix + k: v for k, v in scores.items()}


def reward_scores(imagined: np.ndarray, real: np.ndarray, unlocks: np.ndarray, valid: np.ndarray) -> dict:
  """Imagined against real rewards [W, H] over the ``valid`` steps; see the module docstring."""
  mean = lambda x, m: float(np.sum(x * m) / max(np.sum(m), 1))
  imagined_returns, real_returns = np.sum(imagined * valid, axis=1), np.sum(real * valid, axis=1)
  spread = np.std(imagined_returns) > 0 and np.std(real_returns) > 0
  at_unlocks, elsewhere = unlocks & valid, ~unlocks & valid
  flagged = imagined >= 0.5
  return {"imagined_reward_per_step": mean(imagined, valid), "real_reward_per_step": mean(real, valid),
          "imagined_return": float(np.mean(imagined_returns)), "real_return": float(np.mean(real_returns)),
          "return_correlation": float(np.corrcoef(imagined_returns, real_returns)[0, 1]) if spread else None,
          "real_unlocks": int(np.sum(at_unlocks)),
          "imagined_reward_at_unlocks": mean(imagined, at_unlocks) if at_unlocks.any() else None,
          "imagined_reward_elsewhere": mean(imagined, elsewhere),
          "reward_recall": mean(flagged, at_unlocks) if at_unlocks.any() else None,
          "reward_false_positive_rate": mean(flagged, elsewhere)}


def evaluate(config, workdir: str, *, stage: str, task: str, windows: int, context: int, horizon: int,
             seed: int = 0) -> tuple[dict, dict]:
  """(the JSON record, arrays: ``actions`` [W, H], ``imagined`` and ``real`` uint8 frames [W, H, ...],
  ``starts``)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxai import host  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import agent_player, imagination, nfe_curve, realtime  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import dynamics as dynamics_lib  # pylint: disable=g-import-not-at-top
  config_lib.check(context >= 1, "context", f"must be at least 1, got {context}")
  config_lib.check(horizon >= 1, "horizon", f"must be at least 1, got {horizon}")
  run = agent_player.load_agent_run(config, workdir, stage)
  tasks = tuple(run.config.agent.tasks)
  config_lib.check(task in tasks, "task", f"{task!r} is not one the agent was trained for: {', '.join(tasks)}")
  heldout, split, starts = heldout_windows(run, windows, context)
  window = lambda x: np.stack([x[s:s + context] for s in starts])
  into, labelled = dynamics_lib.actions_into_frames(window(heldout.actions), window(heldout.is_first))
  imagine = jax.jit(lambda params, z, a, m, rng: imagination.imagine(
      run.model, params, z, a, m, jnp.full((len(starts),), tasks.index(task), jnp.int32), rng,
      horizon=horizon, num_steps=run.config.rollout.num_steps, context_signal=run.config.rollout.context_signal))
  context_latents = window(heldout.latents).astype(np.float32)
  out = jax.device_get(imagine(run.params, context_latents, into, labelled, jax.random.key(seed)))
  real = real_continuations(split, heldout, starts, context, np.asarray(out["actions"]), task)
  tokenizer = run.world_model.tokenizer
  decode = nfe_curve.decoder(tokenizer.model, tokenizer.params)
  imagined = decode(out["latents"])
  copy = decode(np.repeat(context_latents[:, -1:], horizon, axis=1))
  encode = jax.jit(functools.partial(realtime.encode_frames, tokenizer.model))
  reconstructed = decode(np.stack([np.asarray(encode(tokenizer.params, f)) for f in real["frames"]]))
  alive = ~real["ended"]
  record = {"benchmark": "imagination_fidelity", "stage": stage, "task": task, "windows": len(starts),
            "context": context, "horizon": horizon, "num_steps": int(run.config.rollout.num_steps),
            "real_ended": float(np.mean(real["ended"])), "windows_alive": int(alive.sum()), "host": host.summary()}
  if alive.any():
    real_frames = real["frames"][alive]
    record.update(nfe_curve.frame_scores(imagined[alive], real_frames))
    record.update(_with_prefix("copy_", nfe_curve.frame_scores(copy[alive], real_frames)))
    record.update(_with_prefix("tokenizer_", nfe_curve.frame_scores(reconstructed[alive], real_frames)))
  record.update(reward_scores(np.asarray(out["rewards"])[:, 1:], real["rewards"], real["unlocks"], real["valid"]))
  return record, {"actions": np.asarray(out["actions"]), "imagined": imagined, "real": real["frames"],
                  "starts": starts}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", workdir="a run with a trained agent stage",
                           at_least_one=("windows", "context", "horizon"))
  from jaxai.world_model import app_errors, rollout_eval  # pylint: disable=g-import-not-at-top
  with app_errors.one_line_errors():
    record, arrays = evaluate(config, args.workdir, stage=args.stage, task=args.task, windows=args.windows,
                              context=args.context, horizon=args.horizon, seed=args.seed)
    if args.png:
      rollout_eval.write_strip(args.png, arrays["real"][:4], arrays["imagined"][:4] / 255.0)
    print(json.dumps(record), file=sys.__stdout__, flush=True)  # the block sends stdout to stderr


if __name__ == "__main__":
  define_flags()
  cli.run(main)
