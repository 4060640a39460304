"""DSA's layer against plain references: the lightning indexer (a per-head loop and the kernels'
jnp twin), top-k attention (the kernels' gather reference), the KL target, recall, the two
stages' gradient separation, top-k >= L as dense, and cached decoding as the plain forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxai.dsa import attention
from jaxai.dsa import model as model_lib
from jaxai.dsa import task
from kernels_pallas import sparse_topk_attention as kernels

B, T, H, D, HI, DI = 2, 24, 3, 8, 2, 8


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_indexer_scores_are_the_weighted_relu_sum_over_heads():
  q, k, w = _normal(0, (B, T, HI, DI)), _normal(1, (B, T, DI)), _normal(2, (B, T, HI))
  got = np.asarray(attention.indexer_scores(q, k, w, attention.causal_visible(T, T)))
  qn, kn, wn = map(np.asarray, (q, k, w))
  for b in range(B):
    for t in range(T):
      for s in range(T):
        want = sum(wn[b, t, j] * max(qn[b, t, j] @ kn[b, s], 0.0) for j in range(HI)) if s <= t else -np.inf
        np.testing.assert_allclose(got[b, t, s], want, rtol=1e-5, atol=1e-5)


def test_fp8_indexer_matches_the_kernels_quantised_reference():
  q, k, w = _normal(0, (B, T, HI, DI)), _normal(1, (B, T, DI)), _normal(2, (B, T, HI))
  got = attention.indexer_scores(q, k, w, attention.causal_visible(T, T), precision="fp8")
  want = kernels.reference_lightning_indexer_scores(q, k, w, precision="fp8")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  plain = kernels.reference_lightning_indexer_scores(q, k, w)
  assert not np.allclose(got, plain, rtol=1e-4, atol=1e-4)  # the quantisation is really applied


def test_indexer_scores_with_a_query_offset_see_only_earlier_keys():
  q, k, w = _normal(0, (B, 4, HI, DI)), _normal(1, (B, T, DI)), _normal(2, (B, 4, HI))
  got = np.asarray(attention.indexer_scores(q, k, w, attention.causal_visible(4, T, q_offset=10)))
  assert np.isfinite(got[:, 0, :11]).all() and np.isneginf(got[:, 0, 11:]).all()
  assert np.isfinite(got[:, 3, :14]).all() and np.isneginf(got[:, 3, 14:]).all()


@pytest.mark.parametrize("topk", [1, 5, 8])
def test_both_sparse_forms_equal_the_kernels_gather_reference(topk):
  q, k, v = _normal(0, (B, T, H, D)), _normal(1, (B, T, D)), _normal(2, (B, T, D))
  scores = kernels.reference_lightning_indexer_scores(_normal(3, (B, T, HI, DI)), _normal(4, (B, T, DI)),
                                                      _normal(5, (B, T, HI)))
  indices = kernels.topk_indices(scores, topk)
  np.testing.assert_array_equal(indices, kernels.select_topk_indices(scores, topk))
  want = kernels.reference_sparse_topk_attention(q, k[:, :, None], v[:, :, None], indices)
  masked, _ = attention.mqa_attention(q, k, v, attention.selection_mask(indices, T))
  gathered, probs = attention.gathered_attention(q, k, v, indices)
  np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gathered, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)  # every query sees key 0


def test_the_kl_target_is_the_head_summed_l1_normalised_attention():
  probs = jax.nn.softmax(_normal(0, (B, H, T, T)) + jnp.where(attention.causal_visible(T, T), 0, -1e9), -1)
  scores = _normal(1, (B, T, T))
  visible = attention.causal_visible(T, T)
  got = float(attention.indexer_kl(probs, jnp.where(visible, scores, -jnp.inf), visible))
  p, s = np.asarray(probs, np.float64).sum(1), np.asarray(scores, np.float64)
  total = 0.0
  for b in range(B):
    for t in range(T):
      target = p[b, t, :t + 1] / p[b, t, :t + 1].sum()
      log_q = s[b, t, :t + 1] - np.log(np.exp(s[b, t, :t + 1]).sum())
      total += np.sum(target * (np.log(target) - log_q))
  np.testing.assert_allclose(got, total / (B * T), rtol=1e-4)
  # Scores equal to the target's log: no divergence left.
  exact = jnp.log(jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32) + 1e-30)
  assert float(attention.indexer_kl(probs, jnp.where(visible, exact, -jnp.inf), visible)) < 1e-4


def test_recall_is_one_for_the_attentions_own_top_k_and_less_for_others():
  probs = jax.nn.softmax(_normal(0, (B, H, T, T)), -1)
  own = attention.selection_mask(kernels.topk_indices(probs.sum(1), 4), T)
  np.testing.assert_allclose(attention.topk_recall(probs, own, 4), 1.0, rtol=1e-6)
  worst = attention.selection_mask(kernels.topk_indices(-probs.sum(1), 4), T)
  assert float(attention.topk_recall(probs, worst, 4)) < 0.9


def _layer(mode, topk=6):
  return attention.SparseAttention(H, D, mode=mode, topk=topk, indexer_heads=HI, indexer_dim=DI,
                                   indexer_rope_dims=4)


def test_top_k_of_at_least_the_context_is_dense_attention():
  x, positions = _normal(0, (B, T, 16)), jnp.arange(T)[None]
  params = _layer("sparse", topk=T).init(jax.random.key(0), x, positions)
  dense_params = {"params": {k: v for k, v in params["params"].items() if k != "indexer"}}
  sparse_out, _ = _layer("sparse", topk=T).apply(params, x, positions, mutable=["losses"])
  np.testing.assert_allclose(sparse_out, _layer("dense").apply(dense_params, x, positions), rtol=1e-5, atol=1e-5)
  fewer, _ = _layer("sparse", topk=4).apply(params, x, positions, mutable=["losses"])
  assert not np.allclose(fewer, sparse_out, atol=1e-3)


def _tiny_model(kind):
  return model_lib.LongContextLM(model_lib.ModelConfig(
      width=16, num_layers=2, num_heads=H, head_dim=D, mlp_hidden=32, layer_pattern=(kind,), topk=5,
      indexer_heads=HI, indexer_dim=DI, indexer_rope_dims=4, num_kv_heads=1, window=6))


def _grads(model, params, tokens, kl_weight):
  loss = lambda p: task.lm_loss(model, kl_weight, p, {"tokens": tokens}, None)[0]
  flat = jax.tree_util.tree_flatten_with_path(jax.grad(loss)(params))[0]
  split = {True: [], False: []}
  for path, g in flat:
    split["indexer" in jax.tree_util.keystr(path)].append(float(jnp.abs(g).max()))
  return split


def test_sparse_stage_the_lm_loss_trains_the_model_and_the_kl_only_the_indexer():
  model = _tiny_model("sparse")
  tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 256)
  params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
  lm_only = _grads(model, params, tokens, kl_weight=0.0)
  assert max(lm_only[True]) == 0.0 and max(lm_only[False]) > 0
  kl = lambda p: task.sown_mean(task.forward(model, p, tokens)[1], "indexer_kl")
  flat = jax.tree_util.tree_flatten_with_path(jax.grad(kl)(params))[0]
  assert max(float(jnp.abs(g).max()) for p, g in flat if "indexer" in jax.tree_util.keystr(p)) > 0
  assert max(float(jnp.abs(g).max()) for p, g in flat if "indexer" not in jax.tree_util.keystr(p)) == 0.0


def test_indexed_mode_kl_reaches_only_the_indexer():
  model = _tiny_model("indexed")
  tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 256)
  params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
  kl = lambda p: task.sown_mean(task.forward(model, p, tokens)[1], "indexer_kl")
  flat = jax.tree_util.tree_flatten_with_path(jax.grad(kl)(params))[0]
  assert max(float(jnp.abs(g).max()) for p, g in flat if "indexer" not in jax.tree_util.keystr(p)) == 0.0


@pytest.mark.parametrize("kind", ["dense", "sparse", "local"])
def test_cached_decoding_equals_the_plain_forward(kind):
  model = _tiny_model(kind)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 256)
  params = model.init(jax.random.key(0), tokens)["params"]
  want = model.apply({"params": params}, tokens, mutable=["losses"])[0]
  cache = model_lib.init_cache(model.config, B, T)
  (logits, cache), _ = model.apply({"params": params}, tokens[:, :8], cache, mutable=["losses"])
  pieces = [logits]
  for t in range(8, T, 4):  # chunks of 4 after a prefill of 8: the cached gather form throughout
    (logits, cache), _ = model.apply({"params": params}, tokens[:, t:t + 4], cache, mutable=["losses"])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), want, rtol=1e-4, atol=1e-4)


def test_pallas_kernels_in_the_sparse_layer_match_the_xla_path():
  x, positions = _normal(0, (1, 16, 16)), jnp.arange(16)[None]
  layer = lambda impl: attention.SparseAttention(2, 16, mode="sparse", topk=4, indexer_heads=2,
                                                 indexer_dim=16, indexer_rope_dims=8, impl=impl)
  params = layer("xla").init(jax.random.key(0), x, positions)
  want, want_losses = layer("xla").apply(params, x, positions, mutable=["losses"])
  got, got_losses = layer("pallas").apply(params, x, positions, mutable=["losses"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_losses["losses"]["indexer_kl"][0], want_losses["losses"]["indexer_kl"][0],
                             rtol=1e-4, atol=1e-5)
