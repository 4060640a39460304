"""transformer.BlockStack: the loop over blocks it replaces, its scanned and rematerialised forms.

References: a hand-written loop of TransformerBlocks (the parameter tree trained checkpoints hold),
the scanned stack against that loop with its parameters stacked by hand, and jax.checkpoint's
contract that rematerialisation changes no value or gradient.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxai.nn import transformer

BLOCK = transformer.BlockConfig(width=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_hidden=32)
FRAME = 2  # tokens per frame of the block-causal layers
B, T = 2, 8
# Tiny programs: XLA's backend optimisations cost compile time and save no run time here.


class Loop(nn.Module):
  """The reference: blocks in a loop of the parent's compact method (the DecoderLM's way), with
  a parameter of the parent's own on either side."""
  config: transformer.BlockConfig
  num_layers: int
  frame_sizes: tuple

  @nn.compact
  def __call__(self, x, positions):
    x = x * self.param("pre", nn.initializers.normal(1.0), (x.shape[-1],))
    for i in range(self.num_layers):
      frame_size = self.frame_sizes[i % len(self.frame_sizes)]
      x = transformer.TransformerBlock(self.config, frame_size=frame_size, name=f"block_{i}")(x, positions)
    return x * self.param("post", nn.initializers.normal(1.0), (x.shape[-1],))


class Stacked(Loop):
  """The same through a BlockStack named ``block`` (and its cache, if given)."""

  @nn.compact
  def __call__(self, x, positions, cache=None):
    x = x * self.param("pre", nn.initializers.normal(1.0), (x.shape[-1],))
    out = transformer.BlockStack(self.config, self.num_layers, frame_sizes=self.frame_sizes,
                                 name="block")(x, positions, cache=cache)
    x, cache = out if cache is not None else (out, None)
    x = x * self.param("post", nn.initializers.normal(1.0), (x.shape[-1],))
    return x if cache is None else (x, cache)


def inputs():
  return jax.random.normal(jax.random.key(0), (B, T, BLOCK.width)), jnp.arange(T)[None]


def init(model, x, positions):
  return nn.unbox(jax.jit(model.init)(jax.random.key(1), x, positions)["params"])


def random_params(model, x, positions):
  """Parameters of ``model``'s shapes from one normal draw: a far shorter program to compile than
  the initialisers' draw per leaf (the values need only be generic)."""
  leaves, treedef = jax.tree.flatten(jax.eval_shape(lambda: init(model, x, positions)))
  flat = 0.3 * jax.random.normal(jax.random.key(2), (sum(leaf.size for leaf in leaves),))
  splits = np.cumsum([leaf.size for leaf in leaves])[:-1]
  return treedef.unflatten([part.reshape(leaf.shape) for part, leaf in zip(jnp.split(flat, splits), leaves)])


def restack(params, num_layers, group):
  """block_i -> block/block_j [groups, ...] by hand: the leaves of layers j, j + group, ..."""
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["block"] = {f"block_{j}": jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                             *[params[f"block_{i}"] for i in range(j, num_layers, group)])
                  for j in range(group)}
  return out


def loss_and_grads(model, params, x, positions):
  """(loss, (parameter gradients, input gradient)) of the squared error to a random target (a
  sum of positive terms: no cancellation for the relative tolerance to fail on)."""
  target = jax.random.normal(jax.random.key(7), x.shape)
  loss = lambda p, x: jnp.mean(jnp.square(model.apply({"params": p}, x, positions) - target))
  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def assert_trees_close(actual, expected, rtol=1e-5):
  """Leaf by leaf, errors relative to the leaf's largest entry: fp32 sums taken in another order
  err by ~1e-7 of their largest terms, which is large against an entry that nearly cancels."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max()),
               actual, expected)


def test_unscanned_stack_has_the_loops_parameters_init_and_outputs():
  """A 2-layer pattern (a bidirectional then a block-causal layer, as the dynamics' space and time
  layers), 3 layers: the last group partial."""
  x, positions = inputs()
  loop, stack = Loop(BLOCK, 3, (None, FRAME)), Stacked(BLOCK, 3, (None, FRAME))

  @jax.jit
  def both():  # one program: another one may round an initialiser differently
    params, stack_params = init(loop, x, positions), init(stack, x, positions)
    return params, stack_params, loop.apply({"params": params}, x, positions), stack.apply(
        {"params": params}, x, positions)

  params, stack_params, out, stack_out = both()
  assert sorted(stack_params) == ["block_0", "block_1", "block_2", "post", "pre"]
  assert_trees_close(stack_params, params, rtol=0)  # the same rng per path: bit-identical
  np.testing.assert_array_equal(stack_out, out)


def test_a_stack_built_in_setup_takes_its_attribute_name():
  class Parent(nn.Module):
    def setup(self):
      self.encoder = transformer.BlockStack(BLOCK, 2)
      self.head = nn.Dense(3)

    def __call__(self, x, positions):
      return self.head(self.encoder(x, positions))

  params = jax.eval_shape(Parent().init, jax.random.key(0), *inputs())["params"]
  assert sorted(params) == ["encoder_0", "encoder_1", "head"]


def test_stack_params_stacks_layer_j_of_each_group():
  params = {f"blocks_{i}": {"w": jnp.full((3,), float(i))} for i in range(6)} | {"other": jnp.ones(2)}
  stacked = transformer.stack_params(params, "blocks", 6, group_size=3)
  assert sorted(stacked) == ["blocks", "other"]
  for j in range(3):
    np.testing.assert_array_equal(stacked["blocks"][f"block_{j}"]["w"][:, 0], [j, j + 3])


# 4 layers of the 2-layer pattern: 2 groups when scanned.
LAYERS, PATTERN = 4, (None, FRAME)


@pytest.fixture(scope="module", name="reference")
def fixture_reference():
  """The loop's parameters, loss and gradients."""
  x, positions = inputs()
  loop = Loop(BLOCK, LAYERS, PATTERN)
  params = random_params(loop, x, positions)
  return dict(params=params, loss_and_grads=jax.jit(lambda p: loss_and_grads(loop, p, x, positions))(params))


