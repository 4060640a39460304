"""Real-time play of the world model: the interactive world, its sliding window, the FPS benchmark,
the play server and the rollout GIF command, on tiny models.

The interactive world is checked against an independent reference: the library's tested
``rollout.rollout`` and the tokenizer's encode and decode, called directly.
"""
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from PIL import Image

from conftest import REPO_ROOT, config_of, subprocess_env
from jaxai import host
from jaxai.craftax import env as craftax_env
from jaxai.craftax import evaluation
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import realtime, rollout
from jaxai.world_model.play import server

FRAME = (63, 63, 3)



def _subprocess_env():
  return subprocess_env(devices=1)


@pytest.fixture(scope="module", name="models")
def fixture_models():
  return realtime.random_world_model(config_of("world_model", "tiny"))


def _context(seed, frames, actions):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (frames, *FRAME), np.uint8), rng.integers(0, 17, actions)


def test_steps_are_rollout_then_decode(models):
  tokenizer, tokenizer_params, dynamics, dynamics_params = models
  num_context, num_generate, num_steps, seed = 3, 3, 2, 5
  frames, dataset_actions = _context(0, num_context, num_context + num_generate)
  world = realtime.ImaginedWorld(*models, num_steps=num_steps, context_signal=0.9,
                                 max_context_frames=num_context + num_generate)  # no slide
  world.start(frames, dataset_actions[:num_context], seed=seed)
  # The action into generated frame t is the one taken after frame t - 1.
  got = np.stack([world.step(int(a)) for a in dataset_actions[num_context - 1:-1]])

  @jax.jit
  def reference(frames, dataset_actions):
    latents = tokenizer.apply({"params": tokenizer_params}, frames[:, None], method=tokenizer.encode)
    actions, labelled = dynamics_lib.actions_into_frames(dataset_actions[None],
                                                         np.zeros((1, len(dataset_actions)), bool))
    imagined = rollout.rollout(dynamics, dynamics_params, latents[:, 0][None], actions, jax.random.key(seed),
                               num_steps=num_steps, context_signal=0.9, action_mask=labelled)
    pixels = tokenizer.apply({"params": tokenizer_params}, imagined[0][:, None], method=tokenizer.decode)
    return jnp.round(jnp.clip(pixels[:, 0], 0.0, 1.0) * 255)

  want = np.asarray(reference(frames, dataset_actions))
  assert got.shape == (num_generate, *FRAME) and got.dtype == np.uint8
  # Equal up to a rounding flip (a cache of another length sums the same terms in another order).
  assert np.max(np.abs(got.astype(int) - want)) <= 1
  assert np.mean(got == want) > 0.99


def test_sliding_window_keeps_playing(models):
  world = realtime.ImaginedWorld(*models, num_steps=1, context_signal=0.9, max_context_frames=4)
  frames, actions = _context(1, 3, 3)
  world.start(frames, actions, seed=0)
  capacity = world.state["cache"]["layers"][0]["key"].shape[2]
  held = []
  for action in range(7):
    frame = world.step(action)
    assert frame.shape == FRAME and frame.dtype == np.uint8
    held.append(world.cached_frames)
    # Factorised: the index counts frames; the pending frame is not in the cache yet.
    assert int(world.state["cache"]["layers"][0]["index"]) + 1 == world.cached_frames <= capacity == 4
  # 3 context frames + 1 fills the cache; each later full cache restarts from the last 2 frames.
  assert held == [4, 3, 4, 3, 4, 3, 4]
  with pytest.raises(ValueError, match="max_context_frames"):
    world.start(*_context(2, 5, 5))


def test_fps_benchmark_prints_its_measurements(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "jaxai.world_model.bench_fps", "--config=configs/world_model.py:tiny",
       "--frames=2", "--context=3", "--rollout_frames=2", "--runs=1", "--warmup=1"],
      cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  records = {r["benchmark"]: r for r in map(json.loads, result.stdout.splitlines())}
  assert set(records) == {"interactive_fps", "kv_cache", "train_step_layout", "tokenizer_train_step"}
  for record in records.values():
    assert record["backend"] == "cpu" and record["num_steps"] == 4 and record["context"] == 3
    assert record["host_cpu"] == host.summary()
    assert record["dynamics"]["width"] == 32 and record["dynamics"]["layers"] == 2
    assert "random" in record["params"]
  positive = {"interactive_fps": ("fps", "ms_per_frame"),
              "kv_cache": ("cached_ms", "uncached_ms", "uncached_over_cached"),
              "train_step_layout": ("factorised_ms", "full_ms", "full_over_factorised"),
              "tokenizer_train_step": ("step_ms", "float32_ms", "float32_over_compute_dtype")}
  for name, keys in positive.items():
    for key in keys:
      assert records[name][key] > 0, (name, key)


