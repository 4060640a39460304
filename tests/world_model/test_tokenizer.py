"""The causal tokenizer (Dreamer 4, issue 4): masks, causality, patch dropping, loss pieces, training.

References are independent: masks built token by token from the paper's sentences, PSNR and the
image-gradient loss recomputed in float64 numpy, drop rates against the U(0, 0.9) law.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import config_of, run_main
from jaxai import config_lib, main
from jaxai.nn import transformer
from jaxai.world_model import models
from jaxai.world_model import task as task_lib
from jaxai.world_model import tokenizer as tok
from jaxai.world_model import tokenizer_loss


BLOCK = transformer.BlockConfig(width=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_hidden=64)
CONFIG = tok.TokenizerConfig(block=BLOCK, encoder_layers=2, decoder_layers=2, num_latents=3,
                             latent_channels=4, image_shape=(14, 21, 3), patch_size=7)  # 2x3 patches


# One latent per patch, each starting from its own patch (encoder) and each patch query from its
# own latent (decoder): the default's layout.
ALIGNED = dataclasses.replace(CONFIG, num_latents=6, aligned_inputs=True)


def test_aligned_inputs_need_one_latent_per_patch():
  with pytest.raises(ValueError, match="one latent per patch"):
    dataclasses.replace(ALIGNED, num_latents=3)


@pytest.fixture(scope="module", name="model_and_params", params=[CONFIG, ALIGNED], ids=["learned", "aligned"])
def fixture_model_and_params(request):
  model = tok.Tokenizer(request.param)
  frames = jnp.zeros((1, 3, *CONFIG.image_shape), jnp.uint8)
  return model, jax.jit(model.init)(jax.random.key(0), frames)["params"]


def random_frames(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- layout and masks -----------------------------------------------------------------------------

def test_patchify_is_row_major_tiles_and_unpatchify_inverts_it():
  frames = random_frames(0, (2, 14, 21, 3))
  patches = np.asarray(tok.patchify(jnp.asarray(frames), 7))
  assert patches.shape == (2, 6, 147)
  for r in range(2):
    for c in range(3):
      np.testing.assert_array_equal(patches[:, r * 3 + c], frames[:, 7 * r:7 * r + 7, 7 * c:7 * c + 7].reshape(2, -1))
  np.testing.assert_array_equal(np.asarray(tok.unpatchify(jnp.asarray(patches), 7, (2, 3))), frames)


def reference_mask(kind, num_frames, num_patches, num_latents):
  """Token by token, from the paper: block-causal in time, then who reads whom within the modalities."""
  per_frame = num_patches + num_latents
  n = num_frames * per_frame
  mask = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      if k // per_frame > q // per_frame:  # never a later frame
        continue
      q_is_latent = q % per_frame >= num_patches
      k_is_latent = k % per_frame >= num_patches
      if kind == "encoder":  # latents attend to everything; patches only to patches
        mask[q, k] = True if q_is_latent else not k_is_latent
      else:  # latents attend only to latents; patches to patches and latents
        mask[q, k] = k_is_latent if q_is_latent else True
  return mask


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_masks_match_the_papers_description(kind):
  np.testing.assert_array_equal(np.asarray(tok.attention_mask(kind, 3, 4, 2)), reference_mask(kind, 3, 4, 2))


def test_encoder_is_causal_in_time(model_and_params):
  model, params = model_and_params
  frames = random_frames(1, (2, 3, *CONFIG.image_shape))
  encode = jax.jit(lambda f: model.apply({"params": params}, f, method=tok.Tokenizer.encode))
  base = np.asarray(encode(frames))
  assert base.shape == (2, 3, model.config.num_latents, CONFIG.latent_channels)
  for t in range(2):
    changed = frames.copy()
    changed[:, t + 1:] = random_frames(2 + t, changed[:, t + 1:].shape)
    out = np.asarray(encode(changed))
    np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])  # the past is untouched
    assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-4  # and the changed frame matters


def test_decoder_is_causal_in_time(model_and_params):
  model, params = model_and_params
  latents = np.random.default_rng(3).uniform(-1, 1, (2, 3, model.config.num_latents, CONFIG.latent_channels))
  decode = jax.jit(lambda z: model.apply({"params": params}, z, method=tok.Tokenizer.decode))
  base = np.asarray(decode(latents))
  assert base.shape == (2, 3, *CONFIG.image_shape)
  changed = latents.copy()
  changed[:, 2] = -changed[:, 2]
  out = np.asarray(decode(changed))
  np.testing.assert_array_equal(out[:, :2], base[:, :2])
  assert np.abs(out[:, 2] - base[:, 2]).max() > 1e-4


def test_bottleneck_is_tanh_bounded_and_latents_ignore_nothing_at_inference(model_and_params):
  model, params = model_and_params
  frames = random_frames(4, (2, 1, *CONFIG.image_shape))
  recon, latents, dropped = jax.jit(lambda f: model.apply({"params": params}, f))(frames)
  assert np.all(np.abs(np.asarray(latents)) < 1)
  assert not np.asarray(dropped).any()  # rng=None: inference, p = 0
  assert recon.shape == frames.shape


# --- masked autoencoding --------------------------------------------------------------------------

def test_patch_drop_rates_follow_uniform_0_to_0p9():
  # Many patches per image: the fraction dropped in an image is then close to its own p.
  drop = np.asarray(tok.sample_patch_drop(jax.random.key(0), (4000,), 2000, 0.9))
  fractions = drop.mean(axis=-1)
  assert abs(fractions.mean() - 0.45) < 0.01
  # Quantiles of U(0, 0.9): q -> 0.9 q (binomial noise per image is ~0.01 here).
  np.testing.assert_allclose(np.quantile(fractions, [0.1, 0.25, 0.5, 0.75, 0.9]),
                             0.9 * np.array([0.1, 0.25, 0.5, 0.75, 0.9]), atol=0.025)
  assert fractions.max() < 0.95 and fractions.min() < 0.02
  assert not np.asarray(tok.sample_patch_drop(jax.random.key(1), (100,), 81, 0.0)).any()


def test_model_drops_patches_per_image_during_training(model_and_params):
  model, params = model_and_params
  frames = random_frames(5, (64, 4, *CONFIG.image_shape))
  apply = jax.jit(lambda f, rng: model.apply({"params": params}, f, rng))
  _, lat_a, dropped = apply(frames, jax.random.key(7))
  dropped = np.asarray(dropped)
  assert dropped.shape == (64, 4, CONFIG.num_patches)
  assert abs(dropped.mean() - 0.45) < 0.05  # 256 images x 6 patches
  # Dropped patches do not reach the latents: changing their pixels changes nothing.
  frames_b = frames.copy()
  patch_pixels = np.array(tok.patchify(jnp.asarray(frames_b), 7))
  patch_pixels[dropped] = 255 - patch_pixels[dropped]
  frames_b = np.asarray(tok.unpatchify(jnp.asarray(patch_pixels), 7, CONFIG.grid))
  _, lat_b, _ = apply(frames_b, jax.random.key(7))
  np.testing.assert_allclose(np.asarray(lat_a), np.asarray(lat_b), atol=1e-6)


# --- loss pieces ----------------------------------------------------------------------------------

def test_psnr_matches_the_textbook_formula():
  a = random_frames(6, (5, 9, 9, 3))
  b = np.clip(a.astype(int) + random_frames(7, a.shape) % 9 - 4, 0, 255).astype(np.uint8)
  mse_255 = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
  expected = 20 * np.log10(255.0) - 10 * np.log10(mse_255)
  got = tokenizer_loss.psnr(jnp.asarray(a / 255.0, jnp.float32), jnp.asarray(b / 255.0, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  # An error of 0.1 everywhere is 20 dB.
  np.testing.assert_allclose(float(tokenizer_loss.psnr(jnp.full((4, 4, 3), 0.6), jnp.full((4, 4, 3), 0.5))),
                             20.0, rtol=1e-5)


def test_gradient_loss_matches_numpy():
  x, y = np.random.default_rng(8).normal(size=(2, 3, 6, 5, 3))
  expected = 0.5 * (((np.diff(x, axis=1) - np.diff(y, axis=1)) ** 2).mean(axis=(1, 2, 3)) +
                    ((np.diff(x, axis=2) - np.diff(y, axis=2)) ** 2).mean(axis=(1, 2, 3)))
  np.testing.assert_allclose(np.asarray(tokenizer_loss.gradient_loss(jnp.asarray(x), jnp.asarray(y))),
                             expected, rtol=1e-5)
  # A constant offset has no edges: zero loss. A blurred step edge has a positive one.
  assert float(tokenizer_loss.gradient_loss(jnp.asarray(x[0]), jnp.asarray(x[0]) + 0.3).max()) < 1e-10


def test_running_rms_matches_a_debiased_ema_and_is_not_differentiated():
  rng = np.random.default_rng(3)
  batches = [rng.normal(size=8).astype(np.float32) * scale for scale in (1.0, 3.0, 0.1, 2.0)]
  decay = tokenizer_loss.RMS_DECAY
  state = tokenizer_loss.init_rms_state(["a"])
  ema, steps = 0.0, 0
  for values in batches:
    ema, steps = decay * ema + (1 - decay) * np.mean(values.astype(np.float64) ** 2), steps + 1
    rms = np.sqrt(ema / (1 - decay ** steps))  # Adam-style debiasing of a zero-started EMA

    def normalized(v, state=state):
      return tokenizer_loss.running_rms_normalize({"a": v}, state)[0]["a"]

    np.testing.assert_allclose(float(normalized(jnp.asarray(values))), values.mean() / rms, rtol=1e-5)
    grad = np.asarray(jax.grad(normalized)(jnp.asarray(values)))
    np.testing.assert_allclose(grad, np.full(8, 1 / (8 * rms)), rtol=1e-4)  # the RMS is a constant
    _, stats, state = tokenizer_loss.running_rms_normalize({"a": jnp.asarray(values)}, state)
    np.testing.assert_allclose(float(stats["a"]), rms, rtol=1e-5)
  # First step: the estimate is exactly that batch's RMS, whatever the term's scale.
  first = batches[0] * 1e-4
  value = tokenizer_loss.running_rms_normalize({"a": jnp.asarray(first)}, tokenizer_loss.init_rms_state(["a"]))[0]["a"]
  np.testing.assert_allclose(float(value), first.mean() / np.sqrt(np.mean(first.astype(np.float64) ** 2)), rtol=1e-4)


def test_loss_value_is_raw_mse_plus_weighted_edge_loss(model_and_params):
  model, params = model_and_params
  frames = random_frames(9, (4, 2, *CONFIG.image_shape))
  rms_state = tokenizer_loss.init_rms_state(tokenizer_loss.term_names(0.2))
  loss, (metrics, _) = tokenizer_loss.tokenizer_loss(model, 0.2, params, {"frames": frames},
                                                     jax.random.key(1), loss_state=rms_state)
  recon, _, _ = model.apply({"params": params}, frames, jax.random.key(1))
  recon, target = np.asarray(recon, np.float64), frames / 255.0
  mse = ((recon - target) ** 2).mean()
  edges = 0.5 * (((np.diff(recon, axis=2) - np.diff(target, axis=2)) ** 2).mean() +
                 ((np.diff(recon, axis=3) - np.diff(target, axis=3)) ** 2).mean())
  np.testing.assert_allclose(float(loss), mse + 0.2 * edges, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["mse"]), mse, rtol=1e-4)


# --- the task through the trainer -----------------------------------------------------------------

def tiny_config(**stage_fields):
  """The tiny variant's tokenizer stage alone, with ``stage_fields`` set for that stage."""
  config = config_of("world_model", "tiny", stage="tokenizer")
  config.stages.tokenizer.update(stage_fields)
  return config


