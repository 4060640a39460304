"""The masked diffusion LM task: its two stages and their config checks. Nothing imports this
module but the trunk's registry (``jaxai.stages.REGISTRY``).

Stages (``config.stages``):
- ``diffusion_lm``: the denoiser (``lm.model.DecoderLM`` with bidirectional attention) trained
  from scratch with the masked diffusion loss (``masked_diffusion``) on the reasoning problems
  (``tasks``; only the generation region masked), mixed with windows of the Python standard
  library's source (``data.text_fraction`` of the rows; every position maskable), for language
  modelling beside the tasks. Evaluation: the held-out problems' loss and the text's (a fixed
  corruption; the text's also as an upper bound in bits per byte), and the exact accuracy of
  ``decoding.eval_decoder`` on the first ``decoding.eval_problems`` held-out problems.
- ``filter``: Learn2PD's filter (``learn2pd.Filter``) on the frozen denoiser. Its data are made
  when it starts (the "filter data" step): the denoiser decodes ``filter.train_prompts`` training
  prompts one token per step (the reference; with ``filter.reference = 'eotp'`` it stops at the
  answer's end-of-text, the same tokens up to there and EOT after), then the oracle replays them
  (``decoding.oracle_labels``); the (confidences, labels, weights) rows are cached in
  ``<reads_dir>/diffusion_lm/filter_data/`` by denoiser step, so a resumed or repeated filter run
  reuses them. The loss is BCE; evaluation: accuracy and the share of positives on held-out
  prompts' oracle rows.

``python -m jaxai.diffusion_lm.decode`` runs every decoder over the frozen pair.
"""
import functools
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxai import config_lib, stages
from jaxai.data import pipeline, text_corpus
from jaxai.diffusion_lm import decoding, learn2pd, masked_diffusion, tasks
from jaxai.lm import model as lm_model
from jaxai.nn import transformer

STAGES = ("diffusion_lm", "filter")
MODEL_SECTIONS = ("model", "data")  # what the denoiser's computation depends on


def validate(config: ml_collections.ConfigDict) -> None:
  for name in config.stages:
    config_lib.check(name in STAGES, "stages", f"unknown stage {name!r}; the diffusion_lm task has "
                     f"{', '.join(STAGES)}")
  config_lib.validate_attention_heads("model", config.model)
  config_lib.validate_block_stack("model", config.model)
  config_lib.check_positive(config, "model.width", "model.num_layers", "model.mlp_hidden",
                            "data.prompt_len", "data.gen_len", "data.block_len", "data.train_per_task",
                            "data.heldout_per_task", "filter.hidden", "filter.train_prompts",
                            "filter.heldout_prompts", "decoding.batch_size", "decoding.eval_problems",
                            "data.eval_text_windows")
  d = config.data
  config_lib.check(d.gen_len % d.block_len == 0, "data.gen_len",
                   f"{d.gen_len} is not a multiple of data.block_len={d.block_len}")
  config_lib.check(len(d.tasks) > 0, "data.tasks", "name at least one reasoning-gym task")
  known = _reasoning_gym_tasks()
  for name in d.tasks:
    config_lib.check(name in known, "data.tasks", f"{name!r} is not a reasoning-gym dataset")
  config_lib.check_choice(config, "decoding.eval_decoder", tuple(decoding.DECODERS))
  config_lib.check_choice(config, "filter.reference", ("one_per_step", "eotp"))
  config_lib.check(1 <= config.decoding.steps_per_block <= d.block_len, "decoding.steps_per_block",
                   f"must be in [1, data.block_len={d.block_len}]")
  config_lib.check_range(config, "decoding.threshold", 0.0, 1.0)
  config_lib.check_range(config, "filter.tau", 0.0, 1.0)
  config_lib.check_range(config, "data.text_fraction", 0.0, 1.0, high_open=True)
  if d.text_fraction > 0 and d.text_source != "stdlib":
    try:
      text_corpus.list_files(d.text_source)
    except text_corpus.CorpusError as e:
      raise config_lib.ConfigError("data.text_source", str(e)) from None


@functools.cache
def _reasoning_gym_tasks() -> frozenset:
  import reasoning_gym.factory  # pylint: disable=g-import-not-at-top
  return frozenset(reasoning_gym.factory.DATASETS)


def make_model(config: ml_collections.ConfigDict) -> lm_model.DecoderLM:
  m = config.model
  block = transformer.block_config(m, compute_dtype=config.compute_dtype, attention_impl=config.attention_impl)
  return lm_model.DecoderLM(block, m.num_layers, vocab_size=tasks.VOCAB_SIZE,
                            logit_soft_cap=m.logit_soft_cap or None, bidirectional=True)


def seq_len(config) -> int:
  return config.data.prompt_len + config.data.gen_len


