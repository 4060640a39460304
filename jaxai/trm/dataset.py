"""``trm_puzzles``: the TRM paper's Sudoku-Extreme and Maze-Hard tasks, generated here, as a TFDS
dataset (ArrayRecord) read with grain.

Public API (what a TRM config needs):

  generate(data_dir, task, variant="default", *, processes=1) -> path
      Generates the task's puzzles once (a progress bar per split) and caches them under
      ``data_dir/trm_puzzles/<task>_<variant>/<version>``; later calls return at once.
  examples(data_dir, task, split, *, variant="default", copies=1, seed=0) -> grain.MapDataset
      ``{'inputs': int32 [L], 'labels': int32 [L], 'puzzle_id': int32}`` with ``L`` =
      ``seq_len(task, variant)``: 81 (Sudoku), 900 (maze) or 144 (the 12x12 maze variant ``small``);
      tokens as documented in ``jaxai.trm.sudoku`` and ``jaxai.trm.maze``.
      ``copies`` versions of each puzzle, augmented on the fly (see ``examples``).
  load(data_dir, task, split, *, variant="default") -> PuzzleSplit
      The stored puzzles with their generator seeds and ratings.
  DatasetError
      Raised, quickly and naming the path, for a missing, incomplete or corrupt dataset.

What is stored: each split holds the first ``VARIANTS[task][variant].puzzles[split]`` candidates,
in seed order, that the task keeps: Sudoku candidates are ``sudoku.generate_puzzle(seed)`` kept by
``sudoku.is_extreme`` (the ``easy`` variant: by ``sudoku.is_easy``); maze candidates
``maze.generate_maze(seed)`` (always long-path by construction; ``small``: 12x12). Train seeds count up from
``TRAIN_SEED_BASE``, heldout seeds from ``HELDOUT_SEED_BASE``, so the two never share a generator seed, and the result does not depend on
how many processes generate it. Each record is one puzzle: its tokens, its index in the split
(``puzzle_id``), its seed (which regenerates it) and its ratings (Sudoku: ``clues``,
``search_nodes``; maze: ``path_length``); the split's number of candidates tried is in the
metadata. Records are in puzzle order (TFDS ``disable_shuffling``) and reads check the index.
"""
import dataclasses
import multiprocessing
import os
import resource
import time
from typing import Callable

import grain
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jaxai.data import array_records
from jaxai.trm import maze
from jaxai.trm import sudoku

DATASET_NAME = "trm_puzzles"
TRAIN_SEED_BASE = 0
HELDOUT_SEED_BASE = 1 << 30  # heldout puzzles: seeds from here on, never used by train
SPLITS = ("train", "heldout")


class DatasetError(RuntimeError):
  """The dataset is missing, incomplete or corrupt; the message names the path and the problem."""


def _sudoku_augment(inputs, labels, copy: int, rng: np.random.Generator):
  transform = sudoku.IDENTITY if copy == 0 else sudoku.random_transform(rng)
  return transform(inputs), transform(labels)


def _maze_augment(inputs, labels, copy: int, rng: np.random.Generator):
  del rng  # the copies are the symmetries in order
  return maze.dihedral(inputs, copy), maze.dihedral(labels, copy)


@dataclasses.dataclass(frozen=True)
class Task:
  seq_len: int
  vocab_size: int
  # seed -> record fields, None if not kept; a generator module's function, so that spawned
  # generating processes need not import this module (grain and TFDS import jax: seconds each)
  candidate: Callable[[int], dict | None]
  ratings: tuple[str, ...]  # integer fields stored beside the tokens
  augment: Callable  # (inputs, labels, copy, rng) -> (inputs, labels); copy 0 is the identity
  max_copies: int | None  # distinct augmentations a puzzle has (None: practically unbounded)


