"""The evaluation harness plays the real game: compared with the game stepped in a plain loop, with
``policies.play_episodes``, and its statistics with scipy."""
import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from jaxai.craftax import env as craftax_env
from jaxai.craftax import evaluation
from jaxai.craftax import policies

NUM_ENVS = 3  # one batch size for every test here: the harness's compilations are shared
MAX_LEN = 24
A = policies.A
# Worlds found by a search of the maps at reset, and what the scripted player does there first.
LAVA_WORLD = 7064  # lava five cells below the spawn, grass in between
WOOD_WORLD = 7002  # a tree two cells right of the spawn
OPENINGS = {LAVA_WORLD: [A.DOWN.value] * 5, WOOD_WORLD: [A.RIGHT.value] * 2 + [A.DO.value] * 3}
_ENV = craftax_env.make_env()  # one instance: env.step is jitted per instance


def _script(world_seed: int) -> np.ndarray:
  """The scripted player's actions on a world: its opening, then seeded random actions."""
  actions = np.random.default_rng(world_seed).integers(craftax_env.NUM_ACTIONS, size=MAX_LEN)
  opening = OPENINGS.get(world_seed, [])
  actions[:len(opening)] = opening
  return actions.astype(np.int32)


class ScriptedPixelPolicy:
  """Plays each world's fixed script, keeping per-slot context as a pixel agent would."""

  def __init__(self):
    self.slot_seed = {}  # slot -> (world seed, steps taken)
    self.resets = []  # (slots, world seeds) of every reset call
    self.frames_seen = {}  # world seed -> frames it was shown

  def reset(self, slots, world_seeds):
    self.resets.append((list(slots), list(world_seeds)))
    for slot, seed in zip(slots, world_seeds):
      self.slot_seed[int(slot)] = (int(seed), 0)
      self.frames_seen[int(seed)] = []

  def act(self, frames, views, active):
    del views  # pixels only
    assert frames.dtype == np.uint8 and frames.shape == (NUM_ENVS, 63, 63, 3)
    actions = np.zeros(NUM_ENVS, np.int64)
    for slot in np.flatnonzero(active):
      seed, t = self.slot_seed[slot]
      self.frames_seen[seed].append(frames[slot].copy())
      actions[slot] = _script(seed)[t]
      self.slot_seed[slot] = (seed, t + 1)
    return actions


def _reference(world_seed: int, actions: np.ndarray, max_len: int) -> dict:
  """The episode of ``actions`` on a world, by the package's own env.reset / env.step."""
  params = _ENV.default_params
  reset_key, steps_key = jax.random.split(jax.random.PRNGKey(world_seed))
  obs, state = _ENV.reset(reset_key, params)
  frames, episode_return, done, t = [np.round(np.asarray(obs) * 255).astype(np.uint8)], 0.0, False, 0
  while not done and len(frames) < max_len:
    obs, state, reward, done, _ = _ENV.step(jax.random.fold_in(steps_key, t), state, int(actions[t]),
                                            params)
    frames.append(np.round(np.asarray(obs) * 255).astype(np.uint8))
    episode_return += float(reward)
    t += 1
  return dict(frames=np.stack(frames), actions=actions[:t], episode_return=episode_return,
              length=len(frames), died=bool(done), achievements=np.asarray(state.achievements))


def _assert_same_frames(played: np.ndarray, replayed: np.ndarray):
  """Equal up to a last-bit rounding of a few pixels (the batched and single-env programs are
  compiled apart; see test_dataset)."""
  assert played.shape == replayed.shape and played.dtype == np.uint8
  difference = np.abs(played.astype(np.int16) - replayed.astype(np.int16))
  assert difference.max() <= 1 and np.mean(difference > 0) < 1e-2


@pytest.fixture(name="scripted", scope="module")
def fixture_scripted():
  seeds = [7000, LAVA_WORLD, WOOD_WORLD, 7001, 7003]  # 5 worlds on 3 slots; the lava death frees slot 1
  policy = ScriptedPixelPolicy()
  results = evaluation.play(policy, seeds, num_envs=NUM_ENVS, max_episode_len=MAX_LEN,
                            record_episode=3)
  references = {s: _reference(s, _script(s), MAX_LEN) for s in seeds}
  return seeds, policy, results, references


def test_scripted_pixel_policy_plays_the_game_as_a_plain_loop(scripted):
  seeds, policy, results, references = scripted
  assert references[LAVA_WORLD]["died"] and references[LAVA_WORLD]["length"] == 6, \
      "the lava world's script no longer walks into lava"
  assert references[WOOD_WORLD]["achievements"][craftax_env.ACHIEVEMENTS.index("collect_wood")]
  assert [e.world_seed for e in results.episodes] == seeds
  for episode in results.episodes:
    reference = references[episode.world_seed]
    np.testing.assert_array_equal(episode.achievements, reference["achievements"])
    assert episode.length == reference["length"]
    assert episode.died == reference["died"]
    assert episode.episode_return == pytest.approx(reference["episode_return"], abs=1e-6)
    # The policy saw every frame but the last, each as the game draws it.
    _assert_same_frames(np.stack(policy.frames_seen[episode.world_seed]), reference["frames"][:-1])


def test_slots_restart_as_their_episodes_end(scripted):
  seeds, policy, _, _ = scripted
  # Slot 1 dies in the lava after 5 steps and takes the 4th world; slots 0 and 2 reach the cap
  # together, slot 0 takes the 5th world and slot 2 idles.
  assert policy.resets == [([0, 1, 2], seeds[:3]), ([1], [seeds[3]]), ([0], [seeds[4]])]


