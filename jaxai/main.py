"""Entry point: ``python -m jaxai.main --config=configs/<paper>.py[:variant] --workdir=DIR``.

Trains the stages ``--config.stage`` names (``all``: every stage of the config, in order), each in
``DIR/<stage>/``; runs resume automatically from each stage's latest checkpoint. Any field can be
overridden with ``--config.<field>=value``, a stage's own fields with
``--config.stages.<stage>.<field>=value``.

``--dry_run`` compiles each stage's train step ahead of time on the current devices, without data
or training, and prints one JSON line per stage: parameter count, FLOPs per step and memory per
device. ``--topology=v5e:16x16`` compiles for that TPU slice instead (needs libtpu: the ``tpu``
extra), from any machine, and fails if a chip's memory would not hold the step.

Bad input (an unknown field, a mesh that does not fit the devices, an indivisible batch, a missing
dataset, an unreadable checkpoint) ends the run with one line ``config error: <field>: <reason>``
(or ``checkpoint error: ...``) on stderr and exit code 2, before anything in the workdir is touched.
SIGTERM (preemption) checkpoints the stage in training and ends the run with exit code 143; a
stage cut short by ``max_steps_per_run`` ends it too, so no later stage reads an unfinished one.
"""
import json
import os
import sys

from absl import flags

from jaxai import cli, config_lib


def define_flags():
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "Where each stage's checkpoints, metrics and outputs go.")
  flags.DEFINE_bool("dry_run", False, "Compile each stage's train step without training; print "
                    "parameters, FLOPs and memory per device as JSON lines.")
  flags.DEFINE_string("topology", None, "With --dry_run: compile for this TPU slice (e.g. v5e:16x16, "
                      "v4:2x2x2) instead of the current devices.")


def _initialize_distributed(config):
  dist = config.distributed
  if dist.initialize or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    import jax  # pylint: disable=g-import-not-at-top
    kwargs = {}
    if dist.coordinator_address:  # else jax reads the environment (TPU VMs, Slurm, JAX_* variables)
      kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=dist.num_processes,
                    process_id=dist.process_id)
    jax.distributed.initialize(**kwargs)


def run(config, workdir: str) -> list[dict]:
  """Validates ``config`` and trains each selected stage in turn; returns each stage's last metrics.

  Raises ``ConfigError`` before touching ``workdir`` when the config cannot work. A stage is built
  right before it trains, so it may read what the stage before it wrote.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxai import stages, train  # pylint: disable=g-import-not-at-top
  _initialize_distributed(config)
  module, stage_configs = stages.validate_run(config, workdir, jax.device_count())
  results = []
  for stage_config in stage_configs:
    results.append(train.train(module.build_stage(stage_config, workdir), workdir))
    reached = results[-1].get("step", stage_config.total_steps)
    if reached < stage_config.total_steps:  # max_steps_per_run: the stages after it wait for it
      print(f"{stage_config.stage}: stopped at step {reached} of {stage_config.total_steps} "
            "(max_steps_per_run); rerun to go on", file=sys.stderr, flush=True)
      break
  return results


def main(argv):
  del argv
  args, config = cli.start("configs/<name>.py[:variant]", workdir="where each stage trains")
  if args.topology and not args.dry_run:
    cli.fail("config error", "topology: --topology compiles for a TPU slice, only with --dry_run")
  # Imported after flag parsing so that `--help` and flag errors do not pay for importing jax.
  from jaxai import checkpointing, dry_run, train  # pylint: disable=g-import-not-at-top
  try:
    if args.dry_run:
      for record in dry_run.dry_run(config, args.workdir, topology=args.topology):
        print(json.dumps(record), flush=True)
    else:
      run(config, args.workdir)
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except checkpointing.CheckpointCorrupt as e:
    cli.fail("checkpoint error", str(e))
  except dry_run.DoesNotFit as e:
    cli.fail("memory error", str(e), code=1)
  except train.NonFiniteLoss as e:
    cli.fail("training error", str(e), code=1)
  except train.Preempted as e:
    cli.fail("preempted", str(e), code=143)  # 128 + SIGTERM, as a shell reports a killed job


if __name__ == "__main__":
  define_flags()
  cli.run(main)
