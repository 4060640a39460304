"""Entry point: ``python -m jaxai.main --config=configs/<paper>.py[:variant] --workdir=DIR``.

Any field can be overridden with ``--config.<field>=value``. Bad input (an unknown field, a mesh that
does not fit the devices, an indivisible batch, a missing dataset, an unreadable checkpoint) ends the
run with one line ``config error: <field>: <reason>`` on stderr and exit code 2, before anything in
the workdir is touched. Runs resume automatically from the workdir's latest checkpoint.
"""
import logging
import os
import re

from absl import app, flags
from ml_collections import config_flags

from jaxai import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")

EXIT_CONFIG_ERROR = config_lib.EXIT_CONFIG_ERROR
fail = config_lib.fail


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    cause = _root_cause(e)
    if isinstance(cause, (AttributeError, KeyError)):  # ml_collections: override of an unknown field
      for arg in argv[1:]:
        path = arg.split("=")[0][len("--config."):] if arg.startswith("--config.") else ""
        if path and f"'{path.split('.')[-1]}'" in str(cause):
          fail("config error", f"{path}: no such config field")
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[-1] if lines else type(e).__name__
    if "ConfigError: " in message:  # raised by get_config, re-wrapped by config_flags
      fail("config error", message.split("ConfigError: ", 1)[1])
    bad_value = re.match(r"flag --config\.([\w.]+)=.*?: (.*)", message)
    if bad_value:
      fail("config error", f"{bad_value.group(1)}: {bad_value.group(2)}")
    fail("config error", f"flags: {message}")


def _load_config():
  """The parsed config; config_flags defers file errors to the first access, so force it here."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("task")
    return config
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(_root_cause(e)).splitlines() if line.strip()]
    fail("config error", f"config: cannot load {flags.FLAGS['config'].serialize().split('=', 1)[-1]}: "
         f"{lines[-1] if lines else type(e).__name__}")


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
  """Validates ``config`` and trains every stage of its task; returns each stage's last metrics.

  Raises ``ConfigError`` before touching ``workdir`` when the config cannot work.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxai import tasks, train  # pylint: disable=g-import-not-at-top
  _initialize_distributed(config)
  config_lib.validate_trainer(config, jax.device_count())
  module = tasks.task_module(config)
  if hasattr(module, "validate"):
    module.validate(config)
  stages = module.build_stages(config, workdir)
  for stage in stages:  # every stage's trainer fields, before the first stage trains
    config_lib.validate_trainer(stage.config, jax.device_count())
  return [train.train(stage, workdir) for stage in stages]


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # absl defaults to INFO, which floods stderr with orbax logs
    logging.getLogger("absl").setLevel(logging.WARNING)
  config = _load_config()
  if config is None:
    fail("config error", "config: --config=configs/<name>.py[:variant] is required")
  if not _WORKDIR.value:
    fail("config error", "workdir: --workdir=DIR is required")
  # jax's "Unable to initialize backend 'tpu'" INFO line would precede our one-line errors.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  # Imported after flag parsing so that `--help` and flag errors do not pay for importing jax.
  from jaxai import checkpointing, train  # pylint: disable=g-import-not-at-top
  try:
    run(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    fail("config error", str(e))
  except checkpointing.CheckpointCorrupt as e:
    fail("checkpoint error", str(e))
  except train.NonFiniteLoss as e:
    fail("training error", str(e), code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
