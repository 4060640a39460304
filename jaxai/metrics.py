"""Metrics sinks: ``metrics.jsonl``, TensorBoard event files, and a live progress line."""
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import scipy.linalg
import tensorboardX


def psnr_from_mse(mse):
  """PSNR in dB of mean squared errors of values in [0, 1]; MSE floored at 1e-12 (120 dB)."""
  return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def frechet_distance(x, y) -> float:
  """Frechet distance between Gaussians fitted to two sample sets [N, D] and [M, D] (the FID and
  FVD formula, on whatever features the rows are): |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^1/2).

  A set of predictions pulled towards the mean (blurred) has a shrunken covariance and scores far
  from the data even when its mean squared error is low. With fewer samples than dimensions the
  covariances are rank-deficient; the distance is still defined, but biased upwards, so compare
  only values computed from the same number of samples.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  # Rank-deficient covariances (see above, or a set that does not vary) make the product singular.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    cross = scipy.linalg.sqrtm(cov_x @ cov_y)
  # sqrtm of a product of PSD matrices is real up to rounding (and its imaginary part is noise)
  trace = np.trace(cov_x) + np.trace(cov_y) - 2.0 * np.trace(np.real(cross))
  return float(np.sum(np.square(x.mean(0) - y.mean(0))) + max(trace, 0.0))


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
  """Writes one JSON object per logged step. Only the first process writes (``enabled``)."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._drop_rows_after(resume_step)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _drop_rows_after(self, step: int) -> None:
    # After a resume the rows past the checkpoint are re-logged; drop the stale ones.
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(rows)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """``image``: uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A progress line per log step: step, steps/s, ETA and the chosen metrics."""

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, stream=sys.stderr):
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int, metrics: dict) -> float:
    """Prints the line; returns steps/s since the previous call."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    if self.enabled:
      eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
      eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
      shown = " | ".join(f"{k} {_format(v)}" for k, v in metrics.items())
      print(f"step {step}/{self.total_steps} | {rate:.2f} steps/s | ETA {eta_text} | {shown}",
            file=self.stream, flush=True)
    return rate


def _format(value) -> str:
  value = _to_python(value)
  return f"{value:.4g}" if isinstance(value, float) else str(value)
