"""Semi-autoregressive decoders of a masked diffusion LM, each counting its denoiser calls.

The generation region (``gen_len`` positions after the prompt, all ``MASK`` at first) is decoded
in blocks of ``block_len``, left to right. Each step is one denoiser call on the whole row; its
most probable token and that token's probability (the confidence) at every position are what the
rules read. A step finalises some still-masked positions of the row's current block, writing the
predicted token there; a finalised token never changes. When its block is complete, a row moves
to the next block. The rules (``Decoder.rule``):

- ``one_per_step``: the most confident position (steps = length): the quality reference.
- ``fixed_steps``: LLaDA's low-confidence remasking with ``steps_per_block`` steps per block: at
  step s the ``block_len // S + (s < block_len % S)`` most confident positions.
- ``threshold``: Fast-dLLM's: every position with confidence >= ``threshold``, at least the most
  confident one.
- ``learn2pd``: the Learn2PD filter (``learn2pd.Filter``) reads the block's confidences (1.0 at
  finalised positions) and every masked position whose sigmoid(logit) > ``tau`` is finalised,
  besides the most confident one (the one-per-step schedule it accelerates).

**EoTP** (``Decoder.eotp``): a row stops as soon as its answer up to its first end-of-text token
is final (an ``EOT`` finalised with every position before it finalised); the rest of the region is
set to ``EOT``. Until that step the decode is the same as without EoTP, so its output equals the
full decode's up to the end-of-text. Every decode also reports ``eot_calls``, the calls after
which that held (what EoTP would have spent), so one full decode measures the share of its calls
spent after the end of text.

Rows of a batch decode together in one ``lax.while_loop`` until every row is done; a row's
``calls`` count only the steps it was still decoding.
"""
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxai.diffusion_lm import tasks

RULES = ("one_per_step", "fixed_steps", "threshold", "learn2pd")


@dataclasses.dataclass(frozen=True)
class Decoder:
  rule: str = "one_per_step"
  eotp: bool = False
  steps_per_block: int = 8     # fixed_steps
  threshold: float = 0.9       # threshold (Fast-dLLM's)
  tau: float = 0.96            # learn2pd (the released scripts' value)

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"unknown decoding rule {self.rule!r}; choose from {', '.join(RULES)}")


# The decoders the issue compares, by the names the command takes.
DECODERS = {
    "one_per_step": Decoder("one_per_step"),
    "llada": Decoder("fixed_steps"),
    "fast_dllm": Decoder("threshold"),
    "learn2pd": Decoder("learn2pd"),
    "eotp": Decoder("one_per_step", eotp=True),
    "learn2pd_eotp": Decoder("learn2pd", eotp=True),
}


class Decoded(NamedTuple):
  tokens: jax.Array     # [B, G] int32: the generation region
  calls: jax.Array      # [B] int32: denoiser calls the row took
  eot_calls: jax.Array  # [B] int32: calls after which its answer through the first EOT was final


