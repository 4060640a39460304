"""The (tau, d) of shortcut-forcing training frames: the step-size distributions, the redraws, the
closed-form shares against sampled histograms, and the samplers' inputs inside the trained support."""
import fractions
import functools

import jax
import numpy as np
import pytest

from jaxai.world_model import dynamics_stage, noise_levels

K_MAX = 8
F = fractions.Fraction


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _frames(key, shape, k_max, distribution, context_fraction, next_frame_fraction, context_signal):
  return noise_levels.training_frames(key, shape, k_max=k_max, distribution=distribution,
                                      context_fraction=context_fraction,
                                      next_frame_fraction=next_frame_fraction, context_signal=context_signal)


def frames(seed, shape, distribution="paper", context_fraction=0.0, next_frame_fraction=0.0,
           context_signal=0.7, k_max=K_MAX):
  out = _frames(jax.random.key(seed), shape, k_max, distribution, context_fraction, next_frame_fraction,
                context_signal)
  return tuple(None if x is None else np.asarray(x) for x in out)


def steps_per_unit(step):
  return np.round(1 / step).astype(int)


def test_the_paper_draws_every_power_of_two_equally_and_tau_on_its_grid():
  tau, step, _ = frames(0, (64, 64))
  n = steps_per_unit(step)
  np.testing.assert_allclose(1 / n, step, rtol=1e-7)
  assert set(np.unique(n)) == {1, 2, 4, 8}
  for k in (1, 2, 4, 8):  # 1/4 each of 4096 frames (binomial sd ~0.007)
    assert abs(np.mean(n == k) - 0.25) < 0.03
  level = tau * n  # tau in {0, d, ..., 1 - d}
  np.testing.assert_allclose(level, np.round(level), atol=1e-6)
  assert level.min() == 0 and np.all(level <= n - 1)
  assert len(np.unique(tau[n == 8])) == 8  # the whole grid is reached


def test_shortcut_models_bootstraps_a_quarter_uniformly_above_d_min():
  tau, step, _ = frames(1, (64, 64), "shortcut_models")
  n = steps_per_unit(step)
  assert abs(np.mean(n == K_MAX) - 0.75) < 0.03
  for k in (1, 2, 4):
    assert abs(np.mean(n == k) - 0.25 / 3) < 0.02
  assert len(np.unique(tau[n == K_MAX])) == K_MAX


def test_redrawn_frames_context_at_d_min_next_frames_at_tau_0_with_the_distributions_steps():
  shape = (256, 32)
  tau0, step0, _ = frames(2, shape, "shortcut_models")
  tau, step, is_next = frames(2, shape, "shortcut_models", 0.5, 0.3)
  before_next = np.pad(is_next[:, 1:], ((0, 0), (0, 1)))
  assert not is_next[:, 0].any() and not (is_next & before_next).any()  # never two in a row
  assert abs(np.mean(is_next[:, 1:]) - 0.3 * 0.7) < 0.01  # drawn, and the predecessor not drawn
  assert np.all(tau[is_next] == 0.0)
  # Next frames' step sizes follow the distribution (not d_min only): 3/4 at d_min, 1/12 each above.
  n_next = steps_per_unit(step[is_next])
  assert abs(np.mean(n_next == K_MAX) - 0.75) < 0.03
  for k in (1, 2, 4):
    assert abs(np.mean(n_next == k) - 0.25 / 3) < 0.02
  # Context frames (before a next frame, or redrawn) sit at d_min from level 6/8 (0.7's nearest) up.
  assert np.all(step[before_next] == 1 / K_MAX)
  assert set(np.unique(tau[before_next] * K_MAX)) == {6, 7}
  changed = ((tau != tau0) | (step != step0)) & ~is_next
  assert np.all(step[changed] == 1 / K_MAX) and np.all(tau[changed] >= 6 / K_MAX)


