"""The Dreamer 4 dynamics model (issue 5): causality, KV-cached rollouts, shortcut forcing.

References are independent: the uncached computation (full attention, the whole context recomputed
at every pass), the paper's loss transcribed line by line below, the sampler's definition, and a
frame run on its own.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxai.nn import attention, transformer
from jaxai.world_model import dynamics, noise_levels, rollout, shortcut_forcing

K_MAX = 8
BLOCK = transformer.BlockConfig(width=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64,
                                attn_soft_cap=50.0)
# 4 layers with time attention every 2nd: two time layers, so causality and the KV cache must hold
# across stacked time layers.
CONFIG = dynamics.DynamicsConfig(block=BLOCK, num_layers=4, num_latents=4, latent_channels=3,
                                 spatial_tokens=2, num_registers=2, k_max=K_MAX, time_every=2)
B, T, N, C = 2, 4, CONFIG.num_latents, CONFIG.latent_channels
# Compile time dominates these tests on CPU: XLA's backend optimisations make the tiny programs
# several times slower to compile and no faster to run. Nested jits (the library's) compile as
# part of the outer program, so wrapping a call in jax.jit covers them too.


def frame_inputs(seed, b=B, t=T):
  """Noisy latents, per-frame (tau, d) from the sampler, actions and a partial action mask."""
  return _frame_inputs(jax.random.key(seed), b, t)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _frame_inputs(key, b, t):
  keys = jax.random.split(key, 4)
  latents = jax.random.normal(keys[0], (b, t, N, C))
  tau, step = noise_levels.sample_tau_and_step(keys[1], (b, t), K_MAX)
  actions = jax.random.randint(keys[2], (b, t), 0, CONFIG.num_actions)
  labelled = jax.random.uniform(keys[3], (b, t)) > 0.3
  return latents, tau, step, actions, labelled


@pytest.fixture(scope="module", name="model_and_params",
                params=["factorised", "full", "factorised+previous_frame"])
def fixture_model_and_params(request):
  """Both layouts: space/time layers, and block-causal attention over all tokens in every layer;
  and the factorised one reading the previous frame directly."""
  return model_and_params_of(request.param)


@functools.cache
def model_and_params_of(variant):
  layout, _, previous_frame = variant.partition("+")
  model = dynamics.Dynamics(dataclasses.replace(CONFIG, layout=layout, previous_frame=bool(previous_frame)))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *frame_inputs(0))["params"])
  if previous_frame:  # the copy gate starts at 0; a trained one is not, and must keep causality too
    params["copy_gate"] = jax.random.normal(jax.random.key(1), params["copy_gate"].shape)
  return model, params


@pytest.fixture(scope="module", name="apply")
def fixture_apply(model_and_params):
  model, params = model_and_params
  return jax.jit(lambda *args: model.apply({"params": params}, *args))


# --- the model ------------------------------------------------------------------------------------

def test_a_change_in_frame_t_plus_1_never_changes_frames_up_to_t(apply):
  latents, tau, step, actions, labelled = frame_inputs(1)
  base = apply(latents, tau, step, actions, labelled)
  for t in range(T - 1):  # change everything frame t + 1 carries: latents, tau, d, action, label
    changed = apply(latents.at[:, t + 1].add(1.0), tau.at[:, t + 1].set(0.5), step.at[:, t + 1].set(0.5),
                    actions.at[:, t + 1].add(1), labelled.at[:, t + 1].set(~labelled[:, t + 1]))
    np.testing.assert_allclose(changed[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed[:, t + 1], base[:, t + 1], atol=1e-4)
  # And the context does reach later frames (the time layers are not inert).
  changed = apply(latents.at[:, 0].add(1.0), tau, step, actions, labelled)
  assert not np.allclose(changed[:, 1:], base[:, 1:], atol=1e-4)


def test_unlabelled_frames_ignore_the_action_value_and_labelled_ones_do_not(apply):
  latents, tau, step, actions, _ = frame_inputs(2)
  unlabelled = jnp.zeros((B, T), bool)
  np.testing.assert_array_equal(apply(latents, tau, step, actions, unlabelled),
                                apply(latents, tau, step, actions + 1, unlabelled))
  labelled = jnp.ones((B, T), bool)
  assert not np.allclose(apply(latents, tau, step, actions, labelled),
                         apply(latents, tau, step, actions + 1, labelled), atol=1e-4)


def test_single_image_sequences_predict_each_frame_as_if_alone(apply):
  latents, tau, step, actions, labelled = frame_inputs(3)
  single_image = jnp.array([True, False])
  got = apply(latents, tau, step, actions, labelled, single_image)
  for t in range(T):  # frame t of sequence 0 as a one-frame sequence
    alone = apply(*(x[:1, t:t + 1] for x in (latents, tau, step, actions, labelled)))
    np.testing.assert_allclose(got[:1, t:t + 1], alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1:], apply(latents, tau, step, actions, labelled)[1:], rtol=1e-5, atol=1e-5)


def test_previous_frame_output_adds_the_gated_previous_latents_times_one_minus_tau():
  model = dynamics.Dynamics(dataclasses.replace(CONFIG, previous_frame=True))
  latents, tau, step, actions, labelled = frame_inputs(4)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), latents, tau, step, actions)["params"])
  gate = jax.random.normal(jax.random.key(1), params["copy_gate"].shape)
  apply = jax.jit(lambda p: model.apply({"params": p}, latents, tau, step, actions, labelled))
  copied = apply({**params, "copy_gate": gate}) - apply({**params, "copy_gate": jnp.zeros_like(gate)})
  tau = np.asarray(tau)
  level = np.clip(np.round(tau * K_MAX), 0, K_MAX - 1).astype(int)  # frame t - 1's level
  expected = ((1 - tau[:, 1:]) * np.asarray(gate)[level[:, :-1]])[..., None, None] * np.asarray(latents[:, :-1])
  np.testing.assert_allclose(copied[:, 1:], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(copied[:, 0], 0.0)  # no previous frame


def test_actions_into_frames_shifts_by_one_and_unlabels_episode_starts():
  actions = jnp.array([[3, 5, 7, 9]])
  is_first = jnp.array([[False, False, True, False]])
  shifted, labelled = dynamics.actions_into_frames(actions, is_first)
  np.testing.assert_array_equal(shifted, [[0, 3, 5, 7]])
  np.testing.assert_array_equal(labelled, [[False, True, False, True]])


# --- KV cache -------------------------------------------------------------------------------------

def test_cached_attention_in_chunks_equals_full_causal_attention():
  layer = attention.Attention(num_heads=4, num_kv_heads=2, head_dim=8, soft_cap=20.0, frame_size=1)
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  positions = jnp.arange(6)[None]
  params = jax.jit(layer.init)(jax.random.key(1), x, positions)

  @jax.jit
  def full_and_chunked(params, x):
    cache, outs = attention.init_kv_cache(2, 8, 2, 8), []  # 8 > 6: an unwritten tail to hide
    for start, stop in ((0, 2), (2, 3), (3, 6)):
      out, cache = layer.apply(params, x[:, start:stop], positions[:, start:stop], cache=cache)
      outs.append(out)
    return layer.apply(params, x, positions), jnp.concatenate(outs, axis=1), cache["index"]

  full, chunked, index = full_and_chunked(params, x)
  assert int(index) == 6
  np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)


def test_cached_rollout_equals_uncached_rollout(model_and_params):
  model, params = model_and_params
  context = jnp.tanh(jax.random.normal(jax.random.key(5), (B, 2, N, C)))
  actions = jax.random.randint(jax.random.key(6), (B, 4), 0, CONFIG.num_actions)
  action_mask = jnp.array([[True] * 4, [True, False, True, False]])
  kwargs = dict(num_steps=2, context_signal=0.9, action_mask=action_mask)

  @jax.jit
  def both(actions):
    return (rollout.rollout(model, params, context, actions, jax.random.key(7), **kwargs),
            rollout.rollout_uncached(model, params, context, actions, jax.random.key(7), **kwargs))

  cached, uncached = both(actions)
  assert cached.shape == (B, 2, N, C)
  np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-5)
  # The generated frames depend on the action (not a constant rollout).
  assert not np.allclose(both(actions.at[:, 2:].add(1))[0], cached, atol=1e-4)


def test_a_call_that_commits_its_first_frame_leaves_the_cache_as_if_only_that_frame_ran(model_and_params):
  """What rollouts do: the last frame is written together with the next frame's first pass."""
  model, params = model_and_params
  latents, tau, step, actions, labelled = frame_inputs(8, t=4)
  apply = lambda *args, **kwargs: model.apply({"params": params}, *args, **kwargs)

  @jax.jit
  def cached_then_uncached():
    frames = lambda lo, hi: (latents[:, lo:hi], tau[:, lo:hi], step[:, lo:hi], actions[:, lo:hi],
                             labelled[:, lo:hi])
    _, cache = apply(*frames(0, 1), cache=dynamics.init_cache(model.config, B, 4))
    # Frames 1 and 2 in one call, keeping only frame 1; then frame 3 (frame 2 never happened).
    _, cache = apply(*frames(1, 3), cache=cache, commit=1)
    inputs = [jnp.concatenate([x[:, :2], x[:, 3:]], axis=1) for x in (latents, tau, step, actions, labelled)]
    return apply(*frames(3, 4), cache=cache)[0], apply(*inputs)[:, 2:]

  cached, uncached = cached_then_uncached()
  np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="commit=0"):
    apply(*frame_inputs(8, t=2), cache=dynamics.init_cache(model.config, B, 4), commit=0)


