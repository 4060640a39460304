"""Tokenizer objective: pixel MSE + a perceptual substitute, each divided by an estimate of its RMS.

Perceptual substitute. The paper adds 0.2 * LPIPS, which needs pretrained VGG weights that cannot be
downloaded here. In its place: the **image-gradient loss**, the squared error of the horizontal and
vertical finite differences of the image (``gradient_loss``). It penalises blurred or misplaced
edges more than plain MSE does - the blur LPIPS is there to prevent - needs no weights, and costs a
few slices instead of a network (XLA convolutions are slow on the CPUs this runs on).

RMS normalisation ("loss normalization" in the paper). Each term is divided by a running estimate
of its root-mean-square, so every term contributes a gradient of similar size whatever its scale,
and the balance does not drift as the reconstructions improve. The estimate is an exponential
moving average (``RMS_DECAY``) of the mean square of the term's per-image values, debiased like
Adam's moments so the first steps are not divided by a near-zero estimate; it is part of the
trainer state (``Task.init_loss_state``), updated under stop-gradient, checkpointed and resumed,
and identical under any mesh (the batch mean is over the global batch).

The loss value handed to the trainer (logged as ``loss``) is the raw ``mse + weight * perceptual``
so that it is comparable across steps and runs, while its *gradient* is that of the normalised sum
``mse / sg(rms_mse) + weight * perceptual / sg(rms_perceptual)`` (the value of the normalised sum
is ~1 + weight at every step and would say nothing about progress).
"""
import jax
import jax.numpy as jnp


def per_image_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over the last three (H, W, C) axes."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(-3, -2, -1))


def psnr(pred: jax.Array, target: jax.Array, max_value: float = 1.0) -> jax.Array:
  """Per-image PSNR in dB over the last three (H, W, C) axes: 10 log10(max^2 / MSE)."""
  return 10.0 * jnp.log10(max_value ** 2 / jnp.maximum(per_image_mse(pred, target), 1e-12))


def image_gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Forward differences along H and W of [..., H, W, C]: ([..., H-1, W, C], [..., H, W-1, C])."""
  return x[..., 1:, :, :] - x[..., :-1, :, :], x[..., :, 1:, :] - x[..., :, :-1, :]


def gradient_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-image squared error of the image gradients (mean of the vertical and horizontal parts)."""
  pred_dy, pred_dx = image_gradients(pred.astype(jnp.float32))
  target_dy, target_dx = image_gradients(target.astype(jnp.float32))
  return 0.5 * (per_image_mse(pred_dy, target_dy) + per_image_mse(pred_dx, target_dx))


RMS_DECAY = 0.99  # ~100 steps of memory: smooth, yet follows the terms as they fall during training


def init_rms_state(names) -> dict:
  """Running-RMS state of each named term: an EMA of its mean square and the EMA's debias factor."""
  zero = jnp.zeros((), jnp.float32)
  return {name: {"mean_square": zero, "debias": zero} for name in names}


def running_rms_normalize(terms: dict[str, jax.Array], state: dict, *, decay: float = RMS_DECAY,
                          eps: float = 1e-8) -> tuple[dict, dict, dict]:
  """Divides each term's batch mean by the running RMS of its per-example values.

  Args:
    terms: name -> per-example values (any shape; all entries count as examples).
    state: ``init_rms_state(terms)`` or the state this function returned on the previous step.
  Returns:
    (name -> normalised scalar, name -> the RMS it was divided by, the updated state). The
    running estimate includes the current batch, so the very first step divides by that batch's RMS.
  """
  normalized, rms, new_state = {}, {}, {}
  for name, values in terms.items():
    values = values.astype(jnp.float32)
    batch_mean_square = jax.lax.stop_gradient(jnp.mean(jnp.square(values)))
    entry = state[name]
    mean_square = decay * entry["mean_square"] + (1.0 - decay) * batch_mean_square
    debias = decay * entry["debias"] + (1.0 - decay)  # = 1 - decay^steps
    new_state[name] = {"mean_square": mean_square, "debias": debias}
    rms[name] = jnp.sqrt(mean_square / debias)
    normalized[name] = jnp.mean(values) / jnp.maximum(rms[name], eps)
  return normalized, rms, new_state


def term_names(perceptual_weight: float) -> tuple[str, ...]:
  return ("mse", "perceptual") if perceptual_weight else ("mse",)


def tokenizer_loss(model, perceptual_weight: float, params, batch, rng, *, loss_state):
  """(loss, (metrics, rms_state)) of one batch {'frames': uint8 [B, T, H, W, C]}; see the module
  docstring. ``loss_state``: the running RMS, ``init_rms_state(term_names(perceptual_weight))`` or
  its last update."""
  rms_state = loss_state
  frames = batch["frames"]
  target = frames.astype(jnp.float32) / 255.0
  recon, _, dropped = model.apply({"params": params}, frames, rng)
  edge_error = gradient_loss(recon, target)
  terms = {"mse": per_image_mse(recon, target), "perceptual": edge_error}
  terms = {k: terms[k] for k in term_names(perceptual_weight)}
  weights = {"mse": 1.0, "perceptual": perceptual_weight}
  normalized, rms, rms_state = running_rms_normalize(terms, rms_state)
  objective = sum(weights[k] * normalized[k] for k in terms)
  raw = sum(weights[k] * jnp.mean(terms[k]) for k in terms)
  loss = objective + jax.lax.stop_gradient(raw - objective)  # value: raw; gradient: normalised
  metrics = {"mse": jnp.mean(per_image_mse(recon, target)),
             "psnr": jnp.mean(psnr(jnp.clip(recon, 0.0, 1.0), target)),
             "perceptual": jnp.mean(edge_error),
             "drop_fraction": jnp.mean(dropped.astype(jnp.float32)),
             **{f"rms/{k}": v for k, v in rms.items()}}
  return loss, (metrics, rms_state)