def assert_matches_reference(got, reference, scanned):
  loss, (grads, x_grad) = reference["loss_and_grads"]
  got_loss, (got_grads, got_x_grad) = got
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  assert_trees_close(got_x_grad, x_grad)
  assert_trees_close(got_grads, restack(grads, LAYERS, len(PATTERN)) if scanned else grads)


def test_scanned_parameters_are_the_loops_stacked_with_a_layers_axis_first():
  x, positions = inputs()
  scanned = Stacked(dataclasses.replace(BLOCK, scan_layers=True), LAYERS, PATTERN)
  boxed = jax.eval_shape(scanned.init, jax.random.key(1), x, positions)["params"]
  # The stacked axis is named for the sharding rules (config_lib maps "layers" to no mesh axis).
  names = [leaf.names for leaf in jax.tree.leaves(boxed["block"], is_leaf=nn.meta.is_axis_metadata)]
  assert names and all(n[0] == "layers" for n in names)
  restacked = jax.eval_shape(lambda: restack(init(Loop(BLOCK, LAYERS, PATTERN), x, positions), LAYERS, 2))
  assert jax.tree.map(jnp.shape, nn.unbox(boxed)) == jax.tree.map(jnp.shape, restacked)


@pytest.mark.parametrize("policy, scan", [("full", False), ("dots", True)])
def test_scanned_and_rematerialised_stacks_give_the_loops_loss_and_gradients(reference, policy, scan):
  """Each remat policy, and the scan with the loop's parameters stacked. Neither changes a value,
  so the scan with remat equal to the loop covers both; each policy runs in one mode
  (jax.checkpoint is the same transform in both)."""
  x, positions = inputs()
  model = Stacked(dataclasses.replace(BLOCK, remat=policy, scan_layers=scan), LAYERS, PATTERN)
  params = restack(reference["params"], LAYERS, len(PATTERN)) if scan else reference["params"]
  got = jax.jit(lambda: loss_and_grads(model, params, x, positions))()
  assert_matches_reference(got, reference, scanned=scan)


def test_scanned_cache_in_chunks_equals_the_loop_over_the_whole_sequence(reference):
  """A stacked cache carried through the scan, written two frames at a time, gives the uncached
  loop's outputs: the scan slices each layer's cache and returns it updated. All layers causal
  (the parameters do not depend on frame_size)."""
  params = reference["params"]
  x, positions = inputs()
  scanned = Stacked(dataclasses.replace(BLOCK, scan_layers=True), LAYERS, (FRAME,))
  cache = transformer.init_stack_cache(scanned.config, LAYERS, B, T)
  assert cache["key"].shape == (LAYERS, B, 1, T, 8) and cache["index"].shape == (LAYERS,)

  @jax.jit
  def chunked(cache):
    expected = Loop(BLOCK, LAYERS, (FRAME,)).apply({"params": params}, x, positions)
    outs = []
    for start in range(0, T, 2 * FRAME):
      chunk = slice(start, start + 2 * FRAME)
      out, cache = scanned.apply({"params": restack(params, LAYERS, 1)}, x[:, chunk], positions[:, chunk],
                                 cache=cache)
      outs.append(out)
    return expected, jnp.concatenate(outs, axis=1), cache

  expected, out, cache = chunked(cache)
  np.testing.assert_array_equal(cache["index"], [T] * LAYERS)
  assert_trees_close(out, expected)
  assert transformer.cache_index(cache) == T and transformer.cache_length(cache) == T
  np.testing.assert_array_equal(transformer.rewind_cache(cache, 2)["index"], [T - 2] * LAYERS)


def test_stack_errors_name_the_sizes():
  x, positions = inputs()
  with pytest.raises(ValueError, match="does not split into groups of 2"):
    jax.eval_shape(Stacked(dataclasses.replace(BLOCK, scan_layers=True), 3, (None, 1)).init,
                   jax.random.key(0), x, positions)
  with pytest.raises(ValueError, match="remat must be one of"):
    dataclasses.replace(BLOCK, remat="some")
  with pytest.raises(ValueError, match="stack of 3 causal layers takes a list of 3 caches"):
    jax.eval_shape(Stacked(BLOCK, 3, (FRAME,)).init, jax.random.key(0), x, positions,
                   transformer.init_stack_cache(BLOCK, 2, B, T))
  with pytest.raises(ValueError, match="takes one cache stacked over its layers"):
    jax.eval_shape(Stacked(dataclasses.replace(BLOCK, scan_layers=True), 2, (FRAME,)).init,
                   jax.random.key(0), x, positions, transformer.init_stack_cache(BLOCK, 2, B, T))
