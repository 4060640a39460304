"""Pre-norm transformer block (RMSNorm, attention, SwiGLU) and a stack of them (``BlockStack``).

A stack runs its layers either as a Python loop over separately named blocks or, with
``BlockConfig.scan_layers``, as one ``nn.scan`` over a group of blocks whose parameters carry a
leading ``layers`` axis. The loop is what trained checkpoints hold; the scan traces and compiles
the group once however deep the stack is, and one array per parameter is what sharding rules and
optimisers handle best at scale. ``BlockConfig.remat`` rematerialises each block in the backward
pass (``full``: saves nothing; ``dots``: saves the matmul outputs without batch dimensions, so
the attention products are recomputed), trading compute for activation memory.
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxai.nn import attention, layers

# What each remat option saves for the backward pass (None: jax.checkpoint's default, nothing).
REMAT_POLICIES = {"none": None, "full": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Hyperparameters of one transformer block; papers share this and vary the mask per layer."""
  width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_hidden: int
  qk_norm: bool = True
  rope_base: float | None = 10_000.0
  attn_soft_cap: float | None = None
  impl: attention.AttentionImpl = "xla"
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = False  # stacks of these blocks run as one nn.scan (BlockStack)
  remat: str = "none"  # none | full | dots (REMAT_POLICIES)

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")


def block_config(section, *, compute_dtype: str, attention_impl: str) -> BlockConfig:
  """The block of a model section of a config (``width``, ``num_heads``, ``num_kv_heads``,
  ``head_dim``, ``mlp_hidden``, ``qk_norm``, ``attn_soft_cap``: 0 for none; optional
  ``scan_layers``, ``remat``). ``attention_impl`` may be ``auto``, resolved where the model is
  traced (``dispatch``)."""
  return BlockConfig(
      width=section.width, num_heads=section.num_heads, num_kv_heads=section.num_kv_heads,
      head_dim=section.head_dim, mlp_hidden=section.mlp_hidden, qk_norm=section.qk_norm,
      attn_soft_cap=section.attn_soft_cap or None, impl=attention_impl, dtype=jnp.dtype(compute_dtype),
      scan_layers=section.get("scan_layers", False), remat=section.get("remat", "none"))


class TransformerBlock(nn.Module):
  """``block(x, positions, mask=None)`` -> x; with ``cache=`` (``attention.init_kv_cache``) it
  returns ``(x, updated cache)`` (see ``attention.Attention``)."""
  config: BlockConfig
  frame_size: int | None = 1
  window_frames: int | None = None

  @nn.compact
  def __call__(self, x, positions, mask=None, cache=None):
    c = self.config
    h = layers.RMSNorm(dtype=c.dtype, name="attn_norm")(x)
    attn = attention.Attention(
        c.num_heads, c.num_kv_heads, c.head_dim, qk_norm=c.qk_norm, rope_base=c.rope_base,
        soft_cap=c.attn_soft_cap, frame_size=self.frame_size, window_frames=self.window_frames,
        impl=c.impl, dtype=c.dtype, name="attn")
    if cache is None:
      x = x + attn(h, positions, mask)
    else:
      out, cache = attn(h, positions, mask, cache=cache)
      x = x + out
    h = layers.RMSNorm(dtype=c.dtype, name="mlp_norm")(x)
    x = x + layers.SwiGLU(c.mlp_hidden, dtype=c.dtype, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x if cache is None else (x, cache)


def apply_block(block, x, positions, mask, cache):
  """A stack's default layer: ``block`` on ``x`` as it is -> (x, cache; None without one)."""
  if cache is None:
    return block(x, positions, mask), None
  return block(x, positions, mask, cache)


def init_stack_cache(config: BlockConfig, num_layers: int, batch: int, max_len: int) -> list | dict:
  """The KV caches of a stack's ``num_layers`` causal layers (``attention.init_kv_cache``): a list
  of them, or with ``config.scan_layers`` one whose arrays have a leading layers axis (``index``
  [num_layers]), which a scanned stack slices as it scans."""
  empty = lambda: attention.init_kv_cache(batch, max_len, config.num_kv_heads, config.head_dim, config.dtype)
  if config.scan_layers:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_layers, *a.shape)), empty())
  return [empty() for _ in range(num_layers)]


def cache_index(cache: list | dict) -> jax.Array:
  """Where the next write goes (every layer of a stack advances alike)."""
  return cache["index"][0] if isinstance(cache, dict) else cache[0]["index"]


def cache_length(cache: list | dict) -> int:
  """The positions each layer's cache holds (``max_len``)."""
  return cache["key"].shape[3] if isinstance(cache, dict) else cache[0]["key"].shape[2]


def rewind_cache(cache: list | dict, length) -> list | dict:
  """``cache`` with every layer's index ``length`` positions back: what lies past it stays,
  hidden by the causal mask until overwritten."""
  if isinstance(cache, dict):
    return dict(cache, index=cache["index"] - length)
  return [dict(layer, index=layer["index"] - length) for layer in cache]


def stack_params(params: dict, name: str, num_layers: int, group_size: int = 1) -> dict:
  """Unscanned parameters (``{name}_{i}`` for each layer) -> those of the same stack scanned
  (``{name}/block_{j}`` for each layer of a group, stacked over groups); other entries are kept.
  Converts a checkpoint of a loop-over-layers model for the scanned one (unboxed arrays)."""
  layer_names = [f"{name}_{i}" for i in range(num_layers)]
  out = {k: v for k, v in params.items() if k not in layer_names}
  out[name] = {f"block_{j}": jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                          *[params[layer_names[i]] for i in range(j, num_layers, group_size)])
               for j in range(group_size)}
  return out


