"""TRM's networks: parameter counts (against the paper's and across the baselines), the halt
head's start, the puzzle tokens, and how each mixer mixes positions."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxai.trm import model as model_lib


def tiny(**overrides) -> model_lib.ModelConfig:
  # Three puzzle ids with two learned tokens of four: the table, its zero padding and the ids.
  base = dict(vocab_size=10, seq_len=12, width=16, num_heads=2, hidden_multiple=8, puzzle_tokens=4,
              learned_puzzle_tokens=2, num_puzzle_ids=3, rounds=2, latent_steps=2)
  return model_lib.ModelConfig(**{**base, **overrides})


@functools.cache
def compiled(config):
  """(params, embed, embed-then-net, halt) for ``config``, each one jitted program."""
  model = model_lib.Reasoner(config)
  params = nn.unbox(jax.jit(functools.partial(model_lib.init_params, model))(jax.random.key(0)))
  embed = jax.jit(lambda p, inputs, ids: model.apply({"params": p}, inputs, ids, method=model_lib.Reasoner.embed))
  net = jax.jit(lambda p, inputs: model.apply({"params": p}, model.apply(
      {"params": p}, inputs, method=model_lib.Reasoner.embed), method=lambda m, h: m.net(h)))
  halt = jax.jit(lambda p, y: model.apply({"params": p}, y, method=model_lib.Reasoner.halt_logit))
  return params, embed, net, halt


def tokens(config, seed=0, batch=2):
  return np.random.default_rng(seed).integers(config.vocab_size, size=(batch, config.seq_len))


def test_full_size_parameter_counts_are_the_papers():
  # The paper: TRM-MLP 5M parameters on Sudoku, TRM with attention 7M (maze, width 512).
  sudoku = model_lib.param_count(model_lib.ModelConfig(vocab_size=10, seq_len=81, mixer="mlp"))
  maze = model_lib.param_count(model_lib.ModelConfig(vocab_size=5, seq_len=900, mixer="attention"))
  assert 4.75e6 < sudoku < 5.25e6 and 6.5e6 < maze < 7.5e6, (sudoku, maze)


def test_single_pass_matching_has_the_same_parameter_count():
  trm = tiny()
  matched = model_lib.single_pass_matching(trm)
  # Equal but for TRM's halt head (D + 1 parameters): 0.3% of this tiny model, less when wider.
  assert (matched.num_layers, matched.repeats) == (trm.num_layers, 1)
  assert model_lib.param_count(trm) - model_lib.param_count(matched) == trm.width + 1
  hrm = dataclasses.replace(trm, reasoner="hrm")
  matched_hrm = model_lib.single_pass_matching(hrm)
  assert matched_hrm.num_layers == 2 * hrm.num_layers
  assert abs(model_lib.param_count(hrm) - model_lib.param_count(matched_hrm)) / model_lib.param_count(hrm) < 5e-3
  deep = model_lib.single_pass_matching(trm, match_depth=True)
  assert model_lib.effective_depth(deep) == model_lib.effective_depth(trm) == 2 * 3 * 2
  assert model_lib.param_count(deep) == model_lib.param_count(matched)


def test_halt_head_starts_at_minus_five_for_every_input():
  config = tiny()
  params, _, _, halt = compiled(config)
  y = np.random.default_rng(1).standard_normal((3, config.length, config.width)).astype(np.float32) * 10
  logits = np.asarray(halt(params, y))
  np.testing.assert_array_equal(logits, [-5.0] * 3)
  sigmoid = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(sigmoid, 1 / (1 + math.exp(5)), rtol=1e-6)
  assert 0.0066 < sigmoid[0] < 0.0068


def test_embedding_is_scaled_tokens_after_puzzle_tokens():
  config = tiny()
  params, embed, _, _ = compiled(config)
  inputs = tokens(config)
  x = np.asarray(embed(params, inputs, np.array([2, 1])))
  np.testing.assert_array_equal(x[:, :config.puzzle_tokens], 0.0)  # zero-initialised table, zero pads
  np.testing.assert_allclose(x[:, config.puzzle_tokens:],
                             np.asarray(params["token_embedding"])[inputs] * math.sqrt(config.width), rtol=1e-6)
  # Each id reads its own row of the table into the first learned_puzzle_tokens positions.
  table = np.arange(3.0, dtype=np.float32)[:, None, None] * np.ones((3, 2, config.width), np.float32)
  x = np.asarray(embed({**params, "puzzle_embedding": table}, inputs, np.array([2, 1])))
  np.testing.assert_allclose(x[:, :2, 0], [[8.0, 8.0], [4.0, 4.0]])
  np.testing.assert_array_equal(x[:, 2:config.puzzle_tokens], 0.0)


def _outputs_changed_by_one_token(config, position):
  params, _, net, _ = compiled(config)
  inputs = tokens(config, batch=1)[0]
  changed = inputs.copy()
  changed[position] = (inputs[position] + 1) % config.vocab_size
  outputs = np.asarray(net(params, np.stack([inputs, changed])))
  return np.abs(outputs[1] - outputs[0]).max(-1)  # [length]


def test_mlp_mixer_mixes_positions():
  config = tiny(mixer="mlp")
  change = _outputs_changed_by_one_token(config, position=5)
  others = np.delete(np.arange(config.length), config.puzzle_tokens + 5)
  assert np.all(change[others] > 1e-4), change


def test_attention_is_not_causal():
  config = tiny(mixer="attention")
  change = _outputs_changed_by_one_token(config, position=config.seq_len - 1)
  assert np.all(change[:-1] > 1e-4), change  # the first positions see the last token


@pytest.mark.parametrize("overrides, message", [
    (dict(mixer="conv"), "mixer must be one of attention, mlp"),
    (dict(mixer="attention", width=18, num_heads=4), r"width \(18\) must be a multiple of num_heads \(4\)"),
    (dict(reasoner="rnn", rounds=0), "reasoner must be one of .*; rounds must be at least 1"),
    (dict(learned_puzzle_tokens=5), r"learned_puzzle_tokens \(5\) must lie in \[0, puzzle_tokens \(4\)\]"),
    (dict(reasoner="hrm", one_step_gradient=True), "one_step_gradient is TRM's ablation"),
])
def test_bad_configs_fail_with_one_message(overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny(**overrides)


def test_wrong_input_length_fails_readably():
  config = tiny()
  params, embed, _, _ = compiled(config)
  with pytest.raises(ValueError, match=r"inputs must be \[batch, seq_len=12\] tokens, got \[2, 81\]"):
    embed(params, jnp.zeros((2, 81), jnp.int32), None)