# --- scanned and rematerialised layers ------------------------------------------------------------

def with_block(model, **changes):
  """The same model with its blocks scanned or rematerialised (``changes`` to the block config)."""
  c = model.config
  return dynamics.Dynamics(dataclasses.replace(c, block=dataclasses.replace(c.block, **changes)))


def stacked(model, params):
  """The unscanned parameters blocks_i stacked for the scanned model: groups of time_every layers."""
  group = 1 if model.config.layout == "full" else model.config.time_every
  return transformer.stack_params(params, "blocks", model.config.num_layers, group)


# The default layout (factorised, reading the previous frame) and the other one; the plain
# factorised model adds nothing the first does not exercise, and each variant costs compiles.
SCAN_VARIANTS = ["factorised+previous_frame", "full"]


@pytest.mark.parametrize("variant, remat", [(SCAN_VARIANTS[0], "dots"), (SCAN_VARIANTS[1], "full")])
def test_scanned_and_rematerialised_layers_give_the_same_outputs_and_gradients(variant, remat):
  """The scan over groups (space layers, then a time layer) with the loop's parameters stacked,
  and rematerialised, computes the loop's function: the loss (a squared error of the outputs,
  single images included) and its gradients. Scan and remat change no value, so their product
  equal to the loop covers each; remat alone: tests/nn/test_block_stack.py."""
  model, params = model_and_params_of(variant)
  latents, tau, step, actions, labelled = frame_inputs(9)
  target = jax.random.normal(jax.random.key(10), latents.shape)
  single_image = jnp.array([False, True])
  boxed = jax.eval_shape(with_block(model, scan_layers=True).init, jax.random.key(0), latents, tau, step,
                         actions)["params"]
  stacked_names = [leaf.names for leaf in jax.tree.leaves(boxed["blocks"], is_leaf=nn.meta.is_axis_metadata)]
  assert stacked_names and all(names[0] == "layers" for names in stacked_names)

  def loss_and_grads(model, params):
    loss = lambda p: jnp.mean(jnp.square(
        model.apply({"params": p}, latents, tau, step, actions, labelled, single_image) - target))
    return jax.value_and_grad(loss)(params)

  (loss, grads), (got_loss, got_grads) = jax.jit(lambda: (
      loss_and_grads(model, params),
      loss_and_grads(with_block(model, scan_layers=True, remat=remat), stacked(model, params))))()
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  expected = stacked(model, grads)
  assert jax.tree.structure(got_grads) == jax.tree.structure(expected)
  # Relative to each leaf's largest entry: fp32 sums in another order err by ~1e-7 of their
  # largest terms, large against an entry that nearly cancels.
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.abs(e).max()),
               got_grads, expected)


