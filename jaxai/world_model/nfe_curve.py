"""Quality against the number of sampling steps K on long generations: the paper's NFE comparison
(shortcut forcing against diffusion forcing, the same objective otherwise) as JSON lines and a PNG.

  python -m jaxai.world_model.nfe_curve --config=configs/world_model.py --workdir=DIR [--workdir=DIR2]
      [--names=shortcut,no_shortcut] [--windows=64] [--context=16] [--horizon=64]
      [--num_steps=1,2,4,8,16,32,64] [--seeds=0,1,2] [--plot=PATH.png] [--gif=PATH.gif]

For each run (a ``--workdir``, trained with the dynamics stage) and each noise seed, ``--windows``
held-out windows (each inside one episode, evenly spread over the split): the model sees
``--context`` real frames (tokenizer latents) and imagines ``--horizon`` frames from the recorded
actions with K steps per frame, past the trained context length by sliding its window
(``rollout.rollout_windowed``). Each (run, K, seed) prints one JSON line of:

* ``frechet_latent_distance``: Frechet distance between the imagined and the real future frames'
  latents (one vector per frame, all horizons), and ``_late`` over the second half of the horizon;
* ``frechet_change_distance`` (and ``_late``): the same between the frame-to-frame changes;
* ``psnr`` of the decoded frames against the real ones, mean over horizons and at ``_h1``,
  ``_h4``, ``_h16``, ``_h64``;
* ``tiles_h<h>``: per-tile Craftax class agreement (``tile_classes``) of the decoded frames with the
  real ones at horizon h, and ``tiles_h<h>/<class>`` the recall of each class of the real frame;

and each run two baseline lines with the same PSNR and tile scores: ``repeat_last`` (the last
context frame's latents decoded, repeated) and ``tokenizer`` (the tokenizer's own reconstruction
of the real future, the ceiling of anything decoded by it). Then one ``summary`` line per (run, K)
with the mean and standard deviation over seeds and the ratio of each Frechet distance to the same
run's at the largest K (each model's own reference). ``--plot`` draws the Frechet distances, PSNR and
the tile agreement at the last horizon against K, one line per run; ``--gif`` writes the first
run's first windows at K = ``rollout.num_steps`` next to the real game.
"""
import json
import sys

import numpy as np
from absl import flags

from jaxai import cli, config_lib, host

HORIZONS = (1, 4, 16, 64)


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_multi_string("workdir", None, "Runs to compare (each trained with the dynamics stage).")
  flags.DEFINE_list("names", None, "A name per --workdir (default: the workdirs).")
  flags.DEFINE_integer("windows", 64, "Held-out windows per (run, K, seed).")
  flags.DEFINE_integer("context", 16, "Real frames before imagining (at most dynamics.window_len - 1).")
  flags.DEFINE_integer("horizon", 64, "Imagined frames per window.")
  flags.DEFINE_list("num_steps", ["1", "2", "4", "8", "16", "32", "64"], "Values of K.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Noise seeds.")
  flags.DEFINE_string("plot", None, "PNG to draw the curves into.")
  flags.DEFINE_string("gif", None, "GIF of the first run's first 4 windows at K = rollout.num_steps.")


def decoder(tokenizer, params, chunk: int = 512):
  """latents [W, T, L, C] -> uint8 frames [W, T, H, W, C], each frame decoded on its own."""
  from jaxai.world_model import realtime  # pylint: disable=g-import-not-at-top

  def decode(latents):
    latents = np.asarray(latents, np.float32)
    flat = latents.reshape(-1, *latents.shape[2:])
    out = [np.asarray(realtime.decode_frames(tokenizer, params, flat[i:i + chunk]))
           for i in range(0, len(flat), chunk)]
    return np.concatenate(out).reshape(*latents.shape[:2], *out[0].shape[1:])

  return decode


