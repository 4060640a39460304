"""Deterministic, per-process batching of a grain ``MapDataset`` for multi-host training.

Global batch ``b`` is examples ``[b*G, (b+1)*G)`` of the seeded, shuffled, repeated stream; process
``p`` of ``P`` reads only its contiguous rows ``[p*G/P, (p+1)*G/P)`` of it. The batches a group of
processes assembles are therefore identical to what one process with the same global batch reads,
whatever the process count, and the iterator state is a position that grain checkpoints.
"""
from typing import Any, Callable

import grain
import numpy as np


def process_local_batches(examples: grain.MapDataset, global_batch: int, *, seed: int,
                          process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                          transform: Callable[[int, Any], Any] | None = None) -> grain.IterDataset:
  """This process's rows of each global batch; ``transform(batch_index, local_batch)`` is applied
  last (e.g. reshaping some batches), deterministically, so the iterator state stays a position."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
  if len(examples) == 0:
    raise ValueError("the dataset has no examples")
  local = global_batch // process_count
  stream = (examples.shuffle(seed) if shuffle else examples).repeat()  # one fresh permutation per epoch
  num_local_examples = (len(stream) // global_batch) * local
  local_rows = grain.MapDataset.range(num_local_examples).map(
      lambda i: stream[(i // local) * global_batch + process_index * local + i % local])
  batches = local_rows.batch(local, drop_remainder=True)
  if transform is not None:
    batches = batches.map_with_index(transform)
  return batches.to_iter_dataset()


def evenly_spaced(num_items: int, count: int) -> np.ndarray:
  """Indices of ``min(count, num_items)`` items spread evenly over ``range(num_items)``, first and
  last included (fewer when rounding makes two picks the same)."""
  return np.unique(np.linspace(0, num_items - 1, min(count, num_items)).astype(int))
