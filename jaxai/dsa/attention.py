"""DeepSeek Sparse Attention (DSA): the lightning indexer, top-k selection, and MQA attention over
only the selected keys, with the indexer's KL losses of the paper's two-stage recipe.

One layer, ``SparseAttention``, in one of three modes (``MODES``):
  dense    causal MQA attention; no indexer (the dense LM the recipe starts from);
  indexed  the same dense attention, plus the indexer trained towards it: its loss is
           KL(p[t, :] || softmax(I[t, :])), p the attention probabilities summed over heads and
           L1-normalised (the dense warm-up);
  sparse   each query attends only to the ``topk`` keys of highest index score I; the indexer
           learns from KL(p[t, S_t] || softmax(I[t, S_t])) over the selected set only.
In both modes with an indexer its input is detached, so the LM loss trains the main model and the
KL only the indexer.

The losses are sown into the ``losses`` collection (``indexer_kl``; ``indexer_recall`` in the
indexed mode: the share of the dense attention's top-k mass that the indexer's top-k selects).

Two equal forms of the sparse attention on XLA: a mask form (the selected keys as a boolean mask
over the dense logits: cheap to differentiate, O(T * S)) for training, and a gather form (the k
rows gathered per query: O(T * k)) for decoding from a cache and for prefill, where the point is
not to touch every key (a long prefill runs as chunks of queries through the cache, so no
[T, S] array of the whole context is built). On GPU/TPU the Pallas kernels
(``kernels_pallas.sparse_topk_attention``) replace both in training when ``impl`` picks them.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import attention, dispatch, layers
from kernels_pallas import block_causal_attention as block_causal_kernel
from kernels_pallas import sparse_topk_attention as dsa_kernels

MODES = ("dense", "indexed", "sparse")
PRECISIONS = ("default", "fp8")
_NEG = jnp.finfo(jnp.float32).min  # finite: a row with nothing visible gives a uniform softmax, not NaN


def causal_visible(q_len: int, kv_len: int, q_offset=0) -> jax.Array:
  """bool [q_len, kv_len]: query i, at absolute position q_offset + i, sees keys s <= its position."""
  return jnp.arange(kv_len)[None, :] <= (q_offset + jnp.arange(q_len))[:, None]


def indexer_scores(q_index, k_index, weights, visible, *, precision: str = "default",
                   impl: str = "xla", from_zero: bool = False) -> jax.Array:
  """I[b, t, s] = sum_j w[b, t, j] ReLU(q[b, t, j] . k[b, s]) where ``visible`` [(B,) T, S], else
  -inf; fp32. q_index [B, T, H_I, D_I], k_index [B, S, D_I], weights [B, T, H_I]. ``fp8``: q and k
  quantised to e4m3 with a power-of-two scale per 128 values (straight-through gradient).
  ``from_zero``: ``visible`` is plain causal from position 0 (training shapes), which is what the
  Pallas kernel computes; only then may ``impl`` pick it."""
  if from_zero and dispatch.resolve(impl, dsa_kernels.PLATFORMS) == "pallas":
    return dsa_kernels.lightning_indexer_scores(q_index, k_index, weights, precision=precision,
                                                interpret=dispatch.interpret())
  if precision == "fp8":
    q_index, k_index = dsa_kernels.fake_quantize_fp8(q_index), dsa_kernels.fake_quantize_fp8(k_index)
  # fp32 products: the indexer is small, and XLA:CPU has no bf16 x bf16 -> fp32 kernel for this layout.
  logits = jnp.einsum("bthd,bsd->bths", q_index.astype(jnp.float32), k_index.astype(jnp.float32))
  scores = jnp.einsum("bth,bths->bts", weights.astype(jnp.float32), jax.nn.relu(logits))
  return jnp.where(visible, scores, -jnp.inf)


def selection_mask(indices, num_keys: int) -> jax.Array:
  """bool [B, T, S]: True at each query's selected keys (-1 selects nothing)."""
  b, t, _ = indices.shape
  rows = jnp.zeros((b, t, num_keys + 1), bool)  # column num_keys takes the -1s, then is dropped
  target = jnp.where(indices < 0, num_keys, indices)
  rows = rows.at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], target].set(True)
  return rows[..., :num_keys]


def mqa_attention(q, k, v, visible, *, soft_cap=None, dtype=jnp.float32):
  """Attention of q [B, T, H, D] over one KV head k, v [B, S, D] where ``visible`` [(B,) T, S]:
  (output [B, T, H, D], probabilities [B, H, T, S] fp32)."""
  b, t, h, d = q.shape
  # Heads folded into the rows and the keys transposed: both products are plain [M, K] x [K, N]
  # matmuls batched over B, the layout XLA:CPU runs in bf16 in both passes (see xla_attention).
  rows = q.transpose(0, 2, 1, 3).reshape(b, h * t, d)
  logits = layers.einsum("bqd,bds->bqs", rows, k.transpose(0, 2, 1), dtype) * d ** -0.5
  logits = layers.soft_cap(logits, soft_cap).reshape(b, h, t, -1)
  visible = visible if visible.ndim == 2 else visible[:, None]
  probs = jax.nn.softmax(jnp.where(visible, logits, _NEG), axis=-1)
  out = layers.einsum("bqs,bsd->bqd", probs.reshape(b, h * t, -1), v, dtype)
  return out.reshape(b, h, t, d).transpose(0, 2, 1, 3).astype(q.dtype), probs


