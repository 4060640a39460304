"""The frame profiler: dot FLOPs read from compiled HLO against the matmul formula, loop bodies
counted once per executed iteration from the trace, and the command end to end on the tiny model."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from jaxai import host
from jaxai.world_model import profile_frame


def _table(fn, *args):
  return profile_frame.thunk_table(profile_frame.parse_hlo(jax.jit(fn).lower(*args).compile().as_text()))


def test_dot_flops_match_the_matmul_formula():
  m, k, n, p = 8, 16, 32, 24
  x, w1, w2 = jnp.ones((m, k)), jnp.ones((k, n)), jnp.ones((n, p))
  table = _table(lambda x, w1, w2: jnp.tanh(jnp.tanh(x @ w1) @ w2), x, w1, w2)
  matmul_flops = sum(t["flops"] for t in table.values() if t["kind"] == "matmul")
  assert matmul_flops == 2 * m * k * n + 2 * m * n * p
  # A batched dot contracts one axis of a 3-d operand.
  a, b = jnp.ones((3, m, k)), jnp.ones((3, k, n))
  table = _table(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b) + 1.0, a, b)
  assert sum(t["flops"] for t in table.values() if t["kind"] == "matmul") == 2 * 3 * m * k * n


def test_loop_bodies_count_once_per_iteration_in_the_trace():
  m, k, iterations = 16, 32, 5
  w = jnp.full((k, k), 0.01)

  def looped(x, w):
    return jax.lax.fori_loop(0, iterations, lambda i, x: jnp.tanh(x @ w), x)

  x = jnp.ones((m, k))
  compiled = jax.jit(looped).lower(x, w).compile()
  table = profile_frame.thunk_table(profile_frame.parse_hlo(compiled.as_text()))
  assert any(t["kind"] == "control" for t in table.values())  # the while loop
  calls = 3
  fn = lambda: jax.block_until_ready(compiled(x, w))
  fn()
  profile, top = profile_frame.summarise(profile_frame.trace_events(fn, calls), table, calls,
                                         wall_ms=1.0, top=len(table))
  # (figures are printed to 4 significant digits)
  assert profile["matmul_mflop_per_frame"] * 1e6 == pytest.approx(2 * m * k * k * iterations, rel=1e-3)
  assert profile["thunks_matmul"] == iterations
  # Every thunk listed, so which one took longest (the timing, which varies) does not matter.
  (matmul,) = [t for t in top if t["kind"] == "matmul"]
  assert matmul["calls_per_frame"] == iterations


def test_profile_command_on_the_tiny_model():
  result = subprocess.run(
      [sys.executable, "-m", "jaxai.world_model.profile_frame", "--config=configs/world_model.py:tiny",
       "--frames=2", "--context=3", "--warmup=1", "--top=4"],
      cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  records = {r["benchmark"]: r for r in map(json.loads, result.stdout.splitlines())}
  assert set(records) == {"frame_profile", "matmul_reference", "top_thunks"}
  profile = records["frame_profile"]
  assert profile["host_cpu"] == host.summary() and profile["dynamics"]["width"] == 32
  # Every frame runs the same program: a whole number of thunks per frame, dots among them.
  assert profile["thunks_per_frame"] == int(profile["thunks_per_frame"]) > profile["thunks_matmul"] > 0
  assert profile["matmul_mflop_per_frame"] > 0 and profile["wall_ms_per_frame"] > 0
  assert len(records["top_thunks"]["thunks"]) == 4
  assert np.isfinite(records["matmul_reference"]["gflops_1024_cubed"])
