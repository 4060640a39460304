"""Held-out evaluation of the dynamics model: rollout PSNR against baselines, and action accuracy.

``eval/rollout_psnr``: for ``rollout.eval_windows`` held-out windows, the model sees
``context_frames`` real frames (as tokenizer latents) and imagines the next ``horizon`` frames
from the recorded actions with K = ``rollout.num_steps`` shortcut steps; the decoded frames are
compared with the real ones (mean over windows of the per-frame PSNR, then over horizons;
``_h1``/``_h4``/``_h16`` single horizons). Baselines in the same metrics row:

* ``eval/rollout_psnr_k<baseline_steps>``: the same model sampled with K = 64 steps (same noise);
* ``eval/rollout_psnr_repeat_last``: the last context frame's latents repeated and decoded (a
  model that learned nothing about motion, through the same decoder as the model's frames);
* ``eval/rollout_psnr_repeat_last_pixels``: the last real frame repeated in pixels. Not a fair
  baseline: an exact copy (a frame where nothing moved) scores 120 dB, the MSE floor of
  ``metrics.psnr_from_mse``, where any decoded frame is capped by the tokenizer, so a few exact
  copies among the windows lift the mean by several dB (2 of 32 windows one frame ahead: 32.3 dB
  against a median of 26.4 in one measurement, docs/world_model.md);
* ``eval/tokenizer_psnr_future``: the tokenizer's own reconstruction of the future frames, the
  ceiling any rollout decoded by it can reach.

PSNR rewards the conditional mean: a blurred prediction of an uncertain future beats a sharp,
plausible one. The paper ranks its ablations by FVD, a distance between the distributions of real
and generated videos, for that reason. ``eval/frechet_latent_distance`` (``_k<baseline_steps>``,
``_repeat_last``) is its stand-in here (no pretrained video network can be downloaded): the
Frechet distance between the imagined and the real future frames, each frame's tokenizer latents
flattened into one vector (``metrics.frechet_distance``). ``eval/frechet_latent_distance_real``,
between the real context frames and the real future frames of the same windows, is the floor
set by the finite sample; copies of real frames score near it whatever their timing.

FLD sees each frame alone, not the motion: real frames in a wrong order score on its floor.
``eval/frechet_change_distance`` (``_k<baseline_steps>``, ``_repeat_last``, ``_real``) is the
same distance between the frame-to-frame changes of the latents, z_t - z_{t-1}, from the last
context frame to the first imagined one and on through the horizon, against those of the real
future; ``_real`` compares the changes within the real context with them (the floor). A copy of
the last frame (no change at all) scores far from it; so do frames that look right but jump.

``eval/next_latent_mse`` (K = ``rollout.num_steps``) against ``eval/next_latent_mse_repeat_last``:
the first imagined frame against the real one in latent space, and the last context frame's
latents as the prediction. Free of the tokenizer's decoding error, this shows directly whether
the model predicts the next frame better than a copy of the last one. A sampler that draws from
the right distribution has about twice the MSE of the conditional mean (the mean is the MSE
optimum), so ``eval/next_latent_mse_k1`` also gives the one-step (K = 1) prediction, the model's
estimate of that mean, which is what a copy competes with.

``eval/action_top1``: ``rollout.action_states`` held-out game states are rebuilt in the real game
(replaying the episode from its world seed; the synthetic source knows its own) and stepped with
each of the 17 actions, giving the true next frame of every action. The model, given the 16 preceding real frames, predicts the next
frame for each action (same noise for all 17). A state counts as a hit when the prediction closest
to the real next frame belongs to an action whose real outcome *is* that frame: several actions
often have the same effect (e.g. NOOP and a craft the player cannot afford), and they are then
equally right; equally close predictions are a tie, broken at random (in expectation).
``eval/action_top1_chance`` is what picking an action at random would score.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxai import metrics
from jaxai.craftax import dataset as craftax_dataset
from jaxai.craftax import env as craftax_env
from jaxai.data import pipeline
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import images
from jaxai.world_model import latents as latents_lib
from jaxai.world_model import rollout as rollout_lib

REPORTED_HORIZONS = (1, 4, 16)


def frame_psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """PSNR in dB of [..., H, W, C] frames in [0, 1] (pred) against uint8 frames (target)."""
  mse = np.mean((pred.astype(np.float64) - target.astype(np.float64) / 255.0) ** 2, axis=(-3, -2, -1))
  return metrics.psnr_from_mse(mse)


def latent_frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between two sets of frames' latents [..., L, C], one vector per frame."""
  flat = lambda z: np.asarray(z, np.float64).reshape(-1, z.shape[-2] * z.shape[-1])
  return metrics.frechet_distance(flat(a), flat(b))


