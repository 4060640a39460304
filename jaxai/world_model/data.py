"""Where the world model's frames and actions come from (``data.source``).

``craftax``: the recorded offline dataset in ``data.dir`` (``jaxai.craftax.dataset``), recorded
there first when missing and ``data.generate`` is set. ``synthetic``: procedural episodes that need
no dataset (tests, smoke runs, the ``tiny`` variant): a tile world on a torus, seen through a 9 x 9
tile view that a random walk of Craftax moves (noop, left, right, up, down) shifts by one tile, so
the next frame is a known function of the frame and the action, as in the game.

Both are "splits" with one interface: ``episodes`` (a table with ``length`` and ``world_seed``),
``episode_offsets``, ``num_steps``, ``read_steps(first, count)`` (``frames``, ``actions``,
``is_first``, ... of steps laid end to end) and ``outcomes_of_every_action(episode, actions, step)``
(the true next frame of each of the 17 actions, for ``eval/action_top1``) and
``continue_episode(episode, actions, step, continuation)`` (the game from a recorded step on under
other actions, for ``imagination_fidelity``).
"""
import functools

import grain
import numpy as np

from jaxai import config_lib
from jaxai.craftax import dataset as craftax_dataset
from jaxai.craftax import env as craftax_env
from jaxai.data import pipeline
from jaxai.world_model import models

SOURCES = ("craftax", "synthetic")
# Craftax-Classic moves: action id -> (rows, columns) the view moves over the world.
MOVES = {1: (0, -1), 2: (0, 1), 3: (-1, 0), 4: (1, 0)}  # LEFT, RIGHT, UP, DOWN; others stay


