"""Times the world model: interactive frames per second, KV cache vs recompute, factorised vs full,
and the tokenizer's training step.

  python -m jaxai.world_model.bench_fps --config=configs/world_model.py [--workdir=DIR]
      [--frames=64] [--context=32] [--rollout_frames=8] [--runs=3]

With ``--workdir`` the trained tokenizer and dynamics model of that run are timed; without, random
parameters of the config's sizes (speed does not depend on the weights), and every line says which.
Prints one JSON line per measurement, each with the backend, device and the config sizes:

* ``interactive_fps``: ``ImaginedWorld.step`` (K = rollout.num_steps denoising passes, the first
  also writing the previous frame to the cache, and the decode to uint8 pixels, one jitted call, in
  rollout.compute_dtype) after ``--context`` random real frames;
  median over ``--frames`` steps after warm-up. The cache holds context + every step taken, so
  the sliding window never triggers during the timing.
* ``kv_cache``: ``rollout.rollout`` (KV-cached) against ``rollout.rollout_uncached`` (the whole
  context recomputed at every pass) generating the same ``--rollout_frames`` latent frames (no
  decode) after ``--context`` frames; median over ``--runs`` calls after one warm-up call each.
* ``train_step_layout``: a jitted value_and_grad of ``shortcut_forcing.dynamics_loss`` (in
  compute_dtype) on one random batch [the dynamics stage's batch_size, dynamics.window_len], for
  dynamics.layout factorised and full
  (random parameters for both); median over ``--runs`` steps after one warm-up step each.
* ``tokenizer_train_step``: a jitted value_and_grad of ``tokenizer_loss.tokenizer_loss`` on one
  random uint8 batch [the tokenizer stage's batch_size, data.window_len] (random parameters), in compute_dtype and in
  float32; median over ``--runs`` steps after one warm-up step each.

Ratios are of timings taken in the same run.
"""
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from jaxai import checkpointing, cli, host, stages
from jaxai.bench import timing
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import dynamics_stage, models, realtime, rollout, shortcut_forcing, tokenizer_loss

def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A trained world-model run; default: random parameters.")
  flags.DEFINE_integer("frames", 64, "Interactive steps timed for interactive_fps.")
  flags.DEFINE_integer("context", 32, "Real context frames before imagining.")
  flags.DEFINE_integer("rollout_frames", 8, "Frames generated in the kv_cache comparison.")
  flags.DEFINE_integer("runs", 3, "Timed calls of the kv_cache and train_step_layout measurements.")
  flags.DEFINE_integer("warmup", 3, "Untimed interactive steps (compilation) before timing.")