def frame_changes(last_context: np.ndarray, frames: np.ndarray) -> np.ndarray:
  """[W, L, C] and [W, T, L, C] -> the T changes [W, T, L, C] from the last context frame on."""
  return np.diff(np.asarray(frames, np.float32), axis=1,
                 prepend=np.asarray(last_context, np.float32)[:, None])


def _evenly(items: np.ndarray, count: int) -> np.ndarray:
  return items[pipeline.evenly_spaced(len(items), count)]


def _horizon_metrics(prefix: str, psnr: np.ndarray) -> dict:
  """psnr [windows, horizon] -> the mean and a few single horizons."""
  per_horizon = psnr.mean(axis=0)
  out = {prefix: float(per_horizon.mean())}
  for h in REPORTED_HORIZONS:
    if h <= len(per_horizon):
      out[f"{prefix}_h{h}"] = float(per_horizon[h - 1])
  return out


def make_evaluate(config, model, tokenizer, tokenizer_params, heldout: latents_lib.LatentSteps,
                  split, out_dir: str):
  """(dynamics params, step, seed=None) -> metrics; see the module docstring. ``heldout``: the
  held-out split's latents; ``split``: the split itself (``jaxai.world_model.data``), for frames."""
  r = config.rollout
  length = r.context_frames + r.horizon
  starts = _evenly(craftax_dataset.window_starts(heldout.episode_offsets, length), r.eval_windows)
  frames = np.stack([split.read_steps(int(s), length)["frames"] for s in starts])  # [W, T, H, W, C]
  window_latents = np.stack([heldout.latents[s:s + length] for s in starts]).astype(np.float32)
  actions, labelled = dynamics_lib.actions_into_frames(
      np.stack([heldout.actions[s:s + length] for s in starts]),
      np.stack([heldout.is_first[s:s + length] for s in starts]))
  context = window_latents[:, :r.context_frames]
  future = frames[:, r.context_frames:]

  @jax.jit
  def decode_with(params, z):
    """[W, T, L, C] -> [W, T, H, W, C], each frame decoded on its own, as the tokenizer was trained
    (single frames) and as the interactive world decodes. The params are an input of the program,
    not constants baked into it."""
    frames = tokenizer.apply({"params": params}, z.reshape(-1, 1, *z.shape[2:]), method=tokenizer.decode)
    return jnp.clip(frames.reshape(*z.shape[:2], *frames.shape[2:]), 0.0, 1.0)

  decode = lambda z: decode_with(tokenizer_params, z)

  def imagine_latents(params, context, actions, labelled, rng, num_steps):
    return rollout_lib.rollout(model, params, context, actions, rng, num_steps=num_steps,
                               context_signal=r.context_signal, action_mask=labelled)

  def imagine(params, context, actions, labelled, rng, num_steps):
    return np.asarray(decode(imagine_latents(params, context, actions, labelled, rng, num_steps)))

  future_latents = window_latents[:, r.context_frames:]
  tokenizer_future = np.asarray(decode(future_latents))
  latent_mse = lambda a, b: float(np.mean((np.asarray(a, np.float32) - b) ** 2))
  next_latents = window_latents[:, r.context_frames]
  repeated_last = np.repeat(context[:, -1:], r.horizon, axis=1)  # the copy baseline's latents
  future_changes = frame_changes(context[:, -1], future_latents)
  fixed = {
      "eval/next_latent_mse_repeat_last": latent_mse(context[:, -1], next_latents),
      **_horizon_metrics("eval/tokenizer_psnr_future", frame_psnr(tokenizer_future, future)),
      **_horizon_metrics("eval/rollout_psnr_repeat_last",
                         frame_psnr(np.asarray(decode(repeated_last)), future)),
      **_horizon_metrics("eval/rollout_psnr_repeat_last_pixels",
                         frame_psnr(np.repeat(frames[:, r.context_frames - 1:r.context_frames] / 255.0,
                                              r.horizon, axis=1), future)),
      "eval/frechet_latent_distance_real": latent_frechet(context, future_latents),
      "eval/frechet_latent_distance_repeat_last": latent_frechet(repeated_last, future_latents),
      "eval/frechet_change_distance_real": latent_frechet(
          frame_changes(context[:, 0], context[:, 1:]), future_changes),
      "eval/frechet_change_distance_repeat_last": latent_frechet(
          frame_changes(context[:, -1], repeated_last), future_changes),
  }
  action_states = _action_states(config, split, heldout) if r.action_states else None

  def evaluate(params, step, seed=None):
    # The same noise for K = 4 and the K = 64 baseline; by default the step's, so that runs
    # evaluated at the same step (a model and its ablation) share it.
    rng = jax.random.key(step if seed is None else seed)
    metrics = dict(fixed)
    predicted = None
    for num_steps in (r.num_steps, r.baseline_steps):
      latents = imagine_latents(params, context, actions, labelled, rng, num_steps)
      imagined = np.asarray(decode(latents))
      if num_steps == r.num_steps:
        metrics["eval/next_latent_mse"] = latent_mse(latents[:, 0], next_latents)
      suffix = "" if num_steps == r.num_steps else f"_k{num_steps}"
      metrics.update(_horizon_metrics(f"eval/rollout_psnr{suffix}", frame_psnr(imagined, future)))
      metrics[f"eval/frechet_latent_distance{suffix}"] = latent_frechet(latents, future_latents)
      metrics[f"eval/frechet_change_distance{suffix}"] = latent_frechet(
          frame_changes(context[:, -1], latents), future_changes)
      predicted = imagined if num_steps == r.num_steps else predicted
    one_step = imagine_latents(params, context, actions[:, :r.context_frames + 1],
                               labelled[:, :r.context_frames + 1], rng, 1)
    metrics["eval/next_latent_mse_k1"] = latent_mse(one_step[:, 0], next_latents)
    if action_states is not None:
      metrics.update(_action_top1(params, action_states, imagine, rng, r.num_steps))
    write_strip(os.path.join(out_dir, f"rollout_step_{step}.png"), future[:2], predicted[:2])
    return metrics

  return evaluate


