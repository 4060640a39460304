"""Deep supervision: halting rules, the carry's reset, the halt target inside a step, evaluation,
and a tiny run on fixed Sudoku-shaped puzzles that lowers the loss."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxai.trm import model as model_lib
from jaxai.trm import supervision

SUPERVISION = supervision.SupervisionConfig()


def tiny(**overrides) -> model_lib.ModelConfig:
  base = dict(vocab_size=6, seq_len=8, width=16, hidden_multiple=8, puzzle_tokens=2, num_layers=1,
              rounds=2, latent_steps=2)
  return model_lib.ModelConfig(**{**base, **overrides})


@functools.cache
def initialised(config):
  model = model_lib.Reasoner(config)
  return model, nn.unbox(jax.jit(functools.partial(model_lib.init_params, model))(jax.random.key(0)))


@functools.cache
def compiled(config):
  """The tiny model's jitted evaluation step and 3-step ``solve``, shared by the tests."""
  model, _ = initialised(config)
  step = jax.jit(lambda params, carry, batch: supervision.supervision_step(
      model, params, carry, batch, jax.random.key(0), config=SUPERVISION, training=False))
  solve = jax.jit(lambda params, batch: supervision.solve(model, params, batch, steps=3))
  return step, solve


def random_batch(config, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.integers(config.vocab_size, size=(2, config.seq_len))) for k in ("inputs", "labels")}


def test_halting_in_training_and_evaluation():
  steps = np.array([1, 1, 5, 16, 16])
  logit = np.array([0.5, -0.5, -1.0, -1.0, 3.0], np.float32)
  halting = jax.jit(supervision.halting, static_argnames=("config", "training"))
  halt = lambda training, exploration=0.0: halting(
      steps, logit, jax.random.key(0), config=dataclasses.replace(SUPERVISION, exploration=exploration),
      training=training)
  np.testing.assert_array_equal(halt(training=False), [False, False, False, True, True])
  np.testing.assert_array_equal(halt(training=True), [True, False, False, True, True])
  # Explored examples never halt before step 2, and always at the last step.
  np.testing.assert_array_equal(halt(training=True, exploration=1.0), [False, False, False, True, True])
  many = np.ones(20_000, np.int32)
  halted = np.asarray(halting(many, many.astype(np.float32), jax.random.key(1), config=SUPERVISION, training=True))
  assert 0.08 < 1 - halted.mean() < 0.12  # the 10% explored are held back


def test_reset_carry_starts_halted_slots_on_new_rows():
  config = tiny()
  carry = jax.device_get(supervision.init_carry(config, 3))
  assert carry["halted"].all()
  old = {**carry, "y": carry["y"] + 7.0, "z": carry["z"] - 7.0, "steps": np.array([4, 9, 16]),
         "halted": np.array([False, True, False]), "inputs": np.full((3, 8), 1),
         "labels": np.full((3, 8), 2), "puzzle_id": np.array([5, 5, 5])}
  batch = {"inputs": np.full((3, 8), 3, np.uint8), "labels": np.full((3, 8), 4, np.uint8)}
  new = jax.device_get(jax.jit(functools.partial(supervision.reset_carry, config))(old, batch))
  y0, z0 = (np.asarray(v) for v in supervision.initial_state(config))
  np.testing.assert_array_equal(new["steps"], [4, 0, 16])
  np.testing.assert_array_equal(new["halted"], [False, False, False])
  np.testing.assert_array_equal(new["inputs"][:, 0], [1, 3, 1])
  np.testing.assert_array_equal(new["labels"][:, 0], [2, 4, 2])
  np.testing.assert_array_equal(new["puzzle_id"], [5, 0, 5])
  np.testing.assert_array_equal(new["y"][1], np.broadcast_to(y0, new["y"][1].shape))
  np.testing.assert_array_equal(new["z"][1], np.broadcast_to(z0, new["z"][1].shape))
  np.testing.assert_array_equal(new["y"][0], old["y"][0])
  # The initial state is a fixed draw (the same every call), not a parameter.
  np.testing.assert_array_equal(supervision.initial_state(config)[0], y0)
  assert y0.std() > 0.5 and np.abs(y0).max() <= 2 and not np.allclose(y0, z0)
  assert "y" not in initialised(config)[1]


