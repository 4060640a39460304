"""The two stages through the trainer, the filter's data, the decode command and config errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, config_of, subprocess_env
from jaxai import checkpointing, config_lib, stages, train
from jaxai.diffusion_lm import decoding, task


def test_both_stages_train_and_the_filter_data_are_the_oracles(tiny_diffusion_lm):
  config, workdir = tiny_diffusion_lm
  for stage in task.STAGES:
    rows = train.read_metrics(str(workdir / stage))
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss"])
  evaluation = train.read_metrics(str(workdir / "diffusion_lm"))[-1]
  assert 0.0 <= evaluation["eval/accuracy"] <= 1.0 and evaluation["eval/calls_per_answer"] >= 2
  cached = sorted(os.listdir(workdir / "diffusion_lm" / "filter_data"))
  assert cached == ["heldout_4_step4.npz", "train_4_step4.npz"]
  with np.load(workdir / "diffusion_lm" / "filter_data" / "train_4_step4.npz") as f:
    conf, labels, weights = f["confidences"], f["labels"], f["weights"]
  assert conf.shape == labels.shape == weights.shape and conf.shape[1] == config.data.block_len
  assert weights.any(-1).all()  # every row has a masked position
  assert np.all(conf[~weights] == 1.0) and np.all((conf[weights] > 0) & (conf[weights] <= 1))
  # one row per oracle step of each prompt: at least one per block, at most one per position
  assert 4 * config.data.gen_len // config.data.block_len <= len(conf) <= 4 * config.data.gen_len


def test_decode_command_prints_a_line_per_decoder_and_length(tiny_diffusion_lm, tmp_path):
  _, workdir = tiny_diffusion_lm
  args = [sys.executable, "-m", "jaxai.diffusion_lm.decode", "--config=configs/diffusion_lm.py:tiny",
          f"--workdir={workdir}", "--gen_lens=16,32", "--problems=3", "--show=1"]
  done = subprocess.run(args, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  records = [json.loads(line) for line in done.stdout.strip().splitlines()]
  assert [(r["decoder"], r["gen_len"]) for r in records] == [(d, n) for n in (16, 32) for d in decoding.DECODERS]
  by_name = {(r["decoder"], r["gen_len"]): r for r in records}
  assert by_name[("one_per_step", 32)]["calls_per_answer"] == 32  # steps = length
  assert by_name[("llada", 32)]["calls_per_answer"] == 32 // 8 * 4  # 4 steps per block of 8
  for r in records:
    assert r["problems"] == 3 and len(r["answers"]) == 1 and "calls_speedup" in r
  # Without one_per_step, its line is derived from eotp's and must equal the measured one.
  derived = subprocess.run(args[:5] + ["--gen_lens=32", "--problems=3", "--decoders=fast_dllm,eotp"], cwd=REPO_ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert derived.returncode == 0, derived.stderr[-2000:]
  lines = {r["decoder"]: r for r in map(json.loads, derived.stdout.strip().splitlines())}
  assert list(lines) == ["one_per_step", "fast_dllm", "eotp"]
  measured = by_name[("one_per_step", 32)]
  for key in ("accuracy", "calls_per_answer", "after_eot_share"):
    assert lines["one_per_step"][key] == measured[key], key
  assert lines["one_per_step"]["seconds"] is None and "wall_speedup" not in lines["fast_dllm"]
  assert lines["fast_dllm"]["calls_speedup"] == by_name[("fast_dllm", 32)]["calls_speedup"]
  missing = subprocess.run(args[:4] + [f"--workdir={tmp_path}"], cwd=REPO_ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("checkpoint error:")


def test_the_long_variant_finetunes_another_run_and_its_filter_replays_eotp(tiny_diffusion_lm, tmp_path):
  base_config, base = tiny_diffusion_lm
  long = config_of("diffusion_lm", "long")
  assert (long.data.gen_len, long.stages.diffusion_lm.init_from, long.filter.reference) == (1024, "diffusion_lm", "eotp")
  with pytest.raises(config_lib.ConfigError, match="reads_from"):
    stages.order(long)
  # The same path at the tiny size: the tiny run's denoiser finetuned at twice its length.
  gen_len = 2 * base_config.data.gen_len
  config = config_of("diffusion_lm", "tiny", data__gen_len=gen_len, filter__reference="eotp",
                     decoding__eval_decoder="eotp")
  config.stages.diffusion_lm.update(init_from="diffusion_lm", reads_from=str(base), total_steps=2,
                                    optimizer=dict(learning_rate=1e-9))
  before = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
  from jaxai import main  # pylint: disable=g-import-not-at-top
  main.run(config, str(tmp_path))
  assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == before  # the base run untouched
  _, start = checkpointing.restore_params(str(base / "diffusion_lm" / "checkpoints"))
  _, tuned = checkpointing.restore_params(str(tmp_path / "diffusion_lm" / "checkpoints"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned, start)
  cached = sorted(os.listdir(tmp_path / "diffusion_lm" / "filter_data"))
  assert cached == ["heldout_4_eotp_step2.npz", "train_4_eotp_step2.npz"]
  with np.load(tmp_path / "diffusion_lm" / "filter_data" / "train_4_eotp_step2.npz") as f:
    assert f["confidences"].shape[1] == config.data.block_len and f["weights"].any(-1).all()
    # one row per oracle step: at least one per block, at most one per position
    assert 4 * gen_len // config.data.block_len <= len(f["confidences"]) <= 4 * gen_len


@pytest.mark.parametrize("overrides, field", [
    (dict(data__gen_len=20), "data.gen_len"),
    (dict(data__tasks=("no_such_task",)), "data.tasks"),
    (dict(decoding__eval_decoder="beam"), "decoding.eval_decoder"),
    (dict(decoding__steps_per_block=9), "decoding.steps_per_block"),
    (dict(filter__tau=1.5), "filter.tau"),
    (dict(filter__reference="llada"), "filter.reference"),
    (dict(stages=dict(distill=config_lib.stage_overlay())), "stages"),
])
def test_bad_config_values_name_their_field(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field):
    task.validate(config_of("diffusion_lm", "tiny", **overrides))


def test_training_rows_mix_problems_and_fully_maskable_text(tmp_path):
  config = config_of("diffusion_lm", "tiny", batch_size=64)
  stage = task.build_stage(stages.stage_config(config, "diffusion_lm"), str(tmp_path))
  batch = next(iter(stage.make_data(0, 1)))
  text = batch["maskable_from"] == 0
  np.testing.assert_array_equal(batch["maskable_from"][~text], config.data.prompt_len)
  assert 0.1 < text.mean() < 0.45  # text_fraction 0.25 of 64 rows
  assert batch["tokens"][text].max() < 256  # plain bytes: no PAD, EOT or MASK
  problem_rows = {tuple(r) for r in task.problems(config, "train").tokens}
  assert all(tuple(r) in problem_rows for r in batch["tokens"][~text])