@functools.cache
def _block_class(remat: str, scanned: bool):
  if remat == "none":
    return TransformerBlock
  # A scan already keeps XLA from merging the recomputation into the forward pass (as
  # jax.checkpoint's documentation notes), so prevent_cse's barriers would only cost there.
  return nn.remat(TransformerBlock, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


class _Group(nn.Module):
  """One step of a scanned stack: ``len(frame_sizes)`` blocks in order -> (x, cache)."""
  config: BlockConfig
  frame_sizes: tuple[int | None, ...]
  window_frames: int | None
  layer_fn: Callable

  @nn.compact
  def __call__(self, x, positions, mask, cache):
    block_class = _block_class(self.config.remat, scanned=True)
    for j, frame_size in enumerate(self.frame_sizes):
      block = block_class(self.config, frame_size=frame_size, window_frames=self.window_frames,
                          name=f"block_{j}")
      x, new_cache = self.layer_fn(block, x, positions, mask, None if frame_size is None else cache)
      if new_cache is not None:
        cache = new_cache
    return x, cache


class BlockStack(nn.Module):
  """``num_layers`` ``TransformerBlock`` s in order: ``stack(x, positions, mask=None, cache=None)``
  -> x, or ``(x, updated cache)`` with a cache (``init_stack_cache`` over the causal layers).

  Layer i attends with ``frame_sizes[i % len(frame_sizes)]`` (``TransformerBlock.frame_size``;
  None: bidirectional), so a repeating pattern of layer kinds is one stack, and runs as
  ``layer_fn(block, x, positions, mask, cache) -> (x, cache)`` (default ``apply_block``; a model
  whose layer kinds see x in different layouts reshapes there, telling them apart by
  ``block.frame_size``). With a cache, every causal layer (frame_size not None) reads and writes
  its own; ``positions`` and ``mask`` are those of the cached layers.

  Unscanned, the blocks are the parent's own children ``{name}_{i}``, as a loop over blocks in the
  parent would name them (the stack shares the parent's scope; ``block_{i}`` without a parent),
  so parameters and their init are those of such a loop, and the cache is a list, one per causal
  layer. Scanned (``config.scan_layers``), one ``nn.scan`` over ``num_layers / len(frame_sizes)``
  groups of ``len(frame_sizes)`` layers: parameters ``{name}/block_{j}`` (layer j of a group) with
  a leading ``layers`` logical axis over groups (``stack_params`` converts), and with a cache
  exactly one causal layer per group, whose slice of the stacked cache the scan hands it.
  """
  config: BlockConfig
  num_layers: int
  frame_sizes: tuple[int | None, ...] = (1,)
  window_frames: int | None = None
  layer_fn: Callable = apply_block

  def setup(self):
    if not self.config.scan_layers and isinstance(self.parent, nn.Module):
      nn.share_scope(self, self.parent)

  @property
  def num_groups(self) -> int:
    return self.num_layers // len(self.frame_sizes)

  @nn.compact
  def __call__(self, x, positions, mask=None, cache=None):
    if self.config.scan_layers:
      x, cache = self._scanned(x, positions, mask, cache)
    else:
      x, cache = self._loop(x, positions, mask, cache)
    return x if cache is None else (x, cache)

  def _loop(self, x, positions, mask, cache):
    block_class = _block_class(self.config.remat, scanned=False)
    prefix = self.name if isinstance(self.parent, nn.Module) else "block"
    causal = sum(self.frame_sizes[i % len(self.frame_sizes)] is not None for i in range(self.num_layers))
    if cache is not None and (not isinstance(cache, (list, tuple)) or len(cache) != causal):
      raise ValueError(f"an unscanned stack of {causal} causal layers takes a list of {causal} caches "
                       f"(init_stack_cache), got {type(cache).__name__} of {len(cache)}")
    caches, new_caches = (None if cache is None else iter(cache)), []
    for i in range(self.num_layers):
      frame_size = self.frame_sizes[i % len(self.frame_sizes)]
      block = block_class(self.config, frame_size=frame_size, window_frames=self.window_frames,
                          name=f"{prefix}_{i}")
      layer_cache = None if caches is None or frame_size is None else next(caches)
      x, layer_cache = self.layer_fn(block, x, positions, mask, layer_cache)
      if layer_cache is not None:
        new_caches.append(layer_cache)
    return x, None if cache is None else new_caches

  def _scanned(self, x, positions, mask, cache):
    group = len(self.frame_sizes)
    if self.num_layers % group:
      raise ValueError(f"a scanned stack of {self.num_layers} layers does not split into groups of "
                       f"{group} (frame_sizes={self.frame_sizes})")
    if cache is not None and sum(f is not None for f in self.frame_sizes) != 1:
      raise ValueError(f"a cached scanned stack needs one causal layer per group, got frame_sizes="
                       f"{self.frame_sizes}")
    if cache is not None and not isinstance(cache, dict):
      raise ValueError("a scanned stack takes one cache stacked over its layers (init_stack_cache "
                       f"of a config with scan_layers), got a {type(cache).__name__}")
    scan = nn.scan(_Group, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, 0), length=self.num_groups,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    groups = scan(self.config, self.frame_sizes, self.window_frames, self.layer_fn, name="groups")
    nn.share_scope(self, groups)  # {name}/block_j, not {name}/groups/block_j
    return groups(x, positions, mask, cache)
