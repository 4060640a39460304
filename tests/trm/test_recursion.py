"""Where the gradient flows in one supervision step, against references written as plain loops:
the earlier updates' results enter ``jax.grad`` as arguments it does not differentiate, and only
what should learn runs inside it. No stop_gradient appears in the references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxai.trm import model as model_lib
from jaxai.trm import recursion, supervision


def tiny(**overrides) -> model_lib.ModelConfig:
  # One block per network: the tests are about which applications of it carry gradient.
  base = dict(vocab_size=6, seq_len=8, width=16, hidden_multiple=8, puzzle_tokens=2, num_layers=1,
              rounds=3, latent_steps=2)
  return model_lib.ModelConfig(**{**base, **overrides})


@functools.cache
def initial_params(reasoner):
  """Parameters shared by every config of one reasoner (recursion counts change no shapes)."""
  model = model_lib.Reasoner(tiny(reasoner=reasoner))
  params = jax.device_get(nn.unbox(jax.jit(functools.partial(model_lib.init_params, model))(jax.random.key(0))))
  rng = np.random.default_rng(0)  # numpy draws: no compiles of random ops per shape
  # Non-zero puzzle token and halt head, so that their gradients are exercised too.
  return jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)


def setup(config):
  model = model_lib.Reasoner(config)
  params = initial_params(config.reasoner)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(config.vocab_size, size=(2, config.seq_len)))
  embed = lambda p: model.apply({"params": p}, inputs, method=model_lib.Reasoner.embed)
  net = lambda name: lambda p, h: model.apply({"params": p}, h, method=lambda m, h: getattr(m, name)(h))
  shape = (2, config.length, config.width)
  y0, z0, weights = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
  objective = lambda y: jnp.sum(jnp.sin(y) * weights)  # any smooth function of the answer state
  return model, params, embed, net, y0, z0, objective


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def largest(tree):
  return max(float(np.abs(x).max()) for x in leaves(tree))


def assert_trees_close(a, b, rtol=1e-4):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  scale = largest(b)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)


def trm_gradient(config, params, embed, net, y0, z0, objective):
  f = lambda p: objective(recursion.trm_recursion(
      net, p, embed(p), y0, z0, rounds=config.rounds, latent_steps=config.latent_steps,
      one_step_gradient=config.one_step_gradient)[0])
  return jax.jit(jax.grad(f))(params)


def test_trm_first_rounds_contribute_no_gradient():
  config = tiny()
  _, params, embed, net_of, y0, z0, objective = setup(config)
  net, n = net_of("net"), config.latent_steps

  def rounds(p, y, z, count):
    x = embed(p)
    for _ in range(count):
      for _ in range(n):
        z = net(p, x + y + z)
      y = net(p, y + z)
    return y, z

  @jax.jit
  def references(params):
    # The first rounds' (y, z) enter the last round as arguments that are not differentiated.
    y, z = rounds(params, y0, z0, config.rounds - 1)
    last_round = jax.grad(lambda p, y, z: objective(rounds(p, y, z, 1)[0]))(params, y, z)
    all_rounds = jax.grad(lambda p: objective(rounds(p, y0, z0, config.rounds)[0]))(params)
    return last_round, all_rounds

  reference, full = references(params)
  assert_trees_close(trm_gradient(config, params, embed, net, y0, z0, objective), reference)
  # The check can fail: back-propagating all rounds gives another gradient.
  assert largest(jax.tree.map(lambda a, b: a - b, full, reference)) > 1e-2 * largest(reference)


def test_trm_one_step_gradient_ablation_differentiates_only_the_last_two_updates():
  config = tiny(one_step_gradient=True)
  _, params, embed, net_of, y0, z0, objective = setup(config)
  net, n = net_of("net"), config.latent_steps

  @jax.jit
  def reference(params):
    x, y, z = embed(params), y0, z0
    for r in range(config.rounds):
      for s in range(n):
        if r < config.rounds - 1 or s < n - 1:
          z = net(params, x + y + z)
      if r < config.rounds - 1:
        y = net(params, y + z)

    def last_two(p, y, z):
      z_last = net(p, embed(p) + y + z)
      return objective(net(p, y + z_last))

    return jax.grad(last_two)(params, y, z)

  reference = reference(params)
  assert_trees_close(trm_gradient(config, params, embed, net, y0, z0, objective), reference)


def test_hrm_gradient_is_the_one_step_approximation():
  config = tiny(reasoner="hrm")
  _, params, embed, net_of, z_high0, z_low0, objective = setup(config)
  low, high = net_of("low_net"), net_of("high_net")
  cycles, steps = config.rounds, config.latent_steps

  @jax.jit
  def reference(params):
    x, z_high, z_low = embed(params), z_high0, z_low0
    for c in range(cycles):
      for s in range(steps):
        if c < cycles - 1 or s < steps - 1:
          z_low = low(params, z_low + z_high + x)
      if c < cycles - 1:
        z_high = high(params, z_high + z_low)

    def last_two(p, z_high, z_low):
      z_low_last = low(p, z_low + z_high + embed(p))
      return objective(high(p, z_high + z_low_last))

    return jax.grad(last_two)(params, z_high, z_low)

  reference = reference(params)
  got = jax.jit(jax.grad(lambda p: objective(recursion.hrm_recursion(
      low, high, p, embed(p), z_high0, z_low0, high_cycles=cycles, low_steps=steps)[0])))(params)
  assert_trees_close(got, reference)
  assert largest(got["low_net"]) > 0 and largest(got["high_net"]) > 0


def test_carried_state_is_detached():
  # One round of one latent step: nothing inside the step stops gradients, so only the detach
  # of the carry can keep step 2's loss from reaching the parameters that made step 1's carry.
  config = tiny(rounds=1, latent_steps=1)
  model, params, embed, _, _, _, objective = setup(config)
  rng = np.random.default_rng(1)
  batch = {k: jnp.asarray(rng.integers(config.vocab_size, size=(2, config.seq_len))) for k in ("inputs", "labels")}
  step = functools.partial(supervision.supervision_step, model, rng=jax.random.key(7),
                           config=supervision.SupervisionConfig(), training=False)

  def second_step_loss(first_params, second_params):
    _, (_, carry) = step(first_params, supervision.init_carry(config, 2), batch)
    loss, (_, second_carry) = step(second_params, carry, batch)
    return loss, second_carry["steps"]

  grads, steps = jax.jit(jax.grad(second_step_loss, has_aux=True))(params, params)
  np.testing.assert_array_equal(steps, [2, 2])  # step 2 continued from step 1's carry
  assert largest(grads) == 0.0

  # The same two steps chained without the carry's detach do reach the first parameters.
  def undetached(first_params, second_params):
    y0, z0 = (jnp.broadcast_to(v, (2, config.length, config.width)) for v in supervision.initial_state(config))
    y, z = recursion.reason(model, first_params, embed(first_params), y0, z0)
    return objective(recursion.reason(model, second_params, embed(second_params), y, z)[0])

  leaky = jax.jit(jax.grad(undetached))(params, params)
  assert largest(leaky) > 1e-3
