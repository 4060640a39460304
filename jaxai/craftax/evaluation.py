"""The real-game evaluation harness: any policy, pixel agent or behaviour planner, on the same worlds.

    results = play(policy, world_seeds(episodes), num_envs=64, max_episode_len=2000)
    print(json.dumps({"policy": name, **summarize(results)}))

``play`` plays one episode per world seed on ``ParallelCraftax``, ``num_envs`` at a time, starting
the next seed in a slot as soon as its episode ends. A policy acts on every slot at once
(``Policy``): it sees the frames (what a pixel agent such as Dreamer 4's may read) and the symbolic
game state (what the omniscient behaviour planners read), and is told which slots start a new episode
on which world, so that it can clear its per-slot context and seed its per-slot randomness from the
world seed. Each episode is then a function of its world seed alone, whichever slot played it and
however many envs ran beside it. ``BehaviourPolicy`` runs ``policies.make_policy`` through this
interface, seeded as ``policies.play_episodes`` seeds it, so both loops play the very same games.

Conventions follow ``policies.play_episodes``: an episode's length counts the frames seen (the policy
acted ``length - 1`` times) and is capped at ``max_episode_len``; the achievements are those
unlocked by its end.
"""
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from scipy import stats

from jaxai.craftax import env as craftax_env
from jaxai.craftax import policies

EVAL_SEED_BASE = 3 << 29  # above the dataset's heldout seeds (1 << 30 onwards), below 2**31


def world_seeds(episodes: int) -> np.ndarray:
  """The evaluation worlds, disjoint from the dataset's train and heldout worlds."""
  return EVAL_SEED_BASE + np.arange(episodes, dtype=np.int64)


class Policy(Protocol):
  """Acts in ``N`` game slots at once.

  ``reset(slots, world_seeds)``: slots ``slots`` (int [K]) start new episodes, on worlds
  ``world_seeds`` (int [K]); a policy forgets what it kept for those slots (its context) and may
  seed their randomness from the world seeds. Called before the first ``act`` that sees them.

  ``act(frames, views, active) -> actions``: ``frames`` uint8 [N, 63, 63, 3] (None when played
  with ``render=False``), ``views`` the ``SymbolicView`` of the same states, ``active`` bool [N]
  the slots playing an episode (the others idle; their actions are ignored, so a policy may skip
  them). Returns int actions [N]. A pixel agent reads only ``frames``. The arrays are fresh each
  step; the harness does not change them after handing them over.
  """

  def reset(self, slots: np.ndarray, world_seeds: np.ndarray) -> None:
    ...

  def act(self, frames: np.ndarray | None, views: craftax_env.SymbolicView,
          active: np.ndarray) -> np.ndarray:
    ...


class BehaviourPolicy:
  """A behaviour policy of ``policies`` (one planner per slot, fresh each episode) as a ``Policy``."""

  def __init__(self, name: str):
    if name not in policies.SKILLS:
      raise ValueError(f"unknown policy {name!r}; choose from {', '.join(policies.POLICY_NAMES)}")
    self.name = name
    self._per_slot: dict[int, object] = {}

  def reset(self, slots: np.ndarray, world_seeds: np.ndarray) -> None:
    for slot, world_seed in zip(slots, world_seeds):
      # The seed play_episodes gives the episode of this world and policy.
      seed = int(world_seed) * 1_000_003 + policies.POLICY_NAMES.index(self.name)
      self._per_slot[int(slot)] = policies.make_policy(self.name, seed)

  def act(self, frames, views, active) -> np.ndarray:
    del frames  # the planners read the game state
    actions = np.full(len(active), policies.NOOP, np.int32)
    for slot in np.flatnonzero(active):
      actions[slot] = self._per_slot[slot].act(craftax_env.slot_view(views, slot))
    return actions


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
  world_seed: int
  achievements: np.ndarray  # bool [22], ACHIEVEMENTS order, unlocked by the episode's end
  episode_return: float
  length: int  # frames seen; the policy acted length - 1 times
  died: bool  # the game ended (death, lava) before the cap


@dataclasses.dataclass(frozen=True)
class Recording:
  """One episode for a video: ``actions[t]`` was chosen on seeing ``frames[t]``."""
  world_seed: int
  frames: np.ndarray  # uint8 [length, 63, 63, 3]
  actions: np.ndarray  # int32 [length - 1] (the last frame has no action)


@dataclasses.dataclass(frozen=True)
class PlayResults:
  episodes: list[EpisodeResult]  # in world_seeds order
  max_episode_len: int
  seconds: float  # wall time of the whole play, compilations and the policy's own work included
  recording: Recording | None