@pytest.mark.parametrize("variant", SCAN_VARIANTS)
def test_scanned_rollout_with_its_stacked_cache_equals_the_unscanned_rollout(variant):
  model, params = model_and_params_of(variant)
  scanned = with_block(model, scan_layers=True)
  cache = dynamics.init_cache(scanned.config, B, 4)["layers"]
  assert cache["key"].shape[0] == model.config.num_cached_layers  # one stacked cache, layers first
  context = jnp.tanh(jax.random.normal(jax.random.key(5), (B, 2, N, C)))
  actions = jax.random.randint(jax.random.key(6), (B, 4), 0, CONFIG.num_actions)
  kwargs = dict(num_steps=2, context_signal=0.9, action_mask=jnp.array([[True] * 4, [True, False] * 2]))
  both = jax.jit(lambda: (
      rollout.rollout(model, params, context, actions, jax.random.key(7), **kwargs),
      rollout.rollout(scanned, stacked(model, params), context, actions, jax.random.key(7), **kwargs)))
  unscanned_frames, scanned_frames = both()
  np.testing.assert_allclose(scanned_frames, unscanned_frames, rtol=1e-4, atol=1e-5)


def test_a_scanned_factorised_model_needs_whole_groups_of_layers():
  with pytest.raises(ValueError, match="num_layers=5 must be a multiple of it"):
    dataclasses.replace(CONFIG, num_layers=5, block=dataclasses.replace(BLOCK, scan_layers=True))
  dataclasses.replace(CONFIG, num_layers=5, layout="full", block=dataclasses.replace(BLOCK, scan_layers=True))


