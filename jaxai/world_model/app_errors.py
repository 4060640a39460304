"""The one-line errors of the world model's command-line apps."""
import contextlib
import sys

from jaxai import cli, config_lib


@contextlib.contextmanager
def one_line_errors():
  """Bad input inside the block (a config field, a missing or corrupt checkpoint, a missing
  dataset) ends the app with one line and exit code 2 (``cli.fail``). Craftax prints while it
  loads its textures: that goes to stderr, so stdout keeps only what the app prints as JSON."""
  from jaxai import checkpointing  # pylint: disable=g-import-not-at-top
  from jaxai.craftax import dataset as craftax_dataset  # pylint: disable=g-import-not-at-top
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the world model first)")
  except craftax_dataset.DatasetError as e:
    cli.fail("config error", f"data.dir: {e}")