def test_tiny_training_lowers_the_loss_and_reports_psnr(tmp_path):
  config = tiny_config(total_steps=40, log_every=5, eval_every=20)
  config.stages.tokenizer.optimizer.learning_rate = 3e-3
  main.run(config, str(tmp_path))
  with open(tmp_path / "tokenizer" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  losses = {r["step"]: r["loss"] for r in rows}
  assert losses[40] < 0.6 * losses[5], losses
  evals = [r for r in rows if "eval/psnr" in r]
  assert [r["step"] for r in evals] == [20, 40]
  assert evals[-1]["eval/psnr"] > evals[0]["eval/psnr"]
  assert evals[-1]["bottleneck_values"] == 4 * 8
  assert evals[-1]["compression_ratio"] == pytest.approx(63 * 63 * 3 / 32)
  assert abs(np.mean([r["drop_fraction"] for r in rows]) - 0.45) < 0.1
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / "tokenizer" / "recon_step_40.png") as image:
    assert image.size[0] > 63 and image.size[1] > 2 * 63


@pytest.mark.parametrize("overrides, field", [
    (dict(stage="video"), "stage"),
    (dict(stage="all", dynamics=dict(spatial_tokens=5)), "dynamics.spatial_tokens"),
    (dict(stage="all", dynamics=dict(short_window_len=3)), "dynamics.short_window_len"),
    (dict(stage="all", dynamics=dict(step_distribution="uniform")), "dynamics.step_distribution"),
    (dict(stage="all", dynamics=dict(bootstrap_teacher="target")), "dynamics.bootstrap_teacher"),
    (dict(stage="all", dynamics=dict(bootstrap_teacher="ema")), "stages.dynamics.ema_decay"),
    (dict(stage="all", dynamics=dict(context_fraction=1.0)), "dynamics.context_fraction"),
    (dict(stage="all", dynamics=dict(next_frame_fraction=-0.1)), "dynamics.next_frame_fraction"),
    (dict(stage="all", rollout=dict(num_steps=3)), "rollout.num_steps"),
    (dict(stage="all", rollout=dict(compute_dtype="float16")), "rollout.compute_dtype"),
    (dict(stage="all", rollout=dict(horizon=8)), "rollout.horizon"),
    (dict(stage="all", dynamics=dict(shortcut_loss_impl="triton")), "dynamics.shortcut_loss_impl"),
    (dict(stage="all", dynamics=dict(scan_layers=True, num_layers=3)), "dynamics.num_layers"),
    (dict(stages=dict(dynamics=dict(reads=("video",)))), "stages.dynamics.reads"),
    (dict(tokenizer=dict(num_latents=64, latent_channels=16)), "tokenizer.latent_channels"),
    (dict(tokenizer=dict(patch_size=8)), "tokenizer.patch_size"),
    (dict(tokenizer=dict(aligned_inputs=True)), "tokenizer.aligned_inputs"),  # 4 latents, 81 patches
    (dict(data=dict(source="craftax", dir="/nonexistent/craftax", generate=False)), "data.dir"),
    (dict(stage="agent", agent=dict(loss_rms_decay=1.0)), "agent.loss_rms_decay"),
])
def test_config_errors_name_the_field(tmp_path, overrides, field):
  config = tiny_config()
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    main.run(config, str(tmp_path))
  assert error.value.field == field
  assert not os.listdir(tmp_path)


