"""What object each map tile of a Craftax-Classic frame shows, to score the frames a model draws.

    classes = classify_tiles(frames)  # uint8 [..., 63, 63, 3] -> int [..., 7, 9], into CLASSES
    scores = tile_agreement(pred_frames, real_frames)  # {"overall", "tree", "count/tree", ...}

The map view is 7 x 9 tiles of 7 x 7 pixels (the two rows below it are the inventory). Each tile
gets the class of its most likely template: every block texture, and every mob and player
texture composited over each block it can stand on, as the renderer composites it.

Night is not a pure darkening. With light level ``d`` the renderer draws a texture ``t`` as

    d t + (1 - d) [0.5 (0.4 y + 0.6 lum(y)) + 0.5 (0, 16, 64)],   y = (1 - m) t + m noise,
    m = max(0, 1 - 2 d) * (0.02 at the centre tile ... 0.96 at the corners),

with ``noise`` grey, uniform in [32, 127] and fresh per pixel; sleeping then greys the view to
``0.5 lum + (0, 0, 8)``. Per pixel this is affine in the texture, ``a t + b lum(t) 1 + s 1 + v``
plus the noise along (1, 1, 1). So each frame's light level and sleep are fitted first (or
given), on the five central tiles where there is little static, and every tile is then matched
against the templates drawn at that light under a Gaussian likelihood that puts the static's
variance on the grey axis only: the static is the same in all three channels, so a tile's
colour survives where its brightness is mostly noise.

Out-of-bounds tiles (where the view overhangs the 64 x 64 map) are decoded jointly, as bands
along the view's sides, since a lone plain-grey tile is more likely stone with its texture lost.

Measured against the game's own state (tests/world_model/test_tile_classes.py): every tile of
day frames is right; at night 99.6% are while awake and ~90% while asleep (the view is then grey,
so only brightness is left). The misses are edge tiles of the darkest frames, mostly ground taken
for an arrow. ``tile_agreement`` reads predicted frames at the real frames' light, as blur biases
a light fit; blur also smooths away what tells table, coal and the small sprites from ground.
"""
import functools

import numpy as np
from craftax.craftax_classic import constants as craftax_constants

BlockType = craftax_constants.BlockType

VIEW_ROWS, VIEW_COLS = craftax_constants.OBS_DIM  # 7, 9
TILE = craftax_constants.BLOCK_PIXEL_SIZE_AGENT  # 7 pixels
FRAME_SHAPE = ((VIEW_ROWS + craftax_constants.INVENTORY_OBS_HEIGHT) * TILE, VIEW_COLS * TILE, 3)

CLASSES = ("out_of_bounds", "grass", "sand", "path", "water", "lava", "tree", "stone", "coal",
           "iron", "diamond", "table", "furnace", "sapling", "ripe_sapling", "zombie", "cow",
           "skeleton", "arrow", "player")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
# WOOD and INVALID have textures but never lie on a Craftax-Classic map.
CLASS_OF_BLOCK = {
    BlockType.OUT_OF_BOUNDS: "out_of_bounds", BlockType.GRASS: "grass", BlockType.SAND: "sand",
    BlockType.PATH: "path", BlockType.WATER: "water", BlockType.LAVA: "lava",
    BlockType.TREE: "tree", BlockType.STONE: "stone", BlockType.COAL: "coal",
    BlockType.IRON: "iron", BlockType.DIAMOND: "diamond", BlockType.CRAFTING_TABLE: "table",
    BlockType.FURNACE: "furnace", BlockType.PLANT: "sapling", BlockType.RIPE_PLANT: "ripe_sapling",
}
MOB_CLASSES = ("zombie", "cow", "skeleton", "arrow")

# The classes scored one by one; a name missing from REPORTED_MEMBERS stands for itself alone.
REPORTED_CLASSES = ("tree", "stone", "coal", "iron", "diamond", "water", "lava", "table",
                    "furnace", "sapling", "mobs", "player")
