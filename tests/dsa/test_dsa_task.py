"""The dsa task's stages as the tiny config trains them: the warm-up changes only the indexer, the
sparse stage starts from it and trains the model, the evaluations report what the docs cite; and
bad config values are one-field errors."""
import json

import jax
import numpy as np
import pytest

from conftest import config_of
from jaxai import checkpointing, config_lib, stages


def _params(workdir, stage):
  _, params = checkpointing.restore_params(str(workdir / stage / "checkpoints"))
  return {jax.tree_util.keystr(path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_the_warmup_trains_only_the_indexer_and_sparse_starts_from_it(tiny_dsa):
  _, workdir = tiny_dsa
  dense, warmup, sparse = (_params(workdir, s) for s in ("dense", "indexer_warmup", "sparse"))
  indexer = [k for k in warmup if "indexer" in k]
  assert indexer and not any("indexer" in k for k in dense)
  assert set(warmup) - set(indexer) == set(dense)
  for key, value in dense.items():
    np.testing.assert_array_equal(warmup[key], value, err_msg=key)  # frozen main model
  assert set(sparse) == set(warmup)
  assert any(not np.array_equal(sparse[k], warmup[k]) for k in dense)  # the LM trains in sparse
  assert any(not np.array_equal(sparse[k], warmup[k]) for k in indexer)  # and the indexer by its KL


def test_every_stage_reports_bits_per_byte_and_retrieval_by_distance(tiny_dsa):
  config, workdir = tiny_dsa
  for stage in stages.selected(config):
    with open(workdir / stage / "metrics.jsonl", encoding="utf-8") as f:
      last = [json.loads(line) for line in f][-1]
    assert last["eval/bits_per_byte"] > 0
    for d in config.data.retrieval_distances:
      assert 0.0 <= last[f"eval/retrieval_d{d}"] <= 1.0
    if stage in ("indexer_warmup", "sparse"):
      assert 0.0 < last["eval/indexer_recall"] <= 1.0 and last["eval/indexer_kl"] >= 0.0
      assert "indexer_kl" in last  # the training loss's term
    else:
      assert "eval/indexer_recall" not in last


@pytest.mark.parametrize("field, value, message", [
    ("model__indexer_rope_dims", 7, "must be even"),
    ("data__retrieval_distances", (32, 4000), "does not fit in seq_len"),
    ("data__seq_len", 100, "too short for the retrieval tasks"),
    ("model__indexer_precision", "fp4", "must be one of"),
])
def test_bad_values_name_their_field(field, value, message):
  config = config_of("dsa", "tiny", **{field: value})
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    stages.validate_run(config, "/nonexistent", 1, check_reads=False)
  assert field.replace("__", ".") in str(error.value)
