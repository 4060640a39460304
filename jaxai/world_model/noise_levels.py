"""Which (signal level tau, step size d) each frame of a shortcut-forcing batch is trained at, and
the share of frames every (tau, d) gets.

Convention as in ``shortcut_forcing``: tau = 0 is pure noise, tau = 1 clean data; d is a power of
two 1 / n with n in {1, 2, 4, ..., K_max}, and tau lies on d's grid {0, d, ..., 1 - d}.

Step-size distributions (``dynamics.step_distribution``), each exactly as its paper writes it:

* ``paper`` (Dreamer 4): d = 1 / U{1, 2, 4, ..., K_max}, every size equally likely, so 6/7 of the
  frames bootstrap at K_max = 64;
* ``shortcut_models`` (Frans et al., 2024): a quarter of the frames bootstrap, with d uniform over
  the sizes above d_min; the other three quarters are at d_min (x-space loss);
* ``d_min``: every frame at d_min (plain diffusion forcing, the no-shortcut ablation).

Two redraws, not in the paper, then make a batch look more like a rollout (``with_context_frames``,
``with_next_frames``). A redrawn context frame is at d_min, as a rollout's context always is. A
redrawn next frame is at tau = 0 with a step size drawn from the distribution like any other
frame's (tau = 0 lies on every grid), so the up-weighted first step of a rollout trains the step
sizes the samplers ask for, not only d_min. ``expected_shares`` gives the resulting share of
frames per (tau, d) in closed form: the tests compare it with the sampled batches, and
``sampler_inputs`` lists what the K-step samplers ask for, all of which must have a share.
"""
import fractions

import jax
import jax.numpy as jnp
import numpy as np

STEP_DISTRIBUTIONS = ("paper", "shortcut_models")  # configurable; "d_min" is the no-shortcut model's
SHORTCUT_MODELS_BOOTSTRAP_FRACTION = 0.25  # Frans et al. (2024): k = 1/4 of a batch bootstraps


def context_signal_level(context_signal: float, k_max: int) -> float:
  """The trained signal level nearest ``context_signal``: tau is embedded on {0, ..., 1 - 1/K_max}."""
  if not 0.0 <= context_signal <= 1.0:
    raise ValueError(f"context_signal must be in [0, 1], got {context_signal}")
  return min(round(context_signal * k_max), k_max - 1) / k_max


def step_probabilities(distribution: str, k_max: int) -> np.ndarray:
  """P(d = 1 / 2^i) for i = 0 .. log2 K_max (d = 1 first, d_min last)."""
  levels = k_max.bit_length()
  if distribution == "paper":
    return np.full(levels, 1.0 / levels)
  if distribution == "shortcut_models":
    if levels == 1:
      return np.ones(1)
    p = np.full(levels, SHORTCUT_MODELS_BOOTSTRAP_FRACTION / (levels - 1))
    p[-1] = 1.0 - SHORTCUT_MODELS_BOOTSTRAP_FRACTION
    return p
  if distribution == "d_min":
    return np.eye(levels)[-1]
  raise ValueError(f"step_distribution must be one of {STEP_DISTRIBUTIONS} or 'd_min', got {distribution!r}")


def sample_step(rng: jax.Array, shape: tuple[int, ...], k_max: int, distribution: str) -> jax.Array:
  """Step sizes d [shape] (fp32) drawn from ``step_probabilities``."""
  p = step_probabilities(distribution, k_max)
  with np.errstate(divide="ignore"):
    logits = jnp.asarray(np.log(p), jnp.float32)
  exponent = jax.random.categorical(rng, logits, shape=shape)
  return (1.0 / 2.0 ** exponent).astype(jnp.float32)


def sample_tau_on_grid(rng: jax.Array, step: jax.Array) -> jax.Array:
  """tau uniform on each frame's grid {0, d, ..., 1 - d}."""
  num_steps = jnp.round(1.0 / step).astype(jnp.int32)
  return (jax.random.randint(rng, step.shape, 0, num_steps) / num_steps).astype(jnp.float32)


