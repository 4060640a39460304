"""The PyTorch side of bench_vs_dreamer4: times the ``dreamer4`` package's DynamicsWorldModel.generate.

Run by ``python -m jaxai.world_model.bench_vs_dreamer4`` with the interpreter of a virtualenv that
holds torch and dreamer4 (a separate one: the PyPI torch wheels are large, and this side must not
import jax or jaxai). Standalone:

  /path/to/torchenv/bin/python jaxai/world_model/bench_dreamer4_torch.py --width=256 --layers=8 \
      --query_heads=4 --kv_heads=2 --head_dim=64 --latents=81 --latent_channels=8 \
      --spatial_tokens=27 --registers=4 --context=32 --frames=1,17 --num_steps=4 --runs=3

Prints one JSON line. ``generate`` is called for ``context + f`` frames for each f of --frames after
the same 32 prompt latents, so the difference of the two medians over the frames between them is
the cost of a frame once the context is in the cache (the prompt's encoding cancels out).
"""
import argparse
import json
import statistics
import time


def parser() -> argparse.ArgumentParser:
  """The flags bench_vs_dreamer4 sends (its test parses them with this)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in (("width", 256), ("layers", 8), ("query_heads", 4), ("kv_heads", 2), ("head_dim", 64),
                        ("latents", 81), ("latent_channels", 8), ("spatial_tokens", 27), ("registers", 4),
                        ("time_every", 4), ("k_max", 64), ("actions", 17), ("context", 32),
                        ("num_steps", 4), ("runs", 3), ("threads", 0), ("seed", 0)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--frames", default="1,17", help="Two frame counts to generate; the timing is their difference.")
  return p


def main():
  p = parser()
  args = p.parse_args()
  few, many = (int(f) for f in args.frames.split(","))
  if not 0 < few < many:
    p.error(f"--frames={args.frames}: need two counts 0 < a < b")

  import torch  # pylint: disable=import-outside-toplevel
  from dreamer4.dreamer4 import DynamicsWorldModel  # pylint: disable=import-outside-toplevel

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  # attn_heads are the KV heads; query_heads a multiple of them (grouped-query attention).
  model = DynamicsWorldModel(
      dim=args.width, dim_latent=args.latent_channels, num_latent_tokens=args.latents,
      num_spatial_tokens=args.spatial_tokens, num_register_tokens=args.registers, depth=args.layers,
      attn_heads=args.kv_heads, attn_kwargs=dict(query_heads=args.query_heads), attn_dim_head=args.head_dim,
      time_block_every=args.time_every, max_steps=args.k_max, num_discrete_actions=args.actions).eval()
  prompt = torch.randn(1, args.context, args.latents, args.latent_channels)
  actions = torch.randint(0, args.actions, (1, args.context + many, 1))

  def seconds(frames):
    start = time.perf_counter()
    model.generate(args.context + frames, num_steps=args.num_steps, prompt_latents=prompt,
                   prompt_discrete_actions=actions[:, :args.context + frames], store_agent_embed=False)
    return time.perf_counter() - start

  timed = {}
  with torch.inference_mode():
    for frames in (few, many):
      seconds(frames)  # warm-up
      timed[frames] = statistics.median(seconds(frames) for _ in range(args.runs))
  ms = (timed[many] - timed[few]) / (many - few) * 1e3
  print(json.dumps({
      "side": "pytorch dreamer4", "torch": torch.__version__, "threads": torch.get_num_threads(),
      "transformer_params": sum(p.numel() for p in model.transformer.parameters()),
      "ms_per_frame": round(ms, 3), "fps": round(1e3 / ms, 3),
      # generate's loop: num_steps denoising passes and one more on the clean frame for the time cache.
      "passes_per_frame": args.num_steps + 1,
      "generate_s": {str(k): round(v, 4) for k, v in timed.items()},
      "statistic": f"(median over {args.runs} generate calls of context + {many} frames - the same of "
                   f"context + {few}) / {many - few}"}), flush=True)


if __name__ == "__main__":
  main()
