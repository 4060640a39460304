"""optax optimiser from config: AdamW, linear warm-up + cosine decay, global-norm clipping, and an
optional trainable subset (``trainable``: a regex on parameter paths)."""
import re

import jax
import ml_collections
import optax
from flax import linen as nn


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(total_steps, opt.warmup_steps + 1), end_value=opt.learning_rate * opt.min_lr_ratio)


def _decay_mask(params):
  # Norm scales and biases (vectors) are not decayed: shrinking them only hurts.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_path(path) -> str:
  """``a/b/kernel`` for a tree path of dict keys (flax boxes and other attributes left out)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def trainable_labels(params, pattern: str):
  """'train' or 'frozen' per parameter: whether ``re.search(pattern, path)`` finds its path."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if regex.search(param_path(path)) else "frozen", params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   trainable: str = "") -> optax.GradientTransformation:
  """AdamW with clipping; with ``trainable`` only the parameters whose path it matches are
  updated: the others get a zero update and no optimizer state (so no Adam moments, no decay)."""
  tx = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=_decay_mask),
  )
  if not trainable:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda params: trainable_labels(params, trainable))
