"""The DSA LM's data: stdlib package documents, their split, and retrieval windows checked from
their decoded bytes (key lines searched for, not read back from the generator)."""
import os
import re
import sysconfig
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxai.data import pipeline
from jaxai.dsa import data

KEY_LINE = re.compile(rb"\nkey ([0-9A-Za-z]{5}) = ([0-9A-Za-z]{6})\n")


def stdlib_packages() -> dict[str, dict[str, bytes]]:
  """{split: {package: its files joined}} by the issue's rule, read here with os.walk."""
  root = sysconfig.get_paths()["stdlib"]
  files = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
    for name in filenames:
      if name.endswith(".py"):
        relpath = os.path.relpath(os.path.join(dirpath, name), root)
        package = relpath.split(os.sep)[0].removesuffix(".py")
        with open(os.path.join(root, relpath), "rb") as f:
          files.setdefault(package, {})[relpath] = f.read()
  splits = {"train": {}, "heldout": {}}
  for package, texts in files.items():
    split = "heldout" if zlib.crc32(package.encode()) % 10_000 < 500 else "train"
    splits[split][package] = b"\n\n".join(texts[p] for p in sorted(texts))
  return splits


def joined(arrays, sep=b"") -> bytes:
  return sep.join(np.asarray(a, np.uint8).tobytes() for a in arrays)


def parse(row) -> dict:
  """The window's query, its answer and the earlier line it retrieves, found in the bytes."""
  text = joined([row["tokens"]])
  answer_at = np.flatnonzero(row["answer_mask"])
  lines = [(m.start(), m.group(1), m.group(2)) for m in KEY_LINE.finditer(text)]
  query_start, key, value = lines[-1]
  assert query_start == len(text) - data.LINE_BYTES  # the query line ends the window
  needles = [start for start, k, _ in lines[:-1] if k == key]
  assert len(needles) == 1
  needle_value_at = needles[0] + len(b"\nkey ") + 5 + len(b" = ")
  assert text[needle_value_at:needle_value_at + 6] == value
  return dict(text=text, answer=bytes(text[i] for i in answer_at), answer_at=answer_at, value=value,
              distance=int(answer_at[0]) - needle_value_at, lines=lines,
              background=KEY_LINE.sub(b"", text[:query_start]))


def test_documents_are_the_stdlib_packages_split_by_name_hash():
  """With no minimum (nothing merged or dropped), each split's documents put back together are
  exactly its packages' files in name order: nothing lost, added or crossing the split."""
  expected = stdlib_packages()
  assert expected["heldout"] and expected["train"]
  for split, packages in expected.items():
    docs = data.package_documents(split, min_bytes=1)
    assert joined(docs) == b"".join(packages[p] for p in sorted(packages)), split


