"""Sudoku puzzles with a unique solution, rated by a solver's search effort, and their augmentations.

Generation (``generate_puzzle(seed)``, deterministic from the seed): a random full grid (the
solver below filling an empty grid, trying digits in a seeded random order), then its clues are
visited in a seeded random order and each is removed if the puzzle without it still has exactly one
solution. The result is *minimal*: no clue can go without losing uniqueness. Uniqueness is decided
by the solver, not assumed: removing a clue keeps the solution unique exactly when no grid with a
different digit in that cell solves the puzzle, which one search shows.

Rating: the solver propagates constraints (naked singles: a cell with one candidate takes it;
hidden singles: a digit with one place left in a row, column or box goes there) to a fixed point,
then branches on the first cell (row-major) with the fewest candidates, trying its digits in
ascending order. ``search_nodes`` is the number of branches it enters while enumerating every
solution, i.e. while proving the solution unique; 0 means propagation alone solves the puzzle.
Because the whole tree is searched the count does not depend on luck in the digit order, and it is
the same for a puzzle and its digit relabellings.

The "extreme" rule (``is_extreme``): at most ``EXTREME_MAX_CLUES`` clues and at least
``EXTREME_MIN_SEARCH_NODES`` search nodes. Random minimal puzzles need little search (measured on
2,000 seeds: 42% none, median 2 nodes, 90th percentile 10, 99th 36; clues 21-30, median 24); the
rule keeps the hardest 10.75% of them, one candidate in 9.3 (figures and costs in ``docs/trm.md``).
A branch always has at least two digits and a unique puzzle's tree is searched whole, so a puzzle
needing search has at least 2 nodes. The "easy" rule (``is_easy``) keeps the others, the 42% that
propagation solves without search: for CPU-sized runs, in which exact accuracy on it moves
(whether the extreme split's does in that budget is not measured yet; docs/trm.md).

How this compares to the paper's Sudoku-Extreme: that set (HRM's, reused by TRM) pools public
collections curated by puzzle enthusiasts (tdoku's benchmark sets: magictour top1465, the forum's
hardest lists, ...) with easier ones, rated by the backtracks of the tdoku solver; its hard part
was found by years of targeted search for puzzles that defeat human techniques. Ours are random
minimal puzzles filtered by search effort: harder than typical random puzzles, but not of that
hand-picked hardness, and our node counts (singles-only propagation) are on a different scale from
tdoku's backtracks (stronger propagation). It cannot be downloaded here, so accuracies on this
split are not comparable with the paper's numbers, only orderings between models.

Encoding for the model: 81 tokens, row-major; token 0 = blank, 1..9 = that digit
(``VOCAB_SIZE = 10``). Inputs are the puzzle, labels the solution (never 0).

Augmentations (``random_transform``): a digit permutation, a permutation of the three bands and of
the rows inside each band, the same for stacks and columns, and a transpose with probability 1/2.
Each maps valid grids to valid grids and puzzles with a unique solution to puzzles with a unique
solution, so the same transform of the solution is the transformed puzzle's solution.
"""
import dataclasses

import numpy as np

NUM_CELLS = 81
BLANK = 0
VOCAB_SIZE = 10  # 0 = blank, 1..9 = digits
EXTREME_MAX_CLUES = 25
EXTREME_MIN_SEARCH_NODES = 10

_ALL_DIGITS = 0x1FF  # candidate sets are 9-bit masks, bit d - 1 for digit d
_UNITS = tuple(
    [tuple(9 * r + c for c in range(9)) for r in range(9)]
    + [tuple(9 * r + c for r in range(9)) for c in range(9)]
    + [tuple(9 * (3 * br + r) + 3 * bc + c for r in range(3) for c in range(3))
       for br in range(3) for bc in range(3)])
_PEERS = tuple(tuple(sorted({p for u in _UNITS if cell in u for p in u} - {cell}))
               for cell in range(NUM_CELLS))
_POPCOUNT = tuple(bin(m).count("1") for m in range(_ALL_DIGITS + 1))
_DIGIT_OF_BIT = {1 << d: d + 1 for d in range(9)}


