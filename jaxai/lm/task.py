"""Byte-level language modelling: decoder LM, next-byte cross-entropy, held-out bits per byte.

One stage, ``lm``. The corpus (``data.source``) is read when the stage starts training, not when it
is built, so ``--dry_run`` reads nothing.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxai import config_lib, stages
from jaxai.data import pipeline, text_corpus
from jaxai.lm import model as model_lib
from jaxai.nn import transformer

STAGES = ("lm",)


def validate(config: ml_collections.ConfigDict) -> None:
  for name in config.stages:
    config_lib.check(name in STAGES, "stages", f"unknown stage {name!r}; the lm task has {', '.join(STAGES)}")
  config_lib.validate_attention_heads("model", config.model)
  config_lib.validate_block_stack("model", config.model)
  config_lib.check_positive(config, "model.width", "model.num_layers", "model.mlp_hidden", "data.seq_len",
                            "data.eval_windows")
  if config.data.source != "stdlib":
    try:
      text_corpus.list_files(config.data.source)
    except text_corpus.CorpusError as e:
      raise config_lib.ConfigError("data.source", str(e)) from None


def make_model(config: ml_collections.ConfigDict) -> model_lib.DecoderLM:
  m = config.model
  block = transformer.block_config(m, compute_dtype=config.compute_dtype,
                                   attention_impl=config.attention_impl)
  return model_lib.DecoderLM(block, m.num_layers, vocab_size=model_lib.BYTE_VOCAB,
                             window_tokens=m.window_tokens or None,
                             logit_soft_cap=m.logit_soft_cap or None)


def next_token_loss(model, params, batch, rng):
  del rng  # deterministic model
  tokens = batch["tokens"]
  logits = model.apply({"params": params}, tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss, {"bits_per_byte": loss / math.log(2)}


def build_stage(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  del workdir
  model = make_model(config)
  seq_len = config.data.seq_len
  loss = functools.partial(next_token_loss, model)
  corpus = functools.cache(lambda: text_corpus.load_corpus(config.data.source))

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  def make_data(process_index, process_count):
    return pipeline.process_local_batches(
        text_corpus.token_windows(corpus()["train"], seq_len), config.batch_size, seed=config.seed,
        process_index=process_index, process_count=process_count)

  def abstract_batch():
    return {"tokens": jax.ShapeDtypeStruct((config.batch_size, seq_len + 1), jnp.int32)}

  eval_loss = jax.jit(lambda params, tokens: loss(params, {"tokens": tokens}, None)[0])

  @functools.cache
  def eval_rows():
    heldout = text_corpus.token_windows(corpus()["heldout"], seq_len)
    return [heldout[i]["tokens"] for i in range(min(len(heldout), config.data.eval_windows))]

  def evaluate(params, step):
    del step
    rows = eval_rows()
    losses = [eval_loss(params, np.stack(rows[i:i + config.batch_size]))
              for i in range(0, len(rows), config.batch_size)]
    value = float(np.mean(losses))
    return {"eval/loss": value, "eval/bits_per_byte": value / math.log(2)}

  return stages.Stage(name="lm", config=config, init_params=init_params, loss=loss, make_data=make_data,
                      abstract_batch=abstract_batch, evaluate=evaluate)
