"""Times the agent: imagined frames per second (what bounds RL in imagination) and real-game acting.

  python -m jaxai.world_model.bench_agent --config=configs/world_model.py [--batch=64] [--runs=3]

Random parameters of the config's sizes (speed does not depend on the weights). Prints one JSON line
per measurement, with the host:

* ``imagined_fps``: ``imagination.imagine`` jitted, ``--batch`` trajectories of
  ``imagination.horizon`` frames after ``imagination.context_frames`` context frames, K =
  ``rollout.num_steps`` shortcut steps per frame (plus the pass that reads each frame's agent
  outputs), in ``compute_dtype`` as training imagines; imagined frames per second of the median call.
* ``agent_act``: ``AgentPlayer.act`` on ``--batch`` slots (encode, one dynamics pass, sample), in
  ``rollout.compute_dtype``; game steps per second (slots x calls) of the median call, the window
  never sliding during the timing.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn

from jaxai import cli, host
from jaxai.bench import timing
from jaxai.world_model import agent_player, agent_stage, imagination, models, realtime


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_integer("batch", 64, "Imagined trajectories, and game slots the agent acts in.")
  flags.DEFINE_integer("runs", 3, "Timed calls after one warm-up call.")


def _random_agent(config, seed: int = 0):
  model = models.make_dynamics(config, agent=True)
  params = jax.jit(lambda rng: agent_stage.init_agent_params(model, rng))(jax.random.key(seed))
  return model, nn.unbox(params)


def imagined_fps(config, *, batch: int, runs: int) -> dict:
  model, params = _random_agent(config)
  c, m = model.config, config.imagination
  keys = jax.random.split(jax.random.key(1), 2)
  context = jax.random.normal(keys[0], (batch, m.context_frames, c.num_latents, c.latent_channels))
  actions = jax.random.randint(keys[1], (batch, m.context_frames), 0, c.num_actions)
  labelled = jnp.ones((batch, m.context_frames), bool)
  tasks = jnp.zeros((batch,), jnp.int32)
  run = jax.jit(lambda p, rng: imagination.imagine(
      model, p, context, actions, labelled, tasks, rng, horizon=m.horizon, num_steps=config.rollout.num_steps,
      context_signal=config.rollout.context_signal)["agent"])
  jax.block_until_ready(run(params, jax.random.key(0)))
  ms = timing.median_ms(lambda: jax.block_until_ready(run(params, jax.random.key(2))), runs)
  return {"batch": batch, "horizon": m.horizon, "context_frames": m.context_frames,
          "num_steps": config.rollout.num_steps, "compute_dtype": config.compute_dtype,
          "ms_per_call": timing.figure(ms), "imagined_fps": timing.figure(batch * m.horizon / ms * 1e3)}


def agent_act(config, *, batch: int, runs: int) -> dict:
  run_config = models.rollout_config(config)
  tokenizer, tokenizer_params, _, _ = realtime.random_world_model(run_config)
  model, params = _random_agent(run_config)
  player = agent_player.AgentPlayer(tokenizer, tokenizer_params, model, params, task=0, num_envs=batch,
                                    context_frames=runs + 2, context_signal=config.rollout.context_signal)
  player.reset(np.arange(batch))
  frames = np.random.default_rng(0).integers(0, 256, (batch, *models.FRAME_SHAPE), dtype=np.uint8)
  player.act(frames)  # compiles
  ms = timing.median_ms(lambda: player.act(frames), runs)
  return {"batch": batch, "compute_dtype": run_config.compute_dtype, "ms_per_call": timing.figure(ms),
          "game_steps_per_sec": timing.figure(batch / ms * 1e3)}


def measure(config, *, batch: int, runs: int):
  d = config.dynamics
  common = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "host_cpu": host.summary(), "params": "random init (speed does not depend on the weights)",
            "dynamics": {"width": d.width, "layers": d.num_layers, "layout": d.layout}}
  yield {"benchmark": "imagined_fps", **common, **imagined_fps(config, batch=batch, runs=runs)}
  yield {"benchmark": "agent_act", **common, **agent_act(config, batch=batch, runs=runs)}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", at_least_one=("batch", "runs"))
  for record in measure(config, batch=args.batch, runs=args.runs):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
