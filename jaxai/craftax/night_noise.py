"""The reconstruction floor set by Craftax's night static: no tokenizer can reproduce random pixels.

    python -m jaxai.craftax.night_noise [--renders=16]

At night (light level < 0.5) the renderer blends fresh uniform noise from ``state.state_rng`` into
every map pixel, strongest at the edges of the view. A model that reconstructs the noise-free
conditional mean still pays that noise's variance as MSE. This renders one state at each timestep
of a 300-step day ``--renders`` times with different ``state_rng`` and prints one JSON line: the
fraction of the day with static, the per-pixel noise variance (in [0, 1] units, uint8 rounding
included) as a PSNR floor at the darkest timestep and at the median night timestep, and the
variance averaged over the day (awake and asleep: sleeping greys the view and halves the static).

The game's own figures (the same on every host; docs/world_model.md): static on 41.7% of the day;
floor 29.57 dB at the darkest timestep awake (35.57 dB asleep), 34.02 dB at the median night
timestep; 37.08 dB for the day's mean variance. So the noise does not rule out a held-out PSNR of
32 dB, but night frames cap near 30.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from craftax.craftax_classic.envs.craftax_state import EnvParams
from craftax.craftax_classic.game_logic import calculate_light_level

from jaxai import cli, metrics
from jaxai.craftax import env as craftax_env

DAY_LENGTH = EnvParams().day_length  # 300 steps


def noise_variance_by_timestep(renders: int, sleeping: bool, world_seed: int = 0) -> np.ndarray:
  """[DAY_LENGTH] per-pixel variance of the rendered frame (in [0, 1]) over ``state_rng`` draws."""
  env = craftax_env.make_env()
  params = env.default_params
  _, state = env.reset_env(jax.random.PRNGKey(world_seed), params)

  def variance(t):
    at_t = state.replace(light_level=calculate_light_level(t, params), is_sleeping=sleeping)
    render = lambda key: craftax_env.frame_from_obs(env.get_obs(at_t.replace(state_rng=key)))
    frames = jax.vmap(render)(jax.random.split(jax.random.PRNGKey(1), renders)).astype(jnp.float32)
    return jnp.mean(jnp.var(frames / 255.0, axis=0, ddof=1))

  return np.asarray(jax.jit(lambda ts: jax.lax.map(variance, ts))(jnp.arange(DAY_LENGTH)))


def define_flags():
  flags.DEFINE_integer("renders", 16, "Renders per timestep (>= 2).")


def main(argv) -> None:
  del argv
  renders = flags.FLAGS.renders
  if renders < 2:
    cli.fail("config error", f"renders: must be >= 2 to measure a variance, got {renders}")
  awake = noise_variance_by_timestep(renders, sleeping=False)
  asleep = noise_variance_by_timestep(renders, sleeping=True)
  night = awake > 0
  print(json.dumps({
      "static_fraction": float(night.mean()),
      "psnr_floor_darkest": float(metrics.psnr_from_mse(awake.max())),
      "psnr_floor_darkest_asleep": float(metrics.psnr_from_mse(asleep.max())),
      "psnr_floor_median_night": float(np.median(metrics.psnr_from_mse(awake[night]))),
      "mean_variance": float(awake.mean()),
      "psnr_of_mean_variance": float(metrics.psnr_from_mse(awake.mean())),
  }))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
