"""30x30 mazes whose shortest path from start to goal is long (Maze-Hard's filter), 12x12 ones
for CPU-sized runs, and their 8 dihedral augmentations.

Generation (``generate_maze(seed, size, min_path_length)``, deterministic from the seed):
1. A perfect maze on a (size/2)x(size/2) lattice of rooms (15x15 at 30x30), one grid cell each, two cells apart (the lattice
   placed at a random even/odd offset on each axis, so the free edge row or column moves): a
   randomized depth-first search carves a passage through the wall cell between each room and the
   room it first reaches, a spanning tree with long winding corridors.
2. Loops: every wall cell still standing between two neighbouring rooms is opened with probability
   ``LOOP_PROBABILITY``, so a maze has many routes and finding the shortest one is a search, not
   following the only corridor.
3. Start and goal: a random open cell is the start; breadth-first search from it gives each open
   cell's distance and whether its shortest path is unique; the goal is a random cell whose
   distance exceeds ``min_path_length`` (the paper's Maze-Hard: more than 110 steps) and whose
   shortest path is unique, so the target is well defined. If the start has none, another start is
   drawn; if several starts fail, a new maze.
This is not the generator of the paper's data (HRM's Maze-Hard, which cannot be downloaded here);
it keeps its size, its > 110-step filter and its encoding of the answer as the marked path.

``SMALL_SIZE`` (12x12, 144 tokens) is not the paper's: it is the size whose runs fit a 2-core CPU
(the 30x30 trains at 0.022 steps/s there). Its filter, ``SMALL_PATH_LENGTH`` (more than 42 steps),
keeps about the same share of random (maze, start) draws as 110 does at 30x30: of 3,000 and 600
draws, 11.4% and 12.8% have a cell that far.

Encoding for the model: size * size tokens (900), row-major over the grid; inputs use ``WALL`` 0, ``OPEN``
1, ``START`` 2, ``GOAL`` 3; labels are the inputs with the open cells of the shortest path set to
``PATH`` 4 (``VOCAB_SIZE = 5``). A path of ``n`` steps marks ``n - 1`` cells between start and goal.

Augmentations: the 8 symmetries of the square (``dihedral(grid, k)``: ``k % 4`` quarter turns,
then a transpose for ``k >= 4``), applied to inputs and labels alike; each keeps walls, start, goal
and the path's length and uniqueness.
"""
import collections
import dataclasses

import numpy as np

SIZE = 30  # the paper's Maze-Hard
NUM_CELLS = SIZE * SIZE
WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4
VOCAB_SIZE = 5
HARD_PATH_LENGTH = 110  # kept mazes have shortest paths of more than this many steps
SMALL_SIZE = 12  # CPU-sized mazes (module docstring)
SMALL_PATH_LENGTH = 42
LOOP_PROBABILITY = 0.1
NUM_DIHEDRAL = 8
_STARTS_PER_MAZE = 8  # starts tried on one maze before drawing a new one
_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _perfect_maze(rng: np.random.Generator, size: int) -> np.ndarray:
  """Steps 1 and 2 of the module docstring: a bool [size, size] grid, True = open."""
  rooms = size // 2  # per side of the lattice
  open_cells = np.zeros((size, size), bool)
  offset = rng.integers(2, size=2)
  room = lambda i, j: (offset[0] + 2 * i, offset[1] + 2 * j)
  visited = np.zeros((rooms, rooms), bool)
  start = tuple(rng.integers(rooms, size=2))
  visited[start] = True
  open_cells[room(*start)] = True
  stack = [start]
  while stack:
    i, j = stack[-1]
    unvisited = [(i + di, j + dj) for di, dj in _STEPS
                 if 0 <= i + di < rooms and 0 <= j + dj < rooms and not visited[i + di, j + dj]]
    if not unvisited:
      stack.pop()
      continue
    ni, nj = unvisited[rng.integers(len(unvisited))]
    visited[ni, nj] = True
    open_cells[room(ni, nj)] = True
    open_cells[offset[0] + i + ni, offset[1] + j + nj] = True  # the wall cell between the two rooms
    stack.append((ni, nj))
  # Wall cells between two lattice-adjacent rooms lie on a room row or room column, not both.
  rows = np.arange(size)[:, None] - offset[0]
  cols = np.arange(size)[None, :] - offset[1]
  inside = (rows >= 0) & (rows <= 2 * rooms - 2) & (cols >= 0) & (cols <= 2 * rooms - 2)
  between_rooms = inside & ((rows % 2 == 0) != (cols % 2 == 0))
  loops = between_rooms & ~open_cells & (rng.random((size, size)) < LOOP_PROBABILITY)
  return open_cells | loops


