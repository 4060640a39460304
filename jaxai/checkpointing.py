"""Orbax checkpoints of the train state together with the grain iterator state.

The RNG needs no saving: every step's key is ``fold_in(key(seed), step)``, so restoring the step
restores the randomness. Restoring takes the *current* run's shardings, so a checkpoint written on
one mesh restores on any other (orbax reshards on load).
"""
import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Any

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


def _first_line(error: BaseException, limit: int = 300) -> str:
  """``Type: first line`` of an error, cut to ``limit`` characters (tensorstore's run long)."""
  text = str(error).splitlines()[0] if str(error) else ""
  text = re.sub(r" <bound method [^>]*>", "", text)
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpointer:
  """Async, keep-last-N checkpoints of ``{'state': train state, 'data': grain iterator}`` (the data
  item only for stages that read a grain iterator)."""

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

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def readable_steps(self, before: int) -> list[int]:
    """Steps before ``before`` whose metadata reads back: the candidates to resume from."""
    steps = []
    for step in self.all_steps():
      if step >= before:
        continue
      try:
        with _quiet_failed_restore():
          self.manager.item_metadata(step)
        steps.append(step)
      except Exception:  # pylint: disable=broad-except
        pass
    return steps

  def set_aside_after(self, step: int) -> list[str]:
    """Moves the checkpoints after ``step`` into ``<directory>_set_aside/`` (never deletes them), so
    that a run resumed from ``step`` writes its own; returns where they went."""
    moved = []
    aside = self.directory + "_set_aside"
    for later in [s for s in self.all_steps() if s > step]:
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(later))
      suffix = 1
      while os.path.exists(target):  # an earlier set-aside of the same step stays too
        target, suffix = os.path.join(aside, f"{later}.{suffix}"), suffix + 1
      os.rename(os.path.join(self.directory, str(later)), target)
      moved.append(target)
    if moved:
      self.manager.reload()
    return moved

  def save(self, step: int, state, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Returns the state laid out as ``abstract_state`` (ShapeDtypeStructs with shardings)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      with _quiet_failed_restore():
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
      raise CheckpointCorrupt(f"checkpoint {os.path.join(self.directory, str(step))} cannot be "
                              f"restored: {_first_line(e)}") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(directory: str, step: int | None = None, abstract_params=None, *,
                   key: str = "params") -> tuple[int, Any]:
  """(step, params) of checkpoint ``step`` (default: the latest) in ``directory``, nothing else read;
  ``key="ema_params"`` reads the parameters' moving average instead (a stage with ``ema_decay``).

  With ``abstract_params`` (ShapeDtypeStructs with shardings) the params are restored laid out so,
  on any mesh; without, as host numpy arrays (jitted functions then place them as their mesh needs:
  committed single-device arrays would clash with a multi-device mesh in scope). Raises
  FileNotFoundError when there is no checkpoint and CheckpointCorrupt when it cannot be read.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                 "data": grain.checkpoint.CheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint {step} in {directory} (there are: "
                              f"{', '.join(map(str, sorted(manager.all_steps()))) or 'none'})")
    try:
      host = abstract_params is None
      if host:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        state_metadata = manager.item_metadata(step)["state"]
        if key not in state_metadata:
          raise CheckpointCorrupt(f"checkpoint {os.path.join(directory, str(step))} holds no {key} "
                                  f"(it has: {', '.join(sorted(state_metadata))})")
        metadata = state_metadata[key]
        abstract_params = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
      item = {key: abstract_params}
      with _quiet_failed_restore():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))["state"][key]
    except CheckpointCorrupt:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorrupt(f"checkpoint {os.path.join(directory, str(step))} cannot be restored: "
                              f"{_first_line(e)}") from e
  finally:
    manager.close()
  return step, (jax.device_get(restored) if host else restored)
