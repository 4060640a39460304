"""Watch a trained world model: held-out rollouts beside the real game, as a GIF.

  python -m jaxai.world_model.rollout_gif --config=configs/world_model.py --workdir=DIR
      [--out=PATH.gif] [--episodes=4] [--context=16] [--horizon=16] [--num_steps=4] [--seed=0]

For ``--episodes`` held-out windows (each inside one episode, evenly spread over the split), the
model sees ``--context`` real frames and imagines ``--horizon`` more from the recorded actions
(``rollout.rollout``, K = ``--num_steps``); frames are encoded and decoded each on its own. Writes
an animated GIF (default ``DIR/rollout.gif``; one row per window, the real game left, the model
right with a red frame while it imagines, 4x nearest-neighbour upscaling) and prints one JSON line
with the PSNR of each imagined frame (mean over windows) and its mean. Flags left out take their
values from the config's ``rollout`` section.
"""
import json
import os

import numpy as np
from absl import flags

from jaxai import cli, config_lib


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A run trained with --config.stage=all (or both stages).")
  flags.DEFINE_string("out", None, "GIF to write; default WORKDIR/rollout.gif.")
  flags.DEFINE_integer("episodes", 4, "Held-out windows in the GIF.")
  flags.DEFINE_integer("context", None, "Real frames before imagining; default rollout.context_frames.")
  flags.DEFINE_integer("horizon", None, "Imagined frames; default rollout.horizon.")
  flags.DEFINE_integer("num_steps", None, "Denoising steps K per frame; default rollout.num_steps.")
  flags.DEFINE_integer("seed", 0, "Noise of the rollouts.")


def imagine_windows(models, windows: list[dict], *, context: int, num_steps: int, context_signal: float,
                    seed: int) -> np.ndarray:
  """uint8 [n, horizon, H, W, C]: each of n windows' frames after ``context``, imagined from its actions."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import dynamics as dynamics_lib  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import realtime, rollout  # pylint: disable=g-import-not-at-top
  tokenizer, tokenizer_params, dynamics, dynamics_params = models
  real = np.stack([w["frames"][:context] for w in windows])  # [n, context, H, W, C]
  n, frame_shape = len(windows), real.shape[2:]
  latents = realtime.encode_frames(tokenizer, tokenizer_params, real.reshape(n * context, *frame_shape))
  actions, labelled = dynamics_lib.actions_into_frames(np.stack([w["actions"] for w in windows]),
                                                       np.stack([w["is_first"] for w in windows]))
  imagined = rollout.rollout(dynamics, dynamics_params, latents.reshape(n, context, *latents.shape[1:]),
                             actions, jax.random.key(seed), num_steps=num_steps,
                             context_signal=context_signal, action_mask=labelled)
  pixels = realtime.decode_frames(tokenizer, tokenizer_params, imagined.reshape(-1, *imagined.shape[2:]))
  return np.asarray(pixels).reshape(n, -1, *frame_shape)


def rollout_gif(config, models, *, out: str, episodes: int, context: int, horizon: int, num_steps: int,
                seed: int) -> dict:
  """Writes the GIF and returns the JSON record (per-frame PSNR, mean over windows)."""
  from jaxai.world_model import data, images, rollout_eval  # pylint: disable=g-import-not-at-top
  windows = data.heldout_windows(config, episodes, context + horizon)
  imagined = imagine_windows(models, windows, context=context, num_steps=num_steps,
                             context_signal=config.rollout.context_signal, seed=seed)
  real = np.stack([w["frames"] for w in windows])
  psnr = rollout_eval.frame_psnr(imagined / 255.0, real[:, context:]).mean(axis=0)
  images.write_gif(out, images.side_by_side_frames(real, imagined))
  return {"psnr_per_frame": [round(float(p), 3) for p in psnr], "psnr_mean": round(float(psnr.mean()), 3),
          "windows": len(windows), "context": context, "horizon": horizon, "num_steps": num_steps,
          "gif": out}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", workdir="a trained world model")
  r = config.rollout
  options = {"context": r.context_frames if args.context is None else args.context,
             "horizon": r.horizon if args.horizon is None else args.horizon,
             "num_steps": r.num_steps if args.num_steps is None else args.num_steps}
  from jaxai import checkpointing  # pylint: disable=g-import-not-at-top
  from jaxai.craftax import dataset as craftax_dataset  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import dynamics_stage, models  # pylint: disable=g-import-not-at-top
  try:
    config_lib.check(min(options["context"], options["horizon"], args.episodes) >= 1, "context",
                     "--context, --horizon and --episodes must be positive")
    models.check_num_steps("num_steps", options["num_steps"], config.dynamics.k_max)
    window = config.dynamics.window_len
    config_lib.check(options["context"] + options["horizon"] <= window, "horizon",
                     f"context + horizon = {options['context']} + {options['horizon']} exceeds the trained "
                     f"window_len={window} (play past it with python -m jaxai.world_model.play)")
    world_model = dynamics_stage.load_world_model(config, args.workdir)
    out = args.out or os.path.join(args.workdir, "rollout.gif")
    record = rollout_gif(config, world_model, out=out, episodes=args.episodes, seed=args.seed, **options)
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the world model first: python -m jaxai.main "
             f"--config=... --config.stage=all --workdir={args.workdir})")
  except craftax_dataset.DatasetError as e:
    cli.fail("config error", f"data.dir: {e}")
  except OSError as e:  # the GIF cannot be written
    cli.fail("error", str(e))
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
