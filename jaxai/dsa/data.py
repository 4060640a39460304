"""Long-context byte data for the sparse-attention LM: stdlib packages as documents, plus retrieval.

Documents: the Python standard library's ``.py`` files grouped per package (a top-level directory, or
a top-level module on its own), each package's files concatenated in sorted path order with
``b"\\n\\n"`` between them. A package longer than ``max_bytes`` is cut into near-equal consecutive
documents (so no tail piece is tiny); packages shorter than ``min_bytes`` are merged, in name order,
with the next short packages of the same split until they reach ``min_bytes`` (a last remainder
still short is dropped). A package's split is fixed by the crc32 of its name (~5% held out, as in
``text_corpus``), so the held-out documents are code the model never saw a line of. The documents
depend on the interpreter's stdlib (CPython 3.11 here), not on anything downloaded.

Retrieval windows: natural text with key lines ``b"\\nkey k3Fq9 = 7Hd2Xa\\n"`` inserted, ending in a
query ``b"\\nkey k3Fq9 = "`` whose value (the answer) and ``b"\\n"`` close the window. Since the key
is random, the value can only come from looking back ``distance`` bytes, which is what sparse
attention must keep: the answer bytes are scored exactly (every one argmax-right).

Every example is a pure function of (seed, index), so the stream is random-access and resumable.
"""
import functools
import os
import zlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxai.data import text_corpus

RETRIEVAL_KINDS = ("needle", "associative_recall")
TRAINING_KINDS = ("recall_drill", "recall_drill") + RETRIEVAL_KINDS  # the share training draws
SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 500  # of 10_000: ~5% of the packages

KEY_BYTES, VALUE_BYTES = 5, 6
ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)
QUERY_PREFIX = len(b"\nkey ") + KEY_BYTES + len(b" = ")  # bytes of a line before its value
LINE_BYTES = QUERY_PREFIX + VALUE_BYTES + 1  # b"\nkey K = V\n"
TRAINING_LENGTH = 10**9  # examples are drawn, not enumerated: no index repeats within a run

# Distinct first seed words keep training, evaluation and the mix's choices on disjoint streams.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def package_name(relpath: str) -> str:
  """The package a stdlib file belongs to: its top-level directory, or its module name."""
  return relpath.split(os.sep)[0].removesuffix(".py")


def split_of(package: str) -> str:
  return "heldout" if zlib.crc32(package.encode()) % 10_000 < HELDOUT_BUCKETS else "train"


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.cache
def _package_texts() -> dict[str, bytes]:
  root, files = text_corpus.list_files("stdlib")
  by_package = {}
  for relpath in sorted(os.path.relpath(f, root) for f in files):
    with open(os.path.join(root, relpath), "rb") as f:
      by_package.setdefault(package_name(relpath), []).append(f.read())
  return {name: b"\n\n".join(parts) for name, parts in sorted(by_package.items())}


