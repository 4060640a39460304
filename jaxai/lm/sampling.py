"""Sampling from the decoder LM: prefill the prompts once, then one KV-cached pass per new token.

Prompts of different lengths are left-padded to one length L (``left_pad``): every row's last
prompt token then sits at index L - 1 and every decode step writes all rows at the same cache
index. A row's RoPE positions count from its first real token (position = index - pad) and its
pad keys are masked, so a padded row computes what it would alone (the tests check it against
the plain model run on each unpadded prompt).

``generate`` is one jitted program: ``prefill`` (the prompts in one pass, writing the cache),
then ``decode``, a ``lax.while_loop`` that stops when every row is done, so a batch that stops
early costs only the steps it took. A step's token: temperature 0 is greedy (argmax); otherwise
logits / temperature, then top-k, then top-p (nucleus) on what top-k kept (``filter_logits``),
then a categorical draw with key ``fold_in(key, step)``: the same key, prompts and settings give
the same tokens. A row is done after its first stop token or ``max_new_tokens``; its later
positions hold ``pad_id``, and its length counts the stop token (``stopped`` says whether it
ended on one). Temperature, top-k, top-p and the stop tokens are traced, so changing them does
not recompile; the prompt length and ``max_new_tokens`` fix the shapes.
"""
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxai.lm import model as model_lib


class Generation(NamedTuple):
  tokens: jax.Array         # [B, max_new_tokens] int32, pad_id after a row is done
  lengths: jax.Array        # [B] int32: tokens generated, the stop token included
  stopped: jax.Array        # [B] bool: the row ended on a stop token (else on max_new_tokens)
  logits: jax.Array | None  # [B, max_new_tokens, V]: the model's logits each token was chosen from


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, L] int32, lengths [B] int32): each prompt right-aligned, pad_id before it.
  L is the longest prompt's length, or ``length`` (e.g. rounded up to share compiled programs)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if not len(prompts) or lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  width = int(lengths.max()) if length is None else length
  if width < lengths.max():
    raise ValueError(f"length {width} is shorter than the longest prompt ({lengths.max()})")
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
  return tokens, lengths


def filter_logits(logits: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
  """``logits`` [..., V] with the tokens outside the top ``top_k`` and then outside the nucleus
  set to -inf. The nucleus is the fewest most likely tokens (of those top-k kept, renormalised)
  whose probability sums to at least ``top_p``. top_k 0 and top_p 1 keep everything; a token
  tied with the last one kept is kept."""
  v = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  logits = jnp.where(logits >= jnp.take(ranked, k - 1, axis=-1)[..., None], logits, -jnp.inf)
  ranked = jnp.where(jnp.arange(v) < k, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # top_p = 1 keeps all exactly: a float cumulative sum can reach 1 before the last token.
  in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
  cutoff = jnp.min(jnp.where(in_nucleus, ranked, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def choose_tokens(logits, key, temperature, top_k, top_p) -> jax.Array:
  """[B] tokens of logits [B, V]: greedy at temperature 0, else a filtered categorical draw."""
  # Conditionals, not selects: a select would pay for the sort and the random draw at every greedy
  # step too, and for the sort when nothing is filtered.
  def sample(logits):
    scaled = logits / temperature
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda x: filter_logits(x, top_k, top_p),
                          lambda x: x, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, sample, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)


def prefill(model: model_lib.DecoderLM, params, tokens, lengths, *, max_len: int):
  """Runs the left-padded prompts (``left_pad``) through ``model`` into a fresh cache of
  ``max_len``; returns (the logits after each prompt's last token [B, V], the cache)."""
  b, width = tokens.shape
  index = jnp.arange(width)[None, :]
  pad = (width - lengths)[:, None]
  cache = model_lib.init_cache(model, b, max_len)
  logits, cache = model.apply({"params": params}, tokens, positions=jnp.maximum(index - pad, 0),
                              kv_mask=index >= pad, cache=cache)
  return logits[:, -1], cache


def decode(model: model_lib.DecoderLM, params, cache, logits, lengths, key, *, max_new_tokens: int,
           temperature=0.0, top_k=0, top_p=1.0, stop_tokens=(), pad_id: int = 0,
           return_logits: bool = False) -> Generation:
  """Up to ``max_new_tokens`` tokens after ``prefill``: ``logits`` [B, V] are those its prompts
  ended on, ``lengths`` [B] the prompt lengths (the positions continue from them)."""
  b, v = logits.shape
  stop_tokens = jnp.asarray(stop_tokens, jnp.int32).reshape(-1)

  def record(state, step, step_logits):
    token = choose_tokens(step_logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
    done = state["stopped"]  # a row is done only once it stopped: the loop bounds the rest
    token = jnp.where(done, pad_id, token)
    state = {**state, "step": step + 1, "tokens": state["tokens"].at[:, step].set(token),
             "lengths": state["lengths"] + ~done, "stopped": done | jnp.isin(token, stop_tokens)}
    if return_logits:
      state["logits"] = state["logits"].at[:, step].set(step_logits)
    return state

  def step_fn(state):
    step = state["step"]
    previous = jax.lax.dynamic_index_in_dim(state["tokens"], step - 1, axis=1)  # [B, 1]
    step_logits, new_cache = model.apply({"params": params}, previous,
                                         positions=(lengths + step - 1)[:, None], cache=state["cache"])
    return record({**state, "cache": new_cache}, step, step_logits[:, 0])

  state = {"cache": cache, "step": jnp.zeros((), jnp.int32),
           "tokens": jnp.full((b, max_new_tokens), pad_id, jnp.int32),
           "lengths": jnp.zeros((b,), jnp.int32), "stopped": jnp.zeros((b,), bool)}
  if return_logits:
    state["logits"] = jnp.zeros((b, max_new_tokens, v), jnp.float32)
  state = record(state, 0, logits)
  # The last token is never fed back, so a cache of L + max_new_tokens - 1 holds every write.
  state = jax.lax.while_loop(lambda s: (s["step"] < max_new_tokens) & ~jnp.all(s["stopped"]), step_fn, state)
  return Generation(state["tokens"], state["lengths"], state["stopped"], state.get("logits"))


def generate(model: model_lib.DecoderLM, params, tokens, lengths, key, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_id: int = 0, return_logits: bool = False) -> Generation:
  """Continues each left-padded prompt (tokens [B, L] and lengths [B] from ``left_pad``) by up to
  ``max_new_tokens`` tokens; see the module docstring for how tokens are chosen and rows stop.
  ``stop_tokens``: token ids (may be empty; its length is part of the compiled program)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  # As arrays, so that their values are traced (jit bakes in omitted defaults and python scalars'
  # weak types) and one program serves every setting.
  return _generate(model, params, tokens, lengths, key, np.float32(temperature), np.int32(top_k),
                   np.float32(top_p), np.asarray(stop_tokens, np.int32).reshape(-1),
                   max_new_tokens=max_new_tokens, pad_id=pad_id, return_logits=return_logits)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "pad_id", "return_logits"))
def _generate(model, params, tokens, lengths, key, temperature, top_k, top_p, stop_tokens, *,
              max_new_tokens, pad_id, return_logits):
  logits, cache = prefill(model, params, tokens, lengths, max_len=tokens.shape[1] + max_new_tokens - 1)
  return decode(model, params, cache, logits, lengths, key, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
                pad_id=pad_id, return_logits=return_logits)

