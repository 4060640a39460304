"""The world-model task: stage ``tokenizer`` trains the causal tokenizer on recorded Craftax frames,
stage ``dynamics`` the dynamics model on its frozen latents (``dynamics_stage``), ``all`` both in turn.

The tokenizer stage
trains in ``workdir/tokenizer`` (checkpoints, ``metrics.jsonl``) and, at every evaluation, logs the
held-out reconstruction PSNR (``eval/psnr``, mean over frames of the per-frame PSNR, reconstructions
clipped to [0, 1]) with the bottleneck size, and writes ``recon_step_<N>.png``: held-out frames
(top row of each pair) above their reconstructions.

Data sources (``data.source``): ``craftax``, the recorded offline dataset in ``data.dir`` (see
``jaxai/craftax``), or ``synthetic``, procedurally generated tile maps that scroll over time
(no dataset needed: for tests and smoke runs).
"""
import functools
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxai import checkpointing, config_lib, metrics
from jaxai.data import pipeline
from jaxai.nn import attention, transformer
from jaxai.tasks import Task
from jaxai.world_model import dynamics_stage
from jaxai.world_model import tokenizer as tokenizer_lib
from jaxai.world_model import tokenizer_loss

STAGES = ("tokenizer", "dynamics", "all")
FRAME_SHAPE = (63, 63, 3)  # Craftax-Classic pixels: 9 x 9 tiles of 7 x 7 pixels
MIN_COMPRESSION = 16  # the bottleneck must be at least this many times smaller than a frame


