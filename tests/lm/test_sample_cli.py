"""The sample and bench_decode commands, each in a fresh process, on a tiny run trained here."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, config_of, subprocess_env
from jaxai import main as main_lib
from jaxai import stages
from jaxai.lm import task


def run_module(module, args, *, devices=2, timeout=300):
  env = subprocess_env(devices)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module", name="workdir")
def fixture_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm_run"))
  main_lib.run(config_of("lm", "tiny"), workdir)
  return workdir


def greedy_reference(workdir, prompts: list[bytes], new_tokens: int) -> list[bytes]:
  """Greedy continuations by the plain forward pass over each whole text, one byte at a time (the
  texts right-padded into one batch: causal attention keeps the pad out)."""
  trained = stages.load_stage(config_of("lm", "tiny"), workdir, "lm", sections=("model",))
  apply = jax.jit(task.make_model(trained.config).apply)
  texts = [list(p) for p in prompts]
  width = max(map(len, texts)) + new_tokens
  for _ in range(new_tokens):
    logits = apply({"params": trained.params}, np.array([t + [0] * (width - len(t)) for t in texts]))
    for row, text in enumerate(texts):
      text.append(int(np.argmax(logits[row, len(text) - 1])))
  return [bytes(t[len(p):]) for t, p in zip(texts, prompts)]


def test_sample_prints_one_json_line_per_prompt_and_stops_at_a_stop_byte(workdir):
  prompts = ["def main(", "import", "é"]  # three rows on two devices: the batch is filled up
  new_tokens = 6
  want = greedy_reference(workdir, [p.encode() for p in prompts], new_tokens)
  stop = want[1][2]  # the third greedy byte after "import" (or an earlier equal one) ends that row
  result = run_module("jaxai.lm.sample", ["--config=configs/lm.py:tiny", f"--workdir={workdir}",
                                          *(f"--prompt={p}" for p in prompts), f"--max_new_tokens={new_tokens}",
                                          "--temperature=0", f"--stop=\\x{stop:02x}"])
  assert result.returncode == 0, result.stderr
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["prompt"] for r in records] == prompts
  assert records[1]["stop_reason"] == "stop_token" and records[1]["new_tokens"] <= 3
  for record, continuation in zip(records, want):
    stopped = stop in continuation
    n = continuation.index(stop) + 1 if stopped else new_tokens
    assert record["new_tokens"] == n, record
    assert record["stop_reason"] == ("stop_token" if stopped else "max_new_tokens")
    # The completion leaves the stop byte out; new_tokens counts it.
    assert record["completion"] == continuation[:n - stopped].decode("utf-8", errors="replace")
    assert record["step"] == config_of("lm", "tiny").total_steps


def test_sample_without_a_checkpoint_is_one_error_line(tmp_path):
  result = run_module("jaxai.lm.sample", ["--config=configs/lm.py:tiny", f"--workdir={tmp_path}", "--prompt=x"])
  assert result.returncode == 2 and not result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("checkpoint error: "), result.stderr


@pytest.mark.parametrize("flag,field", [("--top_p=0", "top_p"), ("--temperature=-1", "temperature"),
                                        ("--stop=ab", "stop"), ("--max_new_tokens=0", "max_new_tokens")])
def test_sample_bad_flag_is_one_config_error_line(flag, field, tmp_path):
  result = run_module("jaxai.lm.sample", ["--config=configs/lm.py:tiny", f"--workdir={tmp_path}", "--prompt=x", flag])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith(f"config error: {field}: "), result.stderr


def test_bench_decode_prints_one_line_per_batch_size():
  result = run_module("jaxai.lm.bench_decode", ["--config=configs/lm.py:tiny", "--prompt_len=8", "--new_tokens=4",
                                                "--batches=1,2", "--runs=1"], devices=1)
  assert result.returncode == 0, result.stderr
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["batch"] for r in records] == [1, 2]
  for r in records:
    assert r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["params"].startswith("random")
    assert r["host_cpu"] and r["backend"] == "cpu"
  assert records[0]["recompute_tokens_agree"] == 4 and records[0]["recompute_ms"] > 0  # float32: all