@pytest.mark.parametrize("distribution,context_fraction,next_frame_fraction",
                         [("paper", 0.5, 0.3), ("shortcut_models", 0.5, 0.3), ("paper", 0.0, 0.0),
                          ("d_min", 0.5, 0.3)])
def test_sampled_share_of_each_tau_and_d_matches_the_closed_form(distribution, context_fraction,
                                                                  next_frame_fraction):
  # Half the frames in windows of 8, half in windows of 2, as alternating batch lengths give them.
  counts, total = {}, 0
  for seed, shape in ((3, (2048, 8)), (4, (8192, 2))):
    tau, step, _ = frames(seed, shape, distribution, context_fraction, next_frame_fraction)
    for t, d in zip(tau.ravel(), step.ravel()):
      key = (F(round(float(t) * K_MAX), K_MAX), F(1, int(round(1 / float(d)))))
      counts[key] = counts.get(key, 0) + 1
    total += tau.size
  expected = noise_levels.expected_shares(k_max=K_MAX, distribution=distribution,
                                          context_fraction=context_fraction,
                                          next_frame_fraction=next_frame_fraction, context_signal=0.7,
                                          window_lens={8: 0.5, 2: 0.5})
  assert abs(sum(expected.values()) - 1.0) < 1e-12
  assert set(counts) <= set(expected)  # nothing sampled outside the stated support
  for key, share in expected.items():
    sd = np.sqrt(share * (1 - share) / total)
    assert abs(counts.get(key, 0) / total - share) < 5 * sd + 1e-4, (key, counts.get(key, 0) / total, share)


def test_the_paper_objective_gives_each_step_size_a_seventh():
  shares = noise_levels.expected_shares(k_max=64, distribution="paper", context_fraction=0.0,
                                        next_frame_fraction=0.0, context_signal=0.9,
                                        window_lens={32: 0.25, 8: 0.75})
  for share in noise_levels.step_shares(shares).values():
    assert share == pytest.approx(1 / 7)


@pytest.mark.parametrize("shortcut,distribution,switches", [
    (True, "paper", True), (True, "shortcut_models", True), (True, "paper", False), (False, "paper", True)])
def test_every_input_the_samplers_ask_for_is_trained(load_config, shortcut, distribution, switches):
  config = load_config("world_model", None, dynamics__shortcut=shortcut,
                       dynamics__step_distribution=distribution)
  if not switches:
    config.dynamics.update(context_fraction=0.0, next_frame_fraction=0.0)
  d = config.dynamics
  shares = dynamics_stage.expected_shares(config)
  # Sampled from the config's own settings, in a long batch and a short one (equal frame counts).
  sampled = set()
  for seed, length in ((5, d.window_len), (6, d.short_window_len)):
    tau, step, _ = frames(seed, (16384 // length, length), distribution if shortcut else "d_min",
                          d.context_fraction, d.next_frame_fraction, config.rollout.context_signal, d.k_max)
    sampled |= {(F(round(float(t) * d.k_max), d.k_max), F(1, int(round(1 / float(s)))))
                for t, s in zip(tau.ravel(), step.ravel())}
  for num_steps in (1, 2, 4):
    for key in noise_levels.sampler_inputs(num_steps, k_max=d.k_max, shortcut=shortcut,
                                           context_signal=config.rollout.context_signal):
      assert shares.get(key, 0.0) > 0.002, (num_steps, key, shares.get(key, 0.0))
      assert key in sampled, (num_steps, key)


def test_step_share_metrics_count_unmasked_frames_per_step_size():
  step = np.array([[1.0, 0.5, 0.125, 0.125], [0.125, 1.0, 0.25, 0.5]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  got = {k: float(v) for k, v in noise_levels.step_share_metrics(step, mask, K_MAX).items()}
  assert got == pytest.approx({"step_share/d1_1": 2 / 7, "step_share/d1_2": 2 / 7,
                               "step_share/d1_4": 1 / 7, "step_share/d1_8": 2 / 7})