REPORTED_MEMBERS = {"sapling": ("sapling", "ripe_sapling"), "mobs": MOB_CLASSES}

# Blocks each sprite can be drawn on: mobs and the player walk on grass, sand and path (the player
# is drawn on lava in the frame it dies); arrows also fly over water and lava.
_WALKABLE = (BlockType.GRASS, BlockType.SAND, BlockType.PATH)
_PLAYER_GROUNDS = _WALKABLE + (BlockType.LAVA,)
_ARROW_GROUNDS = _WALKABLE + (BlockType.WATER, BlockType.LAVA)

# The renderer's night and sleep constants (craftax_classic/renderer.py, constants.py).
_NIGHT_TINT = np.array([0.0, 16.0, 64.0])
_SLEEP_TINT = np.array([0.0, 0.0, 8.0])
_LUMA = np.array([0.299, 0.587, 0.114])
_NOISE_MEAN, _NOISE_STD = 32 + 95 / 2, 95 / np.sqrt(12)  # uniform on [32, 127]
# The fitted light is rounded to 1/256 so that frames share the likelihood's light-dependent parts.
_LIGHT_LEVELS = 256
# The player's tile and its four neighbours: the static's share there is at most ~0.17.
_LIGHT_FIT_TILES = tuple(r * VIEW_COLS + c for r, c in ((3, 4), (3, 3), (3, 5), (2, 4), (4, 4)))


