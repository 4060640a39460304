"""Bad input ends the run with one line `config error: <field>: <reason>`, exit code 2, and leaves
the workdir exactly as it was."""
import json
import os

import pytest

from conftest import run_main


def snapshot(directory):
  return {os.path.relpath(os.path.join(root, f), directory): os.path.getsize(os.path.join(root, f))
          for root, _, files in os.walk(directory) for f in files}


@pytest.mark.parametrize("args, field", [
    (["--config.no_such_field=1"], "no_such_field"),
    (["--config.model.no_such_field=1"], "model.no_such_field"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.batch_size=12"], "batch_size"),
    (["--config.mesh.tensor=8"], "mesh.tensor"),  # a parameter dimension that 8 does not divide
    (["--config.data.source=/no/such/corpus"], "data.source"),
    (["--config.seed=abc"], "seed"),
    (["--config.total_steps=0"], "total_steps"),
])
def test_bad_config_gives_one_line_and_exit_2(tmp_path, args, field):
  (tmp_path / "notes.txt").write_text("existing content")
  before = snapshot(tmp_path)
  result = run_main(["--config=configs/lm.py:tiny", f"--workdir={tmp_path}", *args])
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith(f"config error: {field}: "), lines[0]
  assert snapshot(tmp_path) == before


def test_unknown_variant_and_missing_config_file(tmp_path):
  for config, expected in [("configs/lm.py:huge", "config error: config: unknown variant 'huge'"),
                           ("configs/missing.py", "config error: config: cannot load configs/missing.py")]:
    result = run_main([f"--config={config}", f"--workdir={tmp_path}"], devices=1)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(expected), result.stderr


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
  assert run_main(["--config=configs/lm.py:tiny", f"--workdir={tmp_path}",
                   "--config.max_steps_per_run=2", "--config.checkpoint_every=2"], devices=1).returncode == 0
  state_dir = tmp_path / "lm" / "checkpoints" / "2" / "state"
  for root, _, files in os.walk(state_dir):  # truncate every array file
    for f in files:
      if "ocdbt" in root or f.startswith("d"):
        open(os.path.join(root, f), "wb").close()
  before = snapshot(tmp_path / "lm" / "checkpoints")
  result = run_main(["--config=configs/lm.py:tiny", f"--workdir={tmp_path}"], devices=1)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("checkpoint error: checkpoint ") and "/2 cannot be restored" \
      in lines[0], result.stderr[-2000:]
  assert snapshot(tmp_path / "lm" / "checkpoints") == before


def test_checkpoint_of_another_config_names_the_changed_fields(tmp_path):
  assert run_main(["--config=configs/lm.py:tiny", f"--workdir={tmp_path}",
                   "--config.max_steps_per_run=2", "--config.checkpoint_every=2"], devices=1).returncode == 0
  before = snapshot(tmp_path)
  result = run_main(["--config=configs/lm.py:tiny", f"--workdir={tmp_path}", "--config.model.mlp_hidden=96"],
                    devices=1)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("checkpoint error: checkpoint "), result.stderr[-2000:]
  assert "(this config differs from the checkpoint's config.json in model.mlp_hidden: 128 -> 96)" \
      in lines[0], lines[0]
  assert snapshot(tmp_path) == before


def test_a_corrupt_latest_checkpoint_names_the_intact_ones_and_restore_step_resumes_from_one(tmp_path):
  common = ["--config=configs/lm.py:tiny", "--config.checkpoint_every=1", "--config.keep_checkpoints=5"]
  assert run_main([*common, f"--workdir={tmp_path / 'straight'}"], devices=1).returncode == 0
  run = tmp_path / "run"
  assert run_main([*common, f"--workdir={run}", "--config.max_steps_per_run=3"], devices=1).returncode == 0
  checkpoints = run / "lm" / "checkpoints"
  for root, _, files in os.walk(checkpoints / "3" / "state"):  # truncate the newest one's arrays
    for f in files:
      if "ocdbt" in root or f.startswith("d"):
        open(os.path.join(root, f), "wb").close()
  corrupt = snapshot(checkpoints / "3")
  result = run_main([*common, f"--workdir={run}"], devices=1)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"checkpoint error: checkpoint {checkpoints}/3 cannot be "
                                                 "restored: "), lines
  assert lines[0].endswith("; intact older checkpoints: 1, 2 (resume from one with "
                           "--config.stages.lm.restore_step=N, which sets the later ones aside and "
                           "deletes nothing)"), lines[0]
  resumed = run_main([*common, f"--workdir={run}", "--config.stages.lm.restore_step=2"], devices=1)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"set aside {checkpoints}_set_aside/3" in resumed.stderr
  assert snapshot(f"{checkpoints}_set_aside/3") == corrupt  # kept as it was
  def losses(workdir):
    with open(workdir / "lm" / "metrics.jsonl", encoding="utf-8") as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert losses(run) == losses(tmp_path / "straight")  # steps 3..5 retrained from step 2, exactly
  missing = run_main([*common, f"--workdir={run}", "--config.stages.lm.restore_step=9"], devices=1)
  assert missing.returncode == 2 and missing.stderr.startswith(
      "config error: stages.lm.restore_step: no checkpoint 9 in "), missing.stderr
