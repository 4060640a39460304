"""Reasoning tasks with checkable answers for the masked diffusion LM, from ``reasoning-gym``.

An example is one fixed-length row of byte tokens: the question, left-padded with ``PAD`` to
``prompt_len``, then the generation region of ``gen_len`` positions: the answer's bytes, one
``EOT``, and ``EOT`` again to the end (as LLaDA pads its SFT answers with end-of-text, so the
model learns to predict it after the answer, and a decoder can stop there). Only the generation
region is ever masked. Tokens 0-255 are bytes; ``MASK``, ``EOT`` and ``PAD`` follow.

Splits: held-out problems come from ``reasoning_gym.create_dataset(task, seed=HELDOUT_SEED + i)``
and training ones from ``TRAIN_SEED``; a training problem whose question is also a held-out one
is dropped (word lists repeat), so the two splits share no question. Problems whose question or
answer does not fit the row are dropped and counted. An answer is right when the task's own
``score_answer`` gives it 1.0.
"""
import dataclasses
from typing import Sequence

import numpy as np

BYTES = 256
MASK, EOT, PAD = 256, 257, 258
VOCAB_SIZE = 259
TRAIN_SEED, HELDOUT_SEED = 0, 1 << 20


@dataclasses.dataclass
class Problems:
  """Problems of one split, in row order: ``tokens`` int32 [N, prompt_len + gen_len] (prompt, then
  the answer + EOT padding); the reasoning-gym ``entries`` (question, answer, metadata) and the
  ``task`` of each row, for scoring; ``dropped``: problems left out per reason."""
  tokens: np.ndarray
  entries: list[dict]
  tasks: list[str]
  prompt_len: int
  dropped: dict[str, int]

  def __len__(self) -> int:
    return len(self.entries)


def encode_row(question: str, answer: str | None, prompt_len: int, gen_len: int) -> np.ndarray | None:
  """One row (module docstring); the generation region is all ``MASK`` when ``answer`` is None.
  None if the question is longer than ``prompt_len`` bytes or the answer + EOT than ``gen_len``."""
  q = np.frombuffer(question.encode("utf-8"), np.uint8).astype(np.int32)
  if len(q) > prompt_len:
    return None
  row = np.full(prompt_len + gen_len, PAD, np.int32)
  row[prompt_len - len(q):prompt_len] = q
  if answer is None:
    row[prompt_len:] = MASK
    return row
  a = np.frombuffer(answer.encode("utf-8"), np.uint8).astype(np.int32)
  if len(a) + 1 > gen_len:
    return None
  row[prompt_len:] = EOT
  row[prompt_len:prompt_len + len(a)] = a
  return row


def decode_answer(generated: np.ndarray) -> str:
  """The text of a generation region: its bytes up to the first ``EOT`` (other specials dropped)."""
  generated = np.asarray(generated)
  end = np.flatnonzero(generated == EOT)
  body = generated[:end[0]] if len(end) else generated
  return bytes(int(t) for t in body if t < BYTES).decode("utf-8", errors="replace")


def _dataset(task: str, size: int, seed: int):
  import reasoning_gym  # pylint: disable=g-import-not-at-top  (sympy and friends: seconds)
  return reasoning_gym.create_dataset(task, size=size, seed=seed)


def make_problems(tasks: Sequence[str], per_task: int, split: str, *, prompt_len: int, gen_len: int,
                  exclude: set[str] = frozenset()) -> Problems:
  """``per_task`` problems of each task for ``split`` (train | heldout), rows interleaved by task
  (row i is task i % len(tasks)); questions in ``exclude`` are dropped (module docstring)."""
  if split not in ("train", "heldout"):
    raise ValueError(f"unknown split {split!r}; choose from train, heldout")
  seed = TRAIN_SEED if split == "train" else HELDOUT_SEED
  per_task_rows, dropped = [], {"too_long": 0, "in_heldout": 0}
  for index, task in enumerate(tasks):
    data = _dataset(task, per_task, seed + index)
    kept = []
    for i in range(per_task):
      entry = data[i]
      if entry["question"] in exclude:
        dropped["in_heldout"] += 1
        continue
      row = encode_row(entry["question"], entry["answer"], prompt_len, gen_len)
      if row is None:
        dropped["too_long"] += 1
        continue
      kept.append((row, entry, task))
    per_task_rows.append(kept)
  rows = [r for group in zip(*per_task_rows) for r in group]  # interleaved, shortest task's count
  rows += [r for group in per_task_rows for r in group[min(map(len, per_task_rows)):]]
  return Problems(tokens=np.stack([r[0] for r in rows]), entries=[r[1] for r in rows],
                  tasks=[r[2] for r in rows], prompt_len=prompt_len, dropped=dropped)


def solved(problems: Problems, generated: np.ndarray) -> np.ndarray:
  """bool [N]: the decoded answer of each of the first N problems (generation regions [N, G]) gets
  its task's full score, ``score_answer`` = 1.0 (some scorers give partial credit to a wrong but
  well-formed answer)."""
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  scorers = {}
  out = np.zeros(len(generated), bool)
  for i, (entry, task) in enumerate(zip(problems.entries[:len(generated)], problems.tasks)):
    if task not in scorers:
      scorers[task] = reasoning_gym.get_score_answer_fn(task)
    out[i] = scorers[task](decode_answer(generated[i]), entry) == 1.0
  return out
