"""The interactive page's server: key presses in, imagined Craftax frames out (``realtime.ImaginedWorld``).

Routes: GET / (``page.html``, with the key map filled in), GET /frame (the current frame), POST
/step with {"action": int} and POST /reset (a new context): both answer the new frame as
image/png, with the server's time for it in X-Step-Ms.

With an agent (``AgentWatch``), two more: POST /agent/imagined (the agent picks the action on the
current imagined frame and the world takes it) and POST /agent/real (the agent plays one step of
the real game, a world of its own; ``{"reset": true}`` starts its next episode). Both answer the
new frame, with the action's name in X-Action; the real game adds X-Reward, X-Return, X-Step
(frames into the episode), X-Episode, X-World-Seed and X-Done (the episode ended; the next
request starts the next one).
"""
import http.server
import json
import os
import threading
import time

import numpy as np

from jaxai.craftax import env as craftax_env
from jaxai.craftax import evaluation
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


def page(with_agent: bool = False) -> bytes:
  with open(PAGE, encoding="utf-8") as f:
    text = f.read()
  return (text.replace("__KEYS__", json.dumps(key_map()))
          .replace("__ACTIONS__", json.dumps(list(craftax_env.ACTIONS)))
          .replace("__AGENT__", json.dumps(with_agent)).encode())


class AgentWatch:
  """An agent watched on the page, in the imagined world and in the real game.

  ``imagined`` and ``real`` are two one-slot agents (``agent_player.AgentPlayer``, or any
  ``evaluation.Policy`` on one slot), each keeping its own context. The agent in the imagined world
  starts its context afresh whenever the person played in between (it sees the imagined frames,
  not the held-out context they started from). The real game plays the evaluation worlds in
  order (``evaluation.world_seeds``), so its episode i is ``evaluate_agent``'s episode i, until
  ``max_episode_len`` frames or the end of the game.
  """

  def __init__(self, imagined, real, *, max_episode_len: int = 10_000):
    self.imagined, self.real, self.max_episode_len = imagined, real, max_episode_len
    self.game = craftax_env.ParallelCraftax(1)
    self.imagined_in_sync = False
    self.episode = -1
    self.start_episode()

  def start_episode(self) -> None:
    self.episode += 1
    self.world_seed = int(evaluation.world_seeds(self.episode + 1)[self.episode])
    self.frame, view = self.game.reset_slot(0, self.world_seed)
    self.real.reset(np.zeros(1, np.int64), np.asarray([self.world_seed]))
    self._view, self.steps, self.episode_return, self.done = view, 0, 0.0, False

  def imagined_step(self, world: realtime.ImaginedWorld, frame: np.ndarray) -> tuple[np.ndarray, int]:
    """The agent's action on the imagined ``frame``, and the frame the world answers it with."""
    if not self.imagined_in_sync:
      self.imagined.reset(np.zeros(1, np.int64), np.asarray([0]))
      self.imagined_in_sync = True
    action = int(self.imagined.act(np.asarray(frame)[None], None, np.ones(1, bool))[0])
    return world.step(action), action

  def real_step(self, next_episode: bool = False) -> tuple[np.ndarray, int, float]:
    """One step of the real game, in a new episode first if the last one ended or ``next_episode``
    asks for it: (frame, action, reward)."""
    if self.done or next_episode:
      self.start_episode()
    action = int(self.real.act(self.frame[None], self._view, np.ones(1, bool))[0])
    frames, rewards, terminals, self._view = self.game.step(np.asarray([action]))
    self.frame, self.steps = frames[0], self.steps + 1
    self.episode_return += float(rewards[0])
    self.done = bool(terminals[0]) or self.steps >= self.max_episode_len
    return self.frame, action, float(rewards[0])


def make_server(world: realtime.ImaginedWorld, next_context, *, agent: AgentWatch | None = None,
                host: str = "127.0.0.1", port: int = 8000, seed: int = 0) -> http.server.ThreadingHTTPServer:
  """A server (not yet serving) for the interactive page; starts ``world`` from ``next_context()``.

  next_context() -> (uint8 frames [T, H, W, C], int actions [T], dataset convention). With
  ``agent`` the page gains the agent's two modes.
  """
  lock = threading.Lock()  # one world, played by one request at a time
  state = {"resets": 0}

  def reset():
    frames, actions = next_context()
    world.start(frames, actions, seed=seed + state["resets"])
    state["resets"] += 1
    state["frame"] = np.asarray(frames[-1])
    if agent is not None:
      agent.imagined_in_sync = False

  reset()
  world.step(0)  # compiles the step before the first key press, then starts afresh
  reset()
  body_of_page = page(agent is not None)

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

    def _agent_post(self, body: bytes):
      start = time.perf_counter()
      if self.path == "/agent/imagined":
        state["frame"], action = agent.imagined_step(world, state["frame"])
        frame, headers = state["frame"], []
      else:
        try:
          next_episode = bool(json.loads(body or b"{}").get("reset"))
        except (ValueError, AttributeError):
          self._send(400, b'the body must be a JSON object such as {"reset": true}', "text/plain")
          return
        frame, action, reward = agent.real_step(next_episode)
        headers = [("X-Reward", f"{reward:g}"), ("X-Return", f"{agent.episode_return:g}"),
                   ("X-Step", str(agent.steps)), ("X-Episode", str(agent.episode)),
                   ("X-World-Seed", str(agent.world_seed)), ("X-Done", str(agent.done).lower())]
      ms = (time.perf_counter() - start) * 1e3
      self._send(200, images.png_bytes(frame), "image/png",
                 [("X-Step-Ms", f"{ms:.1f}"), ("X-Action", craftax_env.ACTIONS[action]), *headers])

    def do_POST(self):  # pylint: disable=invalid-name
      body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
      if self.path in ("/agent/imagined", "/agent/real"):
        if agent is None:
          self._send(404, b"no agent: start the page with --agent=agent or --agent=imagination", "text/plain")
          return
        with lock:
          self._agent_post(body)
        return
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
          if agent is not None:
            agent.imagined_in_sync = False  # the person played: the agent's context missed frames
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
