"""Independent checkers of the generated puzzles, shared by the TRM data tests: a second Sudoku
solver and a maze search, with no code from ``jaxai.trm``.

Sudoku: Knuth's Algorithm X on Sudoku's exact-cover matrix (324 constraints: each cell filled,
each digit once per row, column and box; 729 candidate placements), with no propagation rule in
common with ``jaxai.trm.sudoku``'s solver (naked and hidden singles on bitmasks). A generated
puzzle passes when its clues agree with its solution, it has exactly that one solution, and it is
minimal (each clue's removal admits a second solution).

Maze: breadth-first search over the grid as a square array (30x30, or 12x12 for the CPU-sized
variant), from the START token and from the GOAL
token: a labelled path is right when the cells that lie on a shortest start-goal path (distance
from the start + distance to the goal = the path's length) are exactly the start, the goal and the
cells labelled PATH, one per distance. That set having one cell at each distance also means the
shortest path is unique.
"""
import collections

import numpy as np

NUM_CELLS, BLANK, VOCAB_SIZE = 81, 0, 10  # Sudoku's documented encoding, spelled out again
WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4  # the maze's documented tokens
MAZE_SIZE, HARD_PATH_LENGTH = 30, 110  # Maze-Hard: shortest paths of more than 110 steps
SMALL_MAZE_SIZE, SMALL_PATH_LENGTH = 12, 42  # the documented CPU-sized variant


