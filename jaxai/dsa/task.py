"""DeepSeek Sparse Attention's two-stage recipe and its baselines as trunk stages, on byte-level
long documents mixed with retrieval tasks (``jaxai.dsa.data``).

Each stage trains the same ``LongContextLM`` with its own layer pattern (``STAGE_LAYERS``):
  dense            the dense MQA LM the recipe starts from;
  indexer_warmup   from dense: attention still dense, only the indexer trains (the config's
                   ``trainable``), towards the head-summed attention (KL over every key);
  sparse           from the warm-up: top-k attention, LM loss for the model, KL over the selected
                   keys for the detached indexer;
  dense_continued  from dense, as many more LM updates as sparse gets: the dense model at an equal
                   number of LM updates, the comparison the recipe's claim is about;
  local_global     CWM-style: 3 sliding-window layers to 1 global (GQA), from scratch;
  sliding_window   every layer sliding-window (GQA), from scratch.

Loss: next-byte cross-entropy plus ``dsa.indexer_kl_weight`` times the layers' mean indexer KL.
Evaluation: held-out bits/byte, exact retrieval accuracy per distance (needles at distances the
config lists), and for the stages with an indexer its recall of the dense attention's top-k mass
(the model run in the indexed mode: dense attention, indexer scored against it).
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxai import config_lib, stages
from jaxai.data import pipeline
from jaxai.dsa import data as dsa_data
from jaxai.dsa import model as model_lib

STAGE_LAYERS = {
    "dense": ("dense",),
    "indexer_warmup": ("indexed",),
    "sparse": ("sparse",),
    "dense_continued": ("dense",),
    "local_global": ("local", "local", "local", "global"),  # model.global_every = 4 (layer_pattern)
    "sliding_window": ("local",),
}
STAGES = tuple(STAGE_LAYERS)
_INDEXED = ("indexer_warmup", "sparse")


def validate(config: ml_collections.ConfigDict) -> None:
  for name in config.stages:
    config_lib.check(name in STAGES, "stages", f"unknown stage {name!r}; the dsa task has {', '.join(STAGES)}")
  config_lib.check_positive(config, "model.global_every", "model.width", "model.num_layers", "model.num_heads",
                            "model.head_dim",
                            "model.mlp_hidden", "model.num_kv_heads", "model.window", "model.topk",
                            "model.indexer_heads", "model.indexer_dim", "data.seq_len",
                            "data.eval_windows", "data.retrieval_per_distance")
  config_lib.check_range(config, "data.retrieval_fraction", 0.0, 1.0)
  config_lib.check_choice(config, "model.indexer_precision", ("default", "fp8"))
  m = config.model
  config_lib.check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
                   f"{m.num_kv_heads} does not divide num_heads {m.num_heads}")
  config_lib.check(0 <= m.indexer_rope_dims <= m.indexer_dim and m.indexer_rope_dims % 2 == 0,
                   "model.indexer_rope_dims", f"must be even and at most indexer_dim {m.indexer_dim}, "
                   f"got {m.indexer_rope_dims}")
  if m.indexer_precision == "fp8":
    config_lib.check(m.indexer_dim <= 128 or m.indexer_dim % 128 == 0, "model.indexer_dim",
                     f"fp8 scales blocks of 128 values: {m.indexer_dim} must be at most 128 or a multiple of it")
  if config.data.retrieval_fraction > 0:
    least = max(dsa_data.min_seq_len(kind) for kind in dsa_data.RETRIEVAL_KINDS)
    config_lib.check(config.data.seq_len >= least, "data.seq_len",
                     f"{config.data.seq_len} is too short for the retrieval tasks (at least {least})")
  low, high = dsa_data.distance_range(config.data.seq_len)
  for d in config.data.retrieval_distances:
    config_lib.check(low <= d <= high, "data.retrieval_distances",
                     f"distance {d} does not fit in seq_len {config.data.seq_len} (from {low} to {high})")


def model_config(config: ml_collections.ConfigDict, layer_pattern: tuple[str, ...]) -> model_lib.ModelConfig:
  m = config.model
  return model_lib.ModelConfig(
      width=m.width, num_layers=m.num_layers, num_heads=m.num_heads, head_dim=m.head_dim,
      mlp_hidden=m.mlp_hidden, layer_pattern=layer_pattern, num_kv_heads=m.num_kv_heads,
      window=m.window, global_rope_base=m.global_rope_base, rope_base=m.rope_base, topk=m.topk,
      indexer_heads=m.indexer_heads, indexer_dim=m.indexer_dim, indexer_rope_dims=m.indexer_rope_dims,
      indexer_precision=m.indexer_precision, qk_norm=m.qk_norm, logit_soft_cap=m.logit_soft_cap or None,
      impl=config.attention_impl,
      dtype=jnp.dtype(config.compute_dtype))


def layer_pattern(config: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
  """The stage's layer kinds; local_global's is ``model.global_every - 1`` local layers, then a
  global one (CWM: 4; 1 makes it a dense GQA model, the control for the KV heads' layout)."""
  if stage == "local_global":
    return ("local",) * (config.model.global_every - 1) + ("global",)
  return STAGE_LAYERS[stage]


def make_model(config: ml_collections.ConfigDict, stage: str | None = None) -> model_lib.LongContextLM:
  return model_lib.LongContextLM(model_config(config, layer_pattern(config, stage or config.stage)))


def sown_mean(losses: dict, name: str) -> jax.Array | None:
  """Mean over layers of a sown scalar (None when no layer sowed it)."""
  values = [v for path, v in jax.tree_util.tree_flatten_with_path(losses)[0]
            if any(getattr(p, "key", None) == name for p in path)]
  return jnp.mean(jnp.stack(values)) if values else None


def forward(model, params, tokens):
  """(logits [B, T, V] of tokens[:, :-1], sown losses)."""
  logits, state = model.apply({"params": params}, tokens[:, :-1], mutable=["losses"])
  return logits, state.get("losses", {})


def lm_loss(model, kl_weight: float, params, batch, rng, *, train_lm: bool = True):
  """Next-byte cross-entropy plus ``kl_weight`` x the layers' mean indexer KL. Without
  ``train_lm`` (the warm-up, whose main model is frozen) the cross-entropy is only reported, so no
  backward pass runs through the main model at all."""
  del rng  # deterministic model
  tokens = batch["tokens"]
  logits, losses = forward(model, params, tokens)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  metrics = {"bits_per_byte": ce / math.log(2)}
  loss = ce if train_lm else jax.lax.stop_gradient(ce)
  kl = sown_mean(losses, "indexer_kl")
  if kl is not None:
    loss = loss + kl_weight * kl
    metrics["indexer_kl"] = kl
  recall = sown_mean(losses, "indexer_recall")
  if recall is not None:
    metrics["indexer_recall"] = recall
  return loss, metrics


def build_stage(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  del workdir
  model = make_model(config)
  seq_len = config.data.seq_len
  loss = functools.partial(lm_loss, model, config.dsa.indexer_kl_weight,
                           train_lm=config.stage != "indexer_warmup")

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  def make_data(process_index, process_count):
    examples = dsa_data.training_examples(seq_len, config.data.retrieval_fraction, config.seed)
    return pipeline.process_local_batches(examples.map(lambda row: {"tokens": row["tokens"]}),
                                          config.batch_size, seed=config.seed,
                                          process_index=process_index, process_count=process_count)

  def abstract_batch():
    return {"tokens": jax.ShapeDtypeStruct((config.batch_size, seq_len + 1), jnp.int32)}

  return stages.Stage(name=config.stage, config=config, init_params=init_params, loss=loss,
                      make_data=make_data, abstract_batch=abstract_batch,
                      evaluate=make_evaluator(config, model))


def make_evaluator(config: ml_collections.ConfigDict, model):
  """``evaluate(params, step)``: held-out bits/byte, retrieval accuracy per distance and, for the
  stages with an indexer, its recall in the indexed mode. The eval sets are built once."""
  batch = config.batch_size
  indexed = make_model(config, "indexer_warmup") if config.stage in _INDEXED else None

  @jax.jit
  def score(params, tokens):
    logits, _ = forward(model, params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1), logits

  @jax.jit
  def probe(params, tokens):
    _, losses = forward(indexed, params, tokens)
    return sown_mean(losses, "indexer_recall"), sown_mean(losses, "indexer_kl")

  @functools.cache
  def eval_sets():
    windows = np.stack(dsa_data.heldout_windows(config.data.seq_len, config.data.eval_windows))
    retrieval = dsa_data.retrieval_eval_set(config.data.seq_len, tuple(config.data.retrieval_distances),
                                            config.data.retrieval_per_distance, seed=config.seed + 10_000)
    return windows, retrieval

  def batched(fn, *arrays):
    """fn on consecutive slices of ``batch`` rows of each of ``arrays``, one list entry per slice."""
    return [fn(*(a[i:i + batch] for a in arrays)) for i in range(0, len(arrays[0]), batch)]

  def evaluate(params, step):
    del step
    windows, retrieval = eval_sets()
    ce = np.concatenate([np.asarray(c) for c, _ in batched(lambda r: score(params, r), windows)])
    out = {"eval/bits_per_byte": float(ce.mean() / math.log(2))}
    tokens, mask = retrieval["tokens"], retrieval["answer_mask"]
    right, share = (np.concatenate(parts) for parts in zip(*batched(
        lambda t, m: dsa_data.answer_scores(score(params, t)[1], t, m), tokens, mask)))
    for d in sorted(set(retrieval["distance"].tolist())):
      out[f"eval/retrieval_d{d}"] = float(right[retrieval["distance"] == d].mean())
    out["eval/retrieval"] = float(right.mean())
    out["eval/retrieval_bytes"] = float(share.mean())  # answer bytes right (chance: 1/62)
    if indexed is not None:
      probes = batched(lambda r: probe(params, r), windows)
      out["eval/indexer_recall"] = float(np.mean([float(r) for r, _ in probes]))
      out["eval/indexer_kl"] = float(np.mean([float(k) for _, k in probes]))
    return out

  return evaluate