def test_documents_have_bounded_length_and_keep_heldout_packages_out_of_train():
  expected = stdlib_packages()
  docs = {split: data.package_documents(split) for split in data.SPLITS}
  for split, split_docs in docs.items():
    assert all(d.dtype == np.uint8 for d in split_docs)
    lengths = np.array([len(d) for d in split_docs])
    assert lengths.min() >= 4096 and lengths.max() <= 32768, split
  train_text, heldout_text = joined(docs["train"]), joined(docs["heldout"])
  for package, text in expected["heldout"].items():
    probe = text[len(text) // 2:len(text) // 2 + 80]
    assert probe in heldout_text and probe not in train_text, package
  for package in ("email", "asyncio", "argparse"):  # train packages, by the hash
    text = expected["train"][package]
    probe = text[len(text) // 2:len(text) // 2 + 80]
    assert probe in train_text and probe not in heldout_text, package


@pytest.mark.parametrize("kind", data.RETRIEVAL_KINDS)
def test_retrieval_window_answer_is_the_value_found_at_the_stated_distance(kind):
  filler = data.package_documents("heldout")[0]
  for seed in range(20):
    row = data.retrieval_example(np.random.default_rng(seed), 512, kind, filler, num_keys=8)
    assert row["tokens"].shape == row["answer_mask"].shape == (513,)
    assert row["tokens"].dtype == np.int32 and row["answer_mask"].dtype == bool
    found = parse(row)
    assert found["answer"] == found["value"]
    np.testing.assert_array_equal(found["answer_at"], np.arange(513 - 7, 513 - 1))  # then b"\n"
    assert found["distance"] == row["distance"]
    keys = [k for _, k, _ in found["lines"][:-1]]
    assert len(keys) == (1 if kind == "needle" else 8) and len(set(keys)) == len(keys)
    assert found["background"] in joined([filler])  # one contiguous span of the filler


@pytest.mark.parametrize("kind", data.RETRIEVAL_KINDS)
def test_retrieval_distance_is_honoured_exactly(kind):
  filler = data.package_documents("train")[5]
  for distance in (20, 21, 137, 400, 493):  # 20: needle line just before the query; 493: at byte 0
    for seed in range(3):
      row = data.retrieval_example(np.random.default_rng(seed), 512, kind, filler, distance=distance)
      assert parse(row)["distance"] == distance == row["distance"]


def test_retrieval_eval_set_holds_the_asked_distances_on_heldout_filler():
  distances = (20, 250, 493)
  rows = data.retrieval_eval_set(512, distances, count_per_distance=4, seed=3)
  assert rows["tokens"].shape == rows["answer_mask"].shape == (12, 513)
  np.testing.assert_array_equal(rows["distance"], np.repeat(distances, 4))
  heldout_text = joined(data.package_documents("heldout"), b"\n\n")
  for i in range(12):
    found = parse({k: v[i] for k, v in rows.items()})
    assert found["distance"] == rows["distance"][i]
    assert found["background"] in heldout_text
  again = data.retrieval_eval_set(512, distances, count_per_distance=4, seed=3)
  np.testing.assert_array_equal(again["tokens"], rows["tokens"])


def test_layouts_that_do_not_fit_raise_readable_errors():
  rng, filler = np.random.default_rng(0), data.package_documents("heldout")[0]
  with pytest.raises(ValueError, match="distance 494 does not fit in seq_len 512"):
    data.retrieval_example(rng, 512, "needle", filler, distance=494)
  with pytest.raises(ValueError, match="distance 19 does not fit"):
    data.retrieval_eval_set(512, (100, 19), 2, seed=0)
  with pytest.raises(ValueError, match="seq_len 100 is too small for associative_recall"):
    data.retrieval_example(rng, 100, "associative_recall", filler)
  with pytest.raises(ValueError, match="too small"):
    data.training_examples(100, 0.5, seed=0)
  data.training_examples(100, 0.0, seed=0)  # documents only: any length will do
  with pytest.raises(ValueError, match="retrieval kind"):
    data.retrieval_example(rng, 512, "needles", filler)


def test_answer_accuracy_demands_every_answer_byte():
  rows = data.retrieval_eval_set(256, (30, 200), count_per_distance=2, seed=0, kind="associative_recall")
  tokens, mask = rows["tokens"], rows["answer_mask"]
  perfect = np.eye(256, dtype=np.float32)[tokens[:, 1:]]  # [N, L, V] from tokens[:, :-1]
  assert data.answer_scores(perfect, tokens, mask)[0].tolist() == [True] * 4
  assert data.answer_scores(jnp.asarray(perfect), tokens, mask)[0].tolist() == [True] * 4
  wrong = perfect.copy()
  t = np.flatnonzero(mask[1])[0] - 1  # the logits position predicting row 1's first answer byte
  wrong[1, t] = np.roll(wrong[1, t], 1)
  assert data.answer_scores(wrong, tokens, mask)[0].tolist() == [True, False, True, True]
  np.testing.assert_allclose(data.answer_scores(wrong, tokens, mask)[1], [1, 5 / 6, 1, 1])  # 6-byte values
  outside = perfect.copy()
  outside[2, 10] = np.roll(outside[2, 10], 1)  # a filler byte: not scored
  t = np.flatnonzero(mask[3])[0] - 2  # predicts the query's b" " before the answer: not scored
  outside[3, t] = np.roll(outside[3, t], 1)
  assert data.answer_scores(outside, tokens, mask)[0].tolist() == [True] * 4


def test_training_examples_are_deterministic_and_mixed_at_the_asked_share():
  seq_len = 256
  docs_only = data.training_examples(seq_len, 0.0, seed=1)
  train_text = joined(data.package_documents("train"), b"\n\n")
  for i in range(0, 2000, 20):
    row = docs_only[i]
    assert row["tokens"].shape == (seq_len + 1,) and row["tokens"].dtype == np.int32
    assert not row["answer_mask"].any()
    assert joined([row["tokens"]]) in train_text

  mixed = data.training_examples(seq_len, 0.5, seed=1)
  again = data.training_examples(seq_len, 0.5, seed=1)
  rows = [mixed[i] for i in range(400)]
  for i in (0, 7, 399):
    np.testing.assert_array_equal(rows[i]["tokens"], again[i]["tokens"])
    np.testing.assert_array_equal(rows[i]["answer_mask"], again[i]["answer_mask"])
  retrieval = [r for r in rows if r["answer_mask"].any()]
  assert 0.4 < len(retrieval) / len(rows) < 0.6  # binomial(400, 0.5): 4 standard deviations
  # One answer at the end (needle, recall: parse reads their layout) or a drill of repeats.
  ends = [r for r in retrieval if r["answer_mask"][-7:-1].all() and r["answer_mask"].sum() == 6]
  num_lines = {len(parse(r)["lines"]) for r in ends}
  assert num_lines == {2, 9}  # needle (+ query) and 8-key recall (+ query) both appear
  drills = len(retrieval) - len(ends)
  assert 0.35 < drills / len(retrieval) < 0.65  # half the retrieval rows (TRAINING_KINDS)
  assert all(r["answer_mask"].sum() == 6 * (seq_len // 80) for r in retrieval if r["answer_mask"].sum() != 6)
  assert not np.array_equal(data.training_examples(seq_len, 0.5, seed=2)[0]["tokens"], rows[0]["tokens"])

  batch = next(iter(pipeline.process_local_batches(mixed, 4, seed=0)))
  assert batch["tokens"].shape == batch["answer_mask"].shape == (4, seq_len + 1)


def test_heldout_windows_are_spread_over_the_heldout_documents():
  windows = data.heldout_windows(512, 16)
  heldout_text = joined(data.package_documents("heldout"), b"\n\n")
  assert len(windows) == 16 and all(w.shape == (513,) and w.dtype == np.int32 for w in windows)
  assert joined(windows[:1]) == heldout_text[:513] and joined(windows[-1:]) == heldout_text[-513:]
  assert all(joined([w]) in heldout_text for w in windows)
  assert len({joined([w]) for w in windows}) == 16


def test_recall_drills_repeat_every_key_line_with_its_value_later():
  rng = np.random.default_rng(3)
  row = data.recall_drill_example(rng, 512, data.package_documents("train")[0])
  text = bytes(row["tokens"].astype(np.uint8))
  assert len(text) == 513
  lines = re.findall(rb"\nkey ([0-9A-Za-z]{5}) = ([0-9A-Za-z]{6})\n", text)
  keys = [k for k, _ in lines]
  assert len(lines) == 2 * (512 // 80) and all(keys.count(k) == 2 for k in keys)
  first = {}
  masked = np.flatnonzero(row["answer_mask"])
  expected = []
  for match in re.finditer(rb"\nkey ([0-9A-Za-z]{5}) = ([0-9A-Za-z]{6})\n", text):
    key, value = match.groups()
    if key in first:
      assert first[key] == value
      expected.extend(range(match.start(2), match.end(2)))
    first.setdefault(key, value)
  assert masked.tolist() == expected  # the repeats' values, and nothing else