def _placement_constraints(row: int, col: int, digit: int) -> tuple:
  box = 3 * (row // 3) + col // 3
  return (("cell", row, col), ("row", row, digit), ("col", col, digit), ("box", box, digit))


def exact_cover_solutions(grid, limit: int = 2) -> list[np.ndarray]:
  """Up to ``limit`` solutions of an 81-cell grid (0 = blank) as uint8 [81] arrays, by Algorithm X
  (the column with the fewest rows first) over dicts of sets; none if the clues conflict."""
  grid = np.asarray(grid).reshape(9, 9)
  placements = {(r, c, d): _placement_constraints(r, c, d)
                for r in range(9) for c in range(9) for d in range(1, 10)}
  columns = {}
  for placement, constraints in placements.items():
    for constraint in constraints:
      columns.setdefault(constraint, set()).add(placement)

  def select(placement):
    removed = []
    for constraint in placements[placement]:
      for other in columns[constraint]:
        for other_constraint in placements[other]:
          if other_constraint != constraint:
            columns[other_constraint].remove(other)
      removed.append(columns.pop(constraint))
    return removed

  chosen, solutions = [], []

  def search():
    if not columns:
      solution = np.zeros((9, 9), np.uint8)
      for r, c, d in chosen:
        solution[r, c] = d
      solutions.append(solution.reshape(81))
      return
    constraint = min(columns, key=lambda k: len(columns[k]))
    for placement in list(columns[constraint]):
      chosen.append(placement)
      removed = select(placement)
      search()
      for column_constraint, rows in zip(reversed(placements[placement]), reversed(removed)):
        columns[column_constraint] = rows
        for other in rows:
          for other_constraint in placements[other]:
            if other_constraint != column_constraint:
              columns[other_constraint].add(other)
      chosen.pop()
      if len(solutions) >= limit:
        return

  for r in range(9):
    for c in range(9):
      if grid[r, c]:
        placement = (r, c, int(grid[r, c]))
        if any(k not in columns for k in placements[placement]):
          return []  # a clue conflicts with an earlier one
        chosen.append(placement)
        select(placement)
  search()
  return solutions


def is_valid_solution(grid) -> bool:
  """Every row, column and 3x3 box of the 81 cells holds the digits 1..9 once."""
  square = np.asarray(grid).reshape(9, 9)
  boxes = square.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
  return all(sorted(line) == list(range(1, 10)) for lines in (square, square.T, boxes) for line in lines)


def solved_by_singles(grid) -> bool:
  """Whether naked and hidden singles alone fill ``grid``, computed on a boolean [cell, digit]
  candidate table (the module's solver uses bit masks and peer lists)."""
  square = np.asarray(grid).reshape(9, 9)
  possible = np.ones((9, 9, 9), bool)  # [row, col, digit - 1]
  def place(r, c, d):
    possible[r, c, :] = False
    possible[r, :, d] = possible[:, c, d] = False
    possible[3 * (r // 3):3 * (r // 3) + 3, 3 * (c // 3):3 * (c // 3) + 3, d] = False
    possible[r, c, d] = True
  filled = np.zeros((9, 9), bool)
  for r, c in zip(*np.nonzero(square)):
    place(r, c, square[r, c] - 1)
    filled[r, c] = True
  while not filled.all():
    found = None
    counts = possible.sum(-1)
    if (counts[~filled] == 0).any():
      return False
    naked = np.argwhere(~filled & (counts == 1))
    if len(naked):
      r, c = naked[0]
      found = (r, c, int(np.flatnonzero(possible[r, c])[0]))
    else:
      open_digit = possible & ~filled[..., None]
      boxes = open_digit.reshape(3, 3, 3, 3, 9).transpose(0, 2, 1, 3, 4).reshape(9, 9, 9)
      for unit, cells_of in ((open_digit, lambda i, j: (i, j)), (open_digit.transpose(1, 0, 2), lambda i, j: (j, i)),
                             (boxes, lambda i, j: (3 * (i // 3) + j // 3, 3 * (i % 3) + j % 3))):
        for i, d in np.argwhere(unit.sum(1) == 1):
          found = (*cells_of(i, int(np.flatnonzero(unit[i, :, d])[0])), int(d))
          break
        if found:
          break
    if found is None:
      return False
    place(*found)
    filled[found[0], found[1]] = True
  return True


def check_puzzle(puzzle, solution, *, minimal: bool = True):
  """The checks every generated puzzle must pass, by this file's solver."""
  puzzle, solution = np.asarray(puzzle), np.asarray(solution)
  assert puzzle.shape == solution.shape == (NUM_CELLS,)
  assert set(np.unique(puzzle)) <= set(range(VOCAB_SIZE))
  assert is_valid_solution(solution)
  clues = puzzle != BLANK
  np.testing.assert_array_equal(puzzle[clues], solution[clues])
  solutions = exact_cover_solutions(puzzle)
  assert len(solutions) == 1, "not a unique solution"
  np.testing.assert_array_equal(solutions[0], solution)
  if minimal:
    for cell in np.flatnonzero(clues):
      fewer = puzzle.copy()
      fewer[cell] = BLANK
      assert len(exact_cover_solutions(fewer)) == 2, f"clue at cell {cell} is not needed"


def _distances(passable: np.ndarray, source: tuple[int, int]) -> np.ndarray:
  """Steps from ``source`` to every passable cell of a bool [H, W] grid; -1 where unreachable."""
  height, width = passable.shape
  distance = np.full(passable.shape, -1)
  distance[source] = 0
  frontier = collections.deque([source])
  while frontier:
    r, c = frontier.popleft()
    for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
      if 0 <= nr < height and 0 <= nc < width and passable[nr, nc] and distance[nr, nc] < 0:
        distance[nr, nc] = distance[r, c] + 1
        frontier.append((nr, nc))
  return distance


def check_maze(inputs, labels, path_length: int | None = None, *, size: int = MAZE_SIZE,
               min_path_length: int = HARD_PATH_LENGTH) -> int:
  """The checks every size x size maze and each of its symmetries must pass; returns the path's
  length, which must exceed ``min_path_length``."""
  inputs, labels = np.asarray(inputs), np.asarray(labels)
  assert inputs.shape == labels.shape == (size * size,)
  assert set(np.unique(inputs)) <= {WALL, OPEN, START, GOAL}
  assert set(np.unique(labels)) <= {WALL, OPEN, START, GOAL, PATH}
  assert np.sum(inputs == START) == 1 and np.sum(inputs == GOAL) == 1
  path = labels == PATH
  np.testing.assert_array_equal(labels[~path], inputs[~path])  # only open cells become path
  assert np.all(inputs[path] == OPEN)
  grid, marked = inputs.reshape(size, size), path.reshape(size, size)
  start = tuple(np.argwhere(grid == START)[0])
  goal = tuple(np.argwhere(grid == GOAL)[0])
  from_start, from_goal = _distances(grid != WALL, start), _distances(grid != WALL, goal)
  length = int(from_start[goal])
  assert length > min_path_length, f"shortest path not longer than {min_path_length} steps"
  on_shortest = (from_start >= 0) & (from_start + from_goal == length)
  expected = marked.copy()
  expected[start] = expected[goal] = True
  np.testing.assert_array_equal(on_shortest, expected)  # the label is the shortest path ...
  assert sorted(from_start[on_shortest]) == list(range(length + 1))  # ... and it is the only one
  assert np.sum(marked) == length - 1
  if path_length is not None:
    assert path_length == length
  return length
