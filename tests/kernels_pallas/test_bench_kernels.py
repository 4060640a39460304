"""Smoke test: the kernel benchmark runs with tiny sizes and prints parseable JSON lines."""
import json

import jax
import pytest

from jaxai import host
from jaxai.bench import kernels as bench


def test_benchmark_prints_one_json_line_per_measurement(capsys):
  bench.main(["--batch=1", "--seq_len=16", "--heads=2", "--kv_heads=1", "--head_dim=16",
              "--frame_size=4", "--window_frames=2", "--top_k=4", "--indexer_heads=2",
              "--indexer_dim=16", "--frames=4", "--tokens=4", "--channels=4", "--warmup=0",
              "--runs=1", "--dtype=float32"])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    assert "interpret" in records.pop(0)["note"]
  kernels = {(r["kernel"], r["implementation"], r["pass"]) for r in records}
  for kernel in ("block_causal_attention", "sparse_topk_attention", "lightning_indexer",
                 "shortcut_forcing_loss"):
    assert (kernel, "reference", "fwd+bwd") in kernels
    has_kernel = not on_cpu and (kernel != "shortcut_forcing_loss" or jax.default_backend() == "gpu")
    assert ((kernel, "pallas", "fwd") in kernels) == has_kernel
  assert ("block_causal_attention", "dense_xla", "fwd") in kernels
  for record in records:
    assert record["backend"] == jax.default_backend() and record["median_ms"] > 0
    assert record["host_cpu"] == host.summary()  # figures from different CPUs differ 2-10x
    assert record.get("tflops_per_s", 0) > 0 or record.get("gb_per_s", 0) > 0
  attention = next(r for r in records if r["kernel"] == "block_causal_attention")
  assert attention["shapes"]["q"] == [1, 16, 2, 16] and attention["dtype"] == "float32"


def test_benchmark_rejects_unknown_kernel():
  with pytest.raises(SystemExit):
    bench.main(["--only=flash"])


def test_benchmark_times_only_the_chosen_implementations_in_their_order(capsys):
  bench.main(["--only=block_causal", "--implementations=dense_xla,reference", "--batch=1",
              "--seq_len=16", "--heads=2", "--kv_heads=1", "--head_dim=16", "--frame_size=4",
              "--warmup=0", "--runs=1", "--dtype=float32"])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  timed = [(r["implementation"], r["pass"]) for r in records if "kernel" in r]
  assert timed == [("dense_xla", "fwd"), ("dense_xla", "fwd+bwd"), ("reference", "fwd"),
                   ("reference", "fwd+bwd")]


def test_benchmark_rejects_unknown_implementation():
  with pytest.raises(SystemExit):
    bench.main(["--implementations=cudnn"])
