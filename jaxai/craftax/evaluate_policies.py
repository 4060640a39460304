"""How skilled each behaviour policy is: achievement success rates in the real Craftax-Classic.

    python -m jaxai.craftax.evaluate_policies [--episodes=32] [--max_episode_len=2000]
        [--policies=random,novice,intermediate,expert] [--num_envs=64]

prints one JSON line per policy (``evaluation.summarize``): success rate (%) of each of the 22
achievements over the episodes (an achievement counts if unlocked at any point of the episode) with
its 95% Wilson interval, the Crafter score (geometric mean of 1 + rate, minus 1), mean episode
length, death rate, mean return and episodes per hour. The episodes are played by the same harness
as the agents (``evaluation.play``), on seeds from ``EVAL_SEED_BASE`` on, disjoint from the
dataset's train and heldout worlds; every policy plays the same worlds. ``--max_episode_len``
defaults to the ``default`` dataset's cap, so the rates describe the recorded behaviour; pass 10000
for the game's full episodes.

Measured with the defaults (32 episodes of at most 2000 steps per policy; 43 s on the 2-core CPU
machine, when all policies still shared one batch of games: the same games), success rates in %:

  policy        wood table wood_pick stone_pick furnace  coal  iron iron_pick diamond score deaths length
  random        62.5  15.6       0.0        0.0     0.0   0.0   0.0       0.0     0.0  1.83   100%    164
  novice       100.0 100.0     100.0        0.0    12.5   3.1   0.0       0.0     0.0 10.54   100%    193
  intermediate 100.0 100.0     100.0       87.5    87.5  31.2  25.0       0.0     0.0 42.48    94%    876
  expert       100.0 100.0     100.0      100.0    96.9 100.0  96.9      96.9    96.9 98.85    19%   1793

(score: the Crafter score over all 22 achievements; published references: random 1.6, human
experts 50.5.) In the recorded ``default`` train split the expert reached the iron pickaxe in 89 and
the diamond in 88 of its 120 episodes.
"""
import contextlib
import json
import sys

from absl import flags

from jaxai import cli
from jaxai.craftax import evaluation
from jaxai.craftax import policies

EVAL_SEED_BASE = evaluation.EVAL_SEED_BASE


def evaluate(policy_names, episodes: int, max_episode_len: int, num_envs: int) -> list[dict]:
  """One summary per policy (``evaluation.summarize``), every policy on the same worlds."""
  seeds = evaluation.world_seeds(episodes)
  results = []
  for name in policy_names:
    played = evaluation.play(evaluation.BehaviourPolicy(name), seeds,
                             num_envs=min(num_envs, episodes), max_episode_len=max_episode_len,
                             render=False)  # the planners read the game state, not pixels
    results.append({"policy": name, **evaluation.summarize(played)})
  return results


def define_flags():
  flags.DEFINE_integer("episodes", 32, "Episodes per policy.")
  flags.DEFINE_integer("max_episode_len", 2000, "Steps before an episode is cut.")
  flags.DEFINE_string("policies", ",".join(policies.POLICY_NAMES), "Comma-separated behaviour policies.")
  flags.DEFINE_integer("num_envs", 64, "Games played in parallel.")


def main(argv):
  del argv
  args = flags.FLAGS
  names = [n for n in args.policies.split(",") if n]
  unknown = [n for n in names if n not in policies.SKILLS]
  if unknown:
    cli.fail("config error", f"policies: unknown {unknown}; choose from {', '.join(policies.POLICY_NAMES)}")
  for name in ("episodes", "max_episode_len", "num_envs"):
    if args[name].value < 1:
      cli.fail("config error", f"{name}: must be >= 1, got {args[name].value}")
  # Craftax prints while it loads its textures: to stderr, so stdout holds only the JSON lines.
  with contextlib.redirect_stdout(sys.stderr):
    results = evaluate(names, args.episodes, args.max_episode_len, args.num_envs)
  for result in results:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