def test_cli_dynamics_without_a_tokenizer_is_one_config_error_line(tmp_path):
  result = run_main(["--config=configs/world_model.py:tiny", "--config.stage=dynamics",
                     f"--workdir={tmp_path}"], devices=1)
  assert result.returncode == config_lib.EXIT_CONFIG_ERROR
  assert result.stderr.strip().splitlines() == [
      f"config error: stages.dynamics.reads_from: no checkpoint of stage 'tokenizer' in {tmp_path}/"
      "tokenizer/checkpoints: train it there first (--config.stage=tokenizer), or both in turn with "
      "--config.stage=all"]
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("variant", ["tiny", "default", "full"])
def test_every_variant_parses_and_traces(variant):
  config = config_of("world_model", variant)
  config.data.source = "synthetic"  # the default and full variants read a recorded dataset
  task_lib.validate(config)
  model = models.make_tokenizer(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, config.data.window_len, 63, 63, 3), jnp.uint8))
  assert shapes["params"]["to_bottleneck"]["kernel"].value.shape[-1] == config.tokenizer.latent_channels
  assert config.tokenizer.num_latents * config.tokenizer.latent_channels * 16 <= 63 * 63 * 3


def test_running_rms_state_is_checkpointed_and_resumed(tmp_path):
  main.run(tiny_config(total_steps=6, checkpoint_every=3), str(tmp_path / "straight"))
  main.run(tiny_config(total_steps=6, checkpoint_every=3, max_steps_per_run=3), str(tmp_path / "resumed"))
  main.run(tiny_config(total_steps=6, checkpoint_every=3), str(tmp_path / "resumed"))
  rows = {}
  for name in ("straight", "resumed"):
    with open(tmp_path / name / "tokenizer" / "metrics.jsonl", encoding="utf-8") as f:
      rows[name] = {r["step"]: r for r in map(json.loads, f)}
  # Step 6 divides by the running RMS of steps 1..6: equal only if steps 1..3 came back from the checkpoint.
  for key in ("rms/mse", "rms/perceptual", "loss"):
    np.testing.assert_allclose(rows["resumed"][6][key], rows["straight"][6][key], rtol=1e-6)