TASKS = {
    "sudoku": Task(sudoku.NUM_CELLS, sudoku.VOCAB_SIZE, sudoku.extreme_record, ("clues", "search_nodes"),
                   _sudoku_augment, None),
    "maze": Task(maze.NUM_CELLS, maze.VOCAB_SIZE, maze.record, ("path_length",), _maze_augment,
                 maze.NUM_DIHEDRAL),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  puzzles: dict[str, int]  # kept puzzles per split
  candidate: Callable[[int], dict | None] | None = None  # a rule other than the task's
  seq_len: int | None = None  # tokens per puzzle if not the task's (a smaller maze)


def candidate_rule(task: str, variant: str) -> Callable[[int], dict | None]:
  """seed -> the stored fields of that seed's candidate if ``variant`` keeps it, else None."""
  return VARIANTS[task][variant].candidate or TASKS[task].candidate


def seq_len(task: str, variant: str) -> int:
  """Tokens per puzzle of ``task``'s ``variant``."""
  _check_names(task, variant)
  return VARIANTS[task][variant].seq_len or TASKS[task].seq_len


VARIANTS = {
    "sudoku": {
        "tiny": Variant({"train": 4, "heldout": 4}),  # a few seconds: for tests
        # The paper's 1,000 training puzzles; a held-out set large enough for 1% differences
        # (binomial standard error <= 0.5%). 19 min on 2 idle cores of the AVX2 host, 42-67 min
        # while they are shared (docs/trm.md#data).
        "default": Variant({"train": 1000, "heldout": 10_000}),
        # The same train split and the first 2,000 of default's held-out puzzles (kept puzzles are
        # in seed order, so a smaller count is a prefix): 5 min on 2 idle cores, 11-18 while shared;
        # standard error <= 1.1%.
        "small": Variant({"train": 1000, "heldout": 2000}),
        # Minimal puzzles that propagation of singles solves without search (``sudoku.is_easy``:
        # 42% of candidates), for CPU-sized runs: exact accuracy on it moves within 1000 updates.
        "easy": Variant({"train": 1000, "heldout": 2000}, sudoku.easy_record),
    },
    "maze": {
        "tiny": Variant({"train": 4, "heldout": 4}),
        "default": Variant({"train": 1000, "heldout": 1000}),  # the paper's Maze-Hard sizes
        # 12x12 mazes with paths of more than 42 steps (``maze.small_record``), the same counts:
        # for CPU-sized runs (the 30x30 trains at 0.022 steps/s on 2 cores).
        "small": Variant({"train": 1000, "heldout": 1000}, maze.small_record,
                         maze.SMALL_SIZE * maze.SMALL_SIZE),
    },
}


def _check_names(task: str, variant: str):
  if task not in TASKS:
    raise ValueError(f"unknown {DATASET_NAME} task {task!r}; choose from {', '.join(TASKS)}")
  if variant not in VARIANTS[task]:
    raise ValueError(f"unknown {DATASET_NAME} {task} variant {variant!r}; choose from "
                     f"{', '.join(VARIANTS[task])}")


def seed_base(split: str) -> int:
  return TRAIN_SEED_BASE if split == "train" else HELDOUT_SEED_BASE


_MAX_BLOCK_PER_PROCESS = 64  # seeds per worker per round trip at most


def _block_size(needed: int, tried: int, kept: int, processes: int) -> int:
  """Seeds to try next: about as many as the keep rate so far says are still needed (so a tiny
  variant does not generate 64 candidates per worker to keep 4), at least one per worker."""
  expected = int(np.ceil(needed * (tried + 1) / (kept + 1)))
  return min(_MAX_BLOCK_PER_PROCESS * processes, max(processes, expected))


def worker_pool(processes: int):
  """A pool of ``processes`` generating workers, or None for 1 (candidates made in this process).
  Spawned, not forked: forking a process that imported jax can hang."""
  return multiprocessing.get_context("spawn").Pool(processes) if processes > 1 else None


def kept_candidates(task: str, split: str, count: int, *, variant: str = "default",
                    processes: int = 1, pool=None, progress=None):
  """Yields ``(seed, record fields)`` of the first ``count`` kept candidates of ``split``, in seed
  order, and returns the number of seeds tried. ``processes`` > 1 generates blocks of seeds in
  parallel (the same result) on ``pool`` (``worker_pool(processes)``; made and closed here if
  None); ``progress(kept)`` is called as puzzles are kept. ``variant`` names the rule that keeps
  candidates (``candidate_rule``)."""
  candidate = candidate_rule(task, variant)
  base, tried, kept = seed_base(split), 0, 0
  own_pool = pool is None and processes > 1
  if own_pool:
    pool = worker_pool(processes)
  try:
    while kept < count:
      block = range(base + tried, base + tried + _block_size(count - kept, tried, kept, processes))
      if pool:
        records = pool.map(candidate, block, chunksize=max(1, len(block) // (4 * processes)))
      else:
        records = map(candidate, block)  # lazy: stops at the last puzzle needed
      for seed, record in zip(block, records):
        tried += 1
        if record is not None:
          kept += 1
          yield seed, record
          if progress:
            progress(kept)
          if kept == count:
            break
  finally:
    if own_pool:
      pool.terminate()
  return tried


@dataclasses.dataclass
class TrmPuzzlesConfig(tfds.core.BuilderConfig):
  task: str = ""
  variant: str = ""


class TrmPuzzles(tfds.core.GeneratorBasedBuilder):
  """The TRM paper's puzzle tasks, generated procedurally (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [TrmPuzzlesConfig(name=f"{task}_{variant}", task=task, variant=variant,
                                      description=f"{task}, {variant} variant")
                     for task in VARIANTS for variant in VARIANTS[task]]

  def __init__(self, *, processes: int = 1, pool=None, **kwargs):
    super().__init__(**kwargs)
    self._processes, self._pool = processes, pool

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the importlib_resources backport for packages; this file is the answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    task = TASKS[config.task]
    tokens = tfds.features.Tensor(shape=(seq_len(config.task, config.variant),), dtype=np.uint8,
                                  encoding="bytes")
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "inputs": tokens, "labels": tokens, "puzzle_id": np.int64, "seed": np.int64,
            **{name: np.int64 for name in task.ratings}}),
        disable_shuffling=True,  # records stay in puzzle order: reads check it
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    config = self.builder_config
    count = VARIANTS[config.task][config.variant].puzzles[split]
    bar = tqdm.tqdm(total=count, desc=f"Generating {DATASET_NAME}/{config.name} {split}", unit="puzzle")
    candidates = kept_candidates(config.task, split, count, variant=config.variant,
                                 processes=self._processes,
                                 pool=self._pool, progress=lambda kept: bar.update(1))
    puzzle_id = 0
    while True:
      try:
        seed, record = next(candidates)
      except StopIteration as done:
        tried = done.value
        break
      yield puzzle_id, {**record, "puzzle_id": puzzle_id, "seed": seed}
      puzzle_id += 1
    bar.close()
    self.info.metadata.setdefault("candidates_tried", {})[split] = tried
    self.info.metadata.update(seed_bases={s: seed_base(s) for s in SPLITS},
                              vocab_size=TASKS[config.task].vocab_size)


def dataset_dir(data_dir: str, task: str, variant: str = "default") -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), DATASET_NAME,
                      f"{task}_{variant}", str(TrmPuzzles.VERSION))


def generate(data_dir: str, task: str, variant: str = "default", *, processes: int = 1) -> str:
  """Generates ``task``'s ``variant`` under ``data_dir`` unless it is there already; returns its
  directory. ``processes`` workers generate candidates (the result is the same for any number).
  Run it on one process before others read (two generating into one data_dir would both work).

  Measured on the AVX2-only 2-core host (2026-12-07, docs/trm.md#data): Sudoku costs 0.21 CPU
  seconds per kept puzzle (9.3 candidates each), so ``default`` takes ~19 min on 2 idle cores and
  42-67 min while they are shared; mazes 0.15 s each, ``default`` generated in 6 min 02 s on
  shared cores. ``tiny`` takes a few seconds.
  """
  _check_names(task, variant)
  path = dataset_dir(data_dir, task, variant)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    # One pool for both splits: a spawned worker imports the generators, and when this module runs
    # as a program, the module again (grain, TFDS, jax: seconds).
    pool = worker_pool(processes)
    try:
      builder = TrmPuzzles(config=f"{task}_{variant}", processes=processes, pool=pool,
                           data_dir=os.path.abspath(os.path.expanduser(data_dir)),
                           file_format="array_record")
      builder.download_and_prepare()
    finally:
      if pool:
        pool.terminate()
  load(data_dir, task, "train", variant=variant)  # checks what was written
  return path


class PuzzleSplit:
  """One split of a generated task: ``len`` puzzles, ``split[i]`` the stored record of puzzle ``i``
  (``inputs``, ``labels`` uint8, ``puzzle_id``, ``seed`` and the ratings)."""

  def __init__(self, data_dir: str, task: str, split: str, *, variant: str = "default"):
    self.path = dataset_dir(data_dir, task, variant)
    self.task, self.split = task, split
    if not os.path.exists(os.path.join(self.path, "dataset_info.json")):
      raise DatasetError(f"no {DATASET_NAME}/{task}_{variant} dataset at {self.path} (missing "
                         f"dataset_info.json): generate it with jaxai.trm.dataset.generate("
                         f"{data_dir!r}, {task!r}, {variant!r})")
    try:
      builder = tfds.builder_from_directory(self.path)
      split_info = builder.info.splits[split]
      self.candidates_tried = int(builder.info.metadata["candidates_tried"][split])
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DatasetError(f"{DATASET_NAME} at {self.path} is incomplete or corrupt "
                         f"(cannot read its info or split {split!r}: {type(e).__name__}: {e})") from e
    self.num_puzzles = split_info.num_examples
    array_records.check_shards(split_info, self.path, DatasetError)
    self._builder = builder
    self._source = None

  def __getstate__(self):  # grain workers get a copy without the open files
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self.num_puzzles

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_puzzles:
      raise IndexError(f"puzzle {index} of split {self.split!r}, which has {self.num_puzzles}")
    if self._source is None:
      self._source = self._builder.as_data_source(self.split)
    try:
      record = self._source[index]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DatasetError(f"{DATASET_NAME} at {self.path}: cannot read record {index} of split "
                         f"{self.split!r} ({type(e).__name__}: {e}); the files are corrupt, delete "
                         "and regenerate them") from e
    if record["puzzle_id"] != index:
      raise DatasetError(f"{DATASET_NAME} at {self.path}: record {index} of split {self.split!r} "
                         f"holds puzzle {record['puzzle_id']}; the dataset is corrupt")
    return record


def load(data_dir: str, task: str, split: str, *, variant: str = "default") -> PuzzleSplit:
  """Opens one split of a generated task, checking it; raises DatasetError if unusable."""
  _check_names(task, variant)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
  return PuzzleSplit(data_dir, task, split, variant=variant)


class AugmentedPuzzles(grain.sources.RandomAccessDataSource):
  """Example ``i`` = copy ``i // len(puzzles)`` of puzzle ``i % len(puzzles)`` (see ``examples``)."""

  def __init__(self, puzzles: PuzzleSplit, copies: int, seed: int):
    self.puzzles, self.copies, self.seed = puzzles, copies, seed
    self._augment = TASKS[puzzles.task].augment

  def __len__(self) -> int:
    return len(self.puzzles) * self.copies

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    copy, puzzle_id = divmod(int(index), len(self.puzzles))
    record = self.puzzles[puzzle_id]
    rng = np.random.default_rng([self.seed, index])
    inputs, labels = self._augment(record["inputs"], record["labels"], copy, rng)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32),
            "puzzle_id": np.int32(puzzle_id)}


def examples(data_dir: str, task: str, split: str, *, variant: str = "default", copies: int = 1,
             seed: int = 0) -> grain.MapDataset:
  """The split's puzzles as model examples (keys in the module docstring), ``copies`` of each.

  Copy 0 of every puzzle is the puzzle itself. For Sudoku, copies 1.. are random transforms
  (``sudoku.random_transform``) drawn from ``(seed, example index)``, so 1,000 puzzles with
  ``copies=1000`` give the paper's million augmented examples without storing them; for mazes,
  copy ``k`` is symmetry ``k`` of the square (``maze.dihedral``), so ``copies <= 8``. Unshuffled:
  ``jaxai.data.pipeline.process_local_batches`` shuffles and batches it.
  """
  _check_names(task, variant)
  max_copies = TASKS[task].max_copies
  if not isinstance(copies, (int, np.integer)) or copies < 1 or (max_copies and copies > max_copies):
    limit = f"an integer in [1, {max_copies}]" if max_copies else "an integer >= 1"
    why = " (one per symmetry of the square)" if task == "maze" else ""
    raise ValueError(f"copies must be {limit} for {task}{why}, got {copies!r}")
  return grain.MapDataset.source(AugmentedPuzzles(load(data_dir, task, split, variant=variant),
                                                  int(copies), seed))


def _timed_map(candidate, seeds, processes: int, *, warm_up_only: bool = False):
  """(records, wall seconds of the map alone, CPU seconds of this process and the workers), the
  workers' start-up (imports) included in the CPU seconds, excluded from the wall seconds."""
  children_cpu = lambda: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
  cpu_start, children_start = time.process_time(), children_cpu()
  pool = worker_pool(processes)
  try:
    if pool:
      pool.map(int, range(processes), chunksize=1)  # every worker has started
    start = time.time()
    if warm_up_only:
      records = []
    else:
      records = pool.map(candidate, seeds, chunksize=8) if pool else [candidate(s) for s in seeds]
    seconds = time.time() - start
  finally:
    if pool:
      pool.close()
      pool.join()  # reaped, so that the workers' CPU time is counted
  return records, seconds, time.process_time() - cpu_start + children_cpu() - children_start


def measure(task: str, seeds: int, *, processes: int = 1, split: str = "train",
            variant: str = "default") -> dict:
  """What generating ``task`` costs on this host: the first ``seeds`` candidates of ``split`` on
  ``processes`` workers, the keep rate, wall seconds (as measured, under whatever else runs) and
  CPU seconds (all workers', their start-up subtracted) per candidate and per kept puzzle, and each
  variant's generation extrapolated from them: ``minutes_wall`` at the measured rate,
  ``minutes_idle`` on ``processes`` otherwise idle cores (both splits; start-up and writing not
  included, they take seconds)."""
  _check_names(task, variant)
  candidate = candidate_rule(task, variant)
  _, _, start_up_cpu = _timed_map(candidate, [], processes, warm_up_only=True)
  records, seconds, cpu = _timed_map(candidate, range(seed_base(split), seed_base(split) + seeds),
                                     processes)
  cpu -= start_up_cpu if processes > 1 else 0.0
  kept = max(1, sum(record is not None for record in records))
  rule = VARIANTS[task][variant].candidate
  puzzles = {name: sum(v.puzzles.values()) for name, v in VARIANTS[task].items() if v.candidate is rule}
  return {"task": task, "variant": variant, "split": split, "seeds": seeds, "kept": kept,
          "processes": processes,
          "candidates_per_kept": round(seeds / kept, 2),
          "wall_seconds_per_candidate": round(seconds / seeds, 4),
          "wall_seconds_per_kept": round(seconds / kept, 4),
          "cpu_seconds_per_kept": round(cpu / kept, 4),
          "worker_start_up_cpu_seconds": round(start_up_cpu, 2),
          "minutes_wall": {name: round(n * seconds / kept / 60, 1) for name, n in puzzles.items()},
          "minutes_idle": {name: round(n * cpu / kept / processes / 60, 1) for name, n in puzzles.items()}}


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data_dir", None, "Where trm_puzzles/<task>_<variant>/ is generated "
                      "(required unless --measure_seeds).")
  flags.DEFINE_enum("task", "sudoku", sorted(TASKS), "Puzzle task.")
  flags.DEFINE_enum("variant", "default", sorted({v for variants in VARIANTS.values() for v in variants}),
                    "Dataset variant (per task: VARIANTS).")
  flags.DEFINE_integer("processes", os.cpu_count() or 1, "Generating processes.")
  flags.DEFINE_integer("measure_seeds", 0, "If > 0, generate nothing: time this many candidates "
                       "and print the keep rate, seconds per kept puzzle and each variant's "
                       "extrapolated generation time (see measure).")


def main(argv):
  """``python -m jaxai.trm.dataset --data_dir=DIR --task=sudoku [--variant=default]``: generate and
  summarize each split (puzzles, candidates tried, mean ratings, seconds this call took).
  ``--measure_seeds=N`` times N candidates instead (``measure``)."""
  del argv
  import json  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxai import cli  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  if args.measure_seeds > 0:
    print(json.dumps(measure(args.task, args.measure_seeds, processes=args.processes,
                             variant=args.variant)))
    return
  if not args.data_dir:
    cli.fail("config error", "--data_dir: required (where to generate the dataset)")
  start = time.time()
  path = generate(args.data_dir, args.task, args.variant, processes=args.processes)
  seconds = round(time.time() - start, 1)
  for split in SPLITS:
    puzzles = load(args.data_dir, args.task, split, variant=args.variant)
    records = [puzzles[i] for i in range(len(puzzles))]
    ratings = {f"mean_{name}": round(float(np.mean([r[name] for r in records])), 2)
               for name in TASKS[args.task].ratings}
    print(json.dumps({"split": split, "path": path, "puzzles": len(puzzles),
                      "candidates_tried": puzzles.candidates_tried, **ratings, "seconds": seconds}))


if __name__ == "__main__":
  from jaxai import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run(main)
