"""Maze generation and the 8 dihedral augmentations, checked by the independent breadth-first
search of ``puzzle_checks.check_maze`` (no code from ``jaxai.trm.maze``)."""
import numpy as np
import pytest

from jaxai.trm import maze
from puzzle_checks import (GOAL, OPEN, PATH, SMALL_MAZE_SIZE, SMALL_PATH_LENGTH, START, WALL,
                           check_maze)

SEEDS = range(6)  # generated mazes checked here (the dataset's are checked in test_puzzle_dataset)


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_mazes_have_the_unique_long_shortest_path_labelled(seed):
  generated = maze.generate_maze(seed)
  assert generated.inputs.dtype == generated.labels.dtype == np.uint8
  check_maze(generated.inputs, generated.labels, generated.path_length)
  assert generated.seed == seed
  assert np.mean(generated.inputs != WALL) > 0.4  # a maze of corridors, not a few open cells
  again = maze.generate_maze(seed)
  np.testing.assert_array_equal(again.inputs, generated.inputs)
  np.testing.assert_array_equal(again.labels, generated.labels)
  record = maze.record(seed)
  np.testing.assert_array_equal(record["labels"], generated.labels)
  assert record["path_length"] == generated.path_length


@pytest.mark.parametrize("seed", SEEDS)
def test_small_mazes_are_12x12_with_the_documented_long_unique_path(seed):
  record = maze.small_record(seed)
  small = dict(size=SMALL_MAZE_SIZE, min_path_length=SMALL_PATH_LENGTH)
  assert check_maze(record["inputs"], record["labels"], record["path_length"], **small) > 42
  assert np.mean(record["inputs"] != WALL) > 0.4
  for k in (1, 6):  # the symmetries of a 12x12 grid keep it valid
    check_maze(maze.dihedral(record["inputs"], k), maze.dihedral(record["labels"], k), **small)
  np.testing.assert_array_equal(maze.dihedral(record["inputs"], 1).reshape(12, 12),
                                np.rot90(record["inputs"].reshape(12, 12)))


def test_bad_maze_sizes_are_errors():
  with pytest.raises(ValueError, match="even and >= 4"):
    maze.generate_maze(0, size=13)
  with pytest.raises(ValueError, match="not square"):
    maze.dihedral(np.zeros(140, np.uint8), 1)


def test_mazes_have_loops():
  """The documented loops: more open cells than a spanning tree of them has edges + 1, so routes
  other than the shortest exist (counted here: open cells and open neighbour pairs)."""
  open_cells = maze.generate_maze(0).inputs.reshape(30, 30) != WALL
  edges = np.sum(open_cells[1:] & open_cells[:-1]) + np.sum(open_cells[:, 1:] & open_cells[:, :-1])
  assert edges >= np.sum(open_cells) - 1 + 10  # at least 10 independent cycles


def test_the_eight_symmetries_are_distinct_valid_and_copy_zero_is_the_identity():
  generated = maze.generate_maze(1)
  square = generated.inputs.reshape(30, 30)
  reference = [np.rot90(square, k) for k in range(4)] + [np.rot90(square, k).T for k in range(4)]
  versions = set()
  for k in range(maze.NUM_DIHEDRAL):
    inputs, labels = maze.dihedral(generated.inputs, k), maze.dihedral(generated.labels, k)
    np.testing.assert_array_equal(inputs.reshape(30, 30), reference[k])
    assert check_maze(inputs, labels) == generated.path_length
    assert inputs.dtype == np.uint8 and inputs.flags.c_contiguous
    versions.add(inputs.tobytes())
  assert len(versions) == 8
  np.testing.assert_array_equal(maze.dihedral(generated.labels, 0), generated.labels)
  batch = np.stack([generated.inputs, generated.labels])
  np.testing.assert_array_equal(maze.dihedral(batch, 5), np.stack([maze.dihedral(g, 5) for g in batch]))
  for bad in (-1, 8):
    with pytest.raises(ValueError, match="dihedral index"):
      maze.dihedral(generated.inputs, bad)


def _serpentine(second_route: bool) -> tuple[np.ndarray, np.ndarray]:
  """A hand-made maze: one corridor along rows 0, 2, 4 and 6 from START at (0, 0), then down to
  GOAL at (7, 0): 123 steps. With ``second_route`` the cell (7, 1) opens a second route of the same
  length. Labels mark the corridor."""
  grid = np.full((30, 30), WALL, np.uint8)
  for row in (0, 2, 4, 6):
    grid[row] = OPEN
  grid[1, 29] = grid[3, 0] = grid[5, 29] = OPEN
  grid[0, 0], grid[7, 0] = START, GOAL
  labels = np.where(grid == OPEN, PATH, grid)
  if second_route:
    grid[7, 1] = labels[7, 1] = OPEN
  return grid.reshape(-1), labels.reshape(-1)


def test_the_reference_check_accepts_a_hand_made_maze_and_rejects_wrong_labels():
  """This file's check itself: right on a maze made by hand, wrong on a second shortest route, a
  path cell left out, an extra cell marked, an unreachable goal or a path of at most 110 steps."""
  inputs, labels = _serpentine(second_route=False)
  assert check_maze(inputs, labels, 123) == 123
  with pytest.raises(AssertionError):
    check_maze(*_serpentine(second_route=True))
  generated = maze.generate_maze(2)
  check_maze(generated.inputs, generated.labels)
  path = np.flatnonzero(generated.labels == PATH)
  left_out = generated.labels.copy()
  left_out[path[40]] = OPEN
  extra = generated.labels.copy()
  extra[np.flatnonzero((generated.inputs == OPEN) & (generated.labels != PATH))[0]] = PATH
  cut = generated.inputs.copy()
  cut[path[50]] = WALL  # the goal is now farther (another route) or unreachable
  cut_labels = np.where(cut == WALL, WALL, generated.labels)
  for wrong_inputs, wrong_labels in ((generated.inputs, left_out), (generated.inputs, extra),
                                     (cut, cut_labels)):
    with pytest.raises(AssertionError):
      check_maze(wrong_inputs, wrong_labels)
  short = np.full(maze.NUM_CELLS, WALL, np.uint8)
  short[:5] = [START, OPEN, OPEN, OPEN, GOAL]
  with pytest.raises(AssertionError, match="110"):
    check_maze(short, np.where(short == OPEN, PATH, short))
