"""Pictures of solved and failed held-out puzzles: what the model wrote, against the answer.

Sudoku: the clues in black; the model's digits in the empty cells, green where they equal the
solution, red where not (the right digit small beside). Maze: walls dark, open cells white,
start and goal marked; path cells the model marked green where they are on the shortest path and
red where not, path cells it missed orange.
"""
import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxai.trm import maze, sudoku  # pylint: disable=g-import-not-at-top,wrong-import-position

PER_KIND = 4  # solved and failed puzzles drawn


def _draw_sudoku(ax, inputs, labels, predictions):
  for k in range(10):
    width = 2.0 if k % 3 == 0 else 0.5
    ax.plot([k, k], [0, 9], color="black", linewidth=width)
    ax.plot([0, 9], [k, k], color="black", linewidth=width)
  for cell in range(sudoku.NUM_CELLS):
    row, col = divmod(cell, 9)
    x, y = col + 0.5, 8.5 - row
    if inputs[cell] != sudoku.BLANK:
      ax.text(x, y, str(inputs[cell]), ha="center", va="center", fontsize=9, color="black")
    elif predictions[cell] == labels[cell]:
      ax.text(x, y, str(predictions[cell]), ha="center", va="center", fontsize=9, color="green")
    else:
      ax.text(x, y, str(predictions[cell]), ha="center", va="center", fontsize=9, color="red")
      ax.text(col + 0.85, 8.85 - row, str(labels[cell]), ha="center", va="center", fontsize=5, color="gray")
  ax.set_xlim(0, 9)
  ax.set_ylim(0, 9)


def maze_image(inputs, labels, predictions) -> np.ndarray:
  """float [size, size, 3] RGB of one maze and the model's path (module docstring's colours)."""
  size = maze.side(inputs)
  grid = lambda x: np.asarray(x).reshape(size, size)
  inputs, labels, predictions = grid(inputs), grid(labels), grid(predictions)
  image = np.ones((size, size, 3))
  image[inputs == maze.WALL] = (0.2, 0.2, 0.2)
  on_path, marked = labels == maze.PATH, predictions == maze.PATH
  image[on_path & marked] = (0.1, 0.7, 0.1)
  image[~on_path & marked] = (0.9, 0.1, 0.1)
  image[on_path & ~marked] = (1.0, 0.6, 0.0)
  image[inputs == maze.START] = (0.1, 0.3, 0.9)
  image[inputs == maze.GOAL] = (0.6, 0.1, 0.8)
  return image


def write_puzzles(path: str, task: str, arrays: dict) -> None:
  """Up to ``PER_KIND`` solved (top row) and failed (bottom row) puzzles of ``arrays``
  (``inputs``, ``labels``, ``predictions`` [N, L] and ``exact`` [steps, N]) to the PNG ``path``."""
  exact = np.asarray(arrays["exact"][-1], bool)
  rows = [("solved", np.flatnonzero(exact)[:PER_KIND]), ("failed", np.flatnonzero(~exact)[:PER_KIND])]
  fig, axes = plt.subplots(2, PER_KIND, figsize=(2.2 * PER_KIND, 4.6), squeeze=False)
  for r, (kind, indices) in enumerate(rows):
    for c in range(PER_KIND):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(indices):
        ax.axis("off")
        continue
      i = indices[c]
      inputs, labels, predictions = (np.asarray(arrays[k][i]) for k in ("inputs", "labels", "predictions"))
      if task == "sudoku":
        _draw_sudoku(ax, inputs, labels, predictions)
      else:
        ax.imshow(maze_image(inputs, labels, predictions), interpolation="nearest")
      ax.set_title(f"{kind}: held-out #{i}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
