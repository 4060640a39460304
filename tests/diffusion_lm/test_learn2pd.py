"""Learn2PD's filter: its size and its BCE against a plain formula; the bidirectional denoiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxai.diffusion_lm import learn2pd
from jaxai.lm import model as lm_model
from jaxai.nn import transformer


def test_the_filter_has_the_papers_two_thousand_parameters():
  params = learn2pd.Filter(32).init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
  assert sum(x.size for x in jax.tree.leaves(params)) == 32 * 32 + 32 + 32 * 32 + 32 == 2112


def test_bce_over_the_masked_positions_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 8)).astype(np.float32)
  labels = rng.random((5, 8)) < 0.4
  weights = rng.random((5, 8)) < 0.7
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  terms = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  value, metrics = learn2pd.bce_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(float(value), terms[weights].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["filter_accuracy"]), ((logits > 0) == labels)[weights].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["positive_share"]), labels[weights].mean(), rtol=1e-6)


def test_the_bidirectional_model_sees_later_tokens_and_the_causal_one_does_not():
  block = transformer.BlockConfig(width=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_hidden=32)
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
  changed = tokens.at[0, -1].set(9)  # only the last token differs
  for bidirectional in (True, False):
    model = lm_model.DecoderLM(block, 2, vocab_size=16, bidirectional=bidirectional)
    params = model.init(jax.random.key(0), tokens)["params"]
    first = lambda t: model.apply({"params": params}, t)[0, 0]
    moved = float(jnp.abs(first(tokens) - first(changed)).max())
    assert (moved > 1e-4) == bidirectional, (bidirectional, moved)
  with pytest.raises(ValueError, match="no KV cache"):
    model = lm_model.DecoderLM(block, 2, vocab_size=16, bidirectional=True)
    params = model.init(jax.random.key(0), tokens)["params"]
    model.apply({"params": params}, tokens, cache=lm_model.init_cache(model, 1, 8))
