"""This codebase's dynamics model side by side with the PyTorch ``dreamer4`` package, at one size.

  python -m jaxai.world_model.bench_vs_dreamer4 --config=configs/world_model.py \
      --torch_python=/path/to/torchenv/bin/python [--context=32] [--frames=1,17] [--runs=3]

  # the other side's environment, once (torch's PyPI wheels are large; keep them out of this one):
  python3 -m venv /path/to/torchenv && /path/to/torchenv/bin/pip install torch==2.14.1 dreamer4==0.20.2

Both models are built at the size of issue 22 (width 256, 8 layers, 4 query / 2 KV heads of 64,
SwiGLU hidden 682 = dreamer4's 4 x 2/3, 27 spatial tokens of the 81 x 8 latents, 4 registers,
time attention every 4th layer, K_max 64) with random weights, in float32 at batch 1, and
generate latent frames with K = rollout.num_steps shortcut steps after the same number of
context frames, KV-cached on both sides, without decoding (the package's generate has no
tokenizer here). Each side generates context + a and context + b frames (--frames=a,b); the
difference of the medians over b - a is the cost of one frame with the context in the cache.
The PyTorch side (bench_dreamer4_torch.py) runs in its own interpreter, one after the other, never
at the same time, so they do not share the cores.

Prints JSON lines: ``side`` jax, ``side`` pytorch dreamer4, then ``jax_over_dreamer4`` (the frame
rate ratio). Without --torch_python only the jax line.
"""
import json
import os
import subprocess

import jax
import ml_collections
from absl import flags

from jaxai import cli, host
from jaxai.bench import timing
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import realtime, rollout

# Issue 22's equal-size config; names as the dreamer4 side's flags.
EQUAL_SIZE = dict(width=256, layers=8, query_heads=4, kv_heads=2, head_dim=64, mlp_hidden=682,
                  latents=81, latent_channels=8, spatial_tokens=27, registers=4, time_every=4, k_max=64)


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("torch_python", None, "Python of a virtualenv with torch and dreamer4; "
                      "default: time the jax side only.")
  flags.DEFINE_integer("context", 32, "Context frames in the cache before the timed frames.")
  flags.DEFINE_string("frames", "1,17", "Two frame counts a,b to generate; the timing is their difference.")
  flags.DEFINE_integer("runs", 3, "Timed calls per frame count (median).")


def equal_size_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  d, s = config.dynamics, EQUAL_SIZE
  d.width, d.num_layers, d.num_heads, d.num_kv_heads = s["width"], s["layers"], s["query_heads"], s["kv_heads"]
  d.head_dim, d.mlp_hidden, d.spatial_tokens, d.num_registers = (s["head_dim"], s["mlp_hidden"],
                                                                 s["spatial_tokens"], s["registers"])
  d.time_every, d.k_max = s["time_every"], s["k_max"]
  config.rollout.compute_dtype = "float32"
  return config


def jax_side(config, *, context: int, frames: tuple[int, int], runs: int) -> dict:
  _, _, model, params = realtime.random_world_model(equal_size_config(config))
  c = model.config
  if (c.num_latents, c.latent_channels) != (EQUAL_SIZE["latents"], EQUAL_SIZE["latent_channels"]):
    raise ValueError(f"the tokenizer's latents are {c.num_latents} x {c.latent_channels}; this comparison "
                     f"is set up for {EQUAL_SIZE['latents']} x {EQUAL_SIZE['latent_channels']}")
  keys = jax.random.split(jax.random.key(1), 3)
  latents = jax.random.normal(keys[0], (1, context, c.num_latents, c.latent_channels))
  actions = jax.random.randint(keys[1], (1, context + max(frames)), 0, dynamics_lib.NUM_CRAFTAX_ACTIONS)
  r = config.rollout
  timed = {}
  for n in frames:
    call = lambda n=n: jax.block_until_ready(rollout.rollout(
        model, params, latents, actions[:, :context + n], keys[2], num_steps=r.num_steps,
        context_signal=r.context_signal))
    call()  # compiles
    timed[n] = timing.median_ms(call, runs)
  few, many = frames
  ms = (timed[many] - timed[few]) / (many - few)
  params_count = sum(x.size for x in jax.tree.leaves(params))
  return {"side": "jax", "backend": jax.default_backend(), "dynamics_params": params_count,
          "ms_per_frame": timing.figure(ms), "fps": timing.figure(1e3 / ms),
          # the first pass also writes the previous frame to the cache (rollout.generate_frame)
          "passes_per_frame": r.num_steps,
          "rollout_ms": {str(k): timing.figure(v) for k, v in timed.items()},
          "statistic": f"(median over {runs} rollouts of {many} frames - the same of {few}) / {many - few}"}


def torch_side(torch_python: str, *, context: int, frames: tuple[int, int], runs: int, num_steps: int) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_dreamer4_torch.py")
  sizes = {k: v for k, v in EQUAL_SIZE.items() if k != "mlp_hidden"}  # dreamer4 derives it: 4 x 2/3
  argv = [torch_python, script, *(f"--{k}={v}" for k, v in sizes.items()), f"--context={context}",
          f"--frames={frames[0]},{frames[1]}", f"--runs={runs}", f"--num_steps={num_steps}",
          f"--actions={dynamics_lib.NUM_CRAFTAX_ACTIONS}"]
  result = subprocess.run(argv, capture_output=True, text=True, check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"the dreamer4 side failed ({' '.join(argv[:2])}): {tail}")
  return json.loads(lines[-1])


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py", at_least_one=("context", "runs"))
  try:
    frames = tuple(int(f) for f in args.frames.split(","))
    if len(frames) != 2 or not 0 < frames[0] < frames[1]:
      raise ValueError
  except ValueError:
    cli.fail("bad flag", f"--frames={args.frames}: need two frame counts a,b with 0 < a < b")
  if args.torch_python and not os.access(args.torch_python, os.X_OK):
    cli.fail("bad flag", f"--torch_python={args.torch_python} is not an executable")
  common = {"host_cpu": host.summary(), "context": args.context, "num_steps": config.rollout.num_steps,
            "batch": 1, "dtype": "float32", "size": EQUAL_SIZE}
  try:
    ours = {**common, **jax_side(config, context=args.context, frames=frames, runs=args.runs)}
  except ValueError as e:
    cli.fail("config error", str(e))
  print(json.dumps(ours), flush=True)
  if not args.torch_python:
    return
  try:
    theirs = {**common, **torch_side(args.torch_python, context=args.context, frames=frames, runs=args.runs,
                                      num_steps=config.rollout.num_steps)}
  except RuntimeError as e:
    cli.fail("dreamer4 side", str(e))
  print(json.dumps(theirs), flush=True)
  print(json.dumps({"benchmark": "jax_over_dreamer4", "host_cpu": common["host_cpu"],
                    "fps_ratio": timing.figure(ours["fps"] / theirs["fps"]),
                    "per_pass_ratio": timing.figure(ours["fps"] * ours["passes_per_frame"]
                                                    / (theirs["fps"] * theirs["passes_per_frame"]))}),
        flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