class SyntheticSplit:
  """Procedural episodes with the interface of a recorded split (module docstring).

  Episode e is world ``seed_base + e``: a torus of ``2 * 9 x 2 * 9`` tiles drawn from
  ``num_textures`` fixed textures (the same for every split, so train and held-out share them),
  and a walk whose steps are LEFT/RIGHT/UP/DOWN with probability 1/6 each and NOOP otherwise.
  For the agent's heads it has one achievement: ``collect_wood`` unlocks (reward 1) the first time
  the tile at the centre of the view shows texture 0.
  """

  def __init__(self, num_episodes: int, episode_len: int, *, seed_base: int, num_textures: int = 12,
               tile: int = 7):
    self.tile = tile
    self.view = (models.FRAME_SHAPE[0] // tile, models.FRAME_SHAPE[1] // tile)
    self.textures = np.random.default_rng(12345).integers(0, 256, (num_textures, tile, tile, 3),
                                                          dtype=np.uint8)
    seeds = seed_base + np.arange(num_episodes)
    self.worlds, self.actions, self.positions, self.unlocked = [], [], [], []
    for seed in seeds:
      rng = np.random.default_rng(int(seed))
      self.worlds.append(rng.integers(0, num_textures, (2 * self.view[0], 2 * self.view[1])))
      actions = np.where(rng.random(episode_len) < 2 / 3, 0, rng.integers(1, 5, episode_len)).astype(np.int32)
      actions[-1] = 0  # the last step's action leads nowhere (as recorded episodes end)
      position = np.zeros((episode_len, 2), np.int64)
      for t in range(1, episode_len):
        position[t] = self._moved(position[t - 1], actions[t - 1])
      self.actions.append(actions)
      self.positions.append(position)
      centre = self.worlds[-1][(position[:, 0] + self.view[0] // 2) % self.worlds[-1].shape[0],
                               (position[:, 1] + self.view[1] // 2) % self.worlds[-1].shape[1]]
      arrived = centre == 0
      arrived[0] = False  # as in the game: nothing is unlocked, and no reward given, at the reset
      self.unlocked.append(np.maximum.accumulate(arrived))
    self.episodes = {"length": np.full(num_episodes, episode_len, np.int64), "world_seed": seeds}
    self.episode_offsets = np.arange(num_episodes + 1, dtype=np.int64) * episode_len
    self.num_steps = int(self.episode_offsets[-1])

  def _moved(self, position, action) -> np.ndarray:
    move = MOVES.get(int(action), (0, 0))
    return (np.asarray(position) + move) % self.worlds[0].shape

  def _render(self, episode: int, position) -> np.ndarray:
    rows = (position[0] + np.arange(self.view[0])) % self.worlds[episode].shape[0]
    cols = (position[1] + np.arange(self.view[1])) % self.worlds[episode].shape[1]
    tiles = self.textures[self.worlds[episode][np.ix_(rows, cols)]]  # [9, 9, 7, 7, 3]
    return tiles.swapaxes(1, 2).reshape(*models.FRAME_SHAPE)

  def read_steps(self, first_step: int, num_steps: int) -> dict[str, np.ndarray]:
    steps = np.arange(first_step, first_step + num_steps)
    episode = np.searchsorted(self.episode_offsets, steps, side="right") - 1
    local = steps - self.episode_offsets[episode]
    unlocked = np.array([self.unlocked[e][t] for e, t in zip(episode, local)])
    before = np.array([t > 0 and self.unlocked[e][t - 1] for e, t in zip(episode, local)])
    achievements = np.zeros((num_steps, len(craftax_env.ACHIEVEMENTS)), bool)
    achievements[:, craftax_env.ACHIEVEMENTS.index("collect_wood")] = unlocked
    return {"frames": np.stack([self._render(e, self.positions[e][t]) for e, t in zip(episode, local)]),
            "actions": np.array([self.actions[e][t] for e, t in zip(episode, local)], np.int32),
            "is_first": local == 0, "is_last": local == self.episodes["length"][episode] - 1,
            "rewards": (unlocked & ~before).astype(np.float32), "achievements": achievements}

  def outcomes_of_every_action(self, episode: int, actions, step: int):
    del actions  # the walk is stored
    position = self.positions[episode][step]
    return self._render(episode, position), np.stack(
        [self._render(episode, self._moved(position, a)) for a in range(craftax_env.NUM_ACTIONS)])

  def continue_episode(self, episode: int, actions, step: int, continuation) -> dict:
    """The walk from ``step`` of ``episode`` on, moved by ``continuation`` instead of the stored
    actions, as ``CraftaxOfflineSplit.continue_episode`` returns it (the walk never ends)."""
    del actions  # the walk is stored
    world, centre = self.worlds[episode], (self.view[0] // 2, self.view[1] // 2)
    position, unlocked = self.positions[episode][step], bool(self.unlocked[episode][step])
    frames, rewards, achievements = [], [], []
    for action in continuation:
      position = self._moved(position, action)
      arrived = world[(position[0] + centre[0]) % world.shape[0], (position[1] + centre[1]) % world.shape[1]] == 0
      rewards.append(float(arrived and not unlocked))
      unlocked = unlocked or bool(arrived)
      frames.append(self._render(episode, position))
      achievements.append(np.zeros(len(craftax_env.ACHIEVEMENTS), bool))
      achievements[-1][craftax_env.ACHIEVEMENTS.index("collect_wood")] = unlocked
    return {"frame": self._render(episode, self.positions[episode][step]), "frames": np.stack(frames),
            "rewards": np.asarray(rewards, np.float32), "ended": np.zeros(len(continuation), bool),
            "achievements": np.stack(achievements)}


def validate(config) -> None:
  d = config.data
  config_lib.check_choice(config, "data.source", SOURCES)
  config_lib.check_positive(config, "data.window_len", "data.eval_frames")
  if d.source == "synthetic":
    config_lib.check_positive(config, "data.synthetic_episodes", "data.synthetic_episode_len")
    return
  config_lib.check_choice(config, "data.variant", tuple(craftax_dataset.VARIANTS))
  if not d.generate:
    problem = dataset_problem(config)
    config_lib.check(problem is None, "data.dir", f"{problem} (or set --config.data.generate=True to "
                     "record it first)")


def dataset_problem(config) -> str | None:
  """Why the recorded dataset in ``data.dir`` cannot be read, or None if it can."""
  try:
    for split in craftax_dataset.SPLITS:
      craftax_dataset.load(config.data.dir, split, variant=config.data.variant)
  except craftax_dataset.DatasetError as e:
    return str(e)
  return None


def ensure_dataset(config) -> None:
  """Records the Craftax dataset into ``data.dir`` if it is missing and ``data.generate`` is set
  (returns at once when it is there). Called when a stage starts reading, never by ``--dry_run``."""
  if config.data.source == "craftax" and config.data.generate:
    craftax_dataset.generate(config.data.dir, config.data.variant)


@functools.cache
def _synthetic_split(split: str, episodes: int, episode_len: int, seed: int) -> SyntheticSplit:
  heldout = split == "heldout"
  return SyntheticSplit(max(2, episodes // 8) if heldout else episodes, episode_len,
                        seed_base=seed * 1_000_003 + (1 << 20 if heldout else 0))


def load_split(config, split: str):
  """The ``train`` or ``heldout`` split of ``data.source``."""
  d = config.data
  if d.source == "synthetic":
    return _synthetic_split(split, d.synthetic_episodes, d.synthetic_episode_len, config.seed)
  return craftax_dataset.load(d.dir, split, variant=d.variant)


def cache_prefix(config) -> str:
  """What a cache derived from the data (``latents``) is named after."""
  return "synthetic_" if config.data.source == "synthetic" else ""


def windows(config, split: str, window_len: int) -> grain.MapDataset:
  """Windows of ``window_len`` consecutive steps inside one episode, in order."""
  steps = load_split(config, split)
  starts = craftax_dataset.window_starts(steps.episode_offsets, window_len)
  config_lib.check(len(starts) > 0, "data.window_len",
                   f"no {split} episode has {window_len} steps")
  return grain.MapDataset.source(craftax_dataset.WindowSource(steps, starts, window_len))


def heldout_frames(config) -> np.ndarray:
  """``data.eval_frames`` held-out frames as [n, 1, H, W, C]: the frames of evenly spread held-out
  windows of ``data.window_len`` steps."""
  steps = load_split(config, "heldout")
  length = config.data.window_len
  starts = craftax_dataset.window_starts(steps.episode_offsets, length)
  count = -(-config.data.eval_frames // length)
  frames = np.concatenate([steps.read_steps(int(starts[i]), length)["frames"]
                           for i in pipeline.evenly_spaced(len(starts), count)])
  return frames[:config.data.eval_frames, None]


def heldout_windows(config, count: int, length: int) -> list[dict]:
  """``count`` windows of ``length`` held-out steps, each inside one episode, evenly spread."""
  split = load_split(config, "heldout")
  starts = craftax_dataset.window_starts(split.episode_offsets, length)
  config_lib.check(len(starts) > 0, "context", f"no held-out episode has context + horizon = {length} steps")
  return [split.read_steps(int(starts[i]), length) for i in pipeline.evenly_spaced(len(starts), count)]