def test_halt_target_inside_a_step_is_exactly_right():
  config = tiny()
  _, params = initialised(config)
  step, solve = compiled(config)
  batch = random_batch(config, 2)
  predicted = solve(params, batch)["predictions"][0]  # the answer after one step
  labels = predicted.at[1, 3].set((predicted[1, 3] + 1) % config.vocab_size)  # row 1: one token wrong
  _, (metrics, carry) = step(params, supervision.init_carry(config, 2), {**batch, "labels": labels})
  bce = lambda target: -np.log(1 / (1 + np.exp(5.0))) if target else -np.log(1 - 1 / (1 + np.exp(5.0)))
  np.testing.assert_allclose(metrics["exact_accuracy"], 0.5)
  np.testing.assert_allclose(metrics["halt_loss"], (bce(True) + bce(False)) / 2, rtol=1e-5)
  np.testing.assert_array_equal(carry["steps"], [1, 1])
  np.testing.assert_array_equal(carry["halted"], [False, False])  # evaluation runs on


def test_solve_is_the_evaluation_steps_in_sequence():
  config = tiny()
  model, params = initialised(config)
  step, solve = compiled(config)
  batch = random_batch(config, 3)
  solved = solve(params, batch)
  carry = supervision.init_carry(config, 2)
  for i in range(3):
    _, (metrics, carry) = step(params, carry, batch)
    logits = model.apply({"params": params}, carry["y"], method=model_lib.Reasoner.answer_logits)
    np.testing.assert_array_equal(solved["predictions"][i], np.argmax(logits, -1))
    np.testing.assert_allclose(metrics["exact_accuracy"], np.mean(solved["exact"][i]))
  assert solved["halt_logit"].shape == (3, 2)


def test_single_pass_halts_every_example_after_one_step():
  config = tiny(reasoner="single_pass")
  model, params = initialised(config)
  batch = random_batch(config, 4)
  step = jax.jit(lambda params, carry: supervision.supervision_step(
      model, params, carry, batch, jax.random.key(0), config=SUPERVISION))
  loss, (metrics, carry) = step(params, supervision.init_carry(config, 2))
  assert np.all(carry["halted"]) and float(metrics["halt_loss"]) == 0.0
  np.testing.assert_allclose(loss, metrics["answer_loss"])


def test_a_tiny_run_lowers_the_loss():
  # Four fixed Sudoku-shaped puzzles (81 tokens, 0 = blank, answers 1..9), the MLP mixer, two
  # supervision steps per example so that both the first and a carried step are trained.
  config = model_lib.ModelConfig(vocab_size=10, seq_len=81, width=32, hidden_multiple=16, rounds=2,
                                 latent_steps=1, mixer="mlp")
  deep_supervision = dataclasses.replace(SUPERVISION, max_steps=2)
  rng = np.random.default_rng(0)
  labels = rng.integers(1, 10, size=(4, 81))
  batch = {"inputs": jnp.asarray(np.where(rng.random((4, 81)) < 0.3, 0, labels)), "labels": jnp.asarray(labels)}
  model, params = initialised(config)
  tx = optax.adam(1e-2)

  @jax.jit
  def update(params, opt_state, carry, rng):
    grad_fn = jax.value_and_grad(lambda p: supervision.supervision_step(
        model, p, carry, batch, rng, config=deep_supervision), has_aux=True)
    (loss, (_, carry)), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, carry, loss

  opt_state, fresh = tx.init(params), supervision.init_carry(config, 4)
  # The loss of a first step (fresh carry) under the current parameters, before they are updated.
  first_step_loss = lambda params: float(update(params, opt_state, fresh, jax.random.key(0))[3])
  before = first_step_loss(params)
  carry = fresh
  for i in range(40):
    params, opt_state, carry, _ = update(params, opt_state, carry, jax.random.key(i))
  after = first_step_loss(params)
  assert after < 0.5 * before, (before, after)


def test_staggered_slots_halt_in_turn_and_unstaggered_ones_together():
  """With the halt head silent (its initial -5), slot i of a staggered carry halts at the updates
  u with (u + i % max_steps) % max_steps == 0, as a plain count says; unstaggered, every slot
  halts at every max_steps-th update, all together."""
  config = tiny()
  model, params = initialised(config)
  sup = dataclasses.replace(SUPERVISION, max_steps=3, exploration=0.0)
  step = jax.jit(lambda carry, batch: supervision.supervision_step(
      model, params, carry, batch, jax.random.key(0), config=sup, training=True)[1][1])
  slots = 8
  rng = np.random.default_rng(0)
  for stagger in (0, sup.max_steps):
    carry = supervision.init_carry(config, slots, stagger=stagger)
    offsets = np.arange(slots) % stagger if stagger else np.zeros(slots, int)
    for update in range(1, 3 * sup.max_steps + 1):
      batch = {k: jnp.asarray(rng.integers(config.vocab_size, size=(slots, config.seq_len)))
               for k in ("inputs", "labels")}
      carry = step(carry, batch)
      expected = (update + offsets) % sup.max_steps == 0
      np.testing.assert_array_equal(np.asarray(carry["halted"]), expected, err_msg=f"{stagger=}, {update=}")