def predict(denoise: Callable, params, tokens: jax.Array, prompt_len: int) -> tuple[jax.Array, jax.Array]:
  """(most probable token, its probability) [B, G] at each generation position; ``MASK`` and
  ``PAD`` are never predicted."""
  logits = denoise(params, tokens)[:, prompt_len:].astype(jnp.float32)
  logits = logits.at[..., tasks.MASK].set(-jnp.inf).at[..., tasks.PAD].set(-jnp.inf)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def current_block(x: jax.Array, block: jax.Array, block_len: int) -> jax.Array:
  """[B, G] -> [B, block_len]: each row's positions of its block ``block[b]``."""
  b, g = x.shape
  blocks = x.reshape(b, g // block_len, block_len)
  index = jnp.minimum(block, g // block_len - 1)[:, None, None]
  return jnp.take_along_axis(blocks, index, axis=1)[:, 0]


def _spread_block(x: jax.Array, block: jax.Array, gen_len: int) -> jax.Array:
  """bool [B, block_len] -> [B, G], placed at each row's block, False elsewhere."""
  b, block_len = x.shape
  onehot = jax.nn.one_hot(block, gen_len // block_len, dtype=jnp.bool_)
  return (onehot[:, :, None] & x[:, None, :]).reshape(b, gen_len)


def _most_confident(candidates, confidence):
  """One-hot [B, G] of each row's most confident candidate (none if it has none)."""
  best = jnp.argmax(jnp.where(candidates, confidence, -1.0), axis=-1)
  return jax.nn.one_hot(best, candidates.shape[1], dtype=jnp.bool_) & candidates.any(-1, keepdims=True)


def _confident_ranks(candidates, confidence):
  """Each candidate's rank by confidence within its row (0 = most confident; others large)."""
  order = jnp.argsort(-jnp.where(candidates, confidence, -1.0), axis=-1, stable=True)
  return jnp.argsort(order, axis=-1)


def _answer_final(gen, final):
  """[B] bool: the row's first finalised EOT has every position before it finalised; and [B]
  the index of that EOT (G where none)."""
  g = gen.shape[1]
  all_before = jnp.cumprod(jnp.pad(final, ((0, 0), (1, 0)), constant_values=True)[:, :-1], axis=1).astype(bool)
  ends = final & (gen == tasks.EOT) & all_before
  return ends.any(-1), jnp.where(ends.any(-1), jnp.argmax(ends, axis=-1), g)


def _run(denoise, params, prompts, *, gen_len, block_len, choose, eotp, record=None, log=None):
  """The shared loop (module docstring). ``choose(state, pred, conf, candidates) -> (chosen [B, G],
  tokens to write [B, G])``; ``record(log, state, pred, conf, candidates) -> log`` (the oracle's
  labels) runs before the state is updated."""
  b, prompt_len = prompts.shape
  if gen_len % block_len:
    raise ValueError(f"gen_len {gen_len} is not a multiple of block_len {block_len}")
  num_blocks = gen_len // block_len
  position_block = jnp.arange(gen_len) // block_len
  positions = jnp.arange(gen_len)[None, :]
  state = dict(step=jnp.int32(0), gen=jnp.full((b, gen_len), tasks.MASK, jnp.int32),
               final=jnp.zeros((b, gen_len), bool), block=jnp.zeros(b, jnp.int32),
               block_step=jnp.zeros(b, jnp.int32), calls=jnp.zeros(b, jnp.int32),
               eot_calls=jnp.full(b, -1, jnp.int32), done=jnp.zeros(b, bool))

  def body(carry):
    state, log = carry
    tokens = jnp.concatenate([prompts, jnp.where(state["final"], state["gen"], tasks.MASK)], axis=1)
    pred, conf = predict(denoise, params, tokens, prompt_len)
    candidates = ((position_block[None, :] == state["block"][:, None]) & ~state["final"]
                  & ~state["done"][:, None])
    if record is not None:
      log = record(log, state, pred, conf, candidates)
    chosen, written = choose(state, pred, conf, candidates)
    chosen &= candidates
    gen = jnp.where(chosen, written, state["gen"])
    final = state["final"] | chosen
    active = ~state["done"]
    calls = state["calls"] + active
    block_done = active & ~jnp.any(candidates & ~chosen, axis=-1)
    block = state["block"] + block_done
    block_step = jnp.where(block_done, 0, state["block_step"] + 1)
    ready, end = _answer_final(gen, final)
    eot_calls = jnp.where((state["eot_calls"] < 0) & ready, calls, state["eot_calls"])
    done = state["done"] | (block >= num_blocks)
    if eotp:
      after = ready[:, None] & (positions > end[:, None])
      gen = jnp.where(after, tasks.EOT, gen)
      final = final | after
      done = done | ready
    return dict(step=state["step"] + 1, gen=gen, final=final, block=block, block_step=block_step,
                calls=calls, eot_calls=eot_calls, done=done), log

  state, log = jax.lax.while_loop(lambda c: ~jnp.all(c[0]["done"]), body, (state, log))
  eot_calls = jnp.where(state["eot_calls"] < 0, state["calls"], state["eot_calls"])
  return Decoded(state["gen"], state["calls"], eot_calls), log


def decode(denoise: Callable, params, prompts: jax.Array, *, gen_len: int, block_len: int,
           decoder: Decoder, filter_apply: Callable | None = None, filter_params=None) -> Decoded:
  """Decodes the generation regions of ``prompts`` [B, P] with ``decoder`` (module docstring).
  ``denoise(params, tokens [B, L]) -> logits [B, L, V]``; the learn2pd rule also needs
  ``filter_apply(filter_params, confidences [B, block_len]) -> logits [B, block_len]``. Jittable
  with everything but the arrays static."""
  if decoder.rule == "fixed_steps" and not 1 <= decoder.steps_per_block <= block_len:
    raise ValueError(f"steps_per_block must be in [1, block_len={block_len}], got {decoder.steps_per_block}")
  if decoder.rule == "learn2pd" and filter_apply is None:
    raise ValueError("the learn2pd rule needs the trained filter (filter_apply, filter_params)")

  def choose(state, pred, conf, candidates):
    best = _most_confident(candidates, conf)
    if decoder.rule == "one_per_step":
      chosen = best
    elif decoder.rule == "fixed_steps":
      s = decoder.steps_per_block
      count = block_len // s + (state["block_step"] < block_len % s)
      chosen = _confident_ranks(candidates, conf) < count[:, None]
    elif decoder.rule == "threshold":
      chosen = best | (conf >= decoder.threshold)
    else:
      block_conf = current_block(jnp.where(state["final"], 1.0, conf), state["block"], block_len)
      keep = jax.nn.sigmoid(filter_apply(filter_params, block_conf)) > decoder.tau
      chosen = best | _spread_block(keep, state["block"], gen_len)
    return chosen, pred

  decoded, _ = _run(denoise, params, prompts, gen_len=gen_len, block_len=block_len, choose=choose,
                    eotp=decoder.eotp)
  return decoded


class OracleLabels(NamedTuple):
  confidences: jax.Array  # [S, B, block_len] float: the block's confidences at each oracle step
  labels: jax.Array       # [S, B, block_len] bool: the prediction there already equals the reference
  weights: jax.Array      # [S, B, block_len] bool: the position was still masked (a BCE term)


def oracle_labels(denoise: Callable, params, prompts: jax.Array, reference: jax.Array, *,
                  gen_len: int, block_len: int) -> tuple[OracleLabels, Decoded]:
  """The "extremely greedy" oracle's replay of ``reference`` (the one-per-step decode's tokens
  [B, G]): at each step every masked position of the block whose prediction equals the reference
  is finalised; where none does, the most confident position takes its reference token. Each step
  logs the block's confidences (1.0 where finalised) and which masked positions were already right:
  Learn2PD's training pairs. S = gen_len (at most one step per position); unused steps weigh 0."""
  buffers = OracleLabels(jnp.zeros((gen_len,) + reference.shape[:1] + (block_len,), jnp.float32),
                         jnp.zeros((gen_len,) + reference.shape[:1] + (block_len,), bool),
                         jnp.zeros((gen_len,) + reference.shape[:1] + (block_len,), bool))

  def record(log, state, pred, conf, candidates):
    view = lambda x: current_block(x, state["block"], block_len)
    step = state["step"]
    return OracleLabels(log.confidences.at[step].set(view(jnp.where(state["final"], 1.0, conf))),
                        log.labels.at[step].set(view(pred == reference)),
                        log.weights.at[step].set(view(candidates)))

  def choose(state, pred, conf, candidates):
    right = candidates & (pred == reference)
    chosen = jnp.where(right.any(-1, keepdims=True), right, _most_confident(candidates, conf))
    return chosen, reference

  decoded, log = _run(denoise, params, prompts, gen_len=gen_len, block_len=block_len, choose=choose,
                      eotp=False, record=record, log=buffers)
  return log, decoded