def test_a_windowed_rollout_slides_as_interactive_play_does(model_and_params):
  model, params = model_and_params
  latents, _, _, actions, labelled = frame_inputs(7, t=8)
  rng = jax.random.key(3)
  run = lambda window, t: rollout.rollout_windowed(model, params, latents[:, :2], actions[:, :t], rng,
                                                   window_frames=window, num_steps=2, action_mask=labelled[:, :t])
  # A window that holds everything is one plain rollout (with the first segment's key).
  whole = rollout.rollout(model, params, latents[:, :2], actions[:, :6], jax.random.fold_in(rng, 0),
                          num_steps=2, action_mask=labelled[:, :6])
  np.testing.assert_allclose(run(8, 6), whole, rtol=1e-5, atol=1e-5)
  # Window 4: frames 2-3 fill it; then a fresh cache from frames 2-3 (frame 2 unlabelled) makes 4-5.
  slid = np.asarray(run(4, 6))
  first = rollout.rollout(model, params, latents[:, :2], actions[:, :4], jax.random.fold_in(rng, 0),
                          num_steps=2, action_mask=labelled[:, :4])
  second = rollout.rollout(model, params, first, actions[:, 2:6], jax.random.fold_in(rng, 1), num_steps=2,
                           action_mask=labelled[:, 2:6].at[:, 0].set(False))
  np.testing.assert_allclose(slid, np.concatenate([first, second], axis=1), rtol=1e-5, atol=1e-5)


def test_rollout_settings_are_checked(model_and_params):
  assert rollout.context_signal_level(0.9, 64) == 58 / 64  # nearest level on the 1/K_max grid
  assert rollout.context_signal_level(1.0, 8) == 7 / 8  # the cleanest level trained
  with pytest.raises(ValueError, match="power of two"):
    rollout._check_num_steps(3, 8)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="power of two"):
    rollout._check_num_steps(16, 8)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="at least one context frame"):
    rollout.rollout(*model_and_params, jnp.zeros((1, 0, N, C)), jnp.zeros((1, 2), jnp.int32),
                    jax.random.key(0))
  with pytest.raises(ValueError, match="extend past the context"):
    rollout.rollout_uncached(*model_and_params, jnp.zeros((1, 3, N, C)), jnp.zeros((1, 3), jnp.int32),
                             jax.random.key(0))


# --- shortcut forcing -----------------------------------------------------------------------------

def toy_predictor(theta):
  """A small nonlinear f(z, tau, d) whose two half steps differ, so the bootstrap is not trivial."""
  def predict(z, tau, step):
    return jnp.tanh(z * theta[0] + tau[..., None, None] * theta[1]) + step[..., None, None] * theta[2]
  return predict


def paper_frame_losses(f, z1, z0, tau, d, mask, d_min, teacher=None):
  """The paper's objective frame by frame, half steps (by ``teacher``, default f) under
  stop-gradient, ramp weight included."""
  tau, d, mask = map(np.asarray, (tau, d, mask))  # concrete, to pick each frame's branch
  teacher = f if teacher is None else teacher
  losses = []
  for i in np.ndindex(tau.shape):
    t, step, m = tau[i], d[i], mask[i]
    frame = lambda z, s, h: f(z[None, None], s[None, None], h[None, None])[0, 0]  # pylint: disable=cell-var-from-loop
    half = lambda z, s, h: teacher(z[None, None], s[None, None], h[None, None])[0, 0]  # pylint: disable=cell-var-from-loop
    z_tau = (1 - t) * z0[i] + t * z1[i]
    z1_hat = frame(z_tau, t, step)
    if step == d_min:
      loss = jnp.mean((z1_hat - z1[i]) ** 2)
    else:
      b1 = jax.lax.stop_gradient((half(z_tau, t, step / 2) - z_tau) / (1 - t))
      z_prime = z_tau + b1 * step / 2
      b2 = jax.lax.stop_gradient((half(z_prime, t + step / 2, step / 2) - z_prime) / (1 - (t + step / 2)))
      loss = (1 - t) ** 2 * jnp.mean(((z1_hat - z_tau) / (1 - t) - (b1 + b2) / 2) ** 2)
    losses.append((0.9 * t + 0.1) * loss * m)
  return jnp.stack(losses).reshape(tau.shape)