def _post(url, body):
  request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
  with urllib.request.urlopen(request, timeout=120) as response:
    return response.read(), response.headers


def test_play_server_answers_key_presses_with_frames(models):
  assert sorted(set(server.key_map().values())) == list(range(len(craftax_env.ACTIONS)))
  world = realtime.ImaginedWorld(*models, num_steps=1, context_signal=0.9, max_context_frames=4)
  page = server.make_server(world, lambda: _context(3, 2, 2), port=portpicker.pick_unused_port())
  thread = threading.Thread(target=page.serve_forever, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{page.server_address[1]}"
  try:
    with urllib.request.urlopen(url + "/", timeout=60) as response:
      assert "make_iron_sword" in response.read().decode()
    for action in (3, 5, 0):
      body, headers = _post(url + "/step", {"action": action})
      assert headers["Content-Type"] == "image/png" and float(headers["X-Step-Ms"]) > 0
      image = Image.open(io.BytesIO(body))
      assert image.size == FRAME[:2] and image.mode == "RGB"
    body, _ = _post(url + "/reset", None)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), _context(3, 2, 2)[0][-1])
    with pytest.raises(urllib.error.HTTPError, match="400"):
      _post(url + "/step", {"action": 17})
    with pytest.raises(urllib.error.HTTPError, match="404"):  # no agent given
      _post(url + "/agent/real", {})
  finally:
    page.shutdown()
    page.server_close()


class _ScriptedAgent:
  """A one-slot stand-in for the agent: plays ``actions`` in turn, counting its resets."""

  def __init__(self, actions):
    self.actions, self.played, self.resets = list(actions), 0, []

  def reset(self, slots, world_seeds):
    self.resets.append((list(slots), list(world_seeds)))

  def act(self, frames, views, active):
    assert frames.shape == (1, *FRAME) and frames.dtype == np.uint8 and active.tolist() == [True]
    self.played += 1
    return np.asarray([self.actions[(self.played - 1) % len(self.actions)]])


def test_play_server_agent_modes_play_the_imagined_world_and_the_real_game(models):
  """The agent's imagined world answers its actions as the same world played by hand does; its real
  game is the first evaluation world stepped with its actions, with its rewards summed."""
  world = realtime.ImaginedWorld(*models, num_steps=1, context_signal=0.9, max_context_frames=4)
  twin = realtime.ImaginedWorld(*models, num_steps=1, context_signal=0.9, max_context_frames=4)
  imagined, real = _ScriptedAgent([5, 1]), _ScriptedAgent([5, 2, 3])  # do, left; do, right, up
  agent = server.AgentWatch(imagined, real)
  page = server.make_server(world, lambda: _context(3, 2, 2), agent=agent, port=portpicker.pick_unused_port())
  thread = threading.Thread(target=page.serve_forever, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{page.server_address[1]}"
  frames, actions = _context(3, 2, 2)
  twin.start(frames, actions, seed=1)  # the server's second start (the first compiled its step)
  seed = int(evaluation.world_seeds(1)[0])
  game = craftax_env.ParallelCraftax(1)
  game.reset_slot(0, seed)
  try:
    with urllib.request.urlopen(url + "/", timeout=60) as response:
      assert "AGENT = true" in response.read().decode()
    for action in (5, 1):
      body, headers = _post(url + "/agent/imagined", {})
      assert headers["X-Action"] == craftax_env.ACTIONS[action]
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), twin.step(action))
    total = 0.0
    for step, action in enumerate((5, 2, 3, 5), start=1):
      body, headers = _post(url + "/agent/real", {})
      expected, rewards, _, _ = game.step(np.asarray([action]))
      total += float(rewards[0])
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), expected[0])
      assert headers["X-Action"] == craftax_env.ACTIONS[action] and headers["X-Step"] == str(step)
      assert headers["X-World-Seed"] == str(seed) and headers["X-Episode"] == "0"
      assert float(headers["X-Return"]) == pytest.approx(total)
    _, headers = _post(url + "/agent/real", {"reset": True})  # the next evaluation world
    assert headers["X-Episode"] == "1" and headers["X-Step"] == "1"
    assert [r[1] for r in real.resets] == [[seed], [int(evaluation.world_seeds(2)[1])]]
    assert len(imagined.resets) == 1  # no one else played the imagined world in between
  finally:
    page.shutdown()
    page.server_close()


def _command(module, *args):
  return subprocess.run([sys.executable, "-m", f"jaxai.world_model.{module}",
                         "--config=configs/world_model.py:tiny", *args],
                        cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=600,
                        check=False)