def test_recorded_episode_is_the_real_one(scripted):
  seeds, _, results, references = scripted
  recording, reference = results.recording, references[seeds[3]]
  assert recording.world_seed == seeds[3]
  _assert_same_frames(recording.frames, reference["frames"])
  np.testing.assert_array_equal(recording.actions, reference["actions"])


def test_gif_has_a_captioned_image_per_frame(scripted, tmp_path):
  recording = scripted[2].recording
  path = tmp_path / "episode.gif"
  evaluation.write_gif(str(path), recording.frames, recording.actions, "scripted: collect wood")
  with Image.open(path) as gif:
    assert gif.n_frames == len(recording.frames)
    assert gif.size == (63 * 4, 63 * 4 + evaluation.CAPTION_HEIGHT)
  images = evaluation.gif_frames(recording.frames, recording.actions, "task")
  np.testing.assert_array_equal(images[0][:252:4, ::4], recording.frames[0])  # nearest 4x upscale
  assert images[0][252:].any()  # the caption is drawn


def test_behaviour_policies_through_the_harness_play_as_play_episodes():
  seeds = [9000, 9001]
  for name in ("random", "expert"):
    specs = [policies.EpisodeSpec(s, name) for s in seeds]
    # Recorded with frames, so that it runs the harness's compiled programs (no new compilation).
    played = policies.play_episodes(specs, num_envs=NUM_ENVS, max_episode_len=MAX_LEN, render=True,
                                    chunk_len=MAX_LEN)
    expected = sorted((s for s in played if isinstance(s, policies.EpisodeSummary)),
                      key=lambda s: s.episode)
    results = evaluation.play(evaluation.BehaviourPolicy(name), seeds, num_envs=NUM_ENVS,
                              max_episode_len=MAX_LEN)
    for episode, summary in zip(results.episodes, expected, strict=True):
      assert episode.world_seed == summary.world_seed
      np.testing.assert_array_equal(episode.achievements, summary.achievements)
      assert episode.length == summary.length
      assert episode.died == summary.terminal
      assert episode.episode_return == pytest.approx(summary.episode_return, abs=1e-6)
    if name == "expert":
      assert all(e.achievements.any() for e in results.episodes)


@pytest.mark.parametrize("successes,trials", [(0, 10), (3, 10), (10, 10), (7, 32), (1, 1), (31, 32)])
def test_wilson_interval_is_the_formulas(successes, trials):
  # The roots p of (k/n - p)^2 = z^2 p (1 - p) / n, z the 97.5% normal quantile.
  k, n, z = successes, trials, stats.norm.ppf(0.975)
  half = z * np.sqrt(k * (n - k) / n + z * z / 4)
  low, high = evaluation.wilson_interval(successes, trials)
  assert low == pytest.approx((k + z * z / 2 - half) / (n + z * z), abs=1e-12)
  assert high == pytest.approx((k + z * z / 2 + half) / (n + z * z), abs=1e-12)


def test_crafter_score_interval_brackets_the_score_and_shrinks_with_episodes():
  rng = np.random.default_rng(0)
  rates = np.linspace(0.05, 0.9, 22)
  few, many = (rng.random((e, 22)) < rates for e in (32, 512))
  intervals = [evaluation.crafter_score_interval(a) for a in (few, many)]
  for a, (low, high) in zip((few, many), intervals):
    assert low < craftax_env.crafter_score(100 * a.mean(0)) < high
  width = lambda i: i[1] - i[0]
  assert width(intervals[1]) < 0.6 * width(intervals[0])  # ~ 1 / sqrt(16) as wide
  # Every episode alike: nothing to resample, the interval is the score itself.
  same = np.repeat(few[:1], 16, axis=0)
  low, high = evaluation.crafter_score_interval(same)
  assert low == pytest.approx(high) == pytest.approx(craftax_env.crafter_score(100 * same[0]))


def test_summary_of_hand_made_results():
  def episode(unlocked, died, length):
    achievements = np.zeros(22, bool)
    achievements[unlocked] = True
    return evaluation.EpisodeResult(0, achievements, float(len(unlocked)), length, died)
  results = evaluation.PlayResults(
      [episode([0], True, 100), episode([0, 1], False, 200), episode([], True, 300),
       episode([0], False, 400)], max_episode_len=400, seconds=36.0, recording=None)
  summary = evaluation.summarize(results)
  rates = np.zeros(22)
  rates[[0, 1]] = 75.0, 25.0
  assert summary["success_rates"][craftax_env.ACHIEVEMENTS[0]] == 75.0
  assert summary["success_rates"][craftax_env.ACHIEVEMENTS[1]] == 25.0
  assert summary["crafter_score"] == round(craftax_env.crafter_score(rates), 2)
  low, high = summary["crafter_score_ci95"]
  assert low <= summary["crafter_score"] <= high
  low, high = summary["success_rates_ci95"][craftax_env.ACHIEVEMENTS[0]]
  assert low < 75.0 < high
  assert summary["success_rates_ci95"][craftax_env.ACHIEVEMENTS[2]][0] == 0.0
  assert (summary["episodes"], summary["max_episode_len"]) == (4, 400)
  assert summary["mean_return"] == 1.0 and summary["mean_length"] == 250.0
  assert summary["death_rate"] == 0.5
  assert summary["episodes_per_hour"] == 400.0  # 4 episodes in 36 s


def test_policy_returning_bad_actions_is_refused():
  class Broken:
    def reset(self, slots, world_seeds):
      pass

    def act(self, frames, views, active):
      return np.full(NUM_ENVS, craftax_env.NUM_ACTIONS)

  with pytest.raises(ValueError, match="outside"):
    evaluation.play(Broken(), [0], num_envs=NUM_ENVS, max_episode_len=MAX_LEN)