# --- scanned and rematerialised block stacks ------------------------------------------------------

def test_scanned_and_rematerialised_stacks_give_the_same_loss_and_gradients():
  """The encoder and decoder scanned, with the loop's parameters stacked, and rematerialised:
  the same loss (reconstruction error with patches dropped) and gradients as the loop. The
  default's layout (aligned inputs) only: the learned one changes nothing in the stacks. Scan and
  remat change no value, so their product equal to the loop covers each (each policy on its own:
  tests/nn/test_block_stack.py)."""
  c = ALIGNED
  with_block = lambda **changes: tok.Tokenizer(
      dataclasses.replace(c, block=dataclasses.replace(c.block, **changes)))
  stacked = lambda p: transformer.stack_params(transformer.stack_params(p, "encoder", c.encoder_layers),
                                               "decoder", c.decoder_layers)
  model, frames = tok.Tokenizer(c), random_frames(8, (2, 3, *c.image_shape))
  scanned_shapes = jax.eval_shape(with_block(scan_layers=True).init, jax.random.key(0), frames)["params"]
  names = [leaf.names for part in ("encoder", "decoder")
           for leaf in jax.tree.leaves(scanned_shapes[part], is_leaf=nn.meta.is_axis_metadata)]
  assert names and all(n[0] == "layers" for n in names)
  # Generic parameters from one normal draw: a far shorter program to compile than the
  # initialisers' draw per leaf.
  shapes = jax.eval_shape(model.init, jax.random.key(0), frames)["params"]
  leaves, treedef = jax.tree.flatten(nn.unbox(shapes))
  flat = 0.3 * jax.random.normal(jax.random.key(1), (sum(leaf.size for leaf in leaves),))
  parts = jnp.split(flat, np.cumsum([leaf.size for leaf in leaves])[:-1])
  params = treedef.unflatten([part.reshape(leaf.shape) for part, leaf in zip(parts, leaves)])

  def loss_and_grads(model, params):
    def loss(p):
      recon, _, _ = model.apply({"params": p}, frames, jax.random.key(9))
      return jnp.mean(jnp.square(recon - frames / 255.0))
    return jax.value_and_grad(loss)(params)

  (loss, grads), (got_loss, got_grads) = jax.jit(lambda: (
          loss_and_grads(model, params),
          loss_and_grads(with_block(scan_layers=True, remat="dots"), stacked(params))))()
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  expected = stacked(grads)
  assert jax.tree.structure(got_grads) == jax.tree.structure(expected)
  # Relative to each leaf's largest entry: fp32 sums in another order err by ~1e-7 of their
  # largest terms, large against an entry that nearly cancels.
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.abs(e).max()),
               got_grads, expected)
