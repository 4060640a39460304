"""Orbax checkpoints of the train state together with the grain iterator state.

The RNG needs no saving: every step's key is ``fold_in(key(seed), step)``, so restoring the step
restores the randomness. Restoring takes the *current* run's shardings, so a checkpoint written on
one mesh restores on any other (orbax reshards on load).
"""
import os

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointCorrupt(RuntimeError):
  """The latest checkpoint exists but cannot be read back."""


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

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, abstract_state, data_iterator):
    """Returns the state laid out as ``abstract_state`` (ShapeDtypeStructs with shardings)."""
    try:
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