def loss_problem(seed, *, all_d_min=False):
  return _loss_problem(jax.random.key(seed), all_d_min)


@functools.partial(jax.jit, static_argnums=1)
def _loss_problem(key, all_d_min):
  keys = jax.random.split(key, 4)
  z1 = jnp.tanh(jax.random.normal(keys[0], (B, T, N, C)))
  z0 = jax.random.normal(keys[1], (B, T, N, C))
  tau, step = noise_levels.sample_tau_and_step(keys[2], (B, T), K_MAX)
  if all_d_min:
    step = jnp.full_like(step, 1 / K_MAX)
    tau = jnp.floor(tau * K_MAX) / K_MAX
  mask = (jax.random.uniform(keys[3], (B, T)) > 0.2).astype(jnp.float32)
  return z1, z0, tau, step, mask


def test_loss_and_its_gradient_match_the_paper_formula():
  z1, z0, tau, step, mask = loss_problem(0)
  assert bool(jnp.any(step == 1 / K_MAX)) and bool(jnp.any(step > 1 / K_MAX))  # both branches are exercised
  theta = jnp.array([1.3, -0.7, 0.4])

  def ours(theta):
    losses, _ = shortcut_forcing.shortcut_forcing_loss(toy_predictor(theta), z1, z0, tau, step, mask,
                                                       k_max=K_MAX)
    return jnp.sum(losses), losses

  def paper(theta):
    losses = paper_frame_losses(toy_predictor(theta), z1, z0, tau, step, mask, 1 / K_MAX)
    return jnp.sum(losses), losses

  (_, got), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(theta)
  (_, want), want_grad = jax.jit(jax.value_and_grad(paper, has_aux=True))(theta)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)  # half steps are stop-gradient


def test_an_ema_teacher_takes_the_half_steps_and_gets_no_gradient():
  z1, z0, tau, step, mask = loss_problem(0)
  theta, teacher_theta = jnp.array([1.3, -0.7, 0.4]), jnp.array([0.9, 0.2, -0.3])

  def ours(theta, teacher_theta):
    losses, _ = shortcut_forcing.shortcut_forcing_loss(toy_predictor(theta), z1, z0, tau, step, mask,
                                                       k_max=K_MAX, teacher=toy_predictor(teacher_theta))
    return jnp.sum(losses), losses

  def paper(theta):
    losses = paper_frame_losses(toy_predictor(theta), z1, z0, tau, step, mask, 1 / K_MAX,
                                teacher=toy_predictor(teacher_theta))
    return jnp.sum(losses), losses

  (_, got), (grad, teacher_grad) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(
      theta, teacher_theta)
  (_, want), want_grad = jax.jit(jax.value_and_grad(paper, has_aux=True))(theta)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(teacher_grad, 0.0)
  (_, online), _ = jax.jit(jax.value_and_grad(ours, has_aux=True))(theta, theta)
  assert not np.allclose(online, got)  # the teacher's parameters matter


def test_at_d_min_the_target_is_the_clean_latents():
  z1, z0, tau, step, mask = loss_problem(1, all_d_min=True)
  predict = toy_predictor(jnp.array([0.8, 0.5, 2.0]))
  losses, pred = shortcut_forcing.shortcut_forcing_loss(predict, z1, z0, tau, step, mask, k_max=K_MAX)
  x_space = (0.9 * tau + 0.1) * mask * jnp.mean((pred - z1) ** 2, axis=(2, 3))
  np.testing.assert_allclose(losses, x_space, rtol=1e-6)


def test_constant_prediction_is_self_consistent_only_for_the_bootstrap():
  """f = z1 + e for every input: the two half steps agree with the big one (bootstrap loss 0),
  while the x-space loss (d = d_min) still sees the offset e^2."""
  z1, z0, tau, step, mask = loss_problem(2)
  offset = 0.25
  constant = lambda z, tau, step: jnp.broadcast_to(z1 + offset, z.shape)
  losses, _ = shortcut_forcing.shortcut_forcing_loss(constant, z1, z0, tau, step, mask, k_max=K_MAX)
  x_space = step == 1 / K_MAX
  np.testing.assert_allclose(jnp.where(x_space, 0.0, losses), 0.0, atol=1e-6)
  np.testing.assert_allclose(jnp.where(x_space, losses, 0.0),
                             jnp.where(x_space, (0.9 * tau + 0.1) * mask * offset ** 2, 0.0), rtol=1e-5)


