"""The context benchmark's records: one per (context, model), ratios against dense in the same
run, prefill skipped above prefill_max, and the cache's size as the model's layout says."""
from conftest import config_of
from jaxai.dsa import bench


def test_records_per_context_and_model_with_ratios_against_dense():
  config = config_of("dsa", "tiny")
  records = list(bench.measure(config, contexts=[128, 256], models=["dense", "sparse"],
                               topk=32, chunk=64, new_tokens=2, runs=1, prefill_max=128))
  assert [(r["context"], r["attention"]) for r in records] == [
      (c, m) for c in (128, 256) for m in ("dense", "sparse")]
  for r in records:
    assert r["decode_ms_per_token"] > 0 and r["dense_over_this_decode"] > 0
    assert (r["prefill_ms"] is None) == (r["context"] > 128)
  m = config.model
  positions = 256 + 2
  dense = [r for r in records if r["context"] == 256 and r["attention"] == "dense"][0]
  sparse = [r for r in records if r["context"] == 256 and r["attention"] == "sparse"][0]
  assert dense["cache_bytes"] == m.num_layers * (2 * positions * m.head_dim * 4 + 4)  # fp32, K and V, one head
  assert sparse["cache_bytes"] == dense["cache_bytes"] + m.num_layers * positions * m.indexer_dim * 4
