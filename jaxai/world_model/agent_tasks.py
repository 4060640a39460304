"""The agent's tasks on Craftax-Classic and their rewards, read from recorded play.

Dreamer 4 conditions its agent on a task embedding. Here the tasks are the milestones of the
crafting ladder and the game itself:

* one task per milestone (``MILESTONES``): reward 1 at the step the achievement is unlocked, 0
  otherwise (an episode unlocks each achievement once);
* ``all_achievements``: the game's own reward (+1 per new achievement, +-0.1 per health point).

Behaviour cloning trains on task-relevant windows: for a milestone, the windows in which it is
unlocked; for ``all_achievements``, those in which any achievement is unlocked. ``relevant_starts``
finds them among the windows a dataset offers.
"""
import numpy as np

from jaxai.craftax import env as craftax_env

MILESTONES = ("collect_wood", "place_table", "make_wood_pickaxe", "collect_stone",
              "make_stone_pickaxe", "collect_iron", "make_iron_pickaxe", "collect_diamond")
ALL_ACHIEVEMENTS = "all_achievements"
TASKS = MILESTONES + (ALL_ACHIEVEMENTS,)


def check_tasks(tasks) -> None:
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise ValueError(f"unknown tasks {unknown or '(none given)'}; known: {', '.join(TASKS)}")


def unlocks(achievements: np.ndarray, is_first: np.ndarray) -> np.ndarray:
  """bool [S, 22]: achievement i is newly unlocked at step s (steps laid end to end, episodes
  starting where ``is_first``; the achievements at s are those unlocked so far)."""
  before = np.concatenate([np.zeros_like(achievements[:1]), achievements[:-1]])
  before[is_first] = False
  return achievements & ~before & ~is_first[:, None]


def task_rewards(tasks, rewards: np.ndarray, achievements: np.ndarray, is_first: np.ndarray) -> np.ndarray:
  """float32 [S, len(tasks)]: each task's reward for arriving at each step."""
  new = unlocks(achievements, is_first)
  columns = [rewards.astype(np.float32) if task == ALL_ACHIEVEMENTS
             else new[:, craftax_env.ACHIEVEMENTS.index(task)].astype(np.float32) for task in tasks]
  return np.stack(columns, axis=1)


def task_events(tasks, achievements: np.ndarray, is_first: np.ndarray) -> np.ndarray:
  """bool [S, len(tasks)]: the steps that make a window relevant to each task (its milestone's
  unlock; for ``all_achievements`` any unlock)."""
  new = unlocks(achievements, is_first)
  columns = [new.any(axis=1) if task == ALL_ACHIEVEMENTS else new[:, craftax_env.ACHIEVEMENTS.index(task)]
             for task in tasks]
  return np.stack(columns, axis=1)


def relevant_starts(events: np.ndarray, starts: np.ndarray, window_len: int) -> list[np.ndarray]:
  """Per task, the window starts (of ``starts``) whose ``window_len`` steps hold one of its events."""
  counts = np.concatenate([np.zeros((1, events.shape[1]), np.int64), np.cumsum(events, axis=0)])
  inside = counts[starts + window_len] - counts[starts]  # [W, tasks]
  return [starts[inside[:, k] > 0] for k in range(events.shape[1])]
