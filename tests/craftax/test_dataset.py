"""craftax_offline: what grain reads back is what the real game shows for the recorded actions.

The reference is Craftax itself: each recorded episode is replayed from its world seed through the
package's public env.reset/env.step (the key convention of jaxai.craftax.env) and its frames,
rewards, flags and achievements are compared with what the dataset hands out.
"""
import os
import shutil
import time

import jax
import numpy as np
import pytest

from jaxai.craftax import dataset
from jaxai.craftax import env as craftax_env

WINDOW = 8
_ENV = craftax_env.make_env()  # one instance: env.step is jitted per instance


@pytest.fixture(name="data_dir")
def fixture_data_dir(tiny_craftax_data):
  return tiny_craftax_data


def _replay(world_seed: int, actions: np.ndarray) -> dict[str, np.ndarray]:
  """Plays ``actions`` on world ``world_seed`` with the package's own API, recording as documented."""
  env = _ENV
  params = env.default_params
  reset_key, steps_key = jax.random.split(jax.random.PRNGKey(world_seed))
  obs, state = env.reset(reset_key, params)
  out = {"frames": [np.round(np.asarray(obs) * 255).astype(np.uint8)], "rewards": [0.0],
         "is_terminal": [False], "achievements": [np.asarray(state.achievements)]}
  for t, action in enumerate(actions[:-1]):  # the last step's action is a placeholder
    obs, state, reward, done, _ = env.step(jax.random.fold_in(steps_key, t), state, int(action), params)
    out["frames"].append(np.round(np.asarray(obs) * 255).astype(np.uint8))
    out["rewards"].append(float(reward))
    out["is_terminal"].append(bool(done))
    out["achievements"].append(np.asarray(state.achievements))
  return {k: np.stack(v) for k, v in out.items()}


def _assert_same_frames(recorded: np.ndarray, replayed: np.ndarray):
  """Equal up to the last bit: the batched recorder and the single-env replay are compiled apart,
  so a pixel that renders to x.5 can round either way (seen on ~0.03% of values, up to 0.2% of
  one dark frame)."""
  assert recorded.dtype == replayed.dtype == np.uint8 and recorded.shape == replayed.shape
  difference = np.abs(recorded.astype(np.int16) - replayed.astype(np.int16))
  assert difference.max() <= 1 and np.mean(difference > 0) < 1e-2


def test_recorded_episodes_replay_in_the_real_game(data_dir):
  for split in dataset.SPLITS:
    steps = dataset.load(data_dir, split, variant="tiny")
    assert steps.num_steps == int(np.sum(steps.episodes["length"]))
    for i in range(len(steps.episodes["length"])):
      episode = steps.episode(i)
      replay = _replay(int(steps.episodes["world_seed"][i]), episode["actions"])
      _assert_same_frames(episode["frames"], replay["frames"])
      np.testing.assert_allclose(episode["rewards"], replay["rewards"], atol=1e-6)
      np.testing.assert_array_equal(episode["achievements"], replay["achievements"])
      np.testing.assert_array_equal(episode["is_terminal"], replay["is_terminal"])
      length = len(episode["actions"])
      np.testing.assert_array_equal(episode["is_first"], np.arange(length) == 0)
      np.testing.assert_array_equal(episode["is_last"], np.arange(length) == length - 1)
      np.testing.assert_array_equal(episode["achievements"][-1], steps.episodes["achievements"][i])
      assert length == steps.episodes["length"][i] <= dataset.VARIANTS["tiny"].max_episode_len


def test_continued_episodes_are_the_game_under_the_new_actions(data_dir):
  """From a recorded step on, the recorded actions give the recorded steps, and other actions give
  what the package's own API plays for them (the episode's keys, step by step)."""
  steps = dataset.load(data_dir, "heldout", variant="tiny")
  episode = steps.episode(0)
  length = len(episode["actions"])
  step, horizon = length // 3, 6
  assert step + horizon < length
  recorded = steps.continue_episode(0, episode["actions"], step, episode["actions"][step:step + horizon])
  _assert_same_frames(episode["frames"][step][None], recorded["frame"][None])
  later = slice(step + 1, step + 1 + horizon)
  _assert_same_frames(episode["frames"][later], recorded["frames"])
  np.testing.assert_allclose(recorded["rewards"], episode["rewards"][later], atol=1e-6)
  np.testing.assert_array_equal(recorded["achievements"], episode["achievements"][later])
  np.testing.assert_array_equal(recorded["ended"], np.cumsum(episode["is_terminal"][later]) > 0)
  other = np.random.default_rng(0).integers(0, craftax_env.NUM_ACTIONS, horizon).astype(np.int32)
  branched = steps.continue_episode(0, episode["actions"], step, other)
  # _replay plays all but the last action (a recorded episode's placeholder).
  replay = _replay(int(steps.episodes["world_seed"][0]), np.concatenate([episode["actions"][:step], other, [0]]))
  _assert_same_frames(replay["frames"][step + 1:], branched["frames"])
  np.testing.assert_allclose(branched["rewards"], replay["rewards"][step + 1:], atol=1e-6)
  np.testing.assert_array_equal(branched["achievements"], replay["achievements"][step + 1:])
  np.testing.assert_array_equal(branched["ended"], np.cumsum(replay["is_terminal"][step + 1:]) > 0)