def small_model_batch_and_params(impl="xla"):
  """One space and one time layer: enough for the loss tests, cheaper to compile."""
  block = dataclasses.replace(BLOCK, impl=impl)
  model = dynamics.Dynamics(dataclasses.replace(CONFIG, block=block, num_layers=2, loss_impl=impl))
  keys = jax.random.split(jax.random.key(0), 3)
  batch = {"latents": jnp.tanh(jax.random.normal(keys[0], (B, T, N, C))),
           "actions": jax.random.randint(keys[1], (B, T), 0, CONFIG.num_actions),
           "action_mask": jnp.ones((B, T), bool).at[:, 0].set(False)}
  params = nn.unbox(jax.jit(model.init)(keys[2], *frame_inputs(0))["params"])
  return model, batch, params


def test_dynamics_loss_and_grads_agree_with_xla_and_pallas_kernels():
  """The implementation switches only pick the implementation: with "pallas" both attentions and
  the loss run the kernels (interpreted on CPU), and the loss and its gradients must not change. Full-fp32
  matmuls, as the kernels do: a GPU's default (TF32) would differ in the XLA attention alone."""
  results = []
  for impl in ("xla", "pallas"):
    model, batch, params = small_model_batch_and_params(impl)
    loss_fn = lambda p: shortcut_forcing.dynamics_loss(model, p, batch, jax.random.key(1))  # pylint: disable=cell-var-from-loop
    with jax.default_matmul_precision("highest"):
      results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params))
  (xla_loss, xla_metrics), xla_grads = results[0]
  (pallas_loss, pallas_metrics), pallas_grads = results[1]
  np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-5)
  for name, value in xla_metrics.items():
    np.testing.assert_allclose(pallas_metrics[name], value, rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(pallas_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_next_frames_weigh_one_in_the_loss_and_the_others_the_ramp():
  """Plain diffusion forcing (x-space loss only) with next frames: the loss is the mean over frames
  of w * |f(z_tau) - z1|^2 / features, w = 1 at the next frames (tau = 0) and 0.9 tau + 0.1 elsewhere."""
  model, batch, params = small_model_batch_and_params()
  model = dynamics.Dynamics(dataclasses.replace(model.config, shortcut=False, next_frame_fraction=0.5))
  key = jax.random.key(3)
  loss, metrics = jax.jit(lambda p: shortcut_forcing.dynamics_loss(model, p, batch, key))(params)
  # The draws dynamics_loss makes from its key: (tau and d, noise, single images).
  tau_key, noise_key, _ = jax.random.split(key, 3)
  tau, step, is_next = noise_levels.training_frames(
      tau_key, (B, T), k_max=K_MAX, distribution="d_min", context_fraction=0.0, next_frame_fraction=0.5,
      context_signal=0.9)
  assert is_next.any() and not is_next.all()
  z1 = batch["latents"]
  z_tau = shortcut_forcing.corrupt(z1, jax.random.normal(noise_key, z1.shape), tau)
  predicted = jax.jit(lambda p: model.apply({"params": p}, z_tau, tau, step, batch["actions"],
                                             batch["action_mask"]))(params)
  mse = np.mean((np.asarray(predicted) - np.asarray(z1)) ** 2, axis=(2, 3))
  weight = np.where(is_next, 1.0, 0.9 * np.asarray(tau) + 0.1)
  np.testing.assert_allclose(loss, np.mean(weight * mse), rtol=1e-5)
  np.testing.assert_allclose(metrics["next_frame_mse"], mse[np.asarray(is_next)].mean(), rtol=1e-5)


def test_a_few_optimizer_steps_lower_the_dynamics_loss():
  model, batch, params = small_model_batch_and_params()
  loss_fn = functools.partial(shortcut_forcing.dynamics_loss, model, single_image_fraction=0.3)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def train_step(params, opt_state, key):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # The loss varies a lot with the (tau, d, noise) draw: cycle over 4 fixed draws and compare the
  # first pass over them (the loss before each update) with the last one.
  keys = jax.random.split(jax.random.key(2), 4)
  opt_state, losses = optimizer.init(params), []
  for step in range(40):
    params, opt_state, loss = train_step(params, opt_state, keys[step % 4])
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  before, after = np.mean(losses[:4]), np.mean(losses[-4:])
  assert after < 0.7 * before, (before, after)