def _propagate(candidates: list[int], fixed: list[int], peers_of=_PEERS, units=_UNITS,
               all_digits=_ALL_DIGITS) -> bool:
  """Applies naked and hidden singles to ``candidates`` in place until nothing changes, starting
  from the cells in ``fixed`` (which hold one candidate); False on a contradiction.

  The fixed point does not depend on the order the rules are applied in (each only removes
  candidates, and stays applicable as others are removed), so neither does the rating. This is the
  generator's inner loop: the tables are bound as arguments (locals are faster than globals), and
  the hidden-single scan leaves out digits already decided in a unit, so it only visits cells when
  a digit really has one place left.
  """
  while True:
    while fixed:
      cell = fixed.pop()
      bit = candidates[cell]
      for peer in peers_of[cell]:
        mask = candidates[peer]
        if mask & bit:
          mask ^= bit
          if not mask:
            return False
          candidates[peer] = mask
          if not mask & (mask - 1):
            fixed.append(peer)
    for unit in units:
      seen_once = seen_twice = decided = 0
      for cell in unit:
        mask = candidates[cell]
        if mask & (mask - 1):
          seen_twice |= seen_once & mask
          seen_once |= mask
        else:
          decided |= mask
      if seen_once | decided != all_digits:
        return False  # a digit has no place left in this unit
      hidden = seen_once & ~seen_twice & ~decided  # undecided digits with one place left
      if hidden:
        for cell in unit:
          mask = candidates[cell] & hidden
          if mask:
            if mask & (mask - 1):
              return False  # two digits that each can only go here
            candidates[cell] = mask
            fixed.append(cell)
    if not fixed:
      return True


def _candidates_of(grid) -> tuple[list[int], list[int]]:
  """Candidate masks of an 81-cell grid (0 = blank) and its given cells, before propagation."""
  candidates = [_ALL_DIGITS] * NUM_CELLS
  fixed = []
  for cell, digit in enumerate(grid):
    if digit:
      candidates[cell] = 1 << (int(digit) - 1)
      fixed.append(cell)
  return candidates, fixed


def _branch_cell(candidates: list[int]) -> int:
  """The first cell with the fewest (at least two) candidates; -1 if every cell is decided."""
  best, best_count = -1, 10
  for cell, mask in enumerate(candidates):
    if mask & (mask - 1):
      count = _POPCOUNT[mask]
      if count < best_count:
        best, best_count = cell, count
        if count == 2:
          break
  return best


@dataclasses.dataclass
class _Search:
  limit: int  # stop after this many solutions
  rng: np.random.Generator | None = None  # digit order at each branch; None: ascending
  solutions: list = dataclasses.field(default_factory=list)
  nodes: int = 0

  def run(self, candidates: list[int]) -> None:
    cell = _branch_cell(candidates)
    if cell < 0:
      self.solutions.append(np.array([_DIGIT_OF_BIT[m] for m in candidates], np.uint8))
      return
    mask = candidates[cell]
    bits = [1 << d for d in range(9) if mask >> d & 1]
    if self.rng is not None:
      self.rng.shuffle(bits)
    for bit in bits:
      child = candidates.copy()
      child[cell] = bit
      self.nodes += 1
      if _propagate(child, [cell]):
        self.run(child)
      if len(self.solutions) >= self.limit:
        return


@dataclasses.dataclass(frozen=True)
class Solved:
  solutions: list  # up to ``limit`` solutions, uint8 [81] each
  search_nodes: int  # branches entered (see module docstring)


def solve(grid, limit: int = 2) -> Solved:
  """Up to ``limit`` solutions of an 81-cell grid (0 = blank) and the search effort spent.
  With ``limit=2``, one solution means it is unique and ``search_nodes`` is the puzzle's rating."""
  candidates, fixed = _candidates_of(np.asarray(grid).reshape(NUM_CELLS))
  search = _Search(limit)
  if _propagate(candidates, fixed):
    search.run(candidates)
  return Solved(search.solutions, search.nodes)


def random_solution(rng: np.random.Generator) -> np.ndarray:
  """A random valid full grid, uint8 [81] (the solver on an empty grid, digits in random order)."""
  search = _Search(limit=1, rng=rng)
  search.run([_ALL_DIGITS] * NUM_CELLS)
  return search.solutions[0]