def interactive_fps(world, *, context: int, frames: int, warmup: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  h, w, c = world.tokenizer.config.image_shape
  world.start(rng.integers(0, 256, (context, h, w, c), np.uint8),
              rng.integers(0, dynamics_lib.NUM_CRAFTAX_ACTIONS, context), seed=seed)
  actions = rng.integers(0, dynamics_lib.NUM_CRAFTAX_ACTIONS, warmup + frames)
  for action in actions[:warmup]:  # compiles the step
    world.step(int(action))
  times = []
  for action in actions[warmup:]:
    start = time.perf_counter()
    world.step(int(action))  # returns host pixels: the frame is ready
    times.append(time.perf_counter() - start)
  ms = statistics.median(times) * 1e3
  return {"fps": timing.figure(1e3 / ms), "ms_per_frame": timing.figure(ms), "statistic": f"median over {frames} steps",
          "mean_ms_per_frame": timing.figure(statistics.mean(times) * 1e3), "decode_included": True,
          "cache_frames": world.max_context_frames, "sliding_window": "not triggered (cache holds "
          "context + all steps)"}


def kv_cache_speedup(dynamics, dynamics_params, *, context: int, frames: int, num_steps: int,
                     context_signal: float, runs: int) -> dict:
  c = dynamics.config
  latents_rng, actions_rng, rng = jax.random.split(jax.random.key(1), 3)
  latents = jax.random.normal(latents_rng, (1, context, c.num_latents, c.latent_channels))
  actions = jax.random.randint(actions_rng, (1, context + frames), 0, c.num_actions)
  options = dict(num_steps=num_steps, context_signal=context_signal)
  timed = {}
  for name, fn in (("cached", rollout.rollout), ("uncached", rollout.rollout_uncached)):
    call = lambda fn=fn: jax.block_until_ready(
        fn(dynamics, dynamics_params, latents, actions, rng, **options))
    call()  # compiles (the uncached path: one program per context length)
    timed[name] = timing.median_ms(call, runs)
  return {"cached_ms": timing.figure(timed["cached"]), "uncached_ms": timing.figure(timed["uncached"]),
          "uncached_over_cached": timing.figure(timed["uncached"] / timed["cached"]), "generated_frames": frames,
          "decode_included": False, "statistic": f"median over {runs} rollouts"}


def train_step_layouts(config, *, runs: int) -> dict:
  d = config.dynamics
  b, t = stages.stage_config(config, "dynamics").batch_size, d.window_len
  timed = {}
  for layout in ("factorised", "full"):
    layout_config = ml_collections.ConfigDict(config.to_dict())
    layout_config.dynamics.layout = layout
    layout_config.rollout.compute_dtype = config.compute_dtype  # a training step: training's dtype
    _, _, model, params = realtime.random_world_model(layout_config)
    c = model.config
    keys = jax.random.split(jax.random.key(2), 3)
    batch = {"latents": jax.random.normal(keys[0], (b, t, c.num_latents, c.latent_channels)),
             "actions": jax.random.randint(keys[1], (b, t), 0, c.num_actions)}
    loss = lambda p, model=model: shortcut_forcing.dynamics_loss(
        model, p, batch, keys[2], single_image_fraction=d.single_image_fraction)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    call = lambda step=step, params=params: jax.block_until_ready(step(params))
    call()  # compiles
    timed[layout] = timing.median_ms(call, runs)
  return {"factorised_ms": timing.figure(timed["factorised"]), "full_ms": timing.figure(timed["full"]),
          "full_over_factorised": timing.figure(timed["full"] / timed["factorised"]), "batch": [b, t],
          "compute_dtype": config.compute_dtype,
          "statistic": f"median over {runs} steps"}


def tokenizer_train_step(config, *, runs: int) -> dict:
  batch_size = stages.stage_config(config, "tokenizer").batch_size
  frames = jax.random.randint(jax.random.key(3), (batch_size, config.data.window_len,
                                                  *models.FRAME_SHAPE), 0, 256).astype(jnp.uint8)
  weight = config.tokenizer.perceptual_weight
  rms_state = tokenizer_loss.init_rms_state(tokenizer_loss.term_names(weight))
  timed = {}
  for dtype in dict.fromkeys((config.compute_dtype, "float32")):
    dtype_config = ml_collections.ConfigDict(config.to_dict())
    dtype_config.compute_dtype = dtype
    model = models.make_tokenizer(dtype_config)
    params = model.init(jax.random.key(0), frames[:1])["params"]
    loss = functools.partial(tokenizer_loss.tokenizer_loss, model, weight)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    call = lambda step=step, params=params: jax.block_until_ready(
        step(params, {"frames": frames}, jax.random.key(4), loss_state=rms_state))
    call()  # compiles
    timed[dtype] = timing.median_ms(call, runs)
  return {"step_ms": timing.figure(timed[config.compute_dtype]), "float32_ms": timing.figure(timed["float32"]),
          "float32_over_compute_dtype": timing.figure(timed["float32"] / timed[config.compute_dtype]),
          "batch": [batch_size, config.data.window_len], "compute_dtype": config.compute_dtype,
          "statistic": f"median over {runs} steps"}


def measure(config, workdir: str | None, *, frames: int, context: int, rollout_frames: int, runs: int,
            warmup: int):
  """Yields the JSON records, one per measurement."""
  if workdir:
    world_model = dynamics_stage.load_world_model(config, workdir)
    weights = f"trained ({workdir})"
  else:
    world_model = realtime.random_world_model(config)
    weights = "random init (speed does not depend on the weights)"
  r, d, t = config.rollout, config.dynamics, config.tokenizer
  common = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "host_cpu": host.summary(),
            "num_steps": r.num_steps, "context": context,
            "compute_dtype": models.rollout_config(config).compute_dtype,
            "dynamics": {"width": d.width, "layers": d.num_layers, "layout": d.layout,
                         "time_every": d.time_every, "spatial_tokens": d.spatial_tokens},
            "tokenizer": {"width": t.width, "encoder_layers": t.encoder_layers,
                          "decoder_layers": t.decoder_layers}}
  world = realtime.ImaginedWorld(*world_model, num_steps=r.num_steps, context_signal=r.context_signal,
                                 max_context_frames=context + warmup + frames)
  yield {"benchmark": "interactive_fps", **common, "params": weights,
         **interactive_fps(world, context=context, frames=frames, warmup=warmup)}
  yield {"benchmark": "kv_cache", **common, "params": weights,
         **kv_cache_speedup(world_model[2], world_model[3], context=context, frames=rollout_frames,
                            num_steps=r.num_steps, context_signal=r.context_signal, runs=runs)}
  yield {"benchmark": "train_step_layout", **common, "params": "random init (both layouts)",
         **train_step_layouts(config, runs=runs)}
  yield {"benchmark": "tokenizer_train_step", **common, "params": "random init",
         **tokenizer_train_step(config, runs=runs)}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]",
                           at_least_one=("frames", "context", "rollout_frames", "runs", "warmup"))
  try:
    for record in measure(config, args.workdir, frames=args.frames, context=args.context,
                          rollout_frames=args.rollout_frames, runs=args.runs, warmup=args.warmup):
      print(json.dumps(record), flush=True)
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the world model into --workdir first, or leave --workdir "
         "out to time random parameters)")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
