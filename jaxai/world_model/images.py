"""Pictures of frames: reconstruction grids, side-by-side rollout GIFs, PNG bytes."""
import io
import os

import numpy as np

SCALE = 4  # GIF upscaling


def image_grid(frames: np.ndarray, recons: np.ndarray, *, columns: int = 8, scale: int = 3,
               gap: int = 2) -> np.ndarray:
  """uint8 [rows, cols] grid: each pair of rows shows frames (above) and their reconstructions."""
  n, h, w, c = frames.shape
  rows = -(-n // columns)
  grid = np.full((rows * 2 * (h + gap) + gap, columns * (w + gap) + gap, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    x = gap + col * (w + gap)
    for k, image in enumerate((frames[i], recons[i])):
      y = gap + (2 * r + k) * (h + gap)
      grid[y:y + h, x:x + w] = image
  return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)


def png_bytes(frame: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="PNG")
  return buffer.getvalue()


def side_by_side_frames(real: np.ndarray, imagined: np.ndarray, *, scale: int = SCALE, gap: int = 2) -> list:
  """GIF frames: per window a row, real game left, the model right (real context, then imagined).

  real: uint8 [n, T, H, W, C]; imagined: [n, horizon, H, W, C], the last frames of each window.
  The model's panel has a gray border over the context and a red one while it imagines.
  """
  n, t, h, w, c = real.shape
  context = t - imagined.shape[1]
  border = 1
  ph, pw = h + 2 * border, w + 2 * border
  out = []
  for i in range(t):
    canvas = np.full((n * (ph + gap) + gap, 2 * (pw + gap) + gap, c), 255, np.uint8)
    for k in range(n):
      y = gap + k * (ph + gap)
      model_frame = real[k, i] if i < context else imagined[k, i - context]
      colour = (128, 128, 128) if i < context else (220, 30, 30)
      for j, image in enumerate((real[k, i], model_frame)):
        x = gap + j * (pw + gap)
        if j == 1:
          canvas[y:y + ph, x:x + pw] = colour
        canvas[y + border:y + border + h, x + border:x + border + w] = image
    out.append(canvas.repeat(scale, axis=0).repeat(scale, axis=1))
  return out


def write_gif(path: str, frames: list, *, frame_ms: int = 250) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