def play(policy: Policy, world_seeds: Sequence[int], *, num_envs: int, max_episode_len: int = 2000,
         record_episode: int | None = None, render: bool = True) -> PlayResults:
  """Plays one episode of ``policy`` per world seed on ``num_envs`` parallel games.

  ``record_episode``: index into ``world_seeds`` of an episode whose frames and actions to keep.
  ``render=False`` (no frames; about twice as fast) only suits policies that read the views.
  """
  world_seeds = [int(s) for s in world_seeds]
  if max_episode_len < 2:
    raise ValueError(f"max_episode_len must be at least 2, got {max_episode_len}")
  if num_envs < 1:
    raise ValueError(f"num_envs must be at least 1, got {num_envs}")
  if record_episode is not None and not 0 <= record_episode < len(world_seeds):
    raise ValueError(f"record_episode {record_episode} outside [0, {len(world_seeds)})")
  if record_episode is not None and not render:
    raise ValueError("record_episode needs render=True (a recording is frames)")
  start_time = time.perf_counter()
  # Slots without an episode idle; the batch keeps its size, so its compilation is reused.
  games = craftax_env.ParallelCraftax(num_envs, render=render)
  frames = np.zeros((num_envs, *craftax_env.FRAME_SHAPE), np.uint8) if render else None
  views: dict[str, np.ndarray] = {}
  episode_of_slot = np.full(num_envs, -1)  # index into world_seeds, -1 when idle
  returns = np.zeros(num_envs, np.float64)
  lengths = np.zeros(num_envs, np.int64)
  results: list[EpisodeResult | None] = [None] * len(world_seeds)
  recorded_frames, recorded_actions = [], []
  next_episode = 0

  def start(slots):
    nonlocal next_episode
    seeds = []
    for slot in slots:
      seeds.append(world_seeds[next_episode])
      frame, view = games.reset_slot(slot, seeds[-1])
      if render:
        frames[slot] = frame
      for f in dataclasses.fields(view):
        if f.name not in views:
          views[f.name] = np.repeat(getattr(view, f.name)[None], num_envs, 0)
        views[f.name][slot] = getattr(view, f.name)
      episode_of_slot[slot] = next_episode
      returns[slot], lengths[slot] = 0.0, 1
      if next_episode == record_episode:
        recorded_frames.append(frame)
      next_episode += 1
    policy.reset(np.asarray(slots, np.int64), np.asarray(seeds, np.int64))

  start(list(range(min(num_envs, len(world_seeds)))))
  while (active := episode_of_slot >= 0).any():
    actions = np.asarray(policy.act(frames, craftax_env.SymbolicView(**views), active))
    if actions.shape != (num_envs,) or not np.issubdtype(actions.dtype, np.integer):
      raise ValueError(f"policy.act must return int actions [{num_envs}], got {actions.dtype} "
                       f"{actions.shape}")
    actions = np.where(active, actions, policies.NOOP).astype(np.int32)
    if ((actions < 0) | (actions >= craftax_env.NUM_ACTIONS)).any():
      raise ValueError(f"actions outside [0, {craftax_env.NUM_ACTIONS}): {actions}")
    if record_episode is not None and record_episode in episode_of_slot:
      recorded_actions.append(actions[np.flatnonzero(episode_of_slot == record_episode)[0]])
    new_frames, rewards, terminals, new_view = games.step(actions)
    if render:
      frames = np.array(new_frames)  # a fresh array each step: a policy may keep the last one
    views = {f.name: np.array(getattr(new_view, f.name)) for f in dataclasses.fields(new_view)}
    returns += np.where(active, rewards, 0.0)
    lengths += active
    ended = active & (terminals | (lengths >= max_episode_len))
    for slot in np.flatnonzero(active):
      episode = episode_of_slot[slot]
      if episode == record_episode:
        recorded_frames.append(new_frames[slot])
      if not ended[slot]:
        continue
      # The game's own time limit also ends it (step 10,000): that is no death.
      died = bool(terminals[slot]) and lengths[slot] <= craftax_env.MAX_EPISODE_STEPS
      results[episode] = EpisodeResult(world_seeds[episode], views["achievements"][slot].copy(),
                                       float(returns[slot]), int(lengths[slot]), died)
      episode_of_slot[slot] = -1
    restart = [int(s) for s in np.flatnonzero(ended)][:len(world_seeds) - next_episode]
    if restart:
      start(restart)

  recording = None
  if record_episode is not None:
    recording = Recording(world_seeds[record_episode], np.stack(recorded_frames),
                          np.asarray(recorded_actions, np.int32))
  return PlayResults(results, max_episode_len, time.perf_counter() - start_time, recording)