@functools.cache
def package_documents(split: str, min_bytes: int = 4096, max_bytes: int = 32768) -> tuple[np.ndarray, ...]:
  """The split's documents as read-only uint8 arrays of ``min_bytes`` to ``max_bytes`` bytes."""
  _check_split(split)
  if not 0 < 2 * min_bytes <= max_bytes:  # two short pieces merged must still fit
    raise ValueError(f"need 0 < 2 * min_bytes <= max_bytes, got min_bytes={min_bytes}, max_bytes={max_bytes}")
  docs, short = [], b""
  for name, text in _package_texts().items():
    if split_of(name) != split or not text:
      continue
    cuts = np.linspace(0, len(text), -(-len(text) // max_bytes) + 1).astype(int)
    for piece in (text[a:b] for a, b in zip(cuts[:-1], cuts[1:])):
      if len(piece) >= min_bytes:
        docs.append(piece)
        continue
      short = short + b"\n\n" + piece if short else piece
      if len(short) >= min_bytes:
        docs.append(short)
        short = b""
  arrays = tuple(np.frombuffer(d, np.uint8) for d in docs)  # frombuffer of bytes: already read-only
  if not arrays:
    raise ValueError(f"no {split} documents of at least {min_bytes} bytes in this interpreter's stdlib")
  return arrays


@functools.cache
def _split_stream(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The split's documents joined by b"\\n\\n" (read circularly) and each document's start in it."""
  docs = package_documents(split)
  lengths = np.array([len(d) for d in docs])
  starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]])
  stream = np.frombuffer(b"\n\n".join(d.tobytes() for d in docs), np.uint8)
  return stream, starts


def _circular_span(data: np.ndarray, start: int, length: int) -> np.ndarray:
  return np.take(data, np.arange(start, start + length), mode="wrap")


def min_seq_len(kind: str, num_keys: int = 8) -> int:
  """The smallest seq_len whose windows hold ``kind``'s layout at every distance."""
  if kind not in RETRIEVAL_KINDS:
    raise ValueError(f"retrieval kind must be one of {RETRIEVAL_KINDS}, got {kind!r}")
  if kind == "needle":
    return 2 * LINE_BYTES - 1
  if num_keys < 1:
    raise ValueError(f"associative_recall needs num_keys >= 1, got {num_keys}")
  # One line of slack covers the bytes lost to rounding on each side of the queried line.
  return LINE_BYTES * (num_keys + 2) - 1


def distance_range(seq_len: int) -> tuple[int, int]:
  """The distances (inclusive) a window of ``seq_len + 1`` bytes can hold: from a needle line just
  before the query to one at the window's first byte."""
  return LINE_BYTES, seq_len + 1 - LINE_BYTES


def _check_fits(seq_len: int, kind: str, num_keys: int, distances=()) -> None:
  needed = min_seq_len(kind, num_keys)
  if seq_len < needed:
    raise ValueError(f"seq_len {seq_len} is too small for {kind} retrieval with {num_keys} keys: "
                     f"it needs at least {needed} ({LINE_BYTES}-byte key lines and query)")
  low, high = distance_range(seq_len)
  for d in distances:
    if not low <= d <= high:
      raise ValueError(f"distance {d} does not fit in seq_len {seq_len}: distances run from {low} to {high}")


def _line(key: np.ndarray, value: np.ndarray) -> np.ndarray:
  return np.concatenate([np.frombuffer(b"\nkey ", np.uint8), key, np.frombuffer(b" = ", np.uint8), value,
                         np.frombuffer(b"\n", np.uint8)])


def _line_starts(rng: np.random.Generator, offset: int, length: int, count: int) -> np.ndarray:
  """Starts of ``count`` non-overlapping lines placed at random in [offset, offset + length)."""
  gaps = np.sort(rng.integers(0, length - LINE_BYTES * count + 1, size=count))
  return offset + gaps + LINE_BYTES * np.arange(count)


def retrieval_example(rng: np.random.Generator, seq_len: int, kind: str, filler: np.ndarray,
                      distance: int | None = None, num_keys: int = 8) -> dict[str, np.ndarray]:
  """One window of ``seq_len + 1`` bytes: key lines inserted in a random span of ``filler`` (read
  circularly when shorter than needed), closed by the query, its answer and b"\\n". ``distance``:
  bytes from the queried line's value to the answer's first byte (None: uniform over
  ``distance_range``). associative_recall scatters ``num_keys - 1`` more lines (distinct keys) on
  both sides of the queried one; needle has only the queried line."""
  _check_fits(seq_len, kind, num_keys, () if distance is None else (distance,))
  window_len = seq_len + 1
  body = window_len - LINE_BYTES  # bytes before the query line
  if distance is None:
    distance = int(rng.integers(LINE_BYTES, body + 1))
  num_lines = 1 if kind == "needle" else num_keys
  keys = rng.choice(ALPHABET, (num_lines, KEY_BYTES))
  while len(np.unique(keys, axis=0)) < num_lines:  # a repeated key would make the answer ambiguous
    keys = rng.choice(ALPHABET, (num_lines, KEY_BYTES))
  values = rng.choice(ALPHABET, (num_lines, VALUE_BYTES))

  queried = body - distance  # start of the queried line: its value starts QUERY_PREFIX later
  left_slots, right_slots = queried // LINE_BYTES, (distance - LINE_BYTES) // LINE_BYTES
  others = rng.choice(left_slots + right_slots, num_lines - 1, replace=False)
  num_left = int((others < left_slots).sum())
  starts = np.concatenate([[queried], _line_starts(rng, 0, queried, num_left),
                           _line_starts(rng, queried + LINE_BYTES, distance - LINE_BYTES, num_lines - 1 - num_left)])

  window = np.empty(window_len, np.uint8)
  in_line = np.zeros(body, bool)
  for start, key, value in zip(starts, keys, values):
    window[start:start + LINE_BYTES] = _line(key, value)
    in_line[start:start + LINE_BYTES] = True
  filler_len = body - LINE_BYTES * num_lines
  window[:body][~in_line] = _circular_span(filler, int(rng.integers(0, max(1, len(filler) - filler_len + 1))),
                                           filler_len)
  window[body:] = _line(keys[0], values[0])
  answer_mask = np.zeros(window_len, bool)
  answer_mask[body + QUERY_PREFIX:body + QUERY_PREFIX + VALUE_BYTES] = True
  return {"tokens": window.astype(np.int32), "answer_mask": answer_mask, "distance": np.array(distance, np.int32)}


def recall_drill_example(rng: np.random.Generator, seq_len: int, filler: np.ndarray) -> dict[str, np.ndarray]:
  """A training window in which every key line appears twice in natural text, the second time
  after the first at a random distance (multi-query associative recall, as in Zoology's MQAR):
  about seq_len / 80 answers per window instead of one, since a window with a single answer at
  its end gives the recall a few bytes of every window's loss (no exact retrieval in 1000 dense
  updates with single-answer windows alone). answer_mask marks the repeated lines' values."""
  pairs = max(1, seq_len // (4 * LINE_BYTES))
  window_len = seq_len + 1
  keys = rng.choice(ALPHABET, (pairs, KEY_BYTES))
  while len(np.unique(keys, axis=0)) < pairs:
    keys = rng.choice(ALPHABET, (pairs, KEY_BYTES))
  values = rng.choice(ALPHABET, (pairs, VALUE_BYTES))
  starts = _line_starts(rng, 0, window_len, 2 * pairs)
  order = rng.permutation(np.repeat(np.arange(pairs), 2))  # each key's second slot repeats it
  window = np.empty(window_len, np.uint8)
  in_line = np.zeros(window_len, bool)
  answer_mask = np.zeros(window_len, bool)
  seen = set()
  for start, key_index in zip(starts, order):
    window[start:start + LINE_BYTES] = _line(keys[key_index], values[key_index])
    in_line[start:start + LINE_BYTES] = True
    if key_index in seen:
      answer_mask[start + QUERY_PREFIX:start + QUERY_PREFIX + VALUE_BYTES] = True
    seen.add(key_index)
  filler_len = int((~in_line).sum())
  window[~in_line] = _circular_span(filler, int(rng.integers(0, max(1, len(filler) - filler_len + 1))), filler_len)
  return {"tokens": window.astype(np.int32), "answer_mask": answer_mask}


def _document_window(rng: np.random.Generator, seq_len: int, split: str) -> np.ndarray:
  """A window at a random offset of a uniformly drawn document; one shorter than the window runs on
  into the next document (after b"\\n\\n"; the last one into the first)."""
  stream, starts = _split_stream(split)
  doc = int(rng.integers(len(starts)))
  doc_len = len(package_documents(split)[doc])
  offset = int(rng.integers(0, max(0, doc_len - seq_len - 1) + 1))
  return _circular_span(stream, int(starts[doc]) + offset, seq_len + 1)


def training_examples(seq_len: int, retrieval_fraction: float, seed: int, split: str = "train") -> grain.MapDataset:
  """Example ``i`` (of ``TRAINING_LENGTH``) is drawn from (seed, i) alone: with probability
  ``retrieval_fraction`` a retrieval window (one of ``TRAINING_KINDS``; distance and filler span
  of ``split`` random),
  otherwise a document window. Rows: {"tokens": int32 [seq_len + 1], "answer_mask": bool
  [seq_len + 1]}, the mask all False for documents."""
  _check_split(split)
  if not 0 <= retrieval_fraction <= 1:
    raise ValueError(f"retrieval_fraction must be in [0, 1], got {retrieval_fraction}")
  if retrieval_fraction > 0:
    for kind in RETRIEVAL_KINDS:
      _check_fits(seq_len, kind, 8)

  def example(index):
    rng = np.random.default_rng([_TRAIN_STREAM, seed, int(index)])
    if rng.random() < retrieval_fraction:
      # Half drills (many answers per window), half the evaluated layouts (one answer at the end).
      kind = TRAINING_KINDS[int(rng.integers(len(TRAINING_KINDS)))]
      if kind == "recall_drill":
        return recall_drill_example(rng, seq_len, _split_stream(split)[0])
      row = retrieval_example(rng, seq_len, kind, _split_stream(split)[0])
      return {"tokens": row["tokens"], "answer_mask": row["answer_mask"]}
    tokens = _document_window(rng, seq_len, split).astype(np.int32)
    return {"tokens": tokens, "answer_mask": np.zeros(seq_len + 1, bool)}

  return grain.MapDataset.range(TRAINING_LENGTH).map(example)


def heldout_windows(seq_len: int, count: int) -> list[np.ndarray]:
  """``count`` int32 windows of ``seq_len + 1`` bytes of the held-out documents (joined by
  b"\\n\\n"), starts spread evenly from the first byte to the last window; they overlap only when
  ``count`` exceeds the held-out bytes' non-overlapping windows."""
  stream, _ = _split_stream("heldout")
  if len(stream) < seq_len + 1:
    raise ValueError(f"the held-out documents ({len(stream)} bytes) are shorter than one window of {seq_len + 1}")
  starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(int)
  return [stream[s:s + seq_len + 1].astype(np.int32) for s in starts]


def retrieval_eval_set(seq_len: int, distances: tuple[int, ...], count_per_distance: int, seed: int,
                       kind: str = "needle") -> dict[str, np.ndarray]:
  """``count_per_distance`` windows per distance (in that order), filler from the held-out documents,
  on random streams disjoint from training's."""
  _check_fits(seq_len, kind, 8, distances)
  filler, _ = _split_stream("heldout")
  rows = [retrieval_example(np.random.default_rng([_EVAL_STREAM, seed, d, j]), seq_len, kind, filler, distance=d)
          for d in distances for j in range(count_per_distance)]
  if not rows:
    return {"tokens": np.zeros((0, seq_len + 1), np.int32), "answer_mask": np.zeros((0, seq_len + 1), bool),
            "distance": np.zeros(0, np.int32)}
  return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "answer_mask", "distance")}


def answer_scores(logits: np.ndarray | jax.Array, tokens, answer_mask) -> tuple[np.ndarray, np.ndarray]:
  """(exact bool [N]: every answer byte argmax-right; byte share float [N]: the share of answer
  bytes argmax-right, where exact retrieval is still 0 early in training). ``logits`` [N, L, V]
  come from ``tokens[:, :-1]``, so position t predicts ``tokens[:, t + 1]``; a row without answer
  bytes counts as right."""
  xp = jnp if isinstance(logits, jax.Array) else np  # argmax where the logits are: [N, L, V] is large
  predicted = np.asarray(xp.argmax(logits, axis=-1))
  tokens, answer_mask = np.asarray(tokens), np.asarray(answer_mask, bool)
  if predicted.shape != tokens[:, 1:].shape:
    raise ValueError(f"logits {tuple(logits.shape)} do not predict tokens {tokens.shape}: need [N, L - 1, V]")
  hits, scored = predicted == tokens[:, 1:], answer_mask[:, 1:]
  share = (hits & scored).sum(1) / np.maximum(scored.sum(1), 1)
  return np.all(hits | ~scored, axis=1), np.where(scored.any(1), share, 1.0)

