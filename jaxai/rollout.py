"""Watch or play a trained world model: held-out rollouts as a GIF, or the imagined game in a browser.

  python -m jaxai.rollout --config=configs/world_model.py --workdir=DIR [--out=PATH.gif]
      [--episodes=4] [--context=16] [--horizon=16] [--num_steps=4]

For ``--episodes`` held-out windows (each inside one episode, evenly spread over the split), the
model sees ``--context`` real frames and imagines ``--horizon`` more from the recorded actions
(``rollout.rollout``, K = ``--num_steps``); frames are encoded and decoded each on its own. Writes
an animated GIF (default ``DIR/rollout.gif``; one row per window, the real game left, the model
right with a red frame while it imagines, 4x nearest-neighbour upscaling) and prints one JSON line
with the PSNR of each imagined frame (mean over windows) and its mean.

  python -m jaxai.rollout --config=configs/world_model.py --workdir=DIR --evaluate [--seed=N]
      [--config.rollout.eval_windows=128]

prints, as one JSON line, the held-out evaluation the training run logs (``rollout_eval``: rollout
PSNR against its baselines, the Frechet latent distance, action top-1) of the run's latest
checkpoint, computed as in training (``compute_dtype``); ``--seed`` changes the rollout noise
(default: the one training used at that step). Use it to evaluate on more windows than training
affords, or with other noise.

  python -m jaxai.rollout --config=configs/world_model.py --workdir=DIR --interactive [--port=8000]

serves a page on http://127.0.0.1:PORT/ on which a person plays the imagined world with the
keyboard, starting from a random held-out context: each key press POSTs the action to ``/step``
and gets the next imagined frame back as a PNG (``realtime.ImaginedWorld``, sliding window past
``dynamics.window_len`` frames). Flags left out take their values from the config's ``rollout``
section. Errors end the run with one line, ``config error: ...`` or ``checkpoint error: ...``, and
exit code 2.
"""
import contextlib
import http.server
import io
import json
import logging
import os
import sys
import threading
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxai import checkpointing, config_lib
from jaxai.craftax import dataset as craftax_dataset
from jaxai.craftax import env as craftax_env
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import dynamics_stage, realtime, rollout_eval
from jaxai.world_model import rollout as rollout_lib

SCALE = 4  # GIF upscaling
# Keyboard key (JavaScript KeyboardEvent.key) -> Craftax action name.
KEY_ACTIONS = {
    "ArrowLeft": "left", "a": "left", "ArrowRight": "right", "d": "right",
    "ArrowUp": "up", "w": "up", "ArrowDown": "down", "s": "down",
    " ": "do", "Tab": "sleep", "n": "noop",
    "1": "place_stone", "2": "place_table", "3": "place_furnace", "4": "place_plant",
    "5": "make_wood_pickaxe", "6": "make_stone_pickaxe", "7": "make_iron_pickaxe",
    "8": "make_wood_sword", "9": "make_stone_sword", "0": "make_iron_sword",
}


class UsageError(ValueError):
  """A flag or config value that cannot work: ``field: reason``."""


# --- held-out rollouts ----------------------------------------------------------------------------

def heldout_windows(config, count: int, length: int) -> list[dict]:
  """``count`` windows of ``length`` recorded steps, each inside one held-out episode, evenly spread."""
  split = craftax_dataset.load(config.data.dir, "heldout", variant=config.data.variant)
  starts = craftax_dataset.window_starts(split.episode_offsets, length)
  if not len(starts):
    raise UsageError(f"context: no held-out episode has context + horizon = {length} steps")
  chosen = starts[np.unique(np.linspace(0, len(starts) - 1, min(count, len(starts))).astype(int))]
  return [split.read_steps(int(s), length) for s in chosen]


def imagine_windows(models, windows: list[dict], *, context: int, num_steps: int, context_signal: float,
                    seed: int) -> np.ndarray:
  """uint8 [n, horizon, H, W, C]: each of n windows' frames after ``context``, imagined from its actions."""
  tokenizer, tokenizer_params, dynamics, dynamics_params = models
  real = np.stack([w["frames"][:context] for w in windows])  # [n, context, H, W, C]
  n, frame_shape = len(windows), real.shape[2:]
  latents = realtime.encode_frames(tokenizer, tokenizer_params, real.reshape(n * context, *frame_shape))
  actions, labelled = dynamics_lib.actions_into_frames(np.stack([w["actions"] for w in windows]),
                                                       np.stack([w["is_first"] for w in windows]))
  imagined = rollout_lib.rollout(dynamics, dynamics_params, latents.reshape(n, context, *latents.shape[1:]),
                                 actions, jax.random.key(seed), num_steps=num_steps,
                                 context_signal=context_signal, action_mask=labelled)
  pixels = realtime.decode_frames(tokenizer, tokenizer_params, imagined.reshape(-1, *imagined.shape[2:]))
  return np.asarray(pixels).reshape(n, -1, *frame_shape)


