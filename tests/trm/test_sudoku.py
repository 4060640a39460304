"""Sudoku generation and augmentations, checked by the second solver of ``puzzle_checks``
(Algorithm X on the exact-cover matrix, no rule in common with ``jaxai.trm.sudoku``'s solver):
every generated puzzle's clues agree with its solution, it has that one solution, and it is
minimal."""
import numpy as np
import pytest

from jaxai.trm import sudoku
from puzzle_checks import check_puzzle, exact_cover_solutions, is_valid_solution, solved_by_singles

SEEDS = range(12)  # generated puzzles checked here (the dataset's are checked in test_puzzle_dataset)


def test_the_reference_solver_finds_what_it_should():
  """This file's solver itself: a known puzzle's solution, two for an underdetermined grid, none
  for conflicting clues."""
  puzzle = np.array([int(ch) for ch in
                     "530070000600195000098000060800060003400803001700020006060000280000419005000080079"])
  solutions = exact_cover_solutions(puzzle)
  assert len(solutions) == 1 and is_valid_solution(solutions[0])
  assert "".join(map(str, solutions[0][:9])) == "534678912"
  assert len(exact_cover_solutions(np.zeros(81, np.uint8))) == 2
  conflicting = puzzle.copy()
  conflicting[2] = 5  # a second 5 in the first row
  assert exact_cover_solutions(conflicting) == []


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_puzzles_are_unique_minimal_and_rated_as_stored(seed):
  generated = sudoku.generate_puzzle(seed)
  check_puzzle(generated.puzzle, generated.solution)
  assert generated.seed == seed
  assert generated.clues == np.count_nonzero(generated.puzzle)
  assert generated.search_nodes == sudoku.solve(generated.puzzle).search_nodes >= 0
  again = sudoku.generate_puzzle(seed)
  np.testing.assert_array_equal(again.puzzle, generated.puzzle)
  np.testing.assert_array_equal(again.solution, generated.solution)
  kept = sudoku.extreme_record(seed)
  assert (kept is not None) == sudoku.is_extreme(generated)
  if kept is not None:
    assert generated.clues <= sudoku.EXTREME_MAX_CLUES
    assert generated.search_nodes >= sudoku.EXTREME_MIN_SEARCH_NODES
    np.testing.assert_array_equal(kept["inputs"], generated.puzzle)
    assert kept["search_nodes"] == generated.search_nodes and kept["clues"] == generated.clues
  easy = sudoku.easy_record(seed)
  assert (easy is not None) == solved_by_singles(generated.puzzle)  # the easy rule, checked apart
  assert easy is None or kept is None


def test_the_module_solver_agrees_with_the_reference_on_other_grids():
  """Grids with several solutions, none, or one found by propagation alone: ``solve``'s count (up
  to 2) and solutions agree with this file's solver, and it rates a propagation-only grid 0."""
  rng = np.random.default_rng(0)
  for trial in range(12):
    solution = sudoku.random_solution(rng)
    assert is_valid_solution(solution)
    grid = solution.copy()
    grid[rng.permutation(81)[:[5, 50, 58, 64][trial % 4]]] = sudoku.BLANK
    if trial % 3 == 2:  # a conflicting clue, or a clue that leaves no solution
      blank = np.flatnonzero(grid == sudoku.BLANK)[0]
      grid[blank] = 1 + (solution[blank] % 9)
    reference = exact_cover_solutions(grid)
    solved = sudoku.solve(grid)
    assert len(solved.solutions) == len(reference)
    clues = grid != sudoku.BLANK
    for found in solved.solutions:
      assert is_valid_solution(found) and np.array_equal(found[clues], grid[clues])
    if len(reference) == 1:
      np.testing.assert_array_equal(solved.solutions[0], reference[0])
    if trial % 4 == 0 and trial % 3 != 2:
      assert solved.search_nodes == 0  # five blanks: naked singles fill them


def test_ratings_do_not_depend_on_digit_names():
  """The documented invariance: the whole search tree is counted, so relabelling digits (which
  changes the order branches are tried in) keeps ``search_nodes``."""
  rng = np.random.default_rng(1)
  for seed in SEEDS[:4]:
    generated = sudoku.generate_puzzle(seed)
    relabel = sudoku.Transform(np.concatenate([[0], 1 + rng.permutation(9)]), np.arange(9),
                               np.arange(9), False)
    assert sudoku.solve(relabel(generated.puzzle)).search_nodes == generated.search_nodes


def test_augmentations_keep_puzzles_valid_unique_and_consistent():
  rng = np.random.default_rng(2)
  for seed in SEEDS[:3]:
    generated = sudoku.generate_puzzle(seed)
    outputs = set()
    for _ in range(6):
      transform = sudoku.random_transform(rng)
      puzzle, solution = transform(generated.puzzle), transform(generated.solution)
      assert puzzle.dtype == generated.puzzle.dtype and puzzle.shape == (81,)
      assert np.count_nonzero(puzzle) == generated.clues
      check_puzzle(puzzle, solution, minimal=False)  # the transformed solution solves it, uniquely
      outputs.add(puzzle.tobytes())
      # The permutations are of the documented group: bands, rows within bands (and the same for
      # columns), digits, with blanks kept blank.
      for lines in (transform.rows, transform.cols):
        assert sorted(lines) == list(range(9))
        assert all(len({line // 3 for line in lines[3 * b:3 * b + 3]}) == 1 for b in range(3))
      assert transform.digit_map[0] == sudoku.BLANK and sorted(transform.digit_map[1:]) == list(range(1, 10))
    assert len(outputs) == 6  # random transforms differ
  # Batches transform like their rows, and the identity changes nothing.
  batch = np.stack([generated.puzzle, generated.solution])
  transform = sudoku.random_transform(rng)
  np.testing.assert_array_equal(transform(batch), np.stack([transform(row) for row in batch]))
  np.testing.assert_array_equal(sudoku.IDENTITY(batch), batch)


def test_transpose_and_line_permutations_are_what_the_docstring_says():
  grid = np.arange(81).reshape(9, 9) % 10
  rows, cols = np.array([3, 5, 4, 0, 2, 1, 8, 6, 7]), np.array([6, 7, 8, 1, 0, 2, 4, 5, 3])
  transform = sudoku.Transform(np.arange(10), rows, cols, True)
  np.testing.assert_array_equal(transform(grid.reshape(81)).reshape(9, 9), grid[rows][:, cols].T)
