"""``--dry_run`` compiles every config's ``full`` variant ahead of time, for a v5e-256 TPU slice
(libtpu's topology description; on 8 fake CPU devices without libtpu), without data, parameters or
training."""
import glob
import importlib.util
import json
import os

import jax
import pytest

from conftest import REPO_ROOT, config_of, run_main
from jaxai import dry_run, stages

# Stages whose paper-scale model is small: Learn2PD's filter is the paper's ~2K parameters.
SMALL_BY_DESIGN = ("filter",)
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))
# Configs whose stages are several variants of one model, compiled here by their one stage with
# a program of its own and fewer layers, to keep the suite's time: DSA's sparse stage (the indexer
# and top-k attention) with 2 of its 12 layers. Its six stages at 12 layers took 4-8 min each to
# compile for TPU at nice 19 beside training; all six compiled and fit, by hand on 2026-12-08
# (docs/dsa.md).
REDUCED = {"dsa": dict(stage="sparse", model__num_layers=2)}


def test_the_world_models_rl_stage_compiles_at_full_size(tmp_path):
  """RL in imagination, run by name (stage=all skips it), whose on-policy batch (the imagined
  trajectories of the agent model, with its heads) is made inside the compiled step. Full widths
  and mesh; short trajectories keep the compile to seconds. (The finetuning stage's step is the
  dynamics loss plus the heads: it compiled at full size too, by hand, on 2026-12-03.)"""
  config = config_of("world_model", "full", stage="imagination", imagination__horizon=4,
                     imagination__context_frames=4)
  (record,) = dry_run.dry_run(config, str(tmp_path / "run"))
  assert record["stage"] == "imagination" and record["devices"] == 8, record
  assert record["parameters"] > 1e8 and record["flops_per_step"] > 0 and record["memory_per_device_bytes"] > 0
  assert not os.path.exists(tmp_path / "run")


@pytest.fixture
def least_compile_effort():
  """XLA's lowest optimisation and memory-fitting effort while a test compiles: the world model's
  full dynamics step compiles for TPU in 83 s instead of 705 s (2026-12-07, AVX-512-bf16 host,
  each measured at nice 19 beside a training run). The memory checked is then that of the
  low-effort program (the dynamics step: 2.09 GiB of temporaries, 2.72 GiB of arguments per chip),
  which XLA tried less hard to fit; ``--dry_run`` itself compiles at the default effort."""
  before = jax.config.jax_exec_time_optimization_effort, jax.config.jax_memory_fitting_effort
  jax.config.update("jax_exec_time_optimization_effort", -1.0)
  jax.config.update("jax_memory_fitting_effort", -1.0)
  yield
  jax.config.update("jax_exec_time_optimization_effort", before[0])
  jax.config.update("jax_memory_fitting_effort", before[1])


@pytest.mark.parametrize("name", CONFIGS)
def test_full_variant_compiles_for_a_v5e_256_slice_within_a_chips_memory(name, tmp_path, least_compile_effort):
  """The full variants are written for TPU pods: compiled for a v5e-256 slice (libtpu's topology
  description). Without libtpu, on 8 fake CPU devices instead. One compile per config keeps the
  suite's time, so with libtpu the full variants compile on CPU devices only for the world
  model's RL stage (the test above); the command's test compiles the tiny variant."""
  config = config_of(name, "full", **REDUCED.get(name, {}))
  if importlib.util.find_spec("libtpu") is None:
    records = list(dry_run.dry_run(config, str(tmp_path / "run")))
    assert all(r["devices"] == 8 and r["platform"] == "cpu" and r["flops_per_step"] > 0 for r in records), records
  else:
    records = list(dry_run.dry_run(config, str(tmp_path / "run"), topology="v5e:16x16"))
    for record in records:
      assert record["devices"] == 256 and record["device_kind"] == "TPU v5 lite"
      assert record["fits"], record
      # auto attention is a Mosaic kernel here, which XLA counts as zero: counted on the XLA path.
      assert record["flops_per_step"] > 1e12 or record["stage"] in SMALL_BY_DESIGN, record
  assert [r["stage"] for r in records] == stages.selected(config)
  for record in records:
    # Paper scale, not always large: TRM's full model is the paper's 5M parameters.
    assert record["parameters"] > 1e6 or record["stage"] in SMALL_BY_DESIGN, record
    assert record["memory_per_device_bytes"] > 0
  assert not os.path.exists(tmp_path / "run")  # nothing written


def test_flops_are_those_of_the_model():
  """The tiny LM's step against 6 x parameters x tokens (forward and backward of the matmuls) plus
  its attention: XLA's count is of the real program, so it lands near, not on, the formula."""
  config = config_of("lm", "tiny")
  (record,) = dry_run.dry_run(config, "/unused")
  c, m = config.data, config.model
  tokens = config.batch_size * c.seq_len
  attention = 2 * 2 * config.batch_size * m.num_layers * m.num_heads * m.head_dim * c.seq_len ** 2 * 3
  expected = 6 * record["parameters"] * tokens + attention
  assert 0.7 * expected < record["flops_per_step"] < 1.6 * expected, (record["flops_per_step"], expected)
  # XLA counts a scan's body once: a scanned, rematerialised stack must still report the model's FLOPs.
  config.model.update(scan_layers=True, remat="dots")
  (scanned,) = dry_run.dry_run(config, "/unused")
  assert scanned["flops_per_step"] == pytest.approx(record["flops_per_step"], rel=1e-6)
  assert scanned["compiled_flops_per_device"] < record["compiled_flops_per_device"]


def test_the_command_prints_one_json_line_per_stage_and_writes_nothing(tmp_path):
  result = run_main(["--config=configs/world_model.py:tiny", f"--workdir={tmp_path / 'run'}", "--dry_run"])
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [r["stage"] for r in records] == ["tokenizer", "dynamics"]
  assert not os.path.exists(tmp_path / "run")
  wrong = run_main(["--config=configs/lm.py:tiny", f"--workdir={tmp_path}", "--topology=v5e:2x2"])
  assert wrong.returncode == 2 and wrong.stderr.startswith("config error: topology: "), wrong.stderr
