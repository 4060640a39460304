"""``craftax_offline``: recorded Craftax-Classic play of mixed skill, as a TFDS dataset read with grain.

Public API (what a world-model config needs):

  generate(data_dir, variant="default") -> path
      Records the dataset once (a progress bar per split) and caches it under
      ``data_dir/craftax_offline/<variant>/<version>``; later calls return at once.
  window_dataset(data_dir, split, window_len, *, variant="default", seed=0, shuffle=True,
                 stride=1, cross_episodes=False, shard_index=0, shard_count=1) -> grain.MapDataset
      Fixed-length windows ``{'frames': uint8 [T,63,63,3], 'actions': int32 [T], 'rewards':
      float32 [T], 'is_first', 'is_last', 'is_terminal': bool [T], 'achievements': bool [T,22]}``.
      Deterministic given ``seed``; ``.to_iter_dataset()`` gives a grain iterator whose
      ``get_state``/``set_state`` checkpoint the position.
  load(data_dir, split, *, variant="default") -> CraftaxOfflineSplit
      The split's episode table (policy, world seed, length, ...) and step reads.
  DatasetError
      Raised, quickly and naming the path, for a missing, incomplete or corrupt dataset.

What is recorded (conventions in ``jaxai.craftax.policies``): whole episodes of Craftax-Classic
played by the behaviour policies ``random``, ``novice``, ``intermediate`` and ``expert`` in the
proportions of ``VARIANTS[v].policy_mix``; step ``t`` holds the frame the player saw, the action it
then took (NOOP on an episode's last step), the reward for arriving there and the achievements so
far. Every episode is its own world: train and heldout world seeds are disjoint ranges
(``TRAIN_SEED_BASE``, ``HELDOUT_SEED_BASE``), and an episode can be replayed exactly from its world
seed and actions (``jaxai.craftax.env``). Episodes longer than ``max_episode_len`` steps are cut
there (``is_last`` without ``is_terminal``), which keeps many different worlds in the data.

Layout: each ArrayRecord record is a chunk of ``chunk_len`` consecutive steps of one episode (the
last chunk zero-padded); frames are zlib-compressed raw pixels (no image codec on reads). Records
are written in (episode, chunk) order (TFDS ``disable_shuffling``), so with the episode lengths
kept in the dataset's metadata, the records of any window are known without an index file; each
record also names its episode and first step, and reads check them.
"""
import dataclasses
import math
import os

import grain
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jaxai.craftax import env as craftax_env
from jaxai.craftax import policies
from jaxai.data import array_records

DATASET_NAME = "craftax_offline"
TRAIN_SEED_BASE = 0
HELDOUT_SEED_BASE = 1 << 30  # heldout worlds: seeds from here on, never used by train
SPLITS = ("train", "heldout")
STEP_KEYS = ("frames", "actions", "rewards", "is_first", "is_last", "is_terminal", "achievements")


class DatasetError(RuntimeError):
  """The dataset is missing, incomplete or corrupt; the message names the path and the problem."""


@dataclasses.dataclass(frozen=True)
class Variant:
  episodes: dict[str, int]  # episodes per split
  max_episode_len: int  # steps; longer episodes are truncated there
  policy_mix: dict[str, float]  # fraction of episodes played by each behaviour policy
  chunk_len: int = 32  # steps per stored record
  num_envs: int = 64  # games played in parallel while recording


VARIANTS = {
    # A few short episodes, seconds to record (after the step function's compilation): for tests.
    "tiny": Variant(episodes={"train": 4, "heldout": 2}, max_episode_len=40, chunk_len=16,
                    num_envs=4, policy_mix={"random": 0.25, "novice": 0.25, "intermediate": 0.25,
                                            "expert": 0.25}),
    # About 0.3M train frames; see generate()'s docstring for the time and size measured here.
    "default": Variant(episodes={"train": 400, "heldout": 32}, max_episode_len=2000,
                       policy_mix={"random": 0.15, "novice": 0.3, "intermediate": 0.25,
                                   "expert": 0.3}),
}


def episode_specs(variant: str, split: str) -> list[policies.EpisodeSpec]:
  """Which world and which policy each episode of ``split`` gets (deterministic)."""
  v = VARIANTS[variant]
  n = v.episodes[split]
  names = sorted(v.policy_mix)
  weights = np.array([v.policy_mix[k] for k in names], np.float64)
  # Exact proportions (largest remainder), then a seeded order, so small variants mix too.
  counts = np.floor(weights / weights.sum() * n).astype(int)
  for i in np.argsort(-(weights / weights.sum() * n - counts))[:n - counts.sum()]:
    counts[i] += 1
  chosen = np.repeat(names, counts)
  np.random.default_rng(SPLITS.index(split)).shuffle(chosen)
  base = TRAIN_SEED_BASE if split == "train" else HELDOUT_SEED_BASE
  return [policies.EpisodeSpec(base + i, str(p)) for i, p in enumerate(chosen)]