def test_rollout_gif_and_evaluate_commands(tmp_path, tiny_world_model):
  _, workdir = tiny_world_model  # configs/world_model.py:tiny as written: synthetic episodes, both stages
  gif = tmp_path / "out" / "rollout.gif"
  for module in ("rollout_gif", "evaluate"):
    missing = _command(module, f"--workdir={tmp_path / 'empty'}")
    assert missing.returncode == 2 and missing.stderr.startswith("checkpoint error: "), missing.stderr[-2000:]
    assert len(missing.stderr.strip().splitlines()) == 1

  result = _command("rollout_gif", f"--workdir={workdir}", f"--out={gif}", "--episodes=2", "--context=3",
                    "--horizon=2")
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert record["windows"] == 2 and record["gif"] == str(gif) and len(record["psnr_per_frame"]) == 2
  assert all(np.isfinite(record["psnr_per_frame"]))
  with Image.open(gif) as image:
    durations = []
    for i in range(image.n_frames):  # Pillow merges repeated frames, adding up their durations
      image.seek(i)
      durations.append(image.info["duration"])
    assert sum(durations) == (3 + 2) * 250  # the context, then the imagined frames
    # 2 windows in rows, real and imagined side by side, each 63 + 2 border pixels, 4x upscaled.
    assert image.size == (4 * (2 * 65 + 3 * 2), 4 * (2 * 65 + 3 * 2))
  too_long = _command("rollout_gif", f"--workdir={workdir}", "--context=6", "--horizon=6")
  assert too_long.returncode == 2 and too_long.stderr.startswith("config error: horizon: "), too_long.stderr

  # evaluate reproduces the evaluation training logged at its last step (same windows, noise,
  # dtype and tokenizer), and another seed changes the rollouts but not the baselines.
  with open(workdir / "dynamics" / "metrics.jsonl", encoding="utf-8") as f:
    logged = [json.loads(line) for line in f][-1]
  evaluated = _command("evaluate", f"--workdir={workdir}")
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert len(evaluated.stdout.strip().splitlines()) == 1, evaluated.stdout  # one JSON line
  record = json.loads(evaluated.stdout)
  assert record["step"] == logged["step"]
  for key in ("eval/rollout_psnr", "eval/rollout_psnr_k8", "eval/frechet_latent_distance",
              "eval/rollout_psnr_repeat_last", "eval/action_top1"):
    assert record[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
  reseeded = _command("evaluate", f"--workdir={workdir}", "--seed=7", "--config.rollout.action_states=0")
  other = json.loads(reseeded.stdout.strip().splitlines()[-1])
  assert other["seed"] == 7 and other["eval/rollout_psnr"] != record["eval/rollout_psnr"]
  assert other["eval/rollout_psnr_repeat_last"] == record["eval/rollout_psnr_repeat_last"]


def test_nfe_curve_command_slides_past_the_trained_window(tmp_path, tiny_world_model):
  _, workdir = tiny_world_model  # window_len 8: 3 context + 10 imagined frames need a slide
  png = tmp_path / "nfe.png"
  result = _command("nfe_curve", f"--workdir={workdir}", "--names=tiny", "--windows=2", "--context=3",
                    "--horizon=10", "--num_steps=1,8", "--seeds=0,1", f"--plot={png}")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
  baselines = [line for line in lines if "baseline" in line]
  records = [line for line in lines if "seed" in line]
  summaries = {line["num_steps"]: line for line in lines if line.get("summary")}
  assert {b["baseline"] for b in baselines} == {"repeat_last", "tokenizer"}
  assert len(records) == 4 and set(summaries) == {1, 8}
  for record in records:
    for key in ("frechet_latent_distance", "frechet_change_distance_late", "psnr_h1", "psnr_h4", "tiles_h4"):
      assert np.isfinite(record[key]), key
    assert 0.0 <= record["tiles_h1"] <= 1.0
  assert summaries[8]["frechet_latent_distance_over_k8"] == pytest.approx(1.0)
  by_seed = {r["seed"]: r for r in records if r["num_steps"] == 1}
  assert by_seed[0]["psnr"] != by_seed[1]["psnr"]  # the seed is the rollout noise
  assert summaries[1]["psnr_mean"] == pytest.approx((by_seed[0]["psnr"] + by_seed[1]["psnr"]) / 2)
  assert png.stat().st_size > 0
  too_long = _command("nfe_curve", f"--workdir={workdir}", "--context=8", "--horizon=2")
  assert too_long.returncode == 2 and too_long.stderr.startswith("config error: context: "), too_long.stderr
