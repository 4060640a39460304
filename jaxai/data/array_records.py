"""Checks of a TFDS split stored as ArrayRecord files, before anything reads it."""
import os


def check_shards(split_info, dataset_path: str, error: type[Exception]) -> None:
  """Raises ``error`` naming the file when a shard of ``split_info`` (a ``tfds.core.SplitInfo``)
  cannot be opened or holds another number of records than the dataset's info promises: a
  truncated or half-written file, which would otherwise fail at some later read."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  for filepath, expected in zip(split_info.filepaths, split_info.shard_lengths):
    filepath = os.fspath(filepath)
    try:
      found = array_record_module.ArrayRecordReader(filepath).num_records()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise error(f"cannot open {filepath}: {e}") from e
    if found != expected:
      raise error(f"{filepath} holds {found} records, expected {expected}: the file is truncated or "
                  f"corrupt; delete {dataset_path} and regenerate it")