def gathered_attention(q, k, v, indices, *, soft_cap=None, dtype=jnp.float32):
  """The same function over each query's selected rows only: q [B, T, H, D], k, v [B, S, D],
  indices [B, T, K] (-1: none) -> (output [B, T, H, D], probabilities [B, H, T, K] fp32)."""
  gather = jax.vmap(lambda rows, idx: rows[jnp.maximum(idx, 0)])  # [S, D], [T, K] -> [T, K, D]
  k_sel, v_sel = gather(k, indices), gather(v, indices)
  logits = layers.einsum("bthd,btdk->bthk", q, k_sel.swapaxes(2, 3), dtype) * q.shape[-1] ** -0.5
  logits = layers.soft_cap(logits, soft_cap)
  valid = (indices >= 0)[:, :, None]
  probs = jax.nn.softmax(jnp.where(valid, logits, _NEG), axis=-1) * valid
  out = layers.einsum("bthk,btkd->bthd", probs, v_sel, dtype)
  return out.astype(q.dtype), probs.transpose(0, 2, 1, 3)


def indexer_kl(target_probs, scores, visible) -> jax.Array:
  """Mean over queries of KL(p || softmax(scores)) over the ``visible`` keys, p = ``target_probs``
  [B, H, T, S] summed over heads and L1-normalised (a constant: no gradient reaches it)."""
  p = jax.lax.stop_gradient(target_probs.sum(axis=1))
  p = p / jnp.maximum(p.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  log_q = jax.nn.log_softmax(jnp.where(visible, scores, _NEG), axis=-1)
  kl = jnp.where(visible, jax.scipy.special.xlogy(p, p) - p * log_q, 0.0).sum(-1)
  return kl.mean()


def topk_recall(target_probs, selected, topk: int) -> jax.Array:
  """Mean over queries of the attention mass (heads summed) on the selected keys, as a share of
  the mass on the attention's own top-k keys (1: the indexer picks the best possible set)."""
  p = target_probs.sum(axis=1)
  best = jax.lax.top_k(p, min(topk, p.shape[-1]))[0].sum(-1)
  return (jnp.where(selected, p, 0.0).sum(-1) / jnp.maximum(best, jnp.finfo(jnp.float32).tiny)).mean()


def init_cache(batch: int, max_len: int, head_dim: int, indexer_dim: int | None, dtype) -> dict:
  """Empty cache of one ``SparseAttention`` layer: the shared key and value [B, max_len, D], the
  indexer key [B, max_len, D_I] (not in the dense mode), and the write index."""
  cache = {"key": jnp.zeros((batch, max_len, head_dim), dtype),
           "value": jnp.zeros((batch, max_len, head_dim), dtype),
           "index": jnp.zeros((), jnp.int32)}
  if indexer_dim:
    cache["index_key"] = jnp.zeros((batch, max_len, indexer_dim), dtype)
  return cache


class LightningIndexer(nn.Module):
  """x [B, T, W] -> (q_I [B, T, H_I, D_I], k_I [B, T, D_I], w [B, T, H_I]): one key per token
  shared by all indexer heads, LayerNorm'd; RoPE on the first ``rope_dims`` dims of q and k
  (non-interleaved); w = linear(x) * H_I^-1/2, in fp32."""
  num_heads: int
  head_dim: int
  rope_dims: int
  rope_base: float = 10_000.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions):
    q = layers.Dense((self.num_heads, self.head_dim), ("embed", "indexer_heads", "indexer_dim"),
                     dtype=self.dtype, name="query")(x)
    k = layers.Dense(self.head_dim, ("embed", "indexer_dim"), dtype=self.dtype, name="key")(x)
    k = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="key_norm")(k)
    if self.rope_dims:
      rotate = lambda a: jnp.concatenate(
          [layers.rope(a[..., :self.rope_dims], positions, base=self.rope_base),
           a[..., self.rope_dims:]], axis=-1)
      q, k = rotate(q), rotate(k[:, :, None])[:, :, 0]
    w = layers.Dense(self.num_heads, ("embed", "indexer_heads"), dtype=jnp.float32,
                     name="weights")(x.astype(jnp.float32)) * self.num_heads ** -0.5
    return q, k, w