def _out_of_bounds_layouts() -> np.ndarray:
  """[63, 63 tiles] bool: which tiles lie off the 64 x 64 map, for each way the view can overhang
  it (0-3 rows above or below the map, 0-4 columns left or right of it)."""
  def bands(size, axis):  # none, 1..size // 2 at the start, 1..size // 2 at the end
    index = np.expand_dims(np.arange(size), 1 - axis)
    widths = range(1, size // 2 + 1)
    return [index < 0] + [index < k for k in widths] + [index >= size - k for k in widths]
  return np.array([(r | c).reshape(-1) for r in bands(VIEW_ROWS, 0) for c in bands(VIEW_COLS, 1)])


_OUT_OF_BOUNDS_LAYOUTS = _out_of_bounds_layouts()


def _over(ground, rgb, alpha):
  """A sprite composited over a block texture, as the renderer does it."""
  return ground * (1 - alpha) + rgb * alpha


def _tile_pixels(image: np.ndarray) -> np.ndarray:
  """[..., 49, 63, C] map view -> [..., 63 tiles, 49 pixels, C], both row-major."""
  lead, channels = image.shape[:-3], image.shape[-1]
  tiles = image.reshape(*lead, VIEW_ROWS, TILE, VIEW_COLS, TILE, channels)
  tiles = np.moveaxis(tiles, -4, -3)  # [..., rows, cols, 7, 7, C]
  return tiles.reshape(*lead, VIEW_ROWS * VIEW_COLS, TILE * TILE, channels)


def _render_coefficients(light, sleeping, noise_mix):
  """Per-pixel (a, b, s, noise_scale) and per-frame v: the renderer draws texture ``t`` as
  ``a t + b lum(t) 1 + s 1 + v + noise_scale (noise - noise mean) 1``.

  ``light`` and ``sleeping`` broadcast against ``noise_mix`` (m, the static's share of each pixel);
  v has a trailing RGB axis.
  """
  dark, clear = 1 - light, 1 - noise_mix
  a = np.where(sleeping, 0.0, light + 0.2 * dark * clear)
  b = np.where(sleeping, 0.5 * light + 0.25 * dark * clear, 0.3 * dark * clear)
  s = np.where(sleeping, 0.25 * dark * (noise_mix * _NOISE_MEAN + _LUMA @ _NIGHT_TINT),
               0.5 * dark * noise_mix * _NOISE_MEAN)
  v = np.where(np.asarray(sleeping)[..., None], _SLEEP_TINT,
               0.5 * np.asarray(dark)[..., None] * _NIGHT_TINT)
  noise_scale = np.where(sleeping, 0.25, 0.5) * dark * noise_mix
  return a, b, s, v, noise_scale


def _draw(pixels, light, sleeping, noise_mix):
  """Templates [K, P, 3] as drawn over tile pixels whose static share is ``noise_mix`` [P],
  at the static's mean -> [K, P, 3]."""
  a, b, s, v, _ = _render_coefficients(light, sleeping, noise_mix)
  return a[:, None] * pixels + (b * (pixels @ _LUMA) + s)[..., None] + v


@functools.lru_cache(maxsize=None)
def _templates() -> dict[str, np.ndarray]:
  """The templates and what the likelihoods need of them, computed once.

  classes [K], each template's class; noise_intensity [63, 49], the static's share at full night
  per tile pixel; colour [K, 49, 3], grey and lum [K, 49], and matched [245, K] (the three as one
  matrix): the template sides of the likelihood in _classify_chunk. fit_products and fit_sums:
  per light-fit tile, the templates drawn at light 0 (with the static's mean at full strength)
  and their slope up to light 1, awake and asleep, without out-of-bounds (a uniform grey, which
  any brighter or darker grey texture mimics).
  """
  textures = craftax_constants.load_all_textures()[TILE]
  block = {b: np.asarray(textures["block_textures"][b.value], np.float64) for b in CLASS_OF_BLOCK}
  templates = [(block[b], CLASS_OF_BLOCK[b]) for b in CLASS_OF_BLOCK]

  def sprite(name):
    return (np.asarray(textures[f"{name}_texture"], np.float64),
            np.asarray(textures[f"{name}_texture_alpha"], np.float64))

  for rgba in textures["player_textures"]:  # left, right, up, down, sleeping
    rgba = np.asarray(rgba, np.float64)
    templates += [(_over(block[g], rgba[..., :3], rgba[..., 3:] / 255), "player")
                  for g in _PLAYER_GROUNDS]
  for name in ("zombie", "cow", "skeleton"):
    rgb, alpha = sprite(name)
    templates += [(_over(block[g], rgb, alpha), name) for g in _WALKABLE]
  # The arrow texture points up; the renderer flips it for down and transposes it for left/right.
  up = sprite("arrow")
  down = tuple(np.flip(x, 0) for x in up)
  for rgb, alpha in (up, down, *(tuple(x.transpose(1, 0, 2) for x in d) for d in (up, down))):
    templates += [(_over(block[g], rgb, alpha), "arrow") for g in _ARROW_GROUNDS]

  pixels = np.stack([t.reshape(TILE * TILE, 3) for t, _ in templates])
  classes = np.array([CLASS_INDEX[c] for _, c in templates])
  noise_intensity = _tile_pixels(
      np.asarray(textures["night_noise_intensity_texture"], np.float64)[..., :1])[..., 0]

  lum, grey = pixels @ _LUMA, pixels.mean(-1)
  colour = pixels - grey[..., None]
  matched = np.concatenate([colour.reshape(len(pixels), -1), grey, lum], -1).T.astype(np.float32)

  fit_pixels = pixels[classes != CLASS_INDEX["out_of_bounds"]]
  # Per fit tile: the drawings at light 0 and their slopes, awake and asleep, [147, 4 K'], and
  # their dark.slope, slope.slope and dark.dark [2, 3, K'].
  fit_products, fit_sums = [], []
  for i in _LIGHT_FIT_TILES:
    drawings, sums = [], []
    for sleeping in (False, True):
      at_0 = _draw(fit_pixels, 0.0, sleeping, noise_intensity[i]).reshape(len(fit_pixels), -1)
      at_1 = _draw(fit_pixels, 1.0, sleeping, np.zeros(TILE * TILE)).reshape(len(fit_pixels), -1)
      slope = at_1 - at_0
      drawings += [at_0, slope]
      sums.append([np.sum(at_0 * slope, -1), np.sum(slope ** 2, -1), np.sum(at_0 ** 2, -1)])
    fit_products.append(np.concatenate(drawings).T)
    fit_sums.append(np.array(sums))
  return dict(classes=classes, noise_intensity=noise_intensity, colour=colour,
              grey=grey, lum=lum, matched=matched, fit_products=fit_products, fit_sums=fit_sums)


def _matmul(x, y):
  """x [..., F] @ y [F, K] as one 2-D product: numpy's batched matmul calls BLAS once per leading
  index, which stalls for seconds when the BLAS threads share busy cores."""
  return (x.reshape(-1, x.shape[-1]) @ y).reshape(*x.shape[:-1], y.shape[-1])


def _fit_light(tiles):
  """Each frame's light level in [0, 1] and whether the player sleeps, from the tiles in
  ``_LIGHT_FIT_TILES``.

  Per tile, template and state (awake, asleep), the light is the least-squares fit (clipped to
  [0, 1]) of the template's drawing interpolated linearly from light 0 (static at full strength)
  to light 1 (none). The frame takes the state whose best templates fit its tiles better, and the
  median over tiles of their lights. On the game's frames that is within 0.035 of its light
  level, which classifies tiles as well as the true level.
  """
  templates = _templates()
  x = tiles[:, _LIGHT_FIT_TILES].reshape(len(tiles), len(_LIGHT_FIT_TILES), -1).astype(np.float64)
  light = np.zeros((len(x), 2, len(_LIGHT_FIT_TILES)))  # [n, state, tile]
  error = np.zeros_like(light)
  for i in range(len(_LIGHT_FIT_TILES)):
    products = (x[:, i] @ templates["fit_products"][i]).reshape(len(x), 2, 2, -1)
    x_dark, x_slope = products[:, :, 0], products[:, :, 1]  # [n, state, K']
    dark_slope, slope_sq, dark_sq = np.moveaxis(templates["fit_sums"][i], 1, 0)  # [state, K']
    offset_slope = x_slope - dark_slope
    offset_sq = np.sum(x[:, i] ** 2, -1)[:, None, None] - 2 * x_dark + dark_sq
    fit = np.clip(offset_slope / np.maximum(slope_sq, 1e-9), 0, 1)
    fit_error = offset_sq - 2 * fit * offset_slope + fit ** 2 * slope_sq
    best = np.argmin(fit_error, -1)[..., None]
    light[..., i] = np.take_along_axis(fit, best, -1)[..., 0]
    error[..., i] = np.take_along_axis(fit_error, best, -1)[..., 0]
  sleeping = error[:, 1].sum(-1) < error[:, 0].sum(-1)
  return np.median(light[np.arange(len(x)), sleeping.astype(int)], -1), sleeping


@functools.lru_cache(maxsize=4096)
def _likelihood_terms(sleeping: bool, level: int, pixel_noise_std: float):
  """The likelihood's frame-independent parts for frames drawn at light ``level / _LIGHT_LEVELS``.

  The distance of a tile x to template t (times pixel_noise_std**2, up to terms without t) is,
  summed over pixels, |colour(x) - cv - a colour(t)|^2 + 3 w (grey(x) - s - grey(v) - a grey(t)
  - b lum(t))^2 with cv the colour of v and w <= 1 the grey axis's weight: the static varies only
  along (1, 1, 1). Expanded, it is features(x) . matched + bias; this returns the per-pixel
  weights of the features ([3, 63, 49]: -2 a on x's pixels, -6 w a and -6 w b on grey(x)) and the
  bias [63, K].
  """
  t = _templates()
  light = level / _LIGHT_LEVELS
  a, b, s, v, noise_scale = _render_coefficients(
      light, sleeping, max(0.0, 1 - 2 * light) * t["noise_intensity"])
  a, b = np.broadcast_to(a, s.shape), np.broadcast_to(b, s.shape)
  w = pixel_noise_std ** 2 / (pixel_noise_std ** 2 + 3 * (noise_scale * _NOISE_STD) ** 2)
  v_grey = v.mean()
  v_colour = v - v_grey
  grey, lum = t["grey"], t["lum"]
  bias = (2 * a @ (t["colour"] @ v_colour).T + a ** 2 @ np.sum(t["colour"] ** 2, -1).T
          + 3 * (w * a ** 2) @ (grey ** 2).T + 6 * (w * a * b) @ (grey * lum).T
          + 3 * (w * b ** 2) @ (lum ** 2).T
          + 6 * (w * (s + v_grey) * a) @ grey.T + 6 * (w * (s + v_grey) * b) @ lum.T)
  weights = np.stack([-2 * a, -6 * w * a, -6 * w * b])
  return weights.astype(np.float32), bias.astype(np.float32)


def _classify_chunk(tiles, light, sleeping, pixel_noise_std):
  """[n, 63, 49, 3] float32 tiles drawn at light [n], asleep or not [n] -> [n, 63] classes."""
  templates = _templates()
  levels = np.round(np.clip(light, 0, 1) * _LIGHT_LEVELS).astype(int)
  keys, which = np.unique(np.stack([sleeping, levels], -1), axis=0, return_inverse=True)
  terms = [_likelihood_terms(bool(k[0]), int(k[1]), float(pixel_noise_std)) for k in keys]
  weights = np.stack([w for w, _ in terms])[which.reshape(-1)]  # [n, 3, 63, 49]
  bias = np.stack([bias for _, bias in terms])[which.reshape(-1)]  # [n, 63, K]

  n, num_tiles, num_pixels, _ = tiles.shape
  features = np.empty((n, num_tiles, 5 * num_pixels), np.float32)  # pixels (x3), grey, grey
  np.multiply(weights[:, 0, ..., None], tiles,
              out=features[..., :3 * num_pixels].reshape(n, num_tiles, num_pixels, 3))
  grey = tiles.sum(-1) / 3
  np.multiply(weights[:, 1], grey, out=features[..., 3 * num_pixels:4 * num_pixels])
  np.multiply(weights[:, 2], grey, out=features[..., 4 * num_pixels:])
  distance = _matmul(features, templates["matched"]) + bias  # [n, 63, K]

  # Out-of-bounds tiles are where the view overhangs the map: bands along its sides. Each frame
  # takes the band layout whose tiles fit out-of-bounds best and the rest their best other class,
  # which keeps smooth grey stone (at night or blurred) from reading as out-of-bounds.
  outside = templates["classes"] == CLASS_INDEX["out_of_bounds"]
  inside_best = np.argmin(np.where(outside, np.inf, distance), -1)
  inside_distance = np.take_along_axis(distance, inside_best[..., None], -1)[..., 0]
  extra = distance[..., outside].min(-1) - inside_distance  # [n, 63]
  layout = np.argmin(extra @ _OUT_OF_BOUNDS_LAYOUTS.T.astype(np.float32), -1)  # [n]
  classes = templates["classes"][inside_best]
  return np.where(_OUT_OF_BOUNDS_LAYOUTS[layout], CLASS_INDEX["out_of_bounds"], classes)


def _chunks_of_tiles(frames, chunk):
  """The leading shape and (start, float32 tiles [n, 63, 49, 3]) of each chunk of frames."""
  frames = np.asarray(frames)
  if frames.shape[-3:] != FRAME_SHAPE:
    raise ValueError(f"frames must be [..., 63, 63, 3], got {frames.shape}")
  view = frames.reshape(-1, *FRAME_SHAPE)[:, :VIEW_ROWS * TILE]
  chunks = ((i, _tile_pixels(view[i:i + chunk].astype(np.float32)))
            for i in range(0, len(view), chunk))
  return frames.shape[:-3], len(view), chunks


def fit_lighting(frames, *, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(light level in [0, 1], asleep) of each of [..., 63, 63, 3] frames, fitted to the central
  tiles: within 0.035 of the game's light on its own frames (blur biases it)."""
  lead, num, chunks = _chunks_of_tiles(frames, chunk)
  light, sleeping = np.zeros(num), np.zeros(num, bool)
  for i, tiles in chunks:
    light[i:i + len(tiles)], sleeping[i:i + len(tiles)] = _fit_light(tiles)
  return light.reshape(lead), sleeping.reshape(lead)


def classify_tiles(frames, *, light=None, sleeping=None, pixel_noise_std: float = 2.0,
                   chunk: int = 1024) -> np.ndarray:
  """Class index (into ``CLASSES``) of each map tile: [..., 63, 63, 3] frames -> int [..., 7, 9].

  Args:
    frames: uint8 (or float in [0, 255]) Craftax-Classic frames.
    light, sleeping: the light level in [0, 1] and sleep of each frame ([...], or scalars), as
      the game's state has them (``light_level``, ``is_sleeping``); by default each frame's own
      are fitted (``fit_lighting``).
    pixel_noise_std: the per-channel error assumed besides the night static (uint8 rounding, a
      model's blur). It only sets how far colour outweighs brightness in the static at night:
      on the game's frames 0.5 to 2 classify alike, 4 to 8 miss 1-2% more night tiles.
    chunk: frames classified at once (~200 KiB of work memory each); large chunks make few
      BLAS calls, which matters on busy cores.
  """
  if (light is None) != (sleeping is None):
    raise ValueError("give both light and sleeping, or neither")
  lead, num, chunks = _chunks_of_tiles(frames, chunk)
  if light is not None:
    light = np.broadcast_to(np.asarray(light, np.float64), lead).reshape(-1)
    sleeping = np.broadcast_to(np.asarray(sleeping, bool), lead).reshape(-1)
  classes = np.zeros((num, VIEW_ROWS * VIEW_COLS), np.int32)
  for i, tiles in chunks:
    if light is None:
      lighting = _fit_light(tiles)
    else:
      lighting = light[i:i + len(tiles)], sleeping[i:i + len(tiles)]
    classes[i:i + len(tiles)] = _classify_chunk(tiles, *lighting, pixel_noise_std)
  return classes.reshape(*lead, VIEW_ROWS, VIEW_COLS)


def tile_agreement(pred_frames, real_frames, *, light=None, sleeping=None,
                   pixel_noise_std: float = 2.0, chunk: int = 1024) -> dict[str, float]:
  """Per-tile class agreement of predicted with real frames (the same shape [..., 63, 63, 3]).

  Both are classified at the real frames' lighting (``light``/``sleeping`` if given, else fitted
  to the real frames): a blurry prediction biases a fit of its own light, which then misreads
  every tile, while a prediction drawn at the wrong light is simply read as wrong tiles.

  Returns ``overall``, the fraction of map tiles whose classes agree, and for each name in
  ``REPORTED_CLASSES`` its recall under ``<name>`` (among tiles whose real class is in the group,
  the fraction predicted in the group; NaN when there are none) and ``count/<name>`` (how many).
  ``pixel_noise_std`` and ``chunk`` are ``classify_tiles``'s.
  """
  pred_frames, real_frames = np.asarray(pred_frames), np.asarray(real_frames)
  if pred_frames.shape != real_frames.shape:
    raise ValueError(
        f"pred and real frames differ in shape: {pred_frames.shape} vs {real_frames.shape}")
  if light is None and sleeping is None:
    light, sleeping = fit_lighting(real_frames, chunk=chunk)
  kwargs = dict(light=light, sleeping=sleeping, pixel_noise_std=pixel_noise_std, chunk=chunk)
  pred, real = classify_tiles(pred_frames, **kwargs), classify_tiles(real_frames, **kwargs)
  scores = {"overall": float(np.mean(pred == real)) if real.size else float("nan")}
  for name in REPORTED_CLASSES:
    members = [CLASS_INDEX[c] for c in REPORTED_MEMBERS.get(name, (name,))]
    real_in = np.isin(real, members)
    count = int(real_in.sum())
    hits = int((real_in & np.isin(pred, members)).sum())
    scores[name] = hits / count if count else float("nan")
    scores[f"count/{name}"] = float(count)
  return scores