def frame_scores(decoded: np.ndarray, real: np.ndarray) -> dict:
  """PSNR and tile agreement of decoded frames [W, T, H, W, C] (uint8) against the real ones."""
  from jaxai.world_model import rollout_eval, tile_classes  # pylint: disable=g-import-not-at-top
  psnr = rollout_eval.frame_psnr(decoded / 255.0, real).mean(axis=0)  # [T]
  out = {"psnr": float(psnr.mean())}
  for h in HORIZONS:
    if h <= len(psnr):
      out[f"psnr_h{h}"] = float(psnr[h - 1])
      agreement = tile_classes.tile_agreement(decoded[:, h - 1], real[:, h - 1])
      out[f"tiles_h{h}"] = agreement["overall"]
      for name in tile_classes.REPORTED_CLASSES:
        value = agreement.get(name)
        if value is not None and np.isfinite(value):
          out[f"tiles_h{h}/{name}"] = float(value)
  return out


def latent_scores(imagined: np.ndarray, future: np.ndarray, last_context: np.ndarray) -> dict:
  """Frechet latent and change distances, over all horizons and over the second half."""
  from jaxai.world_model import rollout_eval  # pylint: disable=g-import-not-at-top
  late = imagined.shape[1] // 2
  changes = rollout_eval.frame_changes(last_context, imagined)
  real_changes = rollout_eval.frame_changes(last_context, future)
  return {"frechet_latent_distance": rollout_eval.latent_frechet(imagined, future),
          "frechet_latent_distance_late": rollout_eval.latent_frechet(imagined[:, late:], future[:, late:]),
          "frechet_change_distance": rollout_eval.latent_frechet(changes, real_changes),
          "frechet_change_distance_late": rollout_eval.latent_frechet(changes[:, late:], real_changes[:, late:])}


def heldout_long_windows(config, workdir: str, tokenizer, *, windows: int, length: int) -> dict:
  """The latents, frames and actions (into frames) of ``windows`` held-out windows of ``length``."""
  from jaxai.craftax import dataset as craftax_dataset  # pylint: disable=g-import-not-at-top
  from jaxai.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import data, dynamics_stage  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import dynamics as dynamics_lib  # pylint: disable=g-import-not-at-top
  heldout = dynamics_stage.load_latents(config, workdir, "heldout", tokenizer, max_episodes=0)
  split = data.load_split(config, "heldout")
  starts = craftax_dataset.window_starts(heldout.episode_offsets, length)
  config_lib.check(len(starts) >= windows, "windows", f"the held-out split has {len(starts)} windows "
                   f"of {length} frames, fewer than {windows}")
  starts = starts[pipeline.evenly_spaced(len(starts), windows)]
  actions, labelled = dynamics_lib.actions_into_frames(
      np.stack([heldout.actions[s:s + length] for s in starts]),
      np.stack([heldout.is_first[s:s + length] for s in starts]))
  return {"latents": np.stack([heldout.latents[s:s + length] for s in starts]).astype(np.float32),
          "frames": np.stack([split.read_steps(int(s), length)["frames"] for s in starts]),
          "actions": np.asarray(actions), "labelled": np.asarray(labelled)}