def _action_states(config, split, heldout: latents_lib.LatentSteps) -> dict:
  """Held-out states with their context latents and the real next frame of every action."""
  r = config.rollout
  candidates = []
  for e, (begin, end) in enumerate(zip(heldout.episode_offsets[:-1], heldout.episode_offsets[1:])):
    candidates += [(e, int(t)) for t in range(r.context_frames - 1, int(end - begin) - 1)]
  contexts, context_actions, context_labels, outcomes, taken = [], [], [], [], []
  for e, t in _evenly(np.array(candidates, dtype=np.int64), r.action_states):
    begin = int(heldout.episode_offsets[e])
    episode_actions = heldout.actions[begin:begin + t + 1]
    frame, next_frames = split.outcomes_of_every_action(e, episode_actions, t)
    recorded = split.read_steps(begin + t, 2)["frames"]
    # The replay must land on the recorded frames (up to float rounding), or the states are wrong.
    if np.mean(np.abs(frame.astype(int) - recorded[0]) > 1) > 0.01 or \
       np.mean(np.abs(next_frames[episode_actions[t]].astype(int) - recorded[1]) > 1) > 0.01:
      raise RuntimeError(f"held-out episode {e} does not replay to its recorded frames at step {t}")
    window = slice(begin + t + 1 - r.context_frames, begin + t + 1)
    a, labels = dynamics_lib.actions_into_frames(heldout.actions[None, window], heldout.is_first[None, window])
    contexts.append(heldout.latents[window].astype(np.float32))
    context_actions.append(np.asarray(a[0]))
    context_labels.append(np.asarray(labels[0]))
    outcomes.append(next_frames)
    taken.append(int(episode_actions[t]))
  return {"context": np.stack(contexts), "actions": np.stack(context_actions),
          "labelled": np.stack(context_labels), "outcomes": np.stack(outcomes), "taken": np.array(taken)}


def _action_top1(params, states: dict, imagine, rng, num_steps: int) -> dict:
  n = len(states["taken"])
  distances = np.zeros((n, craftax_env.NUM_ACTIONS))
  real_next = states["outcomes"][np.arange(n), states["taken"]]  # [n, H, W, C]
  for a in range(craftax_env.NUM_ACTIONS):  # one batch per action: the same noise for every action
    actions = np.concatenate([states["actions"], np.full((n, 1), a, np.int32)], axis=1)
    labelled = np.concatenate([states["labelled"], np.ones((n, 1), bool)], axis=1)
    predicted = imagine(params, states["context"], actions, labelled, rng, num_steps)[:, 0]
    distances[:, a] = np.mean((predicted - real_next / 255.0) ** 2, axis=(1, 2, 3))
  same_outcome = np.all(states["outcomes"] == real_next[:, None], axis=(2, 3, 4))  # [n, 17]
  # Ties (a model that ignores the action predicts 17 equal frames) are broken at random: in
  # expectation, the fraction of the tied-closest actions that are right.
  closest = distances <= distances.min(axis=1, keepdims=True) * (1 + 1e-9)
  hits = np.sum(closest & same_outcome, axis=1) / np.sum(closest, axis=1)
  return {"eval/action_top1": float(np.mean(hits)),
          "eval/action_top1_chance": float(np.mean(same_outcome.mean(axis=1))),
          "eval/action_states": n}


def write_strip(path: str, real: np.ndarray, imagined: np.ndarray) -> None:
  """PNG: for each window, the real future frames above the imagined ones."""
  if jax.process_index() != 0:
    return
  horizon = real.shape[1]
  images.save_png(path, images.image_grid(
      real.reshape(-1, *real.shape[2:]),
      np.round(imagined.reshape(-1, *imagined.shape[2:]) * 255).astype(np.uint8), columns=horizon, scale=2))