def validate(config: ml_collections.ConfigDict) -> None:
  if config.stage not in STAGES:
    raise config_lib.ConfigError("stage", f"must be one of {', '.join(STAGES)}, got {config.stage!r}")
  if config.stage != "tokenizer":
    dynamics_stage.validate(config)
  t = config.tokenizer
  config_lib.validate_attention_heads("tokenizer", t)
  if t.patch_size <= 0 or FRAME_SHAPE[0] % t.patch_size or FRAME_SHAPE[1] % t.patch_size:
    raise config_lib.ConfigError("tokenizer.patch_size", f"{t.patch_size} does not divide the "
                                 f"{FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} frame")
  for field in ("width", "encoder_layers", "decoder_layers", "num_latents", "latent_channels", "mlp_hidden"):
    if t[field] <= 0:
      raise config_lib.ConfigError(f"tokenizer.{field}", f"must be positive, got {t[field]}")
  frame_values = int(np.prod(FRAME_SHAPE))
  if t.num_latents * t.latent_channels * MIN_COMPRESSION > frame_values:
    raise config_lib.ConfigError(
        "tokenizer.latent_channels", f"bottleneck num_latents x latent_channels = {t.num_latents} x "
        f"{t.latent_channels} = {t.num_latents * t.latent_channels} values is not {MIN_COMPRESSION}x "
        f"smaller than a frame ({frame_values} values); at most {frame_values // MIN_COMPRESSION}")
  num_patches = (FRAME_SHAPE[0] // t.patch_size) * (FRAME_SHAPE[1] // t.patch_size)
  if t.aligned_inputs and t.num_latents != num_patches:
    raise config_lib.ConfigError("tokenizer.aligned_inputs", f"needs one latent per patch "
                                 f"({num_patches}), got num_latents={t.num_latents}")
  if not 0.0 <= t.max_mask_prob < 1.0:
    raise config_lib.ConfigError("tokenizer.max_mask_prob", f"must be in [0, 1), got {t.max_mask_prob}")
  if t.perceptual_weight < 0:
    raise config_lib.ConfigError("tokenizer.perceptual_weight", f"must be >= 0, got {t.perceptual_weight}")
  d = config.data
  if d.window_len <= 0:
    raise config_lib.ConfigError("data.window_len", f"must be positive, got {d.window_len}")
  if d.eval_frames <= 0:
    raise config_lib.ConfigError("data.eval_frames", f"must be positive, got {d.eval_frames}")
  if d.source == "craftax":
    from jaxai.craftax import dataset  # pylint: disable=g-import-not-at-top
    if d.variant not in dataset.VARIANTS:
      raise config_lib.ConfigError("data.variant", f"unknown craftax_offline variant {d.variant!r}; "
                                   f"choose one of {', '.join(dataset.VARIANTS)}")
    problem = None if d.generate else _dataset_problem(config)
    if problem:
      raise config_lib.ConfigError("data.dir", f"{problem} (or set --config.data.generate=True to "
                                   "record it first)")
  elif d.source != "synthetic":
    raise config_lib.ConfigError("data.source", f"must be craftax or synthetic, got {d.source!r}")


def block_config(config: ml_collections.ConfigDict, section) -> transformer.BlockConfig:
  """The transformer block of a model section (``config.tokenizer`` or ``config.dynamics``)."""
  impl = attention.default_attention_impl() if config.attention_impl == "auto" else config.attention_impl
  return transformer.BlockConfig(
      width=section.width, num_heads=section.num_heads, num_kv_heads=section.num_kv_heads,
      head_dim=section.head_dim, mlp_hidden=section.mlp_hidden, qk_norm=section.qk_norm,
      attn_soft_cap=section.attn_soft_cap or None, impl=impl, dtype=jnp.dtype(config.compute_dtype))


def make_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  t = config.tokenizer
  return tokenizer_lib.Tokenizer(tokenizer_lib.TokenizerConfig(
      block=block_config(config, t), encoder_layers=t.encoder_layers, decoder_layers=t.decoder_layers,
      num_latents=t.num_latents, latent_channels=t.latent_channels, image_shape=FRAME_SHAPE,
      patch_size=t.patch_size, max_mask_prob=t.max_mask_prob,
      aligned_inputs=t.get("aligned_inputs", False)))  # absent from tokenizers saved before it existed


# --- data -----------------------------------------------------------------------------------------

def _dataset_problem(config) -> str | None:
  """Why the recorded dataset in ``data.dir`` cannot be read, or None if it can."""
  from jaxai.craftax import dataset  # pylint: disable=g-import-not-at-top
  try:
    dataset.load(config.data.dir, "train", variant=config.data.variant)
    dataset.load(config.data.dir, "heldout", variant=config.data.variant)
  except dataset.DatasetError as e:
    return str(e)
  return None


def _craftax_windows(config, split: str) -> grain.MapDataset:
  from jaxai.craftax import dataset  # pylint: disable=g-import-not-at-top
  return dataset.window_dataset(config.data.dir, split, config.data.window_len,
                                variant=config.data.variant, shuffle=False)


def synthetic_windows(num_windows: int, window_len: int, *, seed: int, num_textures: int = 12,
                      patch_size: int = 7) -> grain.MapDataset:
  """Windows {'frames': uint8 [T, 63, 63, 3]} of tile maps that scroll one tile left per frame.

  The textures are the same for every seed (so that train and held-out windows share them); the
  maps differ with ``seed``. A stand-in for Craftax when no recorded dataset is at hand.
  """
  textures = np.random.default_rng(12345).integers(0, 256, (num_textures, patch_size, patch_size, 3),
                                                   dtype=np.uint8)
  rng = np.random.default_rng(seed)
  gh, gw = FRAME_SHAPE[0] // patch_size, FRAME_SHAPE[1] // patch_size
  windows = []
  for _ in range(num_windows):
    tiles = rng.integers(0, num_textures, (gh, gw + window_len - 1))
    world = textures[tiles].swapaxes(1, 2).reshape(gh * patch_size, -1, 3)
    frames = np.stack([world[:, t * patch_size:(t + gw) * patch_size] for t in range(window_len)])
    windows.append({"frames": frames})
  return grain.MapDataset.source(windows)


def _windows(config, split: str) -> grain.MapDataset:
  d = config.data
  if d.source == "synthetic":
    return synthetic_windows(d.synthetic_windows, d.window_len, seed=config.seed + (split == "heldout"))
  return _craftax_windows(config, split)


def _heldout_frames(config) -> np.ndarray:
  """``data.eval_frames`` held-out frames, evenly spread over the held-out split, as [n, 1, H, W, C]."""
  windows = _windows(config, "heldout")
  frames_per_window = config.data.window_len
  count = -(-config.data.eval_frames // frames_per_window)
  indices = np.unique(np.linspace(0, len(windows) - 1, min(count, len(windows))).astype(int))
  frames = np.concatenate([np.asarray(windows[int(i)]["frames"]) for i in indices])
  return frames[:config.data.eval_frames, None]


# --- evaluation -----------------------------------------------------------------------------------

def image_grid(frames: np.ndarray, recons: np.ndarray, *, columns: int = 8, scale: int = 3,
               gap: int = 2) -> np.ndarray:
  """uint8 [rows, cols] grid: each pair of rows shows frames (above) and their reconstructions."""
  n, h, w, c = frames.shape
  rows = -(-n // columns)
  grid = np.full((rows * 2 * (h + gap) + gap, columns * (w + gap) + gap, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    x = gap + col * (w + gap)
    for k, image in enumerate((frames[i], recons[i])):
      y = gap + (2 * r + k) * (h + gap)
      grid[y:y + h, x:x + w] = image
  return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def make_evaluate(config, model, workdir: str):
  frames = _heldout_frames(config)  # [n, 1, H, W, C] uint8
  batch = config.batch_size
  reconstruct = jax.jit(lambda params, x: jnp.clip(model.apply({"params": params}, x)[0], 0.0, 1.0))
  out_dir = os.path.join(workdir, "tokenizer")
  t = config.tokenizer
  bottleneck = t.num_latents * t.latent_channels

  def evaluate(params, step):
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
      from PIL import Image  # pylint: disable=g-import-not-at-top
      os.makedirs(out_dir, exist_ok=True)
      shown = min(16, len(frames))
      grid = image_grid(frames[:shown, 0], np.round(recon[:shown] * 255).astype(np.uint8))
      Image.fromarray(grid).save(os.path.join(out_dir, f"recon_step_{step}.png"))
    return {"eval/psnr": float(np.mean(psnr)), "eval/psnr_p10": float(np.percentile(psnr, 10)),
            "eval/mse": float(np.mean(mse)), "eval/edge_mse": float(np.mean(edge)),
            "bottleneck_values": bottleneck, "compression_ratio": float(np.prod(FRAME_SHAPE)) / bottleneck}

  return evaluate


# --- stages ---------------------------------------------------------------------------------------

def _ensure_dataset(config) -> None:
  if config.data.source == "craftax" and config.data.generate:
    from jaxai.craftax import dataset  # pylint: disable=g-import-not-at-top
    dataset.generate(config.data.dir, config.data.variant)  # returns at once when already recorded


def tokenizer_stage(config: ml_collections.ConfigDict, workdir: str) -> Task:
  model = make_tokenizer(config)
  window_len = config.data.window_len
  train_windows = _windows(config, "train")

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, window_len, *FRAME_SHAPE), jnp.uint8))["params"]

  def make_data(process_index, process_count):
    return pipeline.process_local_batches(
        train_windows.map(lambda w: {"frames": np.asarray(w["frames"])}), config.batch_size,
        seed=config.seed, process_index=process_index, process_count=process_count)

  weight = config.tokenizer.perceptual_weight
  loss = functools.partial(tokenizer_loss.tokenizer_loss, model, weight)
  return Task(name="tokenizer", config=config, init_params=init_params, loss=loss, make_data=make_data,
              evaluate=make_evaluate(config, model, workdir), subdir="tokenizer",
              init_loss_state=lambda: tokenizer_loss.init_rms_state(tokenizer_loss.term_names(weight)))


def build_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Task]:
  validate(config)
  if config.stage == "dynamics":  # the frozen tokenizer must exist before anything else happens
    checkpoints = dynamics_stage.tokenizer_checkpoints(config, workdir)
    if not checkpointing.Checkpointer.exists(checkpoints):
      raise config_lib.ConfigError("dynamics.tokenizer_workdir", f"no tokenizer checkpoint in "
                                   f"{checkpoints}: train --config.stage=tokenizer there first, or use "
                                   "--config.stage=all")
  _ensure_dataset(config)
  stages = []
  if config.stage in ("tokenizer", "all"):
    stages.append(tokenizer_stage(config, workdir))
  if config.stage in ("dynamics", "all"):
    stages.append(dynamics_stage.dynamics_stage(config, workdir))
  return stages