def evaluate_run(config, workdir: str, name: str, *, windows: int, context: int, horizon: int,
                 num_steps: list[int], seeds: list[int], emit) -> dict:
  """Emits the JSON lines of one run; returns {K: [per-seed metrics]} and the GIF's inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import dynamics_stage, models, rollout  # pylint: disable=g-import-not-at-top
  run = dynamics_stage.load_run(models.rollout_config(config), workdir)
  c, window_len = run.dynamics.config, run.config.dynamics.window_len
  config_lib.check(1 <= context < window_len, "context", f"must be in [1, dynamics.window_len={window_len})")
  for k in num_steps:
    models.check_num_steps("num_steps", k, c.k_max)
  w = heldout_long_windows(run.config, workdir, run.tokenizer, windows=windows, length=context + horizon)
  decode = decoder(run.tokenizer.model, run.tokenizer.params)
  future_latents, real = w["latents"][:, context:], w["frames"][:, context:]
  last_context = w["latents"][:, context - 1]
  base = {"run": name, "workdir": workdir, "step": run.step, "windows": windows, "context": context,
          "horizon": horizon, "host": host.summary()}
  repeated = lambda x: np.repeat(x, horizon, axis=1)
  emit({**base, "baseline": "repeat_last",
        **frame_scores(repeated(decode(last_context[:, None])), real),
        **latent_scores(repeated(last_context[:, None]), future_latents, last_context)})
  emit({**base, "baseline": "tokenizer", **frame_scores(decode(future_latents), real)})
  results, first = {}, None
  for seed in seeds:
    for k in num_steps:
      imagined = np.asarray(rollout.rollout_windowed(
          run.dynamics, run.params, w["latents"][:, :context], w["actions"], jax.random.key(seed),
          window_frames=window_len, num_steps=k, context_signal=run.config.rollout.context_signal,
          action_mask=w["labelled"]))
      decoded = decode(imagined)
      record = {"num_steps": k, "seed": seed, **latent_scores(imagined, future_latents, last_context),
                **frame_scores(decoded, real)}
      emit({**base, **record})
      results.setdefault(k, []).append(record)
      if first is None and k == run.config.rollout.num_steps:
        first = (w["frames"], decoded)
  return {"results": results, "gif": first}


def summaries(name: str, results: dict) -> list[dict]:
  """Per K: mean and sd over seeds, and each Frechet distance over the largest K's (both means)."""
  reference_k = max(results)
  out = []
  for k, records in sorted(results.items()):
    line = {"run": name, "summary": True, "num_steps": k, "seeds": len(records)}
    for key in records[0]:
      if key in ("num_steps", "seed"):
        continue
      values = np.array([r[key] for r in records if key in r], np.float64)
      line[f"{key}_mean"], line[f"{key}_sd"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)
      if key.startswith("frechet"):
        line[f"{key}_over_k{reference_k}"] = float(values.mean() / np.mean([r[key] for r in results[reference_k]]))
    out.append(line)
  return out


def plot(path: str, runs: dict, horizon: int) -> None:
  """Frechet latent / change distance (late), PSNR and tile agreement at the last horizon against K."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  last = max(h for h in HORIZONS if h <= horizon)
  panels = (("frechet_latent_distance_late", "Frechet latent distance (2nd half)"),
            ("frechet_change_distance_late", "Frechet change distance (2nd half)"),
            ("psnr", "PSNR (dB), all horizons"), (f"tiles_h{last}", f"tile agreement at horizon {last}"))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  for ax, (key, title) in zip(axes, panels):
    for name, lines in runs.items():
      ks = [s["num_steps"] for s in lines]
      ax.errorbar(ks, [s[f"{key}_mean"] for s in lines], yerr=[s[f"{key}_sd"] for s in lines], marker="o",
                  capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (sampling steps per frame)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", at_least_one=("windows", "context", "horizon"))
  if not args.workdir:
    cli.fail("config error", "--workdir: give at least one trained run")
  names = args.names or args.workdir
  if len(names) != len(args.workdir):
    cli.fail("config error", f"--names: {len(names)} names for {len(args.workdir)} workdirs")
  from jaxai.world_model import app_errors  # pylint: disable=g-import-not-at-top
  stdout = sys.stdout  # the JSON lines' stream: one_line_errors sends other prints to stderr
  emit = lambda record: print(json.dumps(record), file=stdout, flush=True)
  runs, gif = {}, None
  with app_errors.one_line_errors():
    for workdir, name in zip(args.workdir, names):
      out = evaluate_run(config, workdir, name, windows=args.windows, context=args.context,
                         horizon=args.horizon, num_steps=[int(k) for k in args.num_steps],
                         seeds=[int(s) for s in args.seeds], emit=emit)
      runs[name] = summaries(name, out["results"])
      for line in runs[name]:
        emit(line)
      gif = gif or out["gif"]
  if args.plot:
    plot(args.plot, runs, args.horizon)
    print(f"wrote {args.plot}", file=sys.stderr)
  if args.gif and gif is not None:
    from jaxai.world_model import images  # pylint: disable=g-import-not-at-top
    frames, decoded = gif
    images.write_gif(args.gif, images.side_by_side_frames(frames[:4], decoded[:4]))
    print(f"wrote {args.gif}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