class CraftaxOfflineConfig(tfds.core.BuilderConfig):
  pass


class CraftaxOffline(tfds.core.GeneratorBasedBuilder):
  """Craftax-Classic play recorded by behaviour policies of mixed skill (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [CraftaxOfflineConfig(name=name, description=f"{name} variant")
                     for name in VARIANTS]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the importlib_resources backport for packages; this file is the answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    c = VARIANTS[self.builder_config.name].chunk_len
    def raw(shape, dtype):
      return tfds.features.Tensor(shape=shape, dtype=dtype, encoding="bytes")
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "episode": np.int64, "start": np.int64, "length": np.int64,
            # zlib (~0.8 KB a frame): without TensorFlow, TFDS's writer cannot spill to disk and
            # holds at most 1 GB of serialized records (raw frames would stop it at ~80k frames).
            "frames": tfds.features.Tensor(shape=(c, *craftax_env.FRAME_SHAPE), dtype=np.uint8,
                                           encoding="zlib"),
            "actions": raw((c,), np.int32), "rewards": raw((c,), np.float32),
            "is_first": raw((c,), np.bool_), "is_last": raw((c,), np.bool_),
            "is_terminal": raw((c,), np.bool_),
            "achievements": raw((c, len(craftax_env.ACHIEVEMENTS)), np.bool_),
        }),
        disable_shuffling=True,  # records stay in (episode, chunk) order: see module docstring
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/MichaelTMatthews/Craftax",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    variant = self.builder_config.name
    v = VARIANTS[variant]
    specs = episode_specs(variant, split)
    max_chunks = math.ceil(v.max_episode_len / v.chunk_len)
    # Keys sort as (episode, chunk) and spread over the writer's 2**128 range, so its temporary
    # buckets stay small while the output keeps that order.
    key_scale = 2**128 // (len(specs) * max_chunks)
    table = {k: [None] * len(specs) for k in ("world_seed", "policy", "length", "terminal",
                                              "episode_return", "achievements")}
    bar = tqdm.tqdm(total=len(specs), desc=f"Recording {DATASET_NAME}/{variant} {split}",
                    unit="episode")
    frames = 0
    for item in policies.play_episodes(specs, num_envs=v.num_envs, max_episode_len=v.max_episode_len,
                                       render=True, chunk_len=v.chunk_len):
      if isinstance(item, policies.EpisodeSummary):
        table["world_seed"][item.episode] = item.world_seed
        table["policy"][item.episode] = item.policy
        table["length"][item.episode] = item.length
        table["terminal"][item.episode] = item.terminal
        table["episode_return"][item.episode] = round(item.episode_return, 4)
        table["achievements"][item.episode] = [int(i) for i in np.flatnonzero(item.achievements)]
        frames += item.length
        bar.update(1)
        bar.set_postfix(frames=frames)
        continue
      n = len(item.steps["actions"])
      record = {"episode": item.episode, "start": item.start, "length": n}
      for k in STEP_KEYS:
        x = item.steps[k]
        record[k] = np.concatenate([x, np.zeros((v.chunk_len - n, *x.shape[1:]), x.dtype)])
      yield (item.episode * max_chunks + item.start // v.chunk_len) * key_scale, record
    bar.close()
    self.info.metadata.setdefault("splits", {})[split] = table
    self.info.metadata.update(chunk_len=v.chunk_len, max_episode_len=v.max_episode_len,
                              achievements=list(craftax_env.ACHIEVEMENTS))


def dataset_dir(data_dir: str, variant: str = "default") -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), DATASET_NAME, variant,
                      str(CraftaxOffline.VERSION))


def generate(data_dir: str, variant: str = "default") -> str:
  """Records ``variant`` under ``data_dir`` unless it is there already; returns its directory.

  Measured on this project's 2-core CPU machine: ``default`` took 6 min (1.4 GB peak memory) for
  400 train episodes / 289,843 frames and 32 heldout episodes / 25,664 frames, 668 MB on disk
  (expert episodes reaching the iron pickaxe: 89 train, 10 heldout; the diamond: 88 and 9).
  ``tiny`` takes ~30 s, nearly all of it compiling the game's step. Run it on one process before
  others read (two processes generating into one data_dir would both record).
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown craftax_offline variant {variant!r}; choose from {', '.join(VARIANTS)}")
  path = dataset_dir(data_dir, variant)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    builder = CraftaxOffline(config=variant, data_dir=os.path.abspath(os.path.expanduser(data_dir)),
                             file_format="array_record")
    builder.download_and_prepare()
  load(data_dir, "train", variant=variant)  # checks what was written
  return path


