"""A trained agent in the real Craftax-Classic, beside the behaviour policies, as JSON lines.

  python -m jaxai.world_model.evaluate_agent --config=configs/world_model.py --workdir=DIR \
      [--task=all_achievements] [--episodes=64] [--num_envs=64] [--max_episode_len=2000] \
      [--baselines=random,novice,intermediate,expert] [--greedy] [--gif=DIR/agent.gif]

plays ``--episodes`` episodes of the agent trained in ``DIR`` (its ``--stage``: ``agent`` or ``imagination``,
``agent_player.AgentPlayer``: pixels in, actions out; or ``pixel_bc``, the baseline without a world
model, ``pixel_bc.PixelBCPlayer``) on the evaluation worlds
(``jaxai.craftax.evaluation.world_seeds``: disjoint from every dataset split), batched over
``--num_envs`` games, and then the same worlds with each baseline; prints one JSON line per policy:
success rate of each of the 22 achievements with 95% Wilson intervals, Crafter score, mean return
and length, deaths, and episodes per hour. Episodes are capped at ``--max_episode_len`` (2000, the
dataset's cap, for the CPU table; 10000 is the game's own limit). ``--gif`` writes the agent's
first episode, the real frames with its action and task on each.
"""
import json
import sys

from absl import flags

from jaxai import cli

_BASELINES = ("random", "novice", "intermediate", "expert")


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A run whose agent stage is trained.")
  flags.DEFINE_string("task", "all_achievements", "The task the agent is told (one of agent.tasks).")
  flags.DEFINE_enum("stage", "agent", ["agent", "imagination", "pixel_bc"],
                    "The agent after finetuning (agent: BC) or after RL in imagination, or the "
                    "baseline of BC from pixels without a world model (pixel_bc).")
  flags.DEFINE_integer("episodes", 64, "Episodes per policy.")
  flags.DEFINE_integer("num_envs", 64, "Games played at once.")
  flags.DEFINE_integer("max_episode_len", 2000, "Frames per episode at most (the game's own limit: 10000).")
  flags.DEFINE_list("baselines", [], f"Behaviour policies to play on the same worlds: of {', '.join(_BASELINES)}.")
  flags.DEFINE_bool("greedy", False, "Take the policy's most likely action instead of sampling it.")
  flags.DEFINE_integer("seed", 0, "Seed of the agent's sampling (with each world's seed).")
  flags.DEFINE_string("gif", "", "Write the agent's first episode here.")


def evaluate(config, workdir: str, *, task: str, episodes: int, num_envs: int, max_episode_len: int,
             stage: str = "agent", baselines=(), greedy: bool = False, seed: int = 0, gif: str = ""):
  """Yields one record per policy: the agent first, then each baseline, on the same worlds."""
  from jaxai.craftax import evaluation  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import agent_player, pixel_bc  # pylint: disable=g-import-not-at-top
  worlds = evaluation.world_seeds(episodes)
  num_envs = min(num_envs, episodes)
  if stage == "pixel_bc":
    agent = pixel_bc.PixelBCPlayer.load(config, workdir, task=task, num_envs=num_envs, seed=seed, greedy=greedy)
  else:
    agent = agent_player.AgentPlayer.load(config, workdir, task=task, num_envs=num_envs, stage=stage,
                                          seed=seed, greedy=greedy)
  results = evaluation.play(agent, worlds, num_envs=num_envs, max_episode_len=max_episode_len,
                            record_episode=0 if gif else None)
  if gif:
    evaluation.write_gif(gif, results.recording.frames, results.recording.actions, task)
  name = "BC from pixels (pixel_bc)" if stage == "pixel_bc" else f"agent ({stage})"
  yield {"policy": name, "task": task, "greedy": greedy, **evaluation.summarize(results)}
  for name in baselines:
    results = evaluation.play(evaluation.BehaviourPolicy(name), worlds, num_envs=num_envs,
                              max_episode_len=max_episode_len)
    yield {"policy": name, **evaluation.summarize(results)}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", workdir="a run with a trained agent stage",
                           at_least_one=("episodes", "num_envs"))
  if args.max_episode_len < 2:
    cli.fail("flag error", f"--max_episode_len: must be at least 2, got {args.max_episode_len}")
  unknown = [b for b in args.baselines if b not in _BASELINES]
  if unknown:
    cli.fail("flag error", f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(_BASELINES)}")
  from jaxai.world_model import app_errors  # pylint: disable=g-import-not-at-top
  with app_errors.one_line_errors():
    for record in evaluate(config, args.workdir, task=args.task, episodes=args.episodes,
                           num_envs=args.num_envs, max_episode_len=args.max_episode_len,
                           stage=args.stage, baselines=args.baselines, greedy=args.greedy, seed=args.seed, gif=args.gif):
      print(json.dumps(record), file=sys.__stdout__, flush=True)  # the block sends stdout to stderr


if __name__ == "__main__":
  define_flags()
  cli.run(main)