def sample_tau_and_step(rng: jax.Array, shape: tuple[int, ...], k_max: int,
                        distribution: str = "paper") -> tuple[jax.Array, jax.Array]:
  """Per frame (tau, d), fp32: d from ``distribution``, then tau uniform on d's grid."""
  step_rng, tau_rng = jax.random.split(rng)
  step = sample_step(step_rng, shape, k_max, distribution)
  return sample_tau_on_grid(tau_rng, step), step


def _context_levels(rng, shape, context_signal: float, k_max: int) -> jax.Array:
  """Signal levels uniform on the grid from where rollouts put their context up to 1 - 1/K_max."""
  lowest = round(context_signal_level(context_signal, k_max) * k_max)
  return jax.random.randint(rng, shape, lowest, k_max) / k_max


def with_context_frames(rng: jax.Array, tau: jax.Array, step: jax.Array, *, fraction: float,
                        context_signal: float, k_max: int) -> tuple[jax.Array, jax.Array]:
  """Redraws a ``fraction`` of the frames as rollout-like context: d = d_min and tau uniform on the
  grid from the level rollouts give their context (``context_signal_level``) up to 1 - 1/K_max.

  Not in the paper. With tau independent and uniform per frame, a frame's predecessor is as clean
  as a rollout's context (signal >= 0.9) for only 10% of the frames, so the next-frame prediction
  that rollouts ask for (clean context, noisy new frame) gets little training signal; see
  docs/world_model.md for what it changes.
  """
  context_rng, tau_rng = jax.random.split(rng)
  is_context = jax.random.uniform(context_rng, tau.shape) < fraction
  context_tau = _context_levels(tau_rng, tau.shape, context_signal, k_max)
  return (jnp.where(is_context, context_tau, tau).astype(jnp.float32),
          jnp.where(is_context, 1.0 / k_max, step).astype(jnp.float32))