def _unique_without(puzzle: np.ndarray, cell: int) -> bool:
  """Whether ``puzzle`` with ``cell``'s clue removed still has only the one solution: no grid with
  another digit in that cell solves it."""
  candidates, fixed = _candidates_of(puzzle)
  fixed.remove(cell)
  candidates[cell] = _ALL_DIGITS & ~candidates[cell]
  if not _propagate(candidates, fixed):
    return True
  search = _Search(limit=1)
  search.run(candidates)
  return not search.solutions


def minimal_puzzle(solution: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Clues of ``solution`` removed in a random order while the solution stays unique, uint8 [81]."""
  puzzle = np.array(solution, np.uint8)
  for cell in rng.permutation(NUM_CELLS):
    if _unique_without(puzzle, int(cell)):
      puzzle[cell] = BLANK
  return puzzle


@dataclasses.dataclass(frozen=True)
class Puzzle:
  puzzle: np.ndarray  # uint8 [81], 0 = blank
  solution: np.ndarray  # uint8 [81], 1..9
  seed: int  # generate_puzzle(seed) makes it again
  clues: int
  search_nodes: int


def generate_puzzle(seed: int) -> Puzzle:
  """The minimal puzzle of seed ``seed`` with its solution and rating (see module docstring)."""
  rng = np.random.default_rng(seed)
  solution = random_solution(rng)
  puzzle = minimal_puzzle(solution, rng)
  return Puzzle(puzzle, solution, seed, int(np.count_nonzero(puzzle)), solve(puzzle).search_nodes)


def is_extreme(puzzle: Puzzle) -> bool:
  """The extreme split's rule: few clues and a long search (see module docstring)."""
  return puzzle.clues <= EXTREME_MAX_CLUES and puzzle.search_nodes >= EXTREME_MIN_SEARCH_NODES


def is_easy(puzzle: Puzzle) -> bool:
  """The easy split's rule: propagation of singles alone solves it (no search). Still a minimal
  puzzle (median 24 clues), so the answer needs long chains of deductions, but no guessing."""
  return puzzle.search_nodes == 0


def _record(puzzle: Puzzle) -> dict:
  return {"inputs": puzzle.puzzle, "labels": puzzle.solution, "clues": puzzle.clues,
          "search_nodes": puzzle.search_nodes}


# The candidates' rules live here, not in ``dataset``, so that generating processes import only
# this module.
def extreme_record(seed: int) -> dict | None:
  """The stored fields of ``generate_puzzle(seed)`` if the extreme rule keeps it, else None."""
  puzzle = generate_puzzle(seed)
  return _record(puzzle) if is_extreme(puzzle) else None


def easy_record(seed: int) -> dict | None:
  """The stored fields of ``generate_puzzle(seed)`` if the easy rule keeps it, else None."""
  puzzle = generate_puzzle(seed)
  return _record(puzzle) if is_easy(puzzle) else None


@dataclasses.dataclass(frozen=True)
class Transform:
  """A validity-preserving map of grids: ``out[r, c] = digit_map[grid[rows[r], cols[c]]]``, then
  transposed if ``transpose``. ``digit_map[0] = 0`` keeps blanks blank."""
  digit_map: np.ndarray  # [10]
  rows: np.ndarray  # [9], bands and rows within bands permuted
  cols: np.ndarray  # [9], stacks and columns within stacks permuted
  transpose: bool

  def __call__(self, grid: np.ndarray) -> np.ndarray:
    """Applies the transform to one grid [81] or a batch [..., 81]."""
    square = np.asarray(grid).reshape(*np.shape(grid)[:-1], 9, 9)
    out = self.digit_map[square[..., self.rows, :][..., :, self.cols]]
    if self.transpose:
      out = np.swapaxes(out, -1, -2)
    return out.reshape(np.shape(grid)).astype(np.asarray(grid).dtype)


def _line_order(rng: np.random.Generator) -> np.ndarray:
  """Rows (or columns) reordered by a random band permutation and one within each band."""
  return np.concatenate([3 * band + rng.permutation(3) for band in rng.permutation(3)])


def random_transform(rng: np.random.Generator) -> Transform:
  """A uniformly random transform of the group described in the module docstring."""
  digit_map = np.concatenate([[BLANK], 1 + rng.permutation(9)])
  return Transform(digit_map, _line_order(rng), _line_order(rng), bool(rng.integers(2)))


IDENTITY = Transform(np.arange(VOCAB_SIZE), np.arange(9), np.arange(9), False)