@functools.cache
def _problems(tasks_: tuple, train_per_task: int, heldout_per_task: int, prompt_len: int, gen_len: int):
  heldout = tasks.make_problems(tasks_, heldout_per_task, "heldout", prompt_len=prompt_len, gen_len=gen_len)
  train = tasks.make_problems(tasks_, train_per_task, "train", prompt_len=prompt_len, gen_len=gen_len,
                              exclude={e["question"] for e in heldout.entries})
  return {"train": train, "heldout": heldout}


def problems(config, split: str) -> tasks.Problems:
  """The split's problems (module ``tasks``), made once per process."""
  d = config.data
  return _problems(tuple(d.tasks), d.train_per_task, d.heldout_per_task, d.prompt_len, d.gen_len)[split]


@functools.cache
def _text_windows(source: str, length: int) -> dict[str, grain.MapDataset]:
  corpus = text_corpus.load_corpus(source)
  return {split: text_corpus.token_windows(corpus[split], length - 1) for split in ("train", "heldout")}


def text_windows(config, split: str) -> grain.MapDataset:
  """``{'tokens': int32 [L]}`` windows of the text corpus, L = the row length, made once per process."""
  return _text_windows(config.data.text_source, seq_len(config))[split]


def denoiser(model):
  """``denoise(params, tokens) -> logits``, what the decoders call."""
  return lambda params, tokens: model.apply({"params": params}, tokens)


def decoder_of(config, name: str) -> decoding.Decoder:
  """The named decoder (``decoding.DECODERS``) with this config's settings."""
  c = config.decoding
  return decoding.Decoder(decoding.DECODERS[name].rule, eotp=decoding.DECODERS[name].eotp,
                          steps_per_block=c.steps_per_block, threshold=c.threshold, tau=config.filter.tau)


def make_decode(config, model, name: str, gen_len: int, filter_model=None):
  """Jitted ``(params, prompts, filter_params) -> decoding.Decoded`` of decoder ``name``."""
  filter_apply = None if filter_model is None else (lambda p, c: filter_model.apply({"params": p}, c))
  decoder, denoise = decoder_of(config, name), denoiser(model)

  def decode(params, prompts, filter_params):
    return decoding.decode(denoise, params, prompts, gen_len=gen_len, block_len=config.data.block_len,
                           decoder=decoder, filter_apply=filter_apply, filter_params=filter_params)
  return jax.jit(decode)


def padded_batches(rows: np.ndarray, size: int):
  """Row batches of ``size`` (the last padded by repeating its first row), and how many are real."""
  for start in range(0, len(rows), size):
    chunk = rows[start:start + size]
    real = len(chunk)
    yield np.concatenate([chunk, np.repeat(chunk[:1], size - real, axis=0)]), real


def decode_rows(decode, params, prompts: np.ndarray, size: int, filter_params=None) -> decoding.Decoded:
  """``make_decode``'s ``decode`` over ``prompts`` [N, P] in padded batches of ``size``: one
  ``Decoded`` of numpy arrays for the N real rows."""
  outs = [(jax.device_get(decode(params, rows, filter_params)), real) for rows, real in padded_batches(prompts, size)]
  return decoding.Decoded(*(np.concatenate([getattr(o, k)[:real] for o, real in outs]) for k in decoding.Decoded._fields))


def _diffusion_lm_stage(config, workdir) -> stages.Stage:
  del workdir
  model = make_model(config)
  prompt_len = config.data.prompt_len

  def loss(params, batch, rng):
    tokens = batch["tokens"]
    maskable = jnp.arange(tokens.shape[1])[None, :] >= batch["maskable_from"][:, None]
    noisy, masked, p_mask = masked_diffusion.corrupt(tokens, maskable, rng)
    logits = model.apply({"params": params}, noisy)
    value = masked_diffusion.loss(logits, tokens, masked, p_mask, maskable)
    return value, {"masked_share": jnp.mean(masked.sum(-1) / maskable.sum(-1))}

  def make_data(process_index, process_count):
    rows = grain.MapDataset.source(problems(config, "train").tokens).map(
        lambda row: {"tokens": row, "maskable_from": np.int32(prompt_len)})
    if config.data.text_fraction > 0:
      text = text_windows(config, "train").map(lambda w: {**w, "maskable_from": np.int32(0)})
      f = config.data.text_fraction
      rows = grain.MapDataset.mix([rows, text], weights=[1 - f, f])
    return pipeline.process_local_batches(rows, config.batch_size, seed=config.seed,
                                          process_index=process_index, process_count=process_count)

  def abstract_batch():
    return {"tokens": jax.ShapeDtypeStruct((config.batch_size, seq_len(config)), jnp.int32),
            "maskable_from": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, seq_len(config)), jnp.int32))["params"]

  eval_loss = jax.jit(lambda params, tokens, start, rng: loss(
      params, {"tokens": tokens, "maskable_from": jnp.full(tokens.shape[:1], start, jnp.int32)}, rng)[0])

  def mean_loss(params, rows, start):
    size = config.decoding.batch_size  # whole batches only; the same corruption every evaluation
    values = [eval_loss(params, batch, start, jax.random.key(i))
              for i, (batch, real) in enumerate(padded_batches(rows, size)) if real == size]
    return float(np.mean(values)) if values else float("nan")

  decode = make_decode(config, model, config.decoding.eval_decoder, config.data.gen_len)

  def evaluate(params, step):
    del step
    heldout = problems(config, "heldout")
    size = config.decoding.batch_size
    scores = {"eval/loss": mean_loss(params, heldout.tokens, prompt_len)}
    if config.data.text_fraction > 0:
      windows = text_windows(config, "heldout")
      picks = pipeline.evenly_spaced(len(windows), config.data.eval_text_windows)
      text_loss = mean_loss(params, np.stack([windows[int(i)]["tokens"] for i in picks]), 0)
      scores.update({"eval/text_loss": text_loss, "eval/text_bits_per_byte_bound": text_loss / np.log(2)})
    count = min(config.decoding.eval_problems, len(heldout))
    out = decode_rows(decode, params, heldout.tokens[:count, :prompt_len], size)
    scores.update({"eval/accuracy": float(tasks.solved(heldout, out.tokens).mean()),
                   "eval/calls_per_answer": float(out.calls.mean())})
    return scores

  return stages.Stage(name="diffusion_lm", config=config, init_params=init_params, loss=loss,
                      make_data=make_data, abstract_batch=abstract_batch, evaluate=evaluate)


