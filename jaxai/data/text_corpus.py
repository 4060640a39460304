"""Byte-level text corpus available offline on any machine: the Python standard library's source.

``source="stdlib"`` reads every ``.py`` file of this interpreter's standard library (about 30 MB on
CPython 3.11); any other value is a path to a text file or a directory of ``.py``/``.txt``/``.md``
files. Files are split into train and held-out sets by a hash of their relative path, so the split
does not depend on file order or on which other files exist.
"""
import os
import sysconfig
import zlib

import grain
import numpy as np

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


class CorpusError(FileNotFoundError):
  pass


def list_files(source: str) -> tuple[str, list[str]]:
  if source == "stdlib":
    root = sysconfig.get_paths()["stdlib"]
    suffixes = (".py",)
  else:
    root = os.path.abspath(os.path.expanduser(source))
    suffixes = TEXT_SUFFIXES
    if os.path.isfile(root):
      return os.path.dirname(root), [root]
    if not os.path.isdir(root):
      raise CorpusError(f"no such file or directory: {root}")
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(suffixes))
  if not files:
    raise CorpusError(f"no text files ({', '.join(suffixes)}) under {root}")
  return root, files


def load_corpus(source: str, heldout_fraction: float = 0.05) -> dict[str, np.ndarray]:
  """Returns ``{'train': uint8 bytes, 'heldout': uint8 bytes}``."""
  root, files = list_files(source)
  parts = {"train": [], "heldout": []}
  for path in files:
    bucket = zlib.crc32(os.path.relpath(path, root).encode()) % 10_000
    split = "heldout" if bucket < heldout_fraction * 10_000 else "train"
    with open(path, "rb") as f:
      parts[split].append(f.read())
  if len(files) == 1:  # a single file: hold out its tail instead
    data = parts["train"][0] if parts["train"] else parts["heldout"][0]
    cut = int(len(data) * (1 - heldout_fraction))
    parts = {"train": [data[:cut]], "heldout": [data[cut:]]}
  return {k: np.frombuffer(b"\n\n".join(v), np.uint8) for k, v in parts.items()}


def token_windows(corpus: np.ndarray, seq_len: int) -> grain.MapDataset:
  """Non-overlapping windows of ``seq_len + 1`` bytes (inputs and next-byte targets) as int32."""
  num = (len(corpus) - 1) // seq_len
  if num <= 0:
    raise CorpusError(f"the corpus ({len(corpus)} bytes) is shorter than one window of {seq_len + 1}")
  return grain.MapDataset.range(num).map(
      lambda i: {"tokens": corpus[i * seq_len: i * seq_len + seq_len + 1].astype(np.int32)})