class CraftaxOfflineSplit:
  """One split of a generated dataset: its episode table and reads of consecutive steps."""

  def __init__(self, data_dir: str, split: str, *, variant: str = "default"):
    self.path = dataset_dir(data_dir, variant)
    self.split = split
    if not os.path.exists(os.path.join(self.path, "dataset_info.json")):
      raise DatasetError(f"no {DATASET_NAME}/{variant} dataset at {self.path} (missing "
                         f"dataset_info.json): record it with jaxai.craftax.dataset.generate("
                         f"{data_dir!r}, {variant!r})")
    try:
      builder = tfds.builder_from_directory(self.path)
      info = builder.info
      metadata = dict(info.metadata or {})
      table = metadata["splits"][split]
      self.chunk_len = int(metadata["chunk_len"])
      split_info = info.splits[split]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DatasetError(f"{DATASET_NAME} at {self.path} is incomplete or corrupt "
                         f"(cannot read its info or split {split!r}: {type(e).__name__}: {e})") from e
    self.episodes = {k: np.asarray(v) for k, v in table.items() if k != "achievements"}
    self.episodes["achievements"] = np.zeros((len(table["length"]), len(craftax_env.ACHIEVEMENTS)), bool)
    for i, unlocked in enumerate(table["achievements"]):
      self.episodes["achievements"][i, unlocked] = True
    lengths = self.episodes["length"].astype(np.int64)
    chunks = -(-lengths // self.chunk_len)
    self.episode_offsets = np.concatenate([[0], np.cumsum(lengths)])  # first step of each episode
    self.first_record = np.concatenate([[0], np.cumsum(chunks)])  # first record of each episode
    self.num_steps = int(self.episode_offsets[-1])
    # A truncated or missing shard shows up as fewer records than the info promises.
    if int(self.first_record[-1]) != split_info.num_examples:
      raise DatasetError(f"{DATASET_NAME} at {self.path}: split {split!r} has "
                         f"{split_info.num_examples} records but its episodes need "
                         f"{int(self.first_record[-1])}; the dataset is corrupt, delete and regenerate it")
    array_records.check_shards(split_info, self.path, DatasetError)
    self._builder = builder
    self._source = None

  def __getstate__(self):  # grain workers get a copy without the open files
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def _record(self, index: int, episode: int, start: int) -> dict:
    if self._source is None:
      self._source = self._builder.as_data_source(self.split)
    try:
      record = self._source[index]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DatasetError(f"{DATASET_NAME} at {self.path}: cannot read record {index} of split "
                         f"{self.split!r} ({type(e).__name__}: {e}); the files are corrupt, delete "
                         "and regenerate them") from e
    if record["episode"] != episode or record["start"] != start:
      raise DatasetError(f"{DATASET_NAME} at {self.path}: record {index} of split {self.split!r} "
                         f"holds episode {record['episode']} step {record['start']}, expected "
                         f"episode {episode} step {start}; the dataset is corrupt")
    return record

  def read_steps(self, first_step: int, num_steps: int) -> dict[str, np.ndarray]:
    """Steps ``[first_step, first_step + num_steps)`` of the split's episodes laid end to end."""
    if first_step < 0 or first_step + num_steps > self.num_steps:
      raise IndexError(f"steps [{first_step}, {first_step + num_steps}) outside [0, {self.num_steps})")
    parts = {k: [] for k in STEP_KEYS}
    step, end = first_step, first_step + num_steps
    while step < end:
      episode = int(np.searchsorted(self.episode_offsets, step, side="right") - 1)
      local = step - int(self.episode_offsets[episode])
      chunk = local // self.chunk_len
      record = self._record(int(self.first_record[episode]) + chunk, episode, chunk * self.chunk_len)
      lo = local - chunk * self.chunk_len
      hi = min(int(record["length"]), lo + end - step)
      for k in STEP_KEYS:
        parts[k].append(record[k][lo:hi])
      step += hi - lo
    return {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}

  def outcomes_of_every_action(self, episode: int, actions: np.ndarray, step: int):
    """(frame at ``step`` of ``episode``, the frame each of the 17 actions leads to from there),
    uint8, replaying the episode's ``actions`` (its recorded ones, at least ``step`` of them) in
    the real game from its world seed (``env.next_frame_of_every_action``)."""
    return craftax_env.next_frame_of_every_action(int(self.episodes["world_seed"][episode]), actions, step)

  def continue_episode(self, episode: int, actions: np.ndarray, step: int, continuation: np.ndarray) -> dict:
    """The real game from ``step`` of ``episode`` on, played with ``continuation`` instead of the
    recorded actions (``env.continue_episode``: frame at ``step``, then frames, rewards, ended and
    achievements of each continued step)."""
    return craftax_env.continue_episode(int(self.episodes["world_seed"][episode]), actions, step, continuation)

  def episode(self, index: int) -> dict[str, np.ndarray]:
    """All steps of episode ``index``."""
    start = int(self.episode_offsets[index])
    return self.read_steps(start, int(self.episode_offsets[index + 1]) - start)


def load(data_dir: str, split: str, *, variant: str = "default") -> CraftaxOfflineSplit:
  """Opens one split of a generated dataset, checking it; raises DatasetError if unusable."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
  return CraftaxOfflineSplit(data_dir, split, variant=variant)


def window_starts(episode_offsets: np.ndarray, window_len: int, stride: int = 1) -> np.ndarray:
  """First steps of every ``stride``-th window of ``window_len`` steps that lies inside one episode;
  ``episode_offsets`` [E + 1] holds each episode's first step and the total."""
  starts = [np.arange(begin, end - window_len + 1, stride, dtype=np.int64)
            for begin, end in zip(episode_offsets[:-1], episode_offsets[1:])]
  return np.concatenate(starts) if starts else np.zeros(0, np.int64)


class WindowSource(grain.sources.RandomAccessDataSource):
  """Window ``i`` = ``steps.read_steps(starts[i], window_len)``, of any steps laid end to end
  (a recorded split here, tokenizer latents in ``jaxai.world_model.latents``)."""

  def __init__(self, steps, starts: np.ndarray, window_len: int):
    self.steps, self.starts, self.window_len = steps, starts, window_len

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.steps.read_steps(int(self.starts[index]), self.window_len)


def window_dataset(data_dir: str, split: str, window_len: int, *, variant: str = "default",
                   seed: int = 0, shuffle: bool = True, stride: int = 1,
                   cross_episodes: bool = False, shard_index: int = 0,
                   shard_count: int = 1) -> grain.MapDataset:
  """Windows of ``window_len`` consecutive steps (see module docstring for the keys).

  Windows start every ``stride`` steps. They lie inside one episode unless ``cross_episodes``, in
  which case they run over the split's episodes laid end to end and ``is_first`` marks where a new
  episode begins. With ``shuffle`` the order is a permutation fixed by ``seed``. Process
  ``shard_index`` of ``shard_count`` gets every ``shard_count``-th window of that order, so shards
  are disjoint and together cover every window once. (A pipeline that shards by itself, like
  ``jaxai.data.pipeline.process_local_batches``, wants ``shard_count=1``.)
  """
  if window_len < 1 or stride < 1:
    raise ValueError(f"window_len and stride must be positive, got {window_len} and {stride}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  steps = load(data_dir, split, variant=variant)
  if cross_episodes:
    starts = np.arange(0, steps.num_steps - window_len + 1, stride, dtype=np.int64)
  else:
    starts = window_starts(steps.episode_offsets, window_len, stride)
  if len(starts) == 0:
    raise DatasetError(f"{DATASET_NAME} at {steps.path}: split {split!r} has no window of "
                       f"{window_len} steps (longest episode: {int(steps.episodes['length'].max())})")
  windows = grain.MapDataset.source(WindowSource(steps, starts, window_len))
  if shuffle:
    windows = windows.shuffle(seed=seed)
  return windows[shard_index::shard_count]


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data_dir", None, "Where craftax_offline/<variant>/ is recorded.", required=True)
  flags.DEFINE_enum("variant", "default", sorted(VARIANTS), "Dataset variant.")


def main(argv):
  """``python -m jaxai.craftax.dataset --data_dir=DIR [--variant=default]``: record and summarize."""
  del argv
  import json  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  path = generate(args.data_dir, args.variant)
  for split in SPLITS:
    steps = load(args.data_dir, split, variant=args.variant)
    policy_names, counts = np.unique(steps.episodes["policy"], return_counts=True)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f"-{split}." in f)
    print(json.dumps({"split": split, "path": path, "episodes": len(steps.episodes["length"]),
                      "frames": steps.num_steps, "bytes": size,
                      "episodes_per_policy": dict(zip(policy_names.tolist(), counts.tolist()))}))


if __name__ == "__main__":
  from jaxai import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run(main)
