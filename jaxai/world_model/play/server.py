"""The interactive page's server: key presses in, imagined Craftax frames out (``realtime.ImaginedWorld``).

Routes: GET / (``page.html``, with the key map filled in), GET /frame (the current frame), POST
/step with {"action": int} and POST /reset (a new context): both answer the new frame as
image/png, with the server's time for it in X-Step-Ms.
"""
import http.server
import json
import os
import threading
import time

import numpy as np

from jaxai.craftax import env as craftax_env
from jaxai.world_model import images, realtime

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# Keyboard key (JavaScript KeyboardEvent.key) -> Craftax action name.
KEY_ACTIONS = {
    "ArrowLeft": "left", "a": "left", "ArrowRight": "right", "d": "right",
    "ArrowUp": "up", "w": "up", "ArrowDown": "down", "s": "down",
    " ": "do", "Tab": "sleep", "n": "noop",
    "1": "place_stone", "2": "place_table", "3": "place_furnace", "4": "place_plant",
    "5": "make_wood_pickaxe", "6": "make_stone_pickaxe", "7": "make_iron_pickaxe",
    "8": "make_wood_sword", "9": "make_stone_sword", "0": "make_iron_sword",
}


def key_map() -> dict[str, int]:
  """Keyboard key -> Craftax action index."""
  return {key: craftax_env.ACTIONS.index(name) for key, name in KEY_ACTIONS.items()}


def page() -> bytes:
  with open(PAGE, encoding="utf-8") as f:
    text = f.read()
  return (text.replace("__KEYS__", json.dumps(key_map()))
          .replace("__ACTIONS__", json.dumps(list(craftax_env.ACTIONS))).encode())


def make_server(world: realtime.ImaginedWorld, next_context, *, host: str = "127.0.0.1", port: int = 8000,
                seed: int = 0) -> http.server.ThreadingHTTPServer:
  """A server (not yet serving) for the interactive page; starts ``world`` from ``next_context()``.

  next_context() -> (uint8 frames [T, H, W, C], int actions [T], dataset convention).
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
  body_of_page = page()

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
        self._send(200, body_of_page, "text/html; charset=utf-8")
      elif self.path.startswith("/frame"):
        with lock:
          self._send(200, images.png_bytes(state["frame"]), "image/png")
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
        self._send(200, images.png_bytes(state["frame"]), "image/png", [("X-Step-Ms", f"{ms:.1f}")])

  return http.server.ThreadingHTTPServer((host, port), Handler)


def heldout_contexts(split, length: int, seed: int):
  """next_context() for ``make_server``: a random held-out window of ``length`` steps each call."""
  from jaxai.craftax import dataset as craftax_dataset  # pylint: disable=g-import-not-at-top
  starts = craftax_dataset.window_starts(split.episode_offsets, length)
  if not len(starts):
    raise ValueError(f"context: no held-out episode has {length} steps")
  rng = np.random.default_rng(seed)

  def next_context():
    steps = split.read_steps(int(rng.choice(starts)), length)
    return steps["frames"], steps["actions"]

  return next_context
