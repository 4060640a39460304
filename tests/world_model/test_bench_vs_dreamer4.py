"""The side-by-side benchmark with the PyTorch ``dreamer4`` package: the flags sent to the torch side
are the ones its parser reads, at the equal size; its failures and bad flags are one-line errors.
(torch is not installed here, so a stand-in interpreter plays the torch side.)"""
import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from jaxai.world_model import bench_dreamer4_torch, bench_vs_dreamer4


def _interpreter(tmp_path, body: str) -> str:
  """An executable that runs ``body`` as Python with the arguments it was called with."""
  path = tmp_path / "python"
  path.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{body}' \"$@\"\n")
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def test_torch_side_gets_the_equal_size_and_the_run_shape(tmp_path):
  echo = _interpreter(tmp_path, 'import json, sys; print("log line"); print(json.dumps({"argv": sys.argv[1:]}))')
  result = bench_vs_dreamer4.torch_side(echo, context=5, frames=(2, 9), runs=4, num_steps=4)
  script, *sent = result["argv"]
  assert os.path.basename(script) == "bench_dreamer4_torch.py"
  args = bench_dreamer4_torch.parser().parse_args(sent)
  size = bench_vs_dreamer4.EQUAL_SIZE
  assert (args.width, args.layers, args.query_heads, args.kv_heads, args.head_dim) == (256, 8, 4, 2, 64)
  for name, value in size.items():
    if name != "mlp_hidden":  # dreamer4 derives its SwiGLU width: 256 x 4 x 2/3 = 682
      assert getattr(args, name) == value, name
  assert int(size["width"] * 4 * 2 / 3) == size["mlp_hidden"]
  assert (args.context, args.frames, args.runs, args.num_steps, args.actions) == (5, "2,9", 4, 4, 17)


def test_torch_side_failure_names_its_last_error_line(tmp_path):
  broken = _interpreter(tmp_path, 'import sys; sys.exit("ModuleNotFoundError: No module named dreamer4")')
  with pytest.raises(RuntimeError, match="dreamer4 side failed.*No module named dreamer4"):
    bench_vs_dreamer4.torch_side(broken, context=2, frames=(1, 2), runs=1, num_steps=4)


@pytest.mark.parametrize("flag, message", [("--frames=5,2", "--frames=5,2: need two frame counts"),
                                           ("--torch_python=/nonexistent/python", "is not an executable")])
def test_bad_flags_are_one_line_errors(flag, message):
  result = subprocess.run(
      [sys.executable, "-m", "jaxai.world_model.bench_vs_dreamer4", "--config=configs/world_model.py:tiny", flag],
      cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("bad flag: ") and message in lines[0], result.stderr[-1000:]
