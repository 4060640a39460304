"""trm_puzzles: what grain reads back is the generated puzzles, each checked by the independent
solver and search of test_sudoku and test_maze, in order, augmented as documented."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, made_once, subprocess_env
from jaxai.trm import dataset, maze, sudoku
from puzzle_checks import SMALL_MAZE_SIZE, SMALL_PATH_LENGTH, check_maze, check_puzzle

TASKS = ("sudoku", "maze")
SEQ_LEN = {"sudoku": 81, "maze": 900}
INPUT_TOKENS = {"sudoku": set(range(10)), "maze": {0, 1, 2, 3}}
LABEL_TOKENS = {"sudoku": set(range(1, 10)), "maze": {0, 1, 2, 3, 4}}


@pytest.fixture(name="data_dir")
def fixture_data_dir(tiny_trm_puzzles) -> str:
  return tiny_trm_puzzles


def _records(data_dir, task, split):
  puzzles = dataset.load(data_dir, task, split, variant="tiny")
  return puzzles, [puzzles[i] for i in range(len(puzzles))]


@pytest.mark.parametrize("task", TASKS)
def test_stored_puzzles_are_valid_in_order_and_regenerate_from_their_seeds(data_dir, task):
  seeds = {}
  for split in dataset.SPLITS:
    puzzles, records = _records(data_dir, task, split)
    assert len(puzzles) == dataset.VARIANTS[task]["tiny"].puzzles[split] == 4
    assert [r["puzzle_id"] for r in records] == list(range(4))
    seeds[split] = [int(r["seed"]) for r in records]
    assert seeds[split] == sorted(seeds[split])  # puzzle order is seed order
    base = dataset.seed_base(split)
    assert base <= seeds[split][0] and seeds[split][-1] == base + puzzles.candidates_tried - 1
    for record in records:
      assert record["inputs"].dtype == record["labels"].dtype == np.uint8
      if task == "sudoku":
        check_puzzle(record["inputs"], record["labels"])
        assert record["clues"] == np.count_nonzero(record["inputs"]) <= sudoku.EXTREME_MAX_CLUES
        assert record["search_nodes"] >= sudoku.EXTREME_MIN_SEARCH_NODES
        again = sudoku.generate_puzzle(int(record["seed"]))
        np.testing.assert_array_equal(again.puzzle, record["inputs"])
        assert again.search_nodes == record["search_nodes"]
      else:
        check_maze(record["inputs"], record["labels"], int(record["path_length"]))
        np.testing.assert_array_equal(maze.generate_maze(int(record["seed"])).labels, record["labels"])
  assert seeds["train"][-1] < dataset.HELDOUT_SEED_BASE <= seeds["heldout"][0]  # disjoint seeds
  if task == "sudoku":  # the seeds kept are exactly the extreme ones among those tried
    puzzles = dataset.load(data_dir, task, "train", variant="tiny")
    tried = range(dataset.TRAIN_SEED_BASE, dataset.TRAIN_SEED_BASE + puzzles.candidates_tried)
    assert [s for s in tried if sudoku.extreme_record(s) is not None] == seeds["train"]


@pytest.mark.parametrize("task", TASKS)
def test_examples_have_the_documented_shapes_tokens_and_augmentations(data_dir, task):
  copies = 8 if task == "maze" else 3
  _, records = _records(data_dir, task, "train")
  examples = dataset.examples(data_dir, task, "train", variant="tiny", copies=copies, seed=5)
  assert len(examples) == 4 * copies
  seen = set()
  for index in range(len(examples)):
    example = examples[index]
    assert set(example) == {"inputs", "labels", "puzzle_id"}
    assert example["inputs"].shape == example["labels"].shape == (SEQ_LEN[task],)
    assert example["inputs"].dtype == example["labels"].dtype == example["puzzle_id"].dtype == np.int32
    assert set(np.unique(example["inputs"])) <= INPUT_TOKENS[task]
    assert set(np.unique(example["labels"])) <= LABEL_TOKENS[task]
    copy, puzzle_id = divmod(index, 4)
    assert example["puzzle_id"] == puzzle_id
    record = records[puzzle_id]
    if copy == 0:  # the stored puzzle itself
      np.testing.assert_array_equal(example["inputs"], record["inputs"])
      np.testing.assert_array_equal(example["labels"], record["labels"])
    if task == "sudoku":
      check_puzzle(example["inputs"], example["labels"], minimal=copy == 0)
      assert np.count_nonzero(example["inputs"]) == record["clues"]
    else:
      np.testing.assert_array_equal(example["labels"], maze.dihedral(record["labels"], copy))
      check_maze(example["inputs"], example["labels"], int(record["path_length"]))
    seen.add(example["inputs"].tobytes())
  assert len(seen) == 4 * copies  # every copy is a different grid
  again = dataset.examples(data_dir, task, "train", variant="tiny", copies=copies, seed=5)
  np.testing.assert_array_equal(again[4 * copies - 1]["inputs"], examples[4 * copies - 1]["inputs"])
  if task == "sudoku":  # another seed, other transforms
    other = dataset.examples(data_dir, task, "train", variant="tiny", copies=copies, seed=6)
    assert not np.array_equal(other[4]["inputs"], examples[4]["inputs"])


def test_the_small_maze_variant_keeps_12x12_mazes_in_144_tokens(tmp_path):
  """Its candidates (first of each split), its stored feature shape and the model's length."""
  assert dataset.seq_len("maze", "small") == 144 and dataset.seq_len("maze", "default") == 900
  for split in dataset.SPLITS:
    seed, record = next(dataset.kept_candidates("maze", split, 1, variant="small"))
    assert seed == dataset.seed_base(split)
    check_maze(record["inputs"], record["labels"], record["path_length"], size=SMALL_MAZE_SIZE,
               min_path_length=SMALL_PATH_LENGTH)
  builder = dataset.TrmPuzzles(config="maze_small", data_dir=str(tmp_path), file_format="array_record")
  assert builder.info.features["inputs"].shape == builder.info.features["labels"].shape == (144,)


