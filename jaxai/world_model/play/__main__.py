"""Play a trained world model in a browser.

  python -m jaxai.world_model.play --config=configs/world_model.py --workdir=DIR [--port=8000]
      [--context=16] [--num_steps=4] [--seed=0] [--agent=agent|imagination --task=all_achievements]

Serves a page on http://127.0.0.1:PORT/ on which a person plays the imagined world with the
keyboard, starting from a random held-out context of ``--context`` real frames: each key press
POSTs the action to ``/step`` and gets the next imagined frame back as a PNG
(``realtime.ImaginedWorld``, K = ``--num_steps``; a sliding window past ``dynamics.window_len``
frames). Flags left out take their values from the config's ``rollout`` section.

With ``--agent`` (DIR then holds an agent run: ``agent`` after finetuning, ``imagination`` after
RL) the imagined world is the agent's own world model, and the page gains two modes: watch the
agent, told ``--task``, act in the imagined world, and watch it play the real game (the
evaluation worlds in order: ``server.AgentWatch``). Errors end the
run with one line, ``config error: ...`` or ``checkpoint error: ...``, and exit code 2.
"""
from absl import flags

from jaxai import cli, config_lib


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A run trained with --config.stage=all (or both stages).")
  flags.DEFINE_integer("context", None, "Real frames to start from; default rollout.context_frames.")
  flags.DEFINE_integer("num_steps", None, "Denoising steps K per frame; default rollout.num_steps.")
  flags.DEFINE_integer("seed", 0, "Noise of the rollouts and choice of contexts.")
  flags.DEFINE_integer("port", 8000, "Port of the page.")
  flags.DEFINE_string("host", "127.0.0.1", "Address the page listens on.")
  flags.DEFINE_enum("agent", "", ["", "agent", "imagination"],
                    "Watch the agent trained in --workdir by this stage (empty: no agent).")
  flags.DEFINE_string("task", "all_achievements", "The agent's task (one of agent.tasks).")


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", workdir="a trained world model")
  from jaxai import checkpointing  # pylint: disable=g-import-not-at-top
  from jaxai.craftax import dataset as craftax_dataset  # pylint: disable=g-import-not-at-top
  from jaxai.world_model import agent_player, data, dynamics_stage, models, realtime  # pylint: disable=g-import-not-at-top
  from jaxai.world_model.play import server  # pylint: disable=g-import-not-at-top
  r = config.rollout
  context = r.context_frames if args.context is None else args.context
  num_steps = r.num_steps if args.num_steps is None else args.num_steps
  try:
    config_lib.check(1 <= context <= config.dynamics.window_len, "context", f"must be in [1, the trained "
                     f"window_len={config.dynamics.window_len}], got {context}")
    models.check_num_steps("num_steps", num_steps, config.dynamics.k_max)
    agent = None
    if args.agent:
      loaded = agent_player.load_agent(config, args.workdir, args.agent)
      config, world_model = loaded[0], loaded[1:]
      agent = server.AgentWatch(*(agent_player.AgentPlayer.from_loaded(loaded, task=args.task, num_envs=1,
                                                                       seed=args.seed) for _ in range(2)))
    else:
      world_model = dynamics_stage.load_world_model(config, args.workdir)
    world = realtime.from_config(config, *world_model, num_steps=num_steps)
    page = server.make_server(world, server.heldout_contexts(data.load_split(config, "heldout"), context,
                                                             args.seed),
                              agent=agent, host=args.host, port=args.port, seed=args.seed)
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    train = f"--config.stage={args.agent}" if args.agent else "--config.stage=all"
    cli.fail("checkpoint error", f"{e} (train it first: python -m jaxai.main --config=... {train} "
             f"--workdir={args.workdir})")
  except (craftax_dataset.DatasetError, ValueError) as e:
    cli.fail("config error", f"data.dir: {e}")
  except OSError as e:  # the port is taken
    cli.fail("error", str(e))
  print(f"Playing the imagined world: open http://{args.host}:{page.server_address[1]}/ (Ctrl-C to stop)",
        flush=True)
  try:
    page.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    page.server_close()


if __name__ == "__main__":
  define_flags()
  cli.run(main)