def test_grain_windows_are_slices_of_the_replayed_episodes(data_dir):
  steps = dataset.load(data_dir, "train", variant="tiny")
  windows = dataset.window_dataset(data_dir, "train", WINDOW, variant="tiny", shuffle=False)
  replays = [_replay(int(seed), steps.episode(i)["actions"])
             for i, seed in enumerate(steps.episodes["world_seed"])]
  expected = [(e, s) for e, n in enumerate(steps.episodes["length"]) for s in range(n - WINDOW + 1)]
  assert len(windows) == len(expected)
  for index in range(0, len(windows), 5):
    episode, start = expected[index]
    window = windows[index]
    assert window["frames"].dtype == np.uint8 and window["frames"].shape == (WINDOW, 63, 63, 3)
    assert window["actions"].dtype == np.int32 and window["achievements"].shape == (WINDOW, 22)
    _assert_same_frames(window["frames"], replays[episode]["frames"][start:start + WINDOW])
    np.testing.assert_array_equal(window["achievements"],
                                  replays[episode]["achievements"][start:start + WINDOW])


def test_windows_never_cross_episodes_unless_asked(data_dir):
  windows = dataset.window_dataset(data_dir, "train", WINDOW, variant="tiny", seed=3)
  for window in windows:
    assert not window["is_first"][1:].any() and not window["is_last"][:-1].any()
  crossing = dataset.window_dataset(data_dir, "train", WINDOW, variant="tiny", cross_episodes=True,
                                    stride=3, shuffle=False)
  episode_starts = [int(np.flatnonzero(w["is_first"])[0]) for w in crossing if w["is_first"].any()]
  assert any(start > 0 for start in episode_starts)  # episodes of 40 steps, windows every 3


def _fingerprint(window) -> bytes:
  return window["frames"].tobytes()[::97] + window["actions"].tobytes() + window["is_first"].tobytes()


def test_shuffle_is_seeded_and_shards_partition_the_windows(data_dir):
  def order(**kw):
    return [_fingerprint(w) for w in dataset.window_dataset(data_dir, "train", WINDOW, variant="tiny",
                                                            stride=4, **kw)]
  everything = order(shuffle=False)
  assert len(set(everything)) == len(everything)
  assert order(seed=7) == order(seed=7) != order(seed=8)
  assert sorted(order(seed=7)) == sorted(everything)
  shards = [order(seed=7, shard_index=i, shard_count=3) for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(everything)


def test_iterator_state_resumes_where_it_stopped(data_dir):
  windows = dataset.window_dataset(data_dir, "heldout", WINDOW, variant="tiny", seed=5)
  iterator = iter(windows.to_iter_dataset())
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [_fingerprint(next(iterator)) for _ in range(6)]
  resumed = iter(dataset.window_dataset(data_dir, "heldout", WINDOW, variant="tiny",
                                        seed=5).to_iter_dataset())
  resumed.set_state(state)
  assert [_fingerprint(next(resumed)) for _ in range(6)] == expected


def test_heldout_worlds_are_disjoint_from_train():
  for variant in dataset.VARIANTS:
    train = {s.world_seed for s in dataset.episode_specs(variant, "train")}
    heldout = {s.world_seed for s in dataset.episode_specs(variant, "heldout")}
    assert train and heldout and not train & heldout
    mix = [s.policy for s in dataset.episode_specs(variant, "train")]
    assert set(mix) == set(dataset.VARIANTS[variant].policy_mix)


def test_missing_dataset_is_a_clear_error(tmp_path):
  start = time.time()
  with pytest.raises(dataset.DatasetError, match=str(tmp_path)):
    dataset.window_dataset(str(tmp_path), "train", WINDOW, variant="tiny")
  assert time.time() - start < 5


def test_truncated_or_corrupt_files_are_clear_errors(data_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  version_dir = dataset.dataset_dir(str(copy), "tiny")
  shard = os.path.join(version_dir,
                       sorted(f for f in os.listdir(version_dir) if "train.array_record" in f)[0])
  size = os.path.getsize(shard)

  with open(shard, "r+b") as f:  # bytes flipped inside: the first read notices
    f.seek(size // 3)
    block = f.read(4096)
    f.seek(size // 3)
    f.write(bytes(b ^ 0xFF for b in block))
  start = time.time()
  with pytest.raises(dataset.DatasetError, match="corrupt"):
    for window in dataset.window_dataset(str(copy), "train", WINDOW, variant="tiny", shuffle=False):
      del window
  assert time.time() - start < 10

  os.truncate(shard, size // 2)  # cut short: opening notices
  with pytest.raises(dataset.DatasetError, match="truncated"):
    dataset.load(str(copy), "train", variant="tiny")

  os.remove(os.path.join(version_dir, "metadata.json"))
  with pytest.raises(dataset.DatasetError, match=version_dir):
    dataset.load(str(copy), "heldout", variant="tiny")