def test_examples_batch_through_grain(data_dir):
  batches = list(dataset.examples(data_dir, "sudoku", "heldout", variant="tiny", copies=2).batch(4))
  assert [b["inputs"].shape for b in batches] == [(4, 81), (4, 81)]
  np.testing.assert_array_equal(batches[0]["puzzle_id"], [0, 1, 2, 3])


def test_two_processes_generate_the_same_dataset(data_dir, tmp_path):
  dataset.generate(str(tmp_path), "sudoku", "tiny", processes=2)
  for split in dataset.SPLITS:
    one, one_records = _records(data_dir, "sudoku", split)
    two, two_records = _records(str(tmp_path), "sudoku", split)
    assert one.candidates_tried == two.candidates_tried
    for a, b in zip(one_records, two_records, strict=True):
      assert a["seed"] == b["seed"] and a["search_nodes"] == b["search_nodes"]
      np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_missing_dataset_names_its_path(tmp_path):
  expected = dataset.dataset_dir(str(tmp_path), "maze", "tiny")
  for read in (lambda: dataset.load(str(tmp_path), "maze", "train", variant="tiny"),
               lambda: dataset.examples(str(tmp_path), "maze", "train", variant="tiny")):
    with pytest.raises(dataset.DatasetError, match=expected):
      read()


def test_truncated_or_corrupt_files_are_clear_errors(data_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  version_dir = dataset.dataset_dir(str(copy), "sudoku", "tiny")
  shard = os.path.join(version_dir,
                       next(f for f in sorted(os.listdir(version_dir)) if "train.array_record" in f))
  with open(shard, "r+b") as f:  # bytes flipped inside the first records: the first read notices
    f.seek(200)
    block = f.read(200)
    f.seek(200)
    f.write(bytes(b ^ 0xFF for b in block))
  examples = dataset.examples(str(copy), "sudoku", "train", variant="tiny")
  with pytest.raises(dataset.DatasetError, match="corrupt"):
    examples[0]  # pylint: disable=pointless-statement

  os.truncate(shard, 1000)  # cut short: opening notices
  with pytest.raises(dataset.DatasetError, match="truncated|cannot open"):
    dataset.load(str(copy), "sudoku", "train", variant="tiny")

  os.remove(os.path.join(version_dir, "metadata.json"))
  with pytest.raises(dataset.DatasetError, match=version_dir):
    dataset.load(str(copy), "sudoku", "heldout", variant="tiny")


def test_bad_names_and_copies_are_readable_value_errors(data_dir):
  cases = [
      (lambda: dataset.load(data_dir, "chess", "train"),
       "unknown trm_puzzles task 'chess'; choose from sudoku, maze"),
      (lambda: dataset.examples(data_dir, "maze", "train", variant="huge"),
       "unknown trm_puzzles maze variant 'huge'; choose from tiny, default, small"),
      (lambda: dataset.load(data_dir, "maze", "test", variant="tiny"),
       "unknown split 'test'; choose from train, heldout"),
      (lambda: dataset.examples(data_dir, "maze", "train", variant="tiny", copies=9),
       r"copies must be an integer in \[1, 8\] for maze \(one per symmetry of the square\), got 9"),
      (lambda: dataset.examples(data_dir, "sudoku", "train", variant="tiny", copies=0),
       "copies must be an integer >= 1 for sudoku, got 0"),
      (lambda: dataset.generate(data_dir, "sudoku", "full"), "unknown trm_puzzles sudoku variant 'full'"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  with pytest.raises(IndexError):
    dataset.load(data_dir, "maze", "train", variant="tiny")[4]  # pylint: disable=expression-not-assigned


def test_command_line_summarizes_a_generated_dataset(data_dir):
  """``python -m jaxai.trm.dataset`` on a generated dataset prints one JSON line per split (a fresh
  process: ~5 s of imports)."""
  done = subprocess.run([sys.executable, "-m", "jaxai.trm.dataset", "--task=maze", "--variant=tiny",
                         f"--data_dir={data_dir}"], cwd=REPO_ROOT, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=120, check=True)
  lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  assert [(line["split"], line["puzzles"]) for line in lines] == [("train", 4), ("heldout", 4)]
  assert all(line["mean_path_length"] > maze.HARD_PATH_LENGTH for line in lines)
  assert all(line["candidates_tried"] == 4 for line in lines)  # every maze is kept


def test_measure_reports_the_keep_rate_of_the_seeds_it_tried():
  report = dataset.measure("sudoku", 30)
  kept = sum(sudoku.extreme_record(seed) is not None for seed in range(30))
  assert report["kept"] == max(1, kept) and report["candidates_per_kept"] == round(30 / max(1, kept), 2)
  # Each variant's time is extrapolated only from seeds kept by its own rule.
  assert set(report["minutes_idle"]) == {"tiny", "default", "small"} and report["cpu_seconds_per_kept"] > 0
  easy = dataset.measure("sudoku", 30, variant="easy")
  assert easy["kept"] == max(1, sum(sudoku.easy_record(seed) is not None for seed in range(30)))
  assert set(easy["minutes_idle"]) == {"easy"}
