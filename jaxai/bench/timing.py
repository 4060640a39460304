"""What every benchmark reports: median wall times and figures rounded to four digits."""
import statistics
import time


def median_ms(fn, runs: int) -> float:
  """Median wall time of ``fn()`` (which must block until its result is ready) over ``runs`` calls."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def figure(x: float) -> float:
  """``x`` to four significant digits, as the JSON lines print it."""
  return float(f"{x:.4g}")
