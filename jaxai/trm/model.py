"""The networks of TRM (Jolicoeur-Martineau, 2025) and of its two baselines: embedding, reasoning
networks, answer and halt heads. How they are applied (the recursion) is ``recursion``.

One reasoning network is a stack of ``num_layers`` (2) post-norm blocks, non-causal:
``h = norm(h + mixer(h)); h = norm(h + SwiGLU(h))``. The mixer is self-attention with RoPE
(mazes, ARC: the paper keeps attention for 30x30 grids) or, for Sudoku, an MLP along the token
axis (``mixer='mlp'``, the paper's MLP-mixer variant: on a small fixed grid a learned position-to-
position map beats attention, 87.4% against 74.7%). Following the official code:

- The norms have no learned scale (its ``rms_norm``), and the token-MLP's norm runs over the token
  axis (the code normalises the transposed activations before transposing back). A learned scale
  would also sit under the paper's weight decay of 1.0.
- SwiGLU hidden sizes are ``round(expansion * size * 2/3)`` rounded up to ``hidden_multiple``
  (256 there; the 2/3 gives a gated MLP the parameters of an ungated one of ``expansion``). At
  width 512 this makes the MLP variant 5.0M parameters and the attention one 6.8M, the paper's
  "5M" and "7M".
- Input: token embeddings (std 1/sqrt(D)) with ``puzzle_tokens`` (16) tokens prepended, the whole
  scaled by sqrt(D), so x has unit scale like the fixed random initial y and z.
- Halt head: one logit (the official ``q_halt``; its second, "continue" logit is unused with
  ``no_ACT_continue``) read from position 0, zero weights and bias -5: it starts at
  sigmoid(-5) = 0.7% for every input, so no example halts early before the head has learned.

Puzzle embedding: a zero-initialised table of ``num_puzzle_ids`` x ``learned_puzzle_tokens`` x D
fills the first ``learned_puzzle_tokens`` of the prepended tokens; the rest stay zero. The
official code has a D-wide vector per puzzle identifier (``puzzle_emb_ndim = hidden_size``, so
``learned_puzzle_tokens = 1``) padded with zeros to 16 tokens, and its Sudoku and Maze data give
every example identifier 0: the "puzzle embedding" there is one shared learned token, which
held-out puzzles see as well. That is the default here (``num_puzzle_ids = 1``; the batch's
``puzzle_id`` is then ignored). A per-puzzle table (ARC's use) only helps puzzles seen in
training: a held-out puzzle's id has no trained row (and ``jaxai.trm.dataset``'s ``puzzle_id`` is
the index within a split, so train and held-out ids name different puzzles).

The three models (``reasoner``):
- ``trm``: one network ``net``, applied as z <- net(x + y + z) and y <- net(y + z).
- ``hrm``: two networks of ``num_layers`` each, ``low_net`` (f_L) and ``high_net`` (f_H), HRM's
  z_L <- f_L(z_L + z_H + x), z_H <- f_H(z_H + z_L); twice TRM's parameters at equal settings.
- ``single_pass``: one network of ``num_layers`` applied once to x (``repeats`` times with shared
  weights, when asked), no carried state and no halting: direct prediction.
  ``single_pass_matching`` gives the one whose parameter count is another model's.

Parameters carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``head_dim``,
``length``) for the config's sharding rules; they are fp32, ``dtype`` is the compute dtype.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxai.nn import attention, layers

REASONERS = ("trm", "hrm", "single_pass")
MIXERS = ("attention", "mlp")
HALT_BIAS_INIT = -5.0
# Each reasoner's networks, by attribute name of ``Reasoner``.
NETWORKS = {"trm": ("net",), "hrm": ("low_net", "high_net"), "single_pass": ("net",)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One model: its reasoner, networks, input and recursion sizes (the paper's Sudoku values)."""
  vocab_size: int
  seq_len: int                 # answer tokens (81 Sudoku, 900 maze)
  reasoner: str = "trm"        # trm | hrm | single_pass
  mixer: str = "mlp"           # mlp (over tokens; Sudoku) | attention (mazes)
  width: int = 512
  num_layers: int = 2          # blocks per network
  num_heads: int = 8           # attention only
  expansion: float = 4.0
  hidden_multiple: int = 256   # the official rounding; small widths want a small one (e.g. 8)
  rope_base: float | None = 10_000.0  # attention only; None: no position encoding
  norm_epsilon: float = 1e-5
  puzzle_tokens: int = 16      # prepended positions; 0 for none
  learned_puzzle_tokens: int = 1
  num_puzzle_ids: int = 1
  rounds: int = 3              # TRM's T; HRM's high cycles N
  latent_steps: int = 6        # TRM's n; HRM's low steps per high cycle T'
  one_step_gradient: bool = False  # TRM ablation: HRM's gradient (last z and y updates only)
  repeats: int = 1             # single_pass: the stack applied this many times, shared weights
  state_seed: int = 0          # the fixed random initial y and z
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    problems = []
    if self.reasoner not in REASONERS:
      problems.append(f"reasoner must be one of {', '.join(REASONERS)}, got {self.reasoner!r}")
    if self.mixer not in MIXERS:
      problems.append(f"mixer must be one of {', '.join(MIXERS)}, got {self.mixer!r}")
    for name in ("vocab_size", "seq_len", "width", "num_layers", "num_heads", "rounds",
                 "latent_steps", "repeats", "num_puzzle_ids", "hidden_multiple"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.mixer == "attention" and self.width % self.num_heads:
      problems.append(f"width ({self.width}) must be a multiple of num_heads ({self.num_heads})")
    if self.one_step_gradient and self.reasoner != "trm":
      problems.append(f"one_step_gradient is TRM's ablation (HRM always has it), not for {self.reasoner}")
    if self.repeats != 1 and self.reasoner != "single_pass":
      problems.append(f"repeats ({self.repeats}) is for the single pass; {self.reasoner} recurses instead")
    if not 0 <= self.learned_puzzle_tokens <= self.puzzle_tokens:
      problems.append(f"learned_puzzle_tokens ({self.learned_puzzle_tokens}) must lie in "
                      f"[0, puzzle_tokens ({self.puzzle_tokens})]")
    if problems:
      raise ValueError("; ".join(problems))

  @property
  def length(self) -> int:
    """Positions the networks see: the puzzle tokens, then the answer tokens."""
    return self.puzzle_tokens + self.seq_len


def swiglu_hidden(size: int, expansion: float, multiple: int) -> int:
  """The official SwiGLU width: round(expansion * size * 2/3), rounded up to ``multiple``."""
  return -(-round(expansion * size * 2 / 3) // multiple) * multiple


def rms_normalize(x, axis: int, epsilon: float):
  """x / rms(x) over ``axis``, computed in fp32, without a learned scale (the official norm)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axis, keepdims=True) + epsilon)).astype(x.dtype)


class TokenMLP(nn.Module):
  """SwiGLU along the token axis: [B, S, D] -> [B, S, D], each channel mixed over the positions."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    over_tokens = lambda name: layers.Dense(self.hidden, ("length", "mlp"), in_axis=1, dtype=self.dtype,
                                            name=name)(h)  # [B, D, hidden]
    hidden = jax.nn.silu(over_tokens("gate")) * over_tokens("up")
    out = layers.Dense(h.shape[1], ("mlp", "length"), dtype=self.dtype, name="down")(hidden)  # [B, D, S]
    return out.swapaxes(1, 2)


class Block(nn.Module):
  """Post-norm block: h = norm(h + mixer(h)); h = norm(h + SwiGLU(h)). [B, S, D] -> [B, S, D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h, positions):
    c = self.config
    if c.mixer == "attention":
      mixed = attention.Attention(c.num_heads, c.num_heads, c.width // c.num_heads, qk_norm=False,
                                  rope_base=c.rope_base, frame_size=None, dtype=c.dtype,
                                  name="attention")(h, positions)
      h = rms_normalize(h + mixed, -1, c.norm_epsilon)
    else:
      mixed = TokenMLP(swiglu_hidden(h.shape[1], c.expansion, c.hidden_multiple), dtype=c.dtype,
                       name="token_mlp")(h)
      h = rms_normalize(h + mixed, 1, c.norm_epsilon)  # over the tokens, as the official code
    mlp = layers.SwiGLU(swiglu_hidden(c.width, c.expansion, c.hidden_multiple), dtype=c.dtype, name="mlp")
    h = rms_normalize(h + mlp(h), -1, c.norm_epsilon)
    return nn.with_logical_constraint(h, ("batch", "length", "embed"))


class ReasoningNet(nn.Module):
  """``num_layers`` blocks, the stack applied ``repeats`` times with the same weights."""
  config: ModelConfig
  num_layers: int
  repeats: int = 1

  @nn.compact
  def __call__(self, h):
    c = self.config
    if h.shape[1:] != (c.length, c.width):
      raise ValueError(f"a reasoning network takes [batch, {c.length}, {c.width}] "
                       f"(puzzle tokens + seq_len, width), got {list(h.shape)}")
    positions = jnp.arange(h.shape[1])
    blocks = [Block(c, name=f"block_{i}") for i in range(self.num_layers)]
    for _ in range(self.repeats):
      for block in blocks:
        h = block(h, positions)
    return h


class Reasoner(nn.Module):
  """Embedding, networks (``NETWORKS[reasoner]``) and heads of one model; ``recursion`` applies
  them. ``__call__(inputs, puzzle_ids)`` runs each piece once (to initialise) and returns
  (answer logits, halt logit; None for single_pass)."""
  config: ModelConfig

  def setup(self):
    c = self.config
    self.token_embedding = self.param(
        "token_embedding", layers.partitioned(nn.initializers.truncated_normal(c.width ** -0.5),
                                              ("vocab", "embed")), (c.vocab_size, c.width), jnp.float32)
    if c.learned_puzzle_tokens:
      self.puzzle_embedding = self.param(
          "puzzle_embedding", layers.partitioned(nn.initializers.zeros, (None, None, "embed")),
          (c.num_puzzle_ids, c.learned_puzzle_tokens, c.width), jnp.float32)
    if c.reasoner == "hrm":
      self.low_net = ReasoningNet(c, c.num_layers)
      self.high_net = ReasoningNet(c, c.num_layers)
    else:
      self.net = ReasoningNet(c, c.num_layers, c.repeats if c.reasoner == "single_pass" else 1)
    self.answer_head = layers.Dense(c.vocab_size, ("embed", "vocab"), dtype=c.dtype)
    if c.reasoner != "single_pass":
      self.halt_kernel = self.param("halt_kernel", layers.partitioned(nn.initializers.zeros, ("embed",)),
                                    (c.width,), jnp.float32)
      self.halt_bias = self.param("halt_bias", layers.partitioned(nn.initializers.constant(HALT_BIAS_INIT), ()),
                                  (), jnp.float32)

  def embed(self, inputs, puzzle_ids=None):
    """x [B, puzzle_tokens + seq_len, D]: the prepended puzzle tokens and the input tokens, times
    sqrt(D). ``puzzle_ids`` [B] are read only with ``num_puzzle_ids`` > 1."""
    c = self.config
    if inputs.ndim != 2 or inputs.shape[1] != c.seq_len:
      raise ValueError(f"inputs must be [batch, seq_len={c.seq_len}] tokens, got {list(inputs.shape)}")
    batch = inputs.shape[0]
    tokens = jnp.take(self.token_embedding, inputs.astype(jnp.int32), axis=0)
    parts = []
    if c.learned_puzzle_tokens:
      ids = jnp.zeros((batch,), jnp.int32) if c.num_puzzle_ids == 1 or puzzle_ids is None else puzzle_ids
      parts.append(jnp.take(self.puzzle_embedding, ids.astype(jnp.int32), axis=0))
    if c.puzzle_tokens > c.learned_puzzle_tokens:
      parts.append(jnp.zeros((batch, c.puzzle_tokens - c.learned_puzzle_tokens, c.width), jnp.float32))
    x = jnp.concatenate(parts + [tokens], axis=1) * math.sqrt(c.width)
    return nn.with_logical_constraint(x.astype(c.dtype), ("batch", "length", "embed"))

  def answer_logits(self, y):
    """fp32 logits [B, seq_len, vocab] of the answer tokens (the puzzle tokens dropped)."""
    return self.answer_head(y[:, self.config.puzzle_tokens:]).astype(jnp.float32)

  def halt_logit(self, y):
    """fp32 [B]: the logit of "the current answer is exactly right", read at position 0."""
    return y[:, 0].astype(jnp.float32) @ self.halt_kernel + self.halt_bias

  def __call__(self, inputs, puzzle_ids=None):
    x = self.embed(inputs, puzzle_ids)
    for name in NETWORKS[self.config.reasoner]:
      x = getattr(self, name)(x)
    return self.answer_logits(x), None if self.config.reasoner == "single_pass" else self.halt_logit(x)


def init_params(model: Reasoner, rng) -> dict:
  """The model's parameters (boxed with their logical axes)."""
  c = model.config
  return model.init(rng, jnp.zeros((1, c.seq_len), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]


@functools.cache
def param_count(config: ModelConfig) -> int:
  """The number of trained parameters (from shapes alone: nothing is allocated)."""
  abstract = jax.eval_shape(lambda rng: nn.unbox(init_params(Reasoner(config), rng)), jax.random.key(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


def effective_depth(config: ModelConfig) -> int:
  """Blocks one supervision step applies in sequence: TRM and HRM (rounds * (latent_steps + 1)
  network applications; 3 * 7 * 2 = 42 for the paper's Sudoku TRM), the single pass its stack
  ``repeats`` times."""
  if config.reasoner == "single_pass":
    return config.num_layers * config.repeats
  return config.rounds * (config.latent_steps + 1) * config.num_layers


def single_pass_matching(config: ModelConfig, *, match_depth: bool = False) -> ModelConfig:
  """The single-pass model whose parameter count is nearest ``config``'s.

  Embedding and heads are the same, so the layer count is what is matched: TRM's ``num_layers``
  (the single pass lacks only the halt head's D + 1 parameters) and HRM's two networks'
  ``2 * num_layers``. Equal parameters and equal depth cannot both hold with distinct layers (TRM
  is 42 blocks deep from 2): ``match_depth`` also repeats the stack, with shared weights, the
  number of times that brings its depth nearest ``effective_depth(config)``, a single pass about
  as deep as one supervision step of ``config``; by default it runs once (the paper's "direct
  prediction").
  """
  base = dataclasses.replace(config, reasoner="single_pass", repeats=1, num_layers=1, one_step_gradient=False)
  per_layer = param_count(dataclasses.replace(base, num_layers=2)) - param_count(base)
  layers_needed = max(1, round((param_count(config) - param_count(base)) / per_layer) + 1)
  repeats = max(1, round(effective_depth(config) / layers_needed)) if match_depth else 1
  return dataclasses.replace(base, num_layers=layers_needed, repeats=repeats)