def side_by_side_frames(real: np.ndarray, imagined: np.ndarray, *, scale: int = SCALE, gap: int = 2) -> list:
  """GIF frames: per window a row, real game left, the model right (real context, then imagined).

  real: uint8 [n, T, H, W, C]; imagined: [n, horizon, H, W, C], the last frames of each window.
  The model's panel has a gray border over the context and a red one while it imagines.
  """
  n, t, h, w, c = real.shape
  context = t - imagined.shape[1]
  border = 1
  ph, pw = h + 2 * border, w + 2 * border
  out = []
  for i in range(t):
    canvas = np.full((n * (ph + gap) + gap, 2 * (pw + gap) + gap, c), 255, np.uint8)
    for k in range(n):
      y = gap + k * (ph + gap)
      model_frame = real[k, i] if i < context else imagined[k, i - context]
      colour = (128, 128, 128) if i < context else (220, 30, 30)
      for j, image in enumerate((real[k, i], model_frame)):
        x = gap + j * (pw + gap)
        if j == 1:
          canvas[y:y + ph, x:x + pw] = colour
        canvas[y + border:y + border + h, x + border:x + border + w] = image
    out.append(canvas.repeat(scale, axis=0).repeat(scale, axis=1))
  return out


def write_gif(path: str, frames: list, *, frame_ms: int = 250) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def rollout_gif(config, models, *, out: str, episodes: int, context: int, horizon: int, num_steps: int,
                seed: int) -> dict:
  """Writes the GIF and returns the JSON record (per-frame PSNR, mean over windows)."""
  windows = heldout_windows(config, episodes, context + horizon)
  imagined = imagine_windows(models, windows, context=context, num_steps=num_steps,
                             context_signal=config.rollout.context_signal, seed=seed)
  real = np.stack([w["frames"] for w in windows])
  psnr = rollout_eval.frame_psnr(imagined / 255.0, real[:, context:]).mean(axis=0)
  write_gif(out, side_by_side_frames(real, imagined))
  return {"psnr_per_frame": [round(float(p), 3) for p in psnr], "psnr_mean": round(float(psnr.mean()), 3),
          "windows": len(windows), "context": context, "horizon": horizon, "num_steps": num_steps,
          "gif": out}


def evaluate_run(config, workdir: str, *, seed: int | None = None) -> dict:
  """The held-out evaluation (``dynamics_stage.heldout_evaluator``) of the latest dynamics checkpoint
  in ``workdir``, in the compute dtype training evaluates in; strips go to ``workdir/evaluate``."""
  run = dynamics_stage.load_run(config, workdir)
  evaluate = dynamics_stage.heldout_evaluator(run.config, workdir, run.dynamics, run.tokenizer,
                                              run.tokenizer_step, run.tokenizer_params,
                                              out_dir=os.path.join(workdir, "evaluate"))
  return {"step": run.step, "eval_windows": run.config.rollout.eval_windows, "seed": seed,
          **evaluate(run.params, run.step, seed=seed)}


# --- interactive play -----------------------------------------------------------------------------

def key_map() -> dict[str, int]:
  """Keyboard key -> Craftax action index."""
  return {key: craftax_env.ACTIONS.index(name) for key, name in KEY_ACTIONS.items()}


def png_bytes(frame: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="PNG")
  return buffer.getvalue()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Imagined Craftax</title>