def shortest_paths(open_cells: np.ndarray,
                   start: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Breadth-first search over the open cells of a bool [size, size] grid from ``start``: each
  cell's distance in steps (-1 if unreachable), how many shortest paths reach it (counted up to 2),
  and its predecessor on one of them (a flat index, -1 for none)."""
  size = open_cells.shape[0]
  distance = np.full(size * size, -1, np.int64)
  paths = np.zeros(size * size, np.int64)
  previous = np.full(size * size, -1, np.int64)
  first = start[0] * size + start[1]
  distance[first], paths[first] = 0, 1
  queue = collections.deque([first])
  flat_open = open_cells.reshape(size * size)
  while queue:
    cell = queue.popleft()
    r, c = divmod(cell, size)
    for dr, dc in _STEPS:
      nr, nc = r + dr, c + dc
      if not (0 <= nr < size and 0 <= nc < size):
        continue
      neighbour = nr * size + nc
      if not flat_open[neighbour]:
        continue
      if distance[neighbour] < 0:
        distance[neighbour] = distance[cell] + 1
        previous[neighbour] = cell
        queue.append(neighbour)
      if distance[neighbour] == distance[cell] + 1:
        paths[neighbour] = min(2, paths[neighbour] + paths[cell])
  return distance.reshape(size, size), paths.reshape(size, size), previous


@dataclasses.dataclass(frozen=True)
class Maze:
  inputs: np.ndarray  # uint8 [size * size]: WALL, OPEN, START, GOAL
  labels: np.ndarray  # uint8 [size * size]: the inputs with the shortest path's open cells set to PATH
  seed: int  # generate_maze(seed) makes it again
  path_length: int  # steps from start to goal


def generate_maze(seed: int, size: int = SIZE, min_path_length: int = HARD_PATH_LENGTH) -> Maze:
  """The size x size maze of seed ``seed``, its start, goal and unique shortest path of more than
  ``min_path_length`` steps (see module docstring)."""
  if size < 4 or size % 2:
    raise ValueError(f"maze size must be even and >= 4 (a lattice of rooms two cells apart), got {size}")
  rng = np.random.default_rng(seed)
  while True:
    open_cells = _perfect_maze(rng, size)
    open_flat = np.flatnonzero(open_cells)
    for _ in range(_STARTS_PER_MAZE):
      start = divmod(int(rng.choice(open_flat)), size)
      distance, paths, previous = shortest_paths(open_cells, start)
      goals = np.flatnonzero((distance > min_path_length) & (paths == 1))
      if len(goals):
        break
    else:
      continue
    goal = int(rng.choice(goals))
    inputs = np.where(open_cells, OPEN, WALL).astype(np.uint8).reshape(size * size)
    labels = inputs.copy()
    cell = int(previous[goal])
    while previous[cell] >= 0:  # back from the goal to the cell after the start
      labels[cell] = PATH
      cell = int(previous[cell])
    for grid in (inputs, labels):
      grid[start[0] * size + start[1]], grid[goal] = START, GOAL
    return Maze(inputs, labels, seed, int(distance.reshape(size * size)[goal]))


def _record(generated: Maze) -> dict:
  return {"inputs": generated.inputs, "labels": generated.labels, "path_length": generated.path_length}


def record(seed: int) -> dict:
  """The stored fields of the 30x30 ``generate_maze(seed)`` (every maze is kept: long paths by
  construction). It lives here, not in ``dataset``, so that generating processes import only this
  module."""
  return _record(generate_maze(seed))


def small_record(seed: int) -> dict:
  """``record`` of the 12x12 maze of seed ``seed`` (``SMALL_SIZE``, ``SMALL_PATH_LENGTH``)."""
  return _record(generate_maze(seed, SMALL_SIZE, SMALL_PATH_LENGTH))


def side(grid: np.ndarray) -> int:
  """The side of the square grids flattened in ``grid``'s last axis (ValueError if not square)."""
  cells = np.shape(grid)[-1]
  size = int(round(cells ** 0.5))
  if size * size != cells:
    raise ValueError(f"a maze is a square grid flattened row-major; {cells} cells is not square")
  return size


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
  """Symmetry ``k`` (0..7) of the square applied to flat grids [..., size * size]: ``k % 4``
  counter-clockwise quarter turns, then a transpose if ``k >= 4``; 0 is the identity."""
  if not 0 <= k < NUM_DIHEDRAL:
    raise ValueError(f"dihedral index {k} not in [0, {NUM_DIHEDRAL})")
  size = side(grid)
  square = np.asarray(grid).reshape(*np.shape(grid)[:-1], size, size)
  out = np.rot90(square, k % 4, axes=(-2, -1))
  if k >= 4:
    out = np.swapaxes(out, -1, -2)
  return np.ascontiguousarray(out).reshape(np.shape(grid))
