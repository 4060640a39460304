"""The causal tokenizer of Dreamer 4: frames -> a few continuous latent tokens per frame -> frames.

Token layout. A frame of ``H x W x C`` pixels is cut into ``N = (H/p) * (W/p)`` patches of ``p x p``
pixels (Craftax: 63x63 frames, 7x7 patches that coincide with the game's tiles, N = 81), row-major.
Every frame contributes ``F = N + L`` tokens, its N patch tokens followed by its L latent tokens, and
a window of T frames is the frame-major sequence of ``T * F`` tokens. RoPE positions are spatial
(``token_positions``): patch i of frame t sits at ``t * N + i`` and each latent on the patches it is
meant to summarise (latent j of L at the centre of the j-th of L equal runs of patches), so reading
"the tokens at my own position" is one translation-invariant rule shared by all latents (encoder)
and all patch queries (decoder). Patch tokens also get a learned embedding of their grid cell.

Attention is block-causal over frames (``frame_size=F``: a token sees its own frame and earlier
ones, never later ones) and-ed with a modality mask, the same for every pair of frames:

* encoder: latent tokens attend to every token (patches and latents); patch tokens only to patches.
* decoder: latent tokens attend only to latents; patch tokens (learned queries that read out the
  pixels) to patches and latents.

So the latents of frame t are a function of frames <= t only, and the pixels of frame t of the
latents of frames <= t only: the tokenizer can encode a video causally, frame by frame.

Bottleneck: the encoder's latent tokens are projected to ``latent_channels`` values and squashed by
tanh; the decoder projects them back to the width and adds a learned per-latent embedding.

Aligned inputs (``aligned_inputs``; not in the paper, needs one latent per patch): latent j enters
the encoder as its learned token plus patch j's embedding (after masking: a dropped patch gives the
mask embedding), and patch query j enters the decoder as its learned query plus latent j's
projection. Every token still reads every other one it may see through the masked attention above;
the change is that no latent has to learn, through attention alone, which patch is its own. Without
it, the latents of a tokenizer trained 1000 steps on Craftax put 0-8% of their attention on their
own patch (their strongest key was a latent, not a patch, in 73-88% of cases); with it, held-out
PSNR at step 500 was 27.9 dB against 20.6-21.7 without (docs/world_model.md).

Masked autoencoding: during training each frame draws a drop probability ``q ~ U(0, max_mask_prob)``
and drops each of its patches independently with probability ``q``; a dropped patch's embedding is
replaced by a learned mask embedding (before its grid embedding is added, so the place is known).
At inference (``rng=None``) nothing is dropped.

Learned tokens (latents, decoder queries, mask and grid embeddings) start as small random values,
not zeros: zero vectors through RMSNorm gave exploding gradients in reimplementations.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import attention, layers, transformer


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Sizes of the tokenizer; ``block`` is shared by the encoder and the decoder."""
  block: transformer.BlockConfig
  encoder_layers: int
  decoder_layers: int
  num_latents: int
  latent_channels: int
  image_shape: tuple[int, int, int] = (63, 63, 3)
  patch_size: int = 7
  max_mask_prob: float = 0.9
  aligned_inputs: bool = False
  token_init_scale: float = 0.02

  def __post_init__(self):
    if self.aligned_inputs and self.num_latents != self.num_patches:
      raise ValueError(f"aligned_inputs needs one latent per patch ({self.num_patches}), "
                       f"got num_latents={self.num_latents}")

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_shape[0] // self.patch_size, self.image_shape[1] // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.image_shape[2]

  @property
  def tokens_per_frame(self) -> int:
    return self.num_patches + self.num_latents

  @property
  def bottleneck_values(self) -> int:
    """Numbers per frame that pass the bottleneck."""
    return self.num_latents * self.latent_channels

  @property
  def compression_ratio(self) -> float:
    h, w, c = self.image_shape
    return h * w * c / self.bottleneck_values


