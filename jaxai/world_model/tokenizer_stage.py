"""World model, stage ``tokenizer``: the causal tokenizer trained on recorded (or synthetic) frames.

It trains in ``workdir/tokenizer`` and, at every evaluation, logs the held-out reconstruction PSNR
(``eval/psnr``, mean over frames of the per-frame PSNR, reconstructions clipped to [0, 1]) with the
bottleneck size, and writes ``recon_step_<N>.png``: held-out frames (top row of each pair) above
their reconstructions.
"""
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxai import config_lib, metrics, stages
from jaxai.data import pipeline
from jaxai.world_model import data, images, models, tokenizer_loss

MIN_COMPRESSION = 16  # the bottleneck must be at least this many times smaller than a frame


def validate(config: ml_collections.ConfigDict) -> None:
  t = config.tokenizer
  config_lib.validate_attention_heads("tokenizer", t)
  config_lib.validate_block_stack("tokenizer", t)
  frame = models.FRAME_SHAPE
  config_lib.check(t.patch_size > 0 and frame[0] % t.patch_size == 0 and frame[1] % t.patch_size == 0,
                   "tokenizer.patch_size", f"{t.patch_size} does not divide the {frame[0]}x{frame[1]} frame")
  config_lib.check_positive(t, "width", "encoder_layers", "decoder_layers", "num_latents",
                            "latent_channels", "mlp_hidden", prefix="tokenizer.")
  frame_values = int(np.prod(frame))
  config_lib.check(t.num_latents * t.latent_channels * MIN_COMPRESSION <= frame_values,
                   "tokenizer.latent_channels", f"bottleneck num_latents x latent_channels = "
                   f"{t.num_latents} x {t.latent_channels} = {t.num_latents * t.latent_channels} values "
                   f"is not {MIN_COMPRESSION}x smaller than a frame ({frame_values} values); at most "
                   f"{frame_values // MIN_COMPRESSION}")
  num_patches = (frame[0] // t.patch_size) * (frame[1] // t.patch_size)
  config_lib.check(not t.aligned_inputs or t.num_latents == num_patches, "tokenizer.aligned_inputs",
                   f"needs one latent per patch ({num_patches}), got num_latents={t.num_latents}")
  config_lib.check_range(t, "max_mask_prob", 0.0, 1.0, high_open=True, prefix="tokenizer.")
  config_lib.check_at_least(t, 0, "perceptual_weight", prefix="tokenizer.")


def make_evaluate(config, model, out_dir: str):
  """(params, step) -> held-out reconstruction metrics; the frames are read at the first call."""
  batch = config.batch_size
  reconstruct = jax.jit(lambda params, x: jnp.clip(model.apply({"params": params}, x)[0], 0.0, 1.0))
  t = config.tokenizer
  bottleneck = t.num_latents * t.latent_channels
  heldout = functools.cache(lambda: data.heldout_frames(config))  # [n, 1, H, W, C] uint8

  def evaluate(params, step):
    frames = heldout()
    recons = []
    for start in range(0, len(frames), batch):
      chunk = frames[start:start + batch]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
      recons.append(np.asarray(jax.device_get(reconstruct(params, padded)))[:len(chunk)])
    recon = np.concatenate(recons)[:, 0].astype(np.float64)
    target = frames[:, 0].astype(np.float64) / 255.0
    mse = np.mean((recon - target) ** 2, axis=(1, 2, 3))
    psnr = metrics.psnr_from_mse(mse)
    edge = np.asarray(tokenizer_loss.gradient_loss(recon, target))
    if jax.process_index() == 0:
      shown = min(16, len(frames))
      images.save_png(os.path.join(out_dir, f"recon_step_{step}.png"),
                      images.image_grid(frames[:shown, 0], np.round(recon[:shown] * 255).astype(np.uint8)))
    return {"eval/psnr": float(np.mean(psnr)), "eval/psnr_p10": float(np.percentile(psnr, 10)),
            "eval/mse": float(np.mean(mse)), "eval/edge_mse": float(np.mean(edge)),
            "bottleneck_values": bottleneck,
            "compression_ratio": float(np.prod(models.FRAME_SHAPE)) / bottleneck}

  return evaluate


def build(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  model = models.make_tokenizer(config)
  window_len = config.data.window_len

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, window_len, *models.FRAME_SHAPE), jnp.uint8))["params"]

  def make_data(process_index, process_count):
    data.ensure_dataset(config)
    windows = data.windows(config, "train", window_len)
    return pipeline.process_local_batches(
        windows.map(lambda w: {"frames": np.asarray(w["frames"])}), config.batch_size,
        seed=config.seed, process_index=process_index, process_count=process_count)

  def abstract_batch():
    return {"frames": jax.ShapeDtypeStruct((config.batch_size, window_len, *models.FRAME_SHAPE), jnp.uint8)}

  weight = config.tokenizer.perceptual_weight
  loss = functools.partial(tokenizer_loss.tokenizer_loss, model, weight)
  return stages.Stage(
      name="tokenizer", config=config, init_params=init_params, loss=loss, make_data=make_data,
      abstract_batch=abstract_batch,
      evaluate=make_evaluate(config, model, stages.stage_dir(workdir, "tokenizer")),
      init_loss_state=lambda: tokenizer_loss.init_rms_state(tokenizer_loss.term_names(weight)))
