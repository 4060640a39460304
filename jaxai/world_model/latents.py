"""Recorded Craftax steps as frozen-tokenizer latents: encoded once per tokenizer checkpoint, cached.

The dynamics stage trains on tokenizer latents, never on pixels. Encoding a frame costs about as
much as a dynamics training pass over it, and every frame is seen many times, so the episodes are
encoded once (frame by frame: the tokenizer is causal and was trained on single frames) and kept
as float16 arrays in ``<cache_dir>/<split>_<episodes>ep_tokenizer<step>.npz``. The file name ties
a cache to the tokenizer checkpoint it came from; a cache that cannot be read is re-encoded (it is
derived data). ``LatentSteps`` holds one split in memory; ``window_dataset`` cuts it into
fixed-length windows that never cross an episode boundary.
"""
import dataclasses
import os
import sys

import grain
import jax
import numpy as np
import tqdm

from jaxai.craftax import dataset as craftax_dataset  # window_starts, WindowSource: for any steps


DYNAMICS_FIELDS = ("latents", "actions", "is_first")  # what a dynamics window holds
AGENT_FIELDS = DYNAMICS_FIELDS + ("rewards", "is_last", "achievements")
RECORDED_FIELDS = AGENT_FIELDS[1:]  # copied from the recorded split as they are


@dataclasses.dataclass(frozen=True)
class LatentSteps:
  """One split laid end to end: ``latents`` float16 [S, L, C]; per step ``actions`` int32 [S] (the
  action taken after the frame, dataset convention), ``is_first`` bool [S], and for the agent
  ``rewards`` float32 [S] (for arriving at the frame), ``is_last`` bool [S] and ``achievements``
  bool [S, 22] (unlocked so far); ``episode_offsets`` [E + 1] the first step of each episode (and
  the total); ``world_seeds`` [E]."""
  latents: np.ndarray
  actions: np.ndarray
  is_first: np.ndarray
  rewards: np.ndarray
  is_last: np.ndarray
  achievements: np.ndarray
  episode_offsets: np.ndarray
  world_seeds: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.actions)

  def read_steps(self, start: int, count: int, fields=DYNAMICS_FIELDS) -> dict[str, np.ndarray]:
    window = slice(start, start + count)
    return {name: getattr(self, name)[window] for name in fields}


def _cache_path(cache_dir: str, name: str, episodes: int, tokenizer_step: int) -> str:
  return os.path.join(cache_dir, f"{name}_{episodes}ep_tokenizer{tokenizer_step}.npz")


def _read(path: str) -> LatentSteps | None:
  try:
    with np.load(path) as f:
      steps = LatentSteps(**{field.name: f[field.name] for field in dataclasses.fields(LatentSteps)})
  except (OSError, KeyError, ValueError, EOFError):
    return None
  consistent = (steps.latents.shape[0] == steps.num_steps == int(steps.episode_offsets[-1]) and
                len(steps.world_seeds) == len(steps.episode_offsets) - 1)
  return steps if consistent else None


def load_or_encode(encode, steps, *, name: str, max_episodes: int, tokenizer_step: int,
                   cache_dir: str, batch_size: int = 256) -> LatentSteps:
  """The first ``max_episodes`` episodes (0: all) of split ``steps`` as latents, from the cache
  ``name`` or encoded now.

  steps: a split (``jaxai.world_model.data``: ``episodes``, ``episode_offsets``, ``read_steps``).
  encode: uint8 frames [B, H, W, C] -> latents [B, L, C] (the frozen tokenizer, jitted by the
  caller; called with exactly ``batch_size`` frames, the last batch padded).
  """
  split = name
  num_episodes = len(steps.episodes["length"])
  episodes = num_episodes if max_episodes <= 0 else min(max_episodes, num_episodes)
  path = _cache_path(cache_dir, name, episodes, tokenizer_step)
  if os.path.exists(path):
    cached = _read(path)
    if cached is not None:
      return cached
    print(f"latent cache {path} is unreadable or lacks fields added since; encoding again",
          file=sys.stderr, flush=True)
  num_steps = int(steps.episode_offsets[episodes])
  latents = None
  recorded = {}
  for start in tqdm.trange(0, num_steps, batch_size, desc=f"encoding {split} frames", unit="batch",
                           file=sys.stderr, disable=jax.process_index() != 0):
    count = min(batch_size, num_steps - start)
    read = steps.read_steps(start, count)
    frames = read["frames"]
    if count < batch_size:
      frames = np.concatenate([frames, np.repeat(frames[-1:], batch_size - count, 0)])
    encoded = np.asarray(jax.device_get(encode(frames)))[:count].astype(np.float16)
    if latents is None:
      latents = np.zeros((num_steps, *encoded.shape[1:]), np.float16)
    latents[start:start + count] = encoded
    for name in RECORDED_FIELDS:
      if name not in recorded:
        recorded[name] = np.zeros((num_steps, *read[name].shape[1:]), read[name].dtype)
      recorded[name][start:start + count] = read[name]
  result = LatentSteps(latents=latents, **recorded,
                       episode_offsets=np.asarray(steps.episode_offsets[:episodes + 1], np.int64),
                       world_seeds=np.asarray(steps.episodes["world_seed"][:episodes], np.int64))
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    partial = path + ".partial.npz"  # written then renamed: a crash never leaves a half cache
    np.savez(partial, **dataclasses.asdict(result))
    os.replace(partial, path)
  return result


def window_dataset(steps: LatentSteps, window_len: int, stride: int = 1) -> grain.MapDataset:
  """{'latents': float16 [T, L, C], 'actions': int32 [T], 'is_first': bool [T]} windows, in order."""
  starts = craftax_dataset.window_starts(steps.episode_offsets, window_len, stride)
  if len(starts) == 0:
    raise ValueError(f"no episode has {window_len} steps")
  return grain.MapDataset.source(craftax_dataset.WindowSource(steps, starts, window_len))
