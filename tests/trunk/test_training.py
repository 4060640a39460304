"""The trunk's training guarantees, run through the real CLI in fresh processes.

Meshes, resumption and multi-process runs are compared with a plain one-device run of the same
config: the one-device run is the independent reference, computed without any sharding.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, run_main, subprocess_env

TINY = ["--config=configs/lm.py:tiny"]


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "lm", "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: row["loss"] for row in rows}


def train_ok(workdir, *extra, devices=8):
  result = run_main([*TINY, f"--workdir={workdir}", *extra], devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  return losses(workdir)


@pytest.fixture(scope="module", name="single_device_losses")
def fixture_single_device_losses(tmp_path_factory):
  return train_ok(tmp_path_factory.mktemp("ref"), "--config.mesh.data=1", devices=1)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_meshes_match_one_device(tmp_path, mesh, single_device_losses):
  data, fsdp, tensor = mesh
  got = train_ok(tmp_path, f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                 f"--config.mesh.tensor={tensor}")
  assert sorted(got) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [single_device_losses[s] for s in sorted(got)], rtol=1e-5)


def test_resume_after_crash_reproduces_losses_exactly(tmp_path):
  steady = train_ok(tmp_path / "steady", "--config.checkpoint_every=2", devices=1)
  # Stop after 4 steps, then lose the step-4 checkpoint as a crash would: resume starts from step 2.
  train_ok(tmp_path / "crashed", "--config.checkpoint_every=2", "--config.max_steps_per_run=4", devices=1)
  shutil.rmtree(tmp_path / "crashed" / "lm" / "checkpoints" / "4")
  resumed = train_ok(tmp_path / "crashed", "--config.checkpoint_every=2", devices=1)
  assert resumed == steady  # exact: same params, optimizer state, data position and RNG


def test_checkpoint_from_eight_devices_restores_on_one(tmp_path, single_device_losses):
  train_ok(tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
           "--config.max_steps_per_run=3")
  resumed = train_ok(tmp_path, "--config.mesh.data=1", devices=1)
  assert sorted(resumed) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([resumed[s] for s in (4, 5)], [single_device_losses[s] for s in (4, 5)],
                             rtol=1e-5)


def test_two_processes_match_one_process(tmp_path):
  """jax.distributed on localhost: 2 processes x 1 device vs 1 process x 2 devices."""
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  env = subprocess_env(devices=1)
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxai.main", *TINY, f"--workdir={workdir}",
       "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  one_process = train_ok(tmp_path / "single", devices=2)
  multi = losses(workdir)
  assert sorted(multi) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([multi[s] for s in sorted(multi)], [one_process[s] for s in sorted(multi)],
                             rtol=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  result = run_main([*TINY, f"--workdir={tmp_path}", "--config.optimizer.learning_rate=1e12",
                     "--config.optimizer.warmup_steps=0", "--config.checkpoint_every=1"], devices=1)
  assert result.returncode == 1, result.stderr[-3000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("training error: loss is nan at step") or \
      last_line.startswith("training error: loss is inf at step"), result.stderr[-2000:]
  bad_step = int(last_line.split("at step ")[1].split(";")[0])
  kept = sorted(int(d) for d in os.listdir(tmp_path / "lm" / "checkpoints") if d.isdigit())
  assert kept and kept[-1] == bad_step - 1
  assert f"last good checkpoint is step {bad_step - 1}" in last_line
