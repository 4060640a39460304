"""Byte-level language modelling task: decoder LM, next-byte cross-entropy, held-out bits per byte."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxai import config_lib
from jaxai.data import pipeline, text_corpus
from jaxai.models import decoder_lm
from jaxai.nn import attention, transformer
from jaxai.tasks import Task


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.validate_attention_heads("model", config.model)
  if config.data.source != "stdlib":
    try:
      text_corpus._list_files(config.data.source)  # pylint: disable=protected-access
    except text_corpus.CorpusError as e:
      raise config_lib.ConfigError("data.source", str(e)) from None


def make_model(config: ml_collections.ConfigDict) -> decoder_lm.DecoderLM:
  m = config.model
  impl = attention.default_attention_impl() if config.attention_impl == "auto" else config.attention_impl
  block = transformer.BlockConfig(
      width=m.width, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
      mlp_hidden=m.mlp_hidden, qk_norm=m.qk_norm, attn_soft_cap=m.attn_soft_cap or None,
      impl=impl, dtype=jnp.dtype(config.compute_dtype))
  return decoder_lm.DecoderLM(block, m.num_layers, vocab_size=256,
                              window_tokens=m.window_tokens or None,
                              logit_soft_cap=m.logit_soft_cap or None)


def next_token_loss(model, params, batch, rng):
  del rng  # deterministic model
  tokens = batch["tokens"]
  logits = model.apply({"params": params}, tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss, {"bits_per_byte": loss / math.log(2)}


def build_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Task]:
  del workdir
  model = make_model(config)
  seq_len = config.data.seq_len
  corpus = text_corpus.load_corpus(config.data.source)
  loss = functools.partial(next_token_loss, model)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  def make_data(process_index, process_count):
    return pipeline.process_local_batches(
        text_corpus.token_windows(corpus["train"], seq_len), config.batch_size, seed=config.seed,
        process_index=process_index, process_count=process_count)

  heldout = text_corpus.token_windows(corpus["heldout"], seq_len)
  eval_rows = [heldout[i]["tokens"] for i in range(min(len(heldout), config.data.eval_windows))]
  eval_loss = jax.jit(lambda params, tokens: loss(params, {"tokens": tokens}, None)[0])

  def evaluate(params, step):
    del step
    losses = [eval_loss(params, np.stack(eval_rows[i:i + config.batch_size]))
              for i in range(0, len(eval_rows), config.batch_size)]
    value = float(np.mean(losses))
    return {"eval/loss": value, "eval/bits_per_byte": value / math.log(2)}

  return [Task(name="lm", config=config, init_params=init_params, loss=loss, make_data=make_data,
               evaluate=evaluate)]
