"""Orbax checkpoints of the train state together with the grain iterator state.

The RNG needs no saving: every step's key is ``fold_in(key(seed), step)``, so restoring the step
restores the randomness. Restoring takes the *current* run's shardings, so a checkpoint written on
one mesh restores on any other (orbax reshards on load).
"""
import contextlib
import logging
import os
import sys
import warnings

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointCorrupt(RuntimeError):
  """The latest checkpoint exists but cannot be read back."""


def _is_abandoned_read(unraisable) -> bool:
  """A report of one of a failed restore's other reads: its completion callback on orbax's closed
  event loop, or its read coroutine collected unfinished."""
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _AbandonedReadTasks(logging.Filter):
  """asyncio's "<Task|Future|_GatheringFuture> exception was never retrieved" records (asyncio's
  one message for them). The read futures' reprs do not always name orbax, so only the message
  is matched."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().split("\n", 1)[0].endswith(" exception was never retrieved")


@contextlib.contextmanager
def _quiet_failed_restore():
  """Keeps a failed restore's report to the one exception it raises.

  When one array read fails, orbax stops waiting while tensorstore still finishes the other reads
  of the same damaged checkpoint. Each of those then reports itself, before and after our error
  line: a completion callback on the closed event loop ("Event loop is closed", through
  ``sys.unraisablehook``), an abandoned read coroutine ("Exception ignored in: <coroutine ...>",
  or at exit a "coroutine ... was never awaited" RuntimeWarning) or an asyncio "... exception was
  never retrieved" log record. Those reports, and only those, are dropped; after a failure the
  filters stay until the process exits, because the late reports arrive during shutdown.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if _is_abandoned_read(u) else previous(u)
  tasks_filter = _AbandonedReadTasks()
  logging.getLogger("asyncio").addFilter(tasks_filter)
  try:
    yield
  except Exception:
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    raise
  sys.unraisablehook = previous
  logging.getLogger("asyncio").removeFilter(tasks_filter)


class Checkpointer:
  """Async, keep-last-N checkpoints of ``{'state': train state, 'data': grain iterator}``."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
    )

  @staticmethod
  def exists(directory: str) -> bool:
    """Whether ``directory`` holds at least one finished checkpoint (without creating anything)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
      return False
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)).latest_step() is not None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, abstract_state, data_iterator):
    """Returns the state laid out as ``abstract_state`` (ShapeDtypeStructs with shardings)."""
    try:
      with _quiet_failed_restore():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
      raise CheckpointCorrupt(f"checkpoint {os.path.join(self.directory, str(step))} cannot be "
                              f"restored: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(directory: str, step: int | None = None) -> tuple[int, dict]:
  """(step, params as numpy arrays) of checkpoint ``step`` (default: the latest) in ``directory``.

  For a later stage that uses an earlier stage's model frozen (the world model's dynamics stage
  reads the tokenizer's). Raises FileNotFoundError when there is no checkpoint and CheckpointCorrupt
  when it cannot be read.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                  item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                 "data": grain.checkpoint.CheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {directory}")
    try:
      tree = manager.item_metadata(step)["state"]
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(tree))
      with _quiet_failed_restore():
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorrupt(f"checkpoint {os.path.join(directory, str(step))} cannot be restored: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  finally:
    manager.close()
  # Host arrays: jitted functions then place them as their mesh needs (committed single-device
  # arrays would clash with a multi-device mesh in scope).
  return step, jax.device_get(state["params"])