<style>
 body { font-family: sans-serif; display: flex; gap: 2em; margin: 2em; }
 img { width: 504px; height: 504px; image-rendering: pixelated; border: 1px solid #888; }
 table { border-collapse: collapse; } td { padding: 1px 8px; } kbd { font-weight: bold; }
</style></head>
<body>
<div><img id="frame" src="/frame"><p id="stats">press a key</p></div>
<div><h3>Keys</h3><table id="keys"></table><p><kbd>r</kbd>: new held-out context</p></div>
<script>
const KEYS = __KEYS__, ACTIONS = __ACTIONS__;
const names = {" ": "space"};
for (const [key, action] of Object.entries(KEYS))
  document.getElementById("keys").insertAdjacentHTML("beforeend",
    `<tr><td><kbd>${names[key] || key}</kbd></td><td>${ACTIONS[action]}</td></tr>`);
let busy = false, queued = null, times = [], steps = 0;
async function send(path, body) {
  if (busy) { queued = [path, body]; return; }
  busy = true;
  const start = performance.now();
  const response = await fetch(path, {method: "POST", body: JSON.stringify(body)});
  if (response.ok) {
    document.getElementById("frame").src = URL.createObjectURL(await response.blob());
    times.push(performance.now() - start); times = times.slice(-20);
    steps = path === "/reset" ? 0 : steps + 1;
    const mean = times.reduce((a, b) => a + b) / times.length;
    document.getElementById("stats").textContent =
      `step ${steps}` + (body ? `, ${ACTIONS[body.action]}` : ", context") +
      ` | ${(1000 / mean).toFixed(1)} fps round trip | model ${response.headers.get("X-Step-Ms")} ms/frame`;
  } else {
    document.getElementById("stats").textContent = await response.text();
  }
  busy = false;
  if (queued) { const next = queued; queued = null; send(...next); }
}
document.addEventListener("keydown", (e) => {
  if (e.key in KEYS) { e.preventDefault(); send("/step", {action: KEYS[e.key]}); }
  else if (e.key === "r") { send("/reset", null); }
});
</script></body></html>
"""


def make_server(world: realtime.ImaginedWorld, next_context, *, host: str = "127.0.0.1", port: int = 8000,
                seed: int = 0) -> http.server.ThreadingHTTPServer:
  """A server (not yet serving) for the interactive page; starts ``world`` from ``next_context()``.

  next_context() -> (uint8 frames [T, H, W, C], int actions [T], dataset convention). Routes:
  GET / (the page), GET /frame (the current frame), POST /step with {"action": int} and POST
  /reset (a new context): both answer the new frame as image/png, X-Step-Ms the server's time.
  """
  lock = threading.Lock()  # one world, played by one request at a time
  state = {"resets": 0}

  def reset():
    frames, actions = next_context()
    world.start(frames, actions, seed=seed + state["resets"])
    state["resets"] += 1
    state["frame"] = np.asarray(frames[-1])

  reset()
  world.step(0)  # compiles the step before the first key press, then starts afresh
  reset()
  page = (PAGE.replace("__KEYS__", json.dumps(key_map()))
          .replace("__ACTIONS__", json.dumps(list(craftax_env.ACTIONS))).encode())

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):  # no line per key press
      del args

    def _send(self, code: int, body: bytes, content_type: str, headers=()):
      self.send_response(code)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      for name, value in headers:
        self.send_header(name, value)
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):  # pylint: disable=invalid-name
      if self.path == "/":
        self._send(200, page, "text/html; charset=utf-8")
      elif self.path.startswith("/frame"):
        with lock:
          self._send(200, png_bytes(state["frame"]), "image/png")
      else:
        self._send(404, b"not found", "text/plain")

    def do_POST(self):  # pylint: disable=invalid-name
      body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
      if self.path not in ("/step", "/reset"):
        self._send(404, b"not found", "text/plain")
        return
      with lock:
        start = time.perf_counter()
        if self.path == "/reset":
          reset()
        else:
          try:
            action = int(json.loads(body)["action"])
          except (ValueError, KeyError, TypeError):
            action = -1
          if not 0 <= action < len(craftax_env.ACTIONS):
            message = f"action must be an int in [0, {len(craftax_env.ACTIONS)})"
            self._send(400, message.encode(), "text/plain")
            return
          state["frame"] = world.step(action)
        ms = (time.perf_counter() - start) * 1e3
        self._send(200, png_bytes(state["frame"]), "image/png", [("X-Step-Ms", f"{ms:.1f}")])

  return http.server.ThreadingHTTPServer((host, port), Handler)


def heldout_contexts(config, length: int, seed: int):
  """next_context() for ``make_server``: a random held-out window of ``length`` steps each call."""
  split = craftax_dataset.load(config.data.dir, "heldout", variant=config.data.variant)
  starts = craftax_dataset.window_starts(split.episode_offsets, length)
  if not len(starts):
    raise UsageError(f"context: no held-out episode has {length} steps")
  rng = np.random.default_rng(seed)

  def next_context():
    steps = split.read_steps(int(rng.choice(starts)), length)
    return steps["frames"], steps["actions"]

  return next_context


def serve(config, models, *, context: int, num_steps: int, host: str, port: int, seed: int) -> None:
  world = realtime.from_config(config, *models, num_steps=num_steps)
  server = make_server(world, heldout_contexts(config, context, seed), host=host, port=port, seed=seed)
  print(f"Playing the imagined world: open http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


# --- command line ---------------------------------------------------------------------------------

def define_flags():
  """Defined only when run as a program: jaxai.main, imported beside this module, has --config too."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/world_model.py.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "A run trained with --config.stage=all (or both stages).")
  flags.DEFINE_string("out", None, "GIF to write; default WORKDIR/rollout.gif.")
  flags.DEFINE_integer("episodes", 4, "Held-out windows in the GIF.")
  flags.DEFINE_integer("context", None, "Real frames before imagining; default rollout.context_frames.")
  flags.DEFINE_integer("horizon", None, "Imagined frames; default rollout.horizon.")
  flags.DEFINE_integer("num_steps", None, "Denoising steps K per frame; default rollout.num_steps.")
  flags.DEFINE_integer("seed", None, "Noise of the rollouts and choice of interactive contexts "
                       "(default 0; with --evaluate, the noise training used at that step).")
  flags.DEFINE_bool("interactive", False, "Serve a page to play the imagined world.")
  flags.DEFINE_bool("evaluate", False, "Print the held-out evaluation of the latest checkpoint.")
  flags.DEFINE_integer("port", 8000, "Port of the interactive page.")
  flags.DEFINE_string("host", "127.0.0.1", "Address the interactive page listens on.")


def _options(config, args) -> dict:
  """Context, horizon and K from the flags, or the config's ``rollout`` section where left out."""
  r = config.rollout
  pick = lambda value, default: default if value is None else value
  options = {"context": pick(args.context, r.context_frames), "horizon": pick(args.horizon, r.horizon),
             "num_steps": pick(args.num_steps, r.num_steps)}
  if config.data.source != "craftax":
    raise UsageError(f"data.source: rollouts replay recorded Craftax actions, need craftax, got "
                     f"{config.data.source!r}")
  if options["context"] < 1 or options["horizon"] < 1 or args.episodes < 1:
    raise UsageError("context: --context, --horizon and --episodes must be positive")
  k, k_max = options["num_steps"], config.dynamics.k_max
  if k & (k - 1) or not 1 <= k <= k_max:
    raise UsageError(f"num_steps: must be a power of two in [1, dynamics.k_max={k_max}], got {k}")
  if args.evaluate and args.interactive:
    raise UsageError("evaluate: --evaluate and --interactive are two different modes; pick one")
  if args.evaluate and config.rollout.eval_windows < 1:
    raise UsageError(f"rollout.eval_windows: must be positive, got {config.rollout.eval_windows}")
  window = config.dynamics.window_len
  if args.interactive:
    if options["context"] > window:
      raise UsageError(f"context: {options['context']} frames exceed the trained window_len={window}")
  elif options["context"] + options["horizon"] > window:
    raise UsageError(f"horizon: context + horizon = {options['context']} + {options['horizon']} exceeds "
                     f"the trained window_len={window} (use --interactive to play past it)")
  return options


def main(argv):
  del argv
  args = flags.FLAGS
  if not args["verbosity"].present:  # absl's INFO default floods stderr with orbax logs
    logging.getLogger("absl").setLevel(logging.WARNING)
  config = args.config
  if config is None:
    config_lib.fail("config error", "config: --config=configs/world_model.py[:variant] is required")
  if not args.workdir:
    config_lib.fail("config error", "workdir: --workdir=DIR (a trained world model) is required")
  try:
    options = _options(config, args)
  except UsageError as e:
    config_lib.fail("config error", str(e))
  if args.evaluate:
    try:
      with contextlib.redirect_stdout(sys.stderr):  # craftax prints while it loads its textures
        record = evaluate_run(config, args.workdir, seed=args.seed)
      print(json.dumps(record), flush=True)
    except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
      config_lib.fail("checkpoint error", f"{e} (train the world model first)")
    except craftax_dataset.DatasetError as e:
      config_lib.fail("config error", f"data.dir: {e}")
    return
  seed = 0 if args.seed is None else args.seed
  try:
    models = dynamics_stage.load_world_model(config, args.workdir)
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    config_lib.fail("checkpoint error", f"{e} (train the world model first: python -m jaxai.main "
         f"--config=... --config.stage=all --workdir={args.workdir})")
  try:
    if args.interactive:
      serve(config, models, context=options["context"], num_steps=options["num_steps"], host=args.host,
            port=args.port, seed=seed)
    else:
      out = args.out or os.path.join(args.workdir, "rollout.gif")
      print(json.dumps(rollout_gif(config, models, out=out, episodes=args.episodes, seed=seed,
                                   **options)), flush=True)
  except UsageError as e:
    config_lib.fail("config error", str(e))
  except craftax_dataset.DatasetError as e:
    config_lib.fail("config error", f"data.dir: {e}")
  except OSError as e:  # the port is taken, the GIF cannot be written
    config_lib.fail("error", str(e))


if __name__ == "__main__":
  define_flags()
  app.run(main)
