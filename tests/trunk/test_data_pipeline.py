"""Per-process batching: processes together read exactly what one process reads, checkpointably."""
import grain
import numpy as np

from jaxai.data import pipeline, text_corpus


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_process_shards_concatenate_to_the_single_process_batches():
  examples = grain.MapDataset.range(37).map(lambda i: {"x": np.int64(i)})
  single = take(iter(pipeline.process_local_batches(examples, 8, seed=3)), 10)
  shards = [take(iter(pipeline.process_local_batches(examples, 8, seed=3, process_index=p,
                                                     process_count=4)), 10) for p in range(4)]
  for step in range(10):
    np.testing.assert_array_equal(np.concatenate([s[step]["x"] for s in shards]), single[step]["x"])


def test_epochs_cover_every_example_once_and_reshuffle():
  examples = grain.MapDataset.range(16).map(lambda i: {"x": np.int64(i)})
  batches = take(iter(pipeline.process_local_batches(examples, 4, seed=0)), 8)
  first, second = (np.concatenate([b["x"] for b in batches[e * 4:(e + 1) * 4]]) for e in (0, 1))
  assert sorted(first) == list(range(16)) and sorted(second) == list(range(16))
  assert not np.array_equal(first, second)


def test_iterator_state_restores_the_stream():
  examples = grain.MapDataset.range(50).map(lambda i: {"x": np.int64(i)})
  it = iter(pipeline.process_local_batches(examples, 5, seed=1))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  fresh = iter(pipeline.process_local_batches(examples, 5, seed=1))
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 4)):
    np.testing.assert_array_equal(a["x"], b["x"])


def test_token_windows_are_consecutive_bytes(tmp_path):
  text = bytes(range(256)) * 3
  (tmp_path / "a.txt").write_bytes(text)
  corpus = text_corpus.load_corpus(str(tmp_path / "a.txt"), heldout_fraction=0.1)
  assert len(corpus["train"]) + len(corpus["heldout"]) == len(text)
  windows = text_corpus.token_windows(corpus["train"], 16)
  np.testing.assert_array_equal(windows[2]["tokens"], np.frombuffer(text[32:49], np.uint8))
