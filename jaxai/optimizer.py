"""optax optimiser from config: AdamW, linear warm-up + cosine decay, global-norm clipping."""
import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(total_steps, opt.warmup_steps + 1), end_value=opt.learning_rate * opt.min_lr_ratio)


def _decay_mask(params):
  # Norm scales and biases (vectors) are not decayed: shrinking them only hurts.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=_decay_mask),
  )
