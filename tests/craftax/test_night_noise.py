"""Night static floor: noise appears exactly when the game's light level is below 0.5."""
import numpy as np

from jaxai import metrics
from jaxai.craftax import night_noise


def test_static_appears_exactly_at_night_and_is_strongest_when_darkest():
  variance = night_noise.noise_variance_by_timestep(renders=2, sleeping=False)
  # The game's light curve, written out from Craftax-Classic's calculate_light_level.
  progress = (np.arange(night_noise.DAY_LENGTH) / night_noise.DAY_LENGTH) % 1 + 0.3
  light = 1 - np.abs(np.cos(np.pi * progress)) ** 3
  night = light < 0.5
  # Two renders rarely agree on every noisy pixel; the boundary timesteps have near-zero static.
  assert np.all(variance[~night] == 0)
  assert np.all(variance[night & (light < 0.45)] > 0)
  # Light is flat around its minimum, so two renders place the peak within a few timesteps of it.
  assert abs(int(np.argmax(variance)) - int(np.argmin(light))) <= 3
  assert 25 < metrics.psnr_from_mse(variance.max()) < 35