def with_next_frames(rng: jax.Array, tau: jax.Array, step: jax.Array, next_step: jax.Array, *,
                     fraction: float, context_signal: float,
                     k_max: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Redraws frames [B, T] as a rollout's first step: tau = 0 (pure noise) at step size
  ``next_step`` (drawn from the step distribution independently of everything else, so these
  frames' d follows it exactly), their predecessor as rollout context (``with_context_frames``'
  levels, d_min). Each frame after the first is drawn with probability ``fraction`` and kept
  unless its predecessor was drawn too (it would have to be context and pure noise at once):
  fraction x (1 - fraction) of them. Returns (tau, step, is_next_frame).

  Not in the paper. At tau >~ 0.1 the noisy frame itself already shows where the view moved, so
  only frames near tau = 0 need the action, and the ramp weight gives them 0.1: the action gets
  little of the gradient.
  """
  next_rng, tau_rng = jax.random.split(rng)
  drawn = jax.random.uniform(next_rng, tau.shape) < fraction
  drawn = drawn.at[:, 0].set(False)
  is_next = drawn & ~jnp.pad(drawn[:, :-1], ((0, 0), (1, 0)))
  is_context = jnp.pad(is_next[:, 1:], ((0, 0), (0, 1)))
  context_tau = _context_levels(tau_rng, tau.shape, context_signal, k_max)
  tau = jnp.where(is_next, 0.0, jnp.where(is_context, context_tau, tau))
  step = jnp.where(is_next, next_step, jnp.where(is_context, 1.0 / k_max, step))
  return tau.astype(jnp.float32), step.astype(jnp.float32), is_next


def training_frames(rng: jax.Array, shape: tuple[int, int], *, k_max: int, distribution: str,
                    context_fraction: float, next_frame_fraction: float,
                    context_signal: float) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(tau, d, is_next_frame or None) [B, T] of a training batch: the distribution, then the two
  redraws (each skipped at fraction 0)."""
  tau_rng, context_rng, next_rng = jax.random.split(rng, 3)
  tau, step = sample_tau_and_step(tau_rng, shape, k_max, distribution)
  drawn_step = step  # independent of every redraw decision: the next frames' step sizes
  if context_fraction > 0:
    tau, step = with_context_frames(context_rng, tau, step, fraction=context_fraction,
                                    context_signal=context_signal, k_max=k_max)
  is_next = None
  if next_frame_fraction > 0:
    tau, step, is_next = with_next_frames(next_rng, tau, step, drawn_step, fraction=next_frame_fraction,
                                          context_signal=context_signal, k_max=k_max)
  return tau, step, is_next


# --- the shares, in closed form -------------------------------------------------------------------

def _frame_kinds(window_len: int, context_fraction: float, next_frame_fraction: float):
  """Per position t of a window: P(next frame), P(context frame), P(drawn from the distribution)."""
  n = next_frame_fraction
  q = np.array([0.0] + [n] + [n * (1 - n)] * (window_len - 2))[:window_len]  # P(is_next_t)
  before_next = np.append(q[1:], 0.0)  # frame t precedes a next frame: context
  rest = 1.0 - q - before_next
  return q, before_next + rest * context_fraction, rest * (1 - context_fraction)


def expected_shares(*, k_max: int, distribution: str, context_fraction: float, next_frame_fraction: float,
                    context_signal: float, window_lens: dict[int, float]) -> dict[tuple[fractions.Fraction, fractions.Fraction], float]:
  """{(tau, d): expected share of training frames} (exact fractions as keys).

  ``window_lens``: {window length: share of the training frames in windows of that length} (the
  long and short batches hold the same number of frames, so every ``long_every``-th batch's share
  is 1 / long_every).
  """
  p = step_probabilities(distribution, k_max)
  sizes = [fractions.Fraction(1, 2 ** i) for i in range(len(p))]
  d_min = fractions.Fraction(1, k_max)
  lowest = round(context_signal_level(context_signal, k_max) * k_max)
  shares: dict = {}

  def add(key, value):
    if value > 0:
      shares[key] = shares.get(key, 0.0) + value

  for window_len, frame_share in window_lens.items():
    next_p, context_p, drawn_p = (float(np.mean(x)) * frame_share
                                  for x in _frame_kinds(window_len, context_fraction, next_frame_fraction))
    for d, p_d in zip(sizes, p):
      add((fractions.Fraction(0), d), next_p * p_d)
      for k in range(d.denominator):
        add((k * d, d), drawn_p * p_d / d.denominator)
    for level in range(lowest, k_max):
      add((fractions.Fraction(level, k_max), d_min), context_p / (k_max - lowest))
  return shares


def step_shares(shares: dict) -> dict[fractions.Fraction, float]:
  """{d: share of frames} of an ``expected_shares`` table."""
  out: dict = {}
  for (_, d), share in shares.items():
    out[d] = out.get(d, 0.0) + share
  return dict(sorted(out.items(), reverse=True))


def sampler_inputs(num_steps: int, *, k_max: int, shortcut: bool,
                   context_signal: float) -> set[tuple[fractions.Fraction, fractions.Fraction]]:
  """The (tau, d) a K = ``num_steps`` rollout feeds the model: the new frame's K steps (at d_min
  for a model trained without shortcuts, which knows no other size) and the context frames."""
  d = fractions.Fraction(1, num_steps)
  d_min = fractions.Fraction(1, k_max)
  level = fractions.Fraction(round(context_signal_level(context_signal, k_max) * k_max), k_max)
  return {(k * d, d if shortcut else d_min) for k in range(num_steps)} | {(level, d_min)}


def window_shares(window_len: int, short_window_len: int, long_every: int) -> dict[int, float]:
  """``expected_shares``' ``window_lens`` of the dynamics stage's alternating batch lengths."""
  if not long_every or window_len == short_window_len:
    return {window_len: 1.0}
  return {window_len: 1.0 / long_every, short_window_len: 1.0 - 1.0 / long_every}


def step_share_metrics(step: jax.Array, frame_mask: jax.Array, k_max: int) -> dict[str, jax.Array]:
  """The batch's share of (unmasked) frames per step size, ``step_share/d1_<n>`` for d = 1/n."""
  total = jnp.maximum(jnp.sum(frame_mask), 1.0)
  num_steps = jnp.round(1.0 / step)
  return {f"step_share/d1_{2 ** i}": jnp.sum((num_steps == 2 ** i) * frame_mask) / total
          for i in range(k_max.bit_length())}