def load_denoiser(config, run_dir: str) -> stages.TrainedStage:
  """The ``diffusion_lm`` stage trained in the run ``run_dir``, built as it was trained."""
  return stages.load_stage(config, run_dir, "diffusion_lm", sections=MODEL_SECTIONS)


def filter_rows(config, trained: stages.TrainedStage, split: str, count: int) -> dict[str, np.ndarray]:
  """The oracle's (confidences, labels, weights) rows [N, block_len] for the first ``count``
  prompts of ``split`` (rows with no masked position dropped), cached by denoiser step."""
  c = trained.config
  reference_name = config.filter.reference
  tag = "" if reference_name == "one_per_step" else f"_{reference_name}"
  cache = os.path.join(trained.directory, "filter_data", f"{split}_{count}{tag}_step{trained.step}.npz")
  if os.path.exists(cache):
    with np.load(cache) as f:
      return dict(f)
  model = make_model(c)
  reference = make_decode(c, model, reference_name, c.data.gen_len)
  oracle = jax.jit(functools.partial(decoding.oracle_labels, denoiser(model), gen_len=c.data.gen_len,
                                     block_len=c.data.block_len))
  rows = problems(c, split).tokens[:count, :c.data.prompt_len]
  parts = []
  for prompts, real in padded_batches(rows, config.decoding.batch_size):
    ref = reference(trained.params, prompts, None).tokens
    log, _ = jax.device_get(oracle(trained.params, prompts, ref))
    keep = log.weights[:, :real].any(-1)  # [S, real]: steps where the row still had masked positions
    parts.append({k: getattr(log, k)[:, :real][keep] for k in ("confidences", "labels", "weights")})
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  np.savez(cache + ".tmp.npz", **out)
  os.replace(cache + ".tmp.npz", cache)  # whole or absent
  return out


def _filter_stage(config, workdir) -> stages.Stage:
  f = config.filter
  block = config.data.block_len
  model = learn2pd.Filter(f.hidden)
  trained = functools.cache(lambda: load_denoiser(config, stages.reads_dir(config, workdir)))

  def loss(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["confidences"])
    return learn2pd.bce_loss(logits, batch["labels"], batch["weights"])

  def make_data(process_index, process_count):
    rows = filter_rows(config, trained(), "train", f.train_prompts)
    examples = grain.MapDataset.source(list(zip(*(rows[k] for k in ("confidences", "labels", "weights"))))).map(
        lambda r: {"confidences": r[0], "labels": r[1], "weights": r[2]})
    return pipeline.process_local_batches(examples, config.batch_size, seed=config.seed,
                                          process_index=process_index, process_count=process_count)

  def abstract_batch():
    shape = (config.batch_size, block)
    return {"confidences": jax.ShapeDtypeStruct(shape, jnp.float32),
            "labels": jax.ShapeDtypeStruct(shape, jnp.bool_), "weights": jax.ShapeDtypeStruct(shape, jnp.bool_)}

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, block), jnp.float32))["params"]

  eval_loss = jax.jit(loss)

  def evaluate(params, step):
    del step
    rows = filter_rows(config, trained(), "heldout", f.heldout_prompts)
    value, metrics = eval_loss(params, rows, None)
    return {"eval/loss": float(value), **{f"eval/{k}": float(v) for k, v in metrics.items()}}

  return stages.Stage(name="filter", config=config, init_params=init_params, loss=loss, make_data=make_data,
                      abstract_batch=abstract_batch, evaluate=evaluate)


def build_stage(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  return {"diffusion_lm": _diffusion_lm_stage, "filter": _filter_stage}[config.stage](config, workdir)