def patchify(frames: jax.Array, patch_size: int) -> jax.Array:
  """[..., H, W, C] -> [..., (H/p) * (W/p), p * p * C]: row-major patches, each flattened (row, col, C)."""
  *lead, h, w, c = frames.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"frame {h}x{w} does not split into {patch_size}x{patch_size} patches")
  gh, gw = h // patch_size, w // patch_size
  x = frames.reshape(*lead, gh, patch_size, gw, patch_size, c).swapaxes(-4, -3)
  return x.reshape(*lead, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of ``patchify``: [..., gh * gw, p * p * C] -> [..., gh * p, gw * p, C]."""
  *lead, n, d = patches.shape
  gh, gw = grid
  c = d // (patch_size * patch_size)
  if n != gh * gw or d != patch_size * patch_size * c:
    raise ValueError(f"{n} patches of {d} values do not form a {gh}x{gw} grid of {patch_size}x{patch_size} patches")
  x = patches.reshape(*lead, gh, gw, patch_size, patch_size, c).swapaxes(-4, -3)
  return x.reshape(*lead, gh * patch_size, gw * patch_size, c)


def modality_mask(kind: str, num_patches: int, num_latents: int) -> jax.Array:
  """Boolean [F, F] (query, key) within a frame of ``num_patches`` patch then ``num_latents`` latent tokens."""
  is_latent = jnp.arange(num_patches + num_latents) >= num_patches
  q_latent, k_latent = is_latent[:, None], is_latent[None, :]
  if kind == "encoder":  # latents read everything, patches only patches
    return q_latent | ~k_latent
  if kind == "decoder":  # latents read only latents, patches read patches and latents
    return ~q_latent | k_latent
  raise ValueError(f"mask kind must be 'encoder' or 'decoder', got {kind!r}")


def attention_mask(kind: str, num_frames: int, num_patches: int, num_latents: int) -> jax.Array:
  """The whole [T*F, T*F] visibility the model uses: block-causal over frames and the modality mask."""
  frame_size = num_patches + num_latents
  causal = attention.frame_mask(num_frames * frame_size, num_frames * frame_size, frame_size=frame_size)
  return causal & jnp.tile(modality_mask(kind, num_patches, num_latents), (num_frames, num_frames))


def token_positions(num_frames: int, num_patches: int, num_latents: int) -> jax.Array:
  """RoPE positions [T * F]: patch i of frame t at ``t * N + i``; latent j at the centre of the j-th of
  L equal runs of patches, ``t * N + (j + 0.5) * N / L - 0.5`` (so with L = N, latent j sits on patch j).

  A latent then shares its position with the patches it is meant to summarise, and "read the tokens
  at relative position ~0" is one translation-invariant rule for every latent (encoder) and every
  patch query (decoder), instead of an alignment learned separately per token.
  """
  latent = (jnp.arange(num_latents) + 0.5) * num_patches / num_latents - 0.5
  within = jnp.concatenate([jnp.arange(num_patches, dtype=jnp.float32), latent.astype(jnp.float32)])
  return (jnp.arange(num_frames, dtype=jnp.float32)[:, None] * num_patches + within).reshape(-1)


def sample_patch_drop(rng: jax.Array, frames_shape: tuple[int, ...], num_patches: int,
                      max_prob: float) -> jax.Array:
  """Boolean [*frames_shape, num_patches]: per frame q ~ U(0, max_prob), each patch dropped w.p. q."""
  prob_rng, drop_rng = jax.random.split(rng)
  prob = jax.random.uniform(prob_rng, frames_shape, maxval=max_prob)
  return jax.random.uniform(drop_rng, (*frames_shape, num_patches)) < prob[..., None]


def to_unit_range(frames: jax.Array) -> jax.Array:
  """uint8 frames -> float32 in [0, 1]; float frames are taken to be in [0, 1] already."""
  if frames.dtype == jnp.uint8:
    return frames.astype(jnp.float32) / 255.0
  return frames.astype(jnp.float32)


class Tokenizer(nn.Module):
  """``encode(frames) -> latents`` [B, T, L, C] in (-1, 1); ``decode(latents) -> frames`` [B, T, H, W, C].

  ``__call__(frames, rng)`` autoencodes with patch dropping drawn from ``rng`` (none if ``rng`` is
  None) and returns ``(reconstruction in [0, 1] space, latents, dropped patches [B, T, N])``.
  The residual stream stays fp32; the blocks compute in ``config.block.dtype``. The encoder and
  decoder are ``transformer.BlockStack`` s: parameters ``encoder_i`` and ``decoder_i``, or one
  scan each with ``config.block.scan_layers``.
  """
  config: TokenizerConfig

  def setup(self):
    c = self.config
    width, dtype = c.block.width, c.block.dtype
    small = lambda axes: layers.partitioned(nn.initializers.normal(c.token_init_scale), axes)
    frame_size = c.tokens_per_frame
    # Encoder.
    self.patch_embed = layers.Dense(width, (None, "embed"), dtype=dtype)
    self.patch_pos = self.param("patch_pos", small((None, "embed")), (c.num_patches, width), jnp.float32)
    self.mask_token = self.param("mask_token", small(("embed",)), (width,), jnp.float32)
    self.latent_tokens = self.param("latent_tokens", small((None, "embed")), (c.num_latents, width),
                                    jnp.float32)
    self.encoder = transformer.BlockStack(c.block, c.encoder_layers, frame_sizes=(frame_size,))
    self.encoder_norm = layers.RMSNorm(dtype=jnp.float32)
    self.to_bottleneck = layers.Dense(c.latent_channels, ("embed", None), dtype=jnp.float32)
    # Decoder.
    self.from_bottleneck = layers.Dense(width, (None, "embed"), dtype=jnp.float32)
    self.latent_pos = self.param("latent_pos", small((None, "embed")), (c.num_latents, width), jnp.float32)
    self.patch_queries = self.param("patch_queries", small((None, "embed")), (c.num_patches, width),
                                    jnp.float32)
    self.decoder = transformer.BlockStack(c.block, c.decoder_layers, frame_sizes=(frame_size,))
    self.decoder_norm = layers.RMSNorm(dtype=jnp.float32)
    self.to_pixels = layers.Dense(c.patch_dim, ("embed", None), dtype=jnp.float32)

  def _run(self, stack, kind: str, patch_tokens, latent_tokens):
    """Runs the block ``stack`` over [B, T, N, D] patch and [B, T, L, D] latent tokens; returns both parts."""
    c = self.config
    b, t, n, d = patch_tokens.shape
    x = jnp.concatenate([patch_tokens, latent_tokens], axis=2).reshape(b, t * c.tokens_per_frame, d)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    positions = token_positions(t, c.num_patches, c.num_latents)[None, :]
    mask = jnp.tile(modality_mask(kind, c.num_patches, c.num_latents), (t, t))
    x = stack(x, positions, mask)
    x = x.reshape(b, t, c.tokens_per_frame, d)
    return x[:, :, :n], x[:, :, n:]

  def encode_with_drop(self, frames, rng=None):
    """(latents [B, T, L, C], dropped [B, T, N]); patches are dropped only when ``rng`` is given."""
    c = self.config
    x = patchify(to_unit_range(frames) * 2.0 - 1.0, c.patch_size)  # [B, T, N, p*p*C] in [-1, 1]
    b, t = x.shape[:2]
    h = self.patch_embed(x).astype(jnp.float32)
    if rng is None:
      dropped = jnp.zeros((b, t, c.num_patches), bool)
    else:
      dropped = sample_patch_drop(rng, (b, t), c.num_patches, c.max_mask_prob)
      h = jnp.where(dropped[..., None], self.mask_token, h)
    h = h + self.patch_pos
    latents = jnp.broadcast_to(self.latent_tokens, (b, t, c.num_latents, h.shape[-1]))
    if c.aligned_inputs:  # latent j starts from its own patch's (possibly masked) embedding
      latents = latents + h
    _, latents = self._run(self.encoder, "encoder", h, latents)
    return jnp.tanh(self.to_bottleneck(self.encoder_norm(latents))), dropped

  def encode(self, frames, rng=None):
    """frames uint8 (or float in [0, 1]) [B, T, H, W, C] -> latents [B, T, L, C]."""
    return self.encode_with_drop(frames, rng)[0]

  def decode(self, latents):
    """latents [B, T, L, C] -> frames float32 [B, T, H, W, C], nominally in [0, 1] (not clipped)."""
    c = self.config
    b, t = latents.shape[:2]
    z = self.from_bottleneck(latents) + self.latent_pos
    queries = jnp.broadcast_to(self.patch_queries, (b, t, c.num_patches, z.shape[-1]))
    if c.aligned_inputs:  # patch query j starts from its own latent
      queries = queries + z
    patches, _ = self._run(self.decoder, "decoder", queries, z)
    pixels = self.to_pixels(self.decoder_norm(patches))
    return (unpatchify(pixels, c.patch_size, c.grid) + 1.0) * 0.5

  def __call__(self, frames, rng=None):
    latents, dropped = self.encode_with_drop(frames, rng)
    return self.decode(latents), latents, dropped