def wilson_interval(successes, trials: int, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Wilson score interval of a binomial proportion (successes [K] out of trials), as fractions
  (scipy's ``binomtest(...).proportion_ci(method="wilson")``). Unlike the normal approximation it
  stays inside [0, 1] and is not empty at 0 or n successes."""
  if trials < 1:
    raise ValueError(f"trials must be at least 1, got {trials}")
  intervals = [stats.binomtest(int(k), trials).proportion_ci(confidence_level=confidence, method="wilson")
               for k in np.atleast_1d(successes)]
  low, high = np.array([i.low for i in intervals]), np.array([i.high for i in intervals])
  return (low, high) if np.ndim(successes) else (low[0], high[0])


def crafter_score_interval(achievements: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                           seed: int = 0) -> tuple[float, float]:
  """Percentile-bootstrap interval of the Crafter score over episodes (achievements bool [E, 22]):
  the score is a geometric mean of rates, so no binomial interval applies; resampling the episodes
  (scipy.stats.bootstrap) gives the spread another draw of as many episodes would show."""
  achievements = np.asarray(achievements, np.float64)
  score = lambda index: craftax_env.crafter_score(100.0 * achievements[index.astype(int)].mean(0))
  result = stats.bootstrap((np.arange(len(achievements)),), score, vectorized=False, n_resamples=resamples,
                           confidence_level=confidence, method="percentile", random_state=seed)
  return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(results: PlayResults) -> dict:
  """One JSON-able line: success rate (%) of each achievement with its 95% Wilson interval, the
  Crafter score of the rates with its 95% bootstrap interval over episodes, mean return and length,
  death rate, episodes per hour of wall time."""
  episodes = results.episodes
  n = len(episodes)
  unlocked = np.stack([e.achievements for e in episodes])
  successes = unlocked.sum(0)
  rates = 100.0 * successes / n
  low, high = wilson_interval(successes, n)
  return {
      "episodes": n, "max_episode_len": results.max_episode_len,
      "success_rates": {a: round(float(r), 1) for a, r in zip(craftax_env.ACHIEVEMENTS, rates)},
      "success_rates_ci95": {a: [round(100 * float(lo), 1), round(100 * float(hi), 1)]
                             for a, lo, hi in zip(craftax_env.ACHIEVEMENTS, low, high)},
      "crafter_score": round(craftax_env.crafter_score(rates), 2),
      "crafter_score_ci95": ([round(x, 2) for x in crafter_score_interval(unlocked)] if n > 1
                             else [None, None]),
      "mean_return": round(float(np.mean([e.episode_return for e in episodes])), 2),
      "mean_length": round(float(np.mean([e.length for e in episodes])), 1),
      "death_rate": round(float(np.mean([e.died for e in episodes])), 3),
      "episodes_per_hour": round(n / results.seconds * 3600.0, 1),
      "seconds": round(results.seconds, 1),
  }


CAPTION_HEIGHT = 26  # two lines of PIL's default font under the frame


def gif_frames(frames: np.ndarray, actions: np.ndarray, task_name: str, *,
               scale: int = 4) -> list[np.ndarray]:
  """The frames upscaled ``scale`` times (nearest), with the task name, the step and the action
  chosen on each drawn beneath it; ``actions`` may be one shorter than ``frames`` (no last action)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames, np.uint8)
  if len(actions) not in (len(frames), len(frames) - 1):
    raise ValueError(f"{len(actions)} actions for {len(frames)} frames: want as many or one fewer")
  height, width = frames.shape[1] * scale, frames.shape[2] * scale
  out = []
  for t, frame in enumerate(frames):
    canvas = np.zeros((height + CAPTION_HEIGHT, width, 3), np.uint8)
    canvas[:height] = frame.repeat(scale, 0).repeat(scale, 1)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    action = craftax_env.ACTIONS[int(actions[t])] if t < len(actions) else "(end)"
    draw.text((3, height + 1), task_name, fill=(255, 255, 255))
    # The step number keeps consecutive images distinct, so the GIF writer merges none of them.
    draw.text((3, height + 13), f"t={t}  {action}", fill=(255, 220, 120))
    out.append(np.asarray(image))
  return out


def write_gif(path: str, frames: np.ndarray, actions: np.ndarray, task_name: str, *,
              scale: int = 4, frame_ms: int = 100) -> None:
  """An animated GIF of an episode's real frames, captioned (``gif_frames``)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = [Image.fromarray(f) for f in gif_frames(frames, actions, task_name, scale=scale)]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
