"""What every command line of this codebase shares (absl flags): ``--config`` with one-line errors.

A command defines its flags in ``define_flags()`` (called only when it runs as a program, so that
two commands imported into one process do not both define ``--config``), then ``cli.run(main)``.
Bad input ends the command with one line ``<kind>: <message>`` on stderr and exit code 2
(``config_lib.fail``); ``config_flags`` would otherwise print a traceback, or defer a missing
config file to its first use.
"""
import importlib.util
import logging
import os
import re

from absl import app, flags
from ml_collections import config_flags

from jaxai import config_lib

fail = config_lib.fail


def define_config_flag(example: str = "configs/lm.py:tiny") -> None:
  config_flags.DEFINE_config_file("config", None, f"Config file, e.g. {example}.", lock_config=True)


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def parse_flags(argv):
  """absl's parser, with each kind of bad flag turned into one ``config error`` line."""
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


def config(required_example: str = "configs/<name>.py[:variant]"):
  """The parsed ``--config``; config_flags defers file errors to the first access, so force it here."""
  try:
    value = flags.FLAGS["config"].value
    if value is not None:
      value.get("task")
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(_root_cause(e)).splitlines() if line.strip()]
    fail("config error", f"config: cannot load {flags.FLAGS['config'].serialize().split('=', 1)[-1]}: "
         f"{lines[-1] if lines else type(e).__name__}")
  if value is None:
    fail("config error", f"config: --config={required_example} is required")
  return value


def quiet_logs() -> None:
  """absl's INFO default floods stderr with orbax logs, and jax's "Unable to initialize backend"
  INFO line would precede our one-line errors."""
  if not flags.FLAGS["verbosity"].present:
    logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def skip_absent_tpu() -> None:
  """With libtpu installed (the ``tpu`` extra, also used to compile for TPU slices from a CPU
  machine) jax probes for TPU chips at its first use and prints several lines of errors where
  there are none. Where no TPU chip is attached and ``JAX_PLATFORMS`` is unset, skip the probe.
  Call before jax's first use."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
    gpu = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    jax.config.update("jax_platforms", "cuda,cpu" if gpu else "cpu")


def start(example: str, *, workdir: str | None = None, at_least_one: tuple[str, ...] = ()):
  """What every command does first: quiet logs, the parsed ``--config`` (``config``), a required
  ``--workdir`` (``workdir`` says what it holds) and integer flags that must be >= 1, each bad one
  a one-line error; then ``skip_absent_tpu``. Returns (flags, config)."""
  args = flags.FLAGS
  quiet_logs()
  value = config(example)
  if workdir is not None and not args.workdir:
    fail("config error", f"workdir: --workdir=DIR ({workdir}) is required")
  for name in at_least_one:
    if args[name].value < 1:
      fail("config error", f"{name}: must be >= 1, got {args[name].value}")
  skip_absent_tpu()
  return args, value


def run(main) -> None:
  app.run(main, flags_parser=parse_flags)
