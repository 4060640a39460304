"""jaxai.metrics: PSNR and the Frechet distance against closed forms."""
import numpy as np
import pytest

from jaxai import metrics


def test_psnr_from_mse_matches_the_definition_and_floors_exact_copies():
  assert metrics.psnr_from_mse(0.01) == pytest.approx(20.0)
  assert metrics.psnr_from_mse(0.0) == pytest.approx(120.0)


def test_frechet_distance_of_gaussian_samples_approaches_the_closed_form():
  # Independent dimensions: |mu_x - mu_y|^2 + sum_i (sx_i - sy_i)^2 with standard deviations s.
  rng = np.random.default_rng(0)
  mu_x, mu_y = np.array([0.0, 1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0, 0.0])
  sd_x, sd_y = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 3.0])
  n = 200_000
  x = mu_x + sd_x * rng.standard_normal((n, 4))
  y = mu_y + sd_y * rng.standard_normal((n, 4))
  expected = np.sum((mu_x - mu_y) ** 2) + np.sum((sd_x - sd_y) ** 2)
  assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_with_correlated_covariances_matches_the_matrix_formula():
  # Non-commuting covariances, against tr(Sx + Sy - 2 (Sy^1/2 Sx Sy^1/2)^1/2) via eigendecompositions.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((500, 3)) @ np.array([[1.0, 0.8, 0.0], [0.0, 0.6, 0.3], [0.0, 0.0, 0.2]])
  y = rng.standard_normal((400, 3)) @ np.array([[0.3, 0.0, 0.0], [0.5, 1.2, 0.0], [0.1, 0.0, 0.9]]) + 0.3

  def psd_sqrt(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

  cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  root_y = psd_sqrt(cov_y)
  expected = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(cov_x) + np.trace(cov_y)
              - 2 * np.trace(psd_sqrt(root_y @ cov_x @ root_y)))
  assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_penalises_shrunken_samples_that_mse_prefers():
  # Predictions pulled halfway to the mean: lower MSE to the data than an independent sample
  # from the data's own distribution, but farther from it as a distribution.
  rng = np.random.default_rng(2)
  data = rng.standard_normal((4000, 8))
  shrunk = 0.5 * data + 0.5 * 0.3 * rng.standard_normal((4000, 8))
  sample = rng.standard_normal((4000, 8))
  assert np.mean((shrunk - data) ** 2) < np.mean((sample - data) ** 2)
  assert metrics.frechet_distance(shrunk, data) > 5 * metrics.frechet_distance(sample, data)