class SparseAttention(nn.Module):
  """MQA self-attention (one key/value head shared by all query heads, the MQA form of MLA) in one
  of ``MODES``. ``__call__(x, positions, cache=None)`` -> output, or ``(output, cache)``.

  positions: [B, T] absolute; with a cache, x's tokens are written at ``cache["index"]`` and
  attend to everything written so far.
  """
  num_heads: int
  head_dim: int
  mode: str = "dense"
  topk: int = 64
  indexer_heads: int = 4
  indexer_dim: int = 32
  indexer_rope_dims: int = 16
  precision: str = "default"
  qk_norm: bool = True
  rope_base: float = 10_000.0
  soft_cap: float | None = None
  impl: str = "xla"
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, positions, cache=None):
    dense = lambda shape, axes, name: layers.Dense(shape, axes, dtype=self.dtype, name=name)(x)
    q = dense((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), "query")
    k = dense(self.head_dim, ("embed", "head_dim"), "key")
    v = dense(self.head_dim, ("embed", "head_dim"), "value")
    if self.qk_norm:
      q = layers.RMSNorm("head_dim", dtype=self.dtype, name="query_norm")(q)
      k = layers.RMSNorm("head_dim", dtype=self.dtype, name="key_norm")(k)
    q = layers.rope(q, positions, base=self.rope_base)
    k = layers.rope(k[:, :, None], positions, base=self.rope_base)[:, :, 0]
    index = None
    if self.mode != "dense":
      # The indexer's input is detached (the paper's sparse stage; in the warm-up the main model
      # is frozen anyway): the LM loss trains the main model, the KL only the indexer.
      index = LightningIndexer(self.indexer_heads, self.indexer_dim, self.indexer_rope_dims,
                               self.rope_base, dtype=self.dtype, name="indexer")(
                                   jax.lax.stop_gradient(x), positions)
    q_offset = 0
    if cache is not None:
      q_offset = cache["index"]
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), q_offset, 1)
      k, v = write(cache["key"], k), write(cache["value"], v)
      cache = dict(cache, key=k, value=v, index=q_offset + x.shape[1])
      if index is not None:
        cache["index_key"] = write(cache["index_key"], index[1])
        index = (index[0], cache["index_key"], index[2])
    out = self._attend(q, k, v, index, q_offset, training_shapes=cache is None)
    out = layers.Dense(x.shape[-1], ("heads", "head_dim", "embed"), in_axis=(-2, -1),
                       dtype=self.dtype, name="out")(out)
    return out if cache is None else (out, cache)

  def _attend(self, q, k, v, index, q_offset, training_shapes):
    """Attention of queries at q_offset.. over all keys k, v. ``training_shapes``: no cache
    (queries and keys both from position 0), where the kernels apply and the XLA sparse path uses
    the mask form; with a cache the gather form."""
    t, s = q.shape[1], k.shape[1]
    visible = causal_visible(t, s, q_offset)
    if self.mode == "dense":
      # On XLA the one-KV-head layout of mqa_attention: a dense training step at L = 1024 took
      # 2.1 s against 3.1 s through the shared GQA path with a KV-head axis of 1 (AMX host).
      if not training_shapes or dispatch.resolve(self.impl, block_causal_kernel.PLATFORMS) == "xla":
        return mqa_attention(q, k, v, visible, soft_cap=self.soft_cap, dtype=self.dtype)[0]
      return attention.dot_product_attention(q, k[:, :, None], v[:, :, None], frame_size=1,
                                             soft_cap=self.soft_cap, impl=self.impl)
    scores = indexer_scores(*index, visible, precision=self.precision, impl=self.impl,
                            from_zero=training_shapes)
    if self.mode == "indexed":
      out, probs = mqa_attention(q, k, v, visible, soft_cap=self.soft_cap, dtype=self.dtype)
      self.sow("losses", "indexer_kl", indexer_kl(probs, scores, visible))
      selected = selection_mask(dsa_kernels.topk_indices(scores, self.topk), s)
      self.sow("losses", "indexer_recall", topk_recall(probs, selected, self.topk))
      return out
    indices = dsa_kernels.topk_indices(jax.lax.stop_gradient(scores), self.topk)
    selected_scores = lambda: jnp.take_along_axis(scores, jnp.maximum(indices, 0), axis=-1)
    if not training_shapes:
      out, probs = gathered_attention(q, k, v, indices, soft_cap=self.soft_cap, dtype=self.dtype)
      self.sow("losses", "indexer_kl", indexer_kl(probs, selected_scores(), indices >= 0))
      return out
    if self.soft_cap is None and dispatch.resolve(self.impl, dsa_kernels.PLATFORMS) == "pallas":
      out = dsa_kernels.sparse_topk_attention(q, k[:, :, None], v[:, :, None], indices,
                                              interpret=dispatch.interpret())
      # The KL target needs the selected probabilities; the gathered form recomputes them.
      probs = gathered_attention(q, k, v, indices, soft_cap=None, dtype=self.dtype)[1]
      self.sow("losses", "indexer_kl", indexer_kl(probs, selected_scores(), indices >= 0))
      return out
    selected = selection_mask(indices, s)
    out, probs = mqa_attention(q, k, v, selected, soft_cap=self.soft_cap, dtype=self.dtype)
    self.sow("losses", "indexer_kl", indexer_kl(probs, scores, selected))
    return out
