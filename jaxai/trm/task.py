"""TRM and its baselines trained on the generated puzzles: one stage, ``trm``, with deep supervision.

Each update is one supervision step (``supervision.supervision_step``) of every slot of the batch:
the slots carry their example and its detached (y, z) from update to update in the trainer's batch
carry (``Stage.init_batch_carry``), and a slot whose example halted takes the new batch's row in
that slot, as the official code refills its carry. So a training example gets up to
``supervision.max_steps`` (16) updates, fewer once the halt head says its answer is right.

The model is ``model.reasoner`` (trm | hrm | single_pass, ``jaxai.trm.model``); the single pass,
with ``model.match_parameters``, takes the layer count that gives it TRM's parameter count at the
same width (``model.single_pass_matching``). The trainer keeps the EMA of the weights
(``ema_decay``, the paper's 0.999) and the evaluation scores it, as the paper reports it.

Evaluation (held-out split, the first ``data.eval_puzzles`` puzzles): every puzzle through all
``max_steps`` supervision steps from the initial state (``supervision.solve``):
``eval/exact_accuracy`` (every token of the answer right after the last step), the same after
steps 1, 2, 4 and 8 (``eval/exact_at_step_N``), ``eval/token_accuracy``, and what the halt head
would do: ``eval/halt_steps`` (mean first step whose halt logit is > 0, else max_steps) and
``eval/halted_exact_accuracy`` (the answer at that step). The puzzles are generated into
``data.dir`` when the stage starts training (``data.generate``), never by ``--dry_run``.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from jaxai import config_lib, stages
from jaxai.data import pipeline
from jaxai.trm import dataset, supervision
from jaxai.trm import model as model_lib

STAGES = ("trm",)
EVAL_STEPS = (1, 2, 4, 8)  # besides the last step: the answer's accuracy after these steps


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The model of ``config.model`` on ``config.data.task`` (raises ValueError on bad values)."""
  m, spec = config.model, dataset.TASKS[config.data.task]
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  fields = dict(vocab_size=spec.vocab_size, seq_len=dataset.seq_len(config.data.task, config.data.variant),
                reasoner=m.reasoner, mixer=m.mixer,
                width=m.width, num_layers=m.num_layers, num_heads=m.num_heads, expansion=m.expansion,
                hidden_multiple=m.hidden_multiple, puzzle_tokens=m.puzzle_tokens, rounds=m.rounds,
                latent_steps=m.latent_steps, one_step_gradient=m.one_step_gradient, dtype=dtype)
  if m.reasoner == "single_pass" and m.match_parameters:
    recursive = model_lib.ModelConfig(**{**fields, "reasoner": "trm", "one_step_gradient": False})
    return dataclasses.replace(model_lib.single_pass_matching(recursive, match_depth=m.match_depth),
                               dtype=dtype)
  return model_lib.ModelConfig(**fields)


def supervision_config(config: ml_collections.ConfigDict) -> supervision.SupervisionConfig:
  s = config.supervision
  return supervision.SupervisionConfig(max_steps=s.max_steps, exploration=s.exploration,
                                       halt_loss_weight=s.halt_loss_weight,
                                       stagger_starts=s.stagger_starts)


def validate(config: ml_collections.ConfigDict) -> None:
  for name in config.stages:
    config_lib.check(name in STAGES, "stages", f"unknown stage {name!r}; the trm task has {', '.join(STAGES)}")
  config_lib.check_choice(config, "data.task", tuple(dataset.TASKS))
  config_lib.check_choice(config, "data.variant", tuple(dataset.VARIANTS[config.data.task]))
  config_lib.check_positive(config, "data.copies", "data.eval_puzzles")
  limit = dataset.TASKS[config.data.task].max_copies
  config_lib.check(not limit or config.data.copies <= limit, "data.copies",
                   f"{config.data.copies} exceeds the {limit} distinct augmentations of a {config.data.task}")
  for section, make in (("model", model_config), ("supervision", supervision_config)):
    try:
      make(config)
    except ValueError as e:
      raise config_lib.ConfigError(section, str(e)) from None
  config_lib.check(config.ema_decay > 0, "ema_decay", "the evaluation scores the weights' moving average "
                   "(the paper's 0.999): set ema_decay in (0, 1)")
  if not config.data.generate:
    try:
      for split in dataset.SPLITS:
        dataset.load(config.data.dir, config.data.task, split, variant=config.data.variant)
    except dataset.DatasetError as e:
      raise config_lib.ConfigError("data.dir", f"{e} (or set --config.data.generate=True to "
                                   "generate it first)") from None


def make_model(config: ml_collections.ConfigDict) -> model_lib.Reasoner:
  return model_lib.Reasoner(model_config(config))


def boxed_carry(model_cfg: model_lib.ModelConfig, batch_size: int, stagger: int = 0) -> dict:
  """``supervision.init_carry`` boxed with its logical axes: the trainer shards it like the batch."""
  carry = supervision.init_carry(model_cfg, batch_size, stagger=stagger)
  return {k: nn.LogicallyPartitioned(v, names=supervision.CARRY_AXES[k]) for k, v in carry.items()}


def evaluation_scores(outputs: dict) -> dict:
  """Held-out scores of ``supervision.solve``'s outputs (``exact`` and ``halt_logit`` [steps, B],
  numpy), as documented in the module docstring."""
  exact, halt = np.asarray(outputs["exact"], bool), np.asarray(outputs["halt_logit"]) > 0
  steps = exact.shape[0]
  first_halt = np.where(halt.any(axis=0), halt.argmax(axis=0), steps - 1)  # 0-based step index
  scores = {"eval/exact_accuracy": float(exact[-1].mean()),
            "eval/halt_steps": float(np.mean(first_halt + 1)),
            "eval/halted_exact_accuracy": float(exact[first_halt, np.arange(exact.shape[1])].mean())}
  for n in EVAL_STEPS:
    if n < steps:
      scores[f"eval/exact_at_step_{n}"] = float(exact[n - 1].mean())
  return scores


def heldout_batches(config: ml_collections.ConfigDict, count: int, batch_size: int):
  """The first ``count`` held-out puzzles, unaugmented, as numpy batches of ``batch_size`` rows (the
  last one padded by repeating its first row; ``valid`` marks the real rows)."""
  puzzles = dataset.examples(config.data.dir, config.data.task, "heldout", variant=config.data.variant)
  count = min(count, len(puzzles))
  for start in range(0, count, batch_size):
    rows = [puzzles[i] for i in range(start, min(count, start + batch_size))]
    valid = np.zeros(batch_size, bool)
    valid[:len(rows)] = True
    rows += [rows[0]] * (batch_size - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in ("inputs", "labels", "puzzle_id")}, valid


def solver(model: model_lib.Reasoner, steps: int):
  """Jitted ``supervision.solve`` with per-step token accuracy: params, batch -> outputs."""
  def solve(params, batch):
    out = supervision.solve(model, params, batch, steps=steps)
    out["tokens_right"] = jnp.sum(out["predictions"][-1] == batch["labels"], axis=-1)
    return out
  return jax.jit(solve)


def evaluate_puzzles(config, solve, params, count: int) -> tuple[dict, dict]:
  """(scores, arrays) over the first ``count`` held-out puzzles with ``solve`` (``solver``'s,
  made once so that repeated evaluations compile once): scores as ``evaluation_scores`` plus
  ``eval/token_accuracy``; arrays ``inputs``, ``labels``, ``predictions`` (after the last step)
  and ``exact`` [steps, N] for pictures."""
  parts = []
  for batch, valid in heldout_batches(config, count, config.batch_size):
    out = jax.device_get(solve(params, batch))
    parts.append({"inputs": batch["inputs"][valid], "labels": batch["labels"][valid],
                  "predictions": out["predictions"][-1][valid], "exact": out["exact"][:, valid],
                  "halt_logit": out["halt_logit"][:, valid], "tokens_right": out["tokens_right"][valid]})
  arrays = {k: np.concatenate([p[k] for p in parts], axis=1 if k in ("exact", "halt_logit") else 0)
            for k in parts[0]}
  scores = evaluation_scores(arrays)
  scores["eval/token_accuracy"] = float(arrays["tokens_right"].sum() / arrays["labels"].size)
  scores["eval/puzzles"] = int(arrays["labels"].shape[0])
  return scores, arrays


def build_stage(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  del workdir
  model = make_model(config)
  model_cfg = model.config
  sup = supervision_config(config)
  seq_len = model_cfg.seq_len

  def loss(params, batch, rng, *, batch_carry):
    return supervision.supervision_step(model, params, batch_carry, batch, rng, config=sup, training=True)

  def make_data(process_index, process_count):
    d = config.data
    if d.generate:
      dataset.generate(d.dir, d.task, d.variant, processes=os.cpu_count() or 1)
    examples = dataset.examples(d.dir, d.task, "train", variant=d.variant, copies=d.copies, seed=config.seed)
    return pipeline.process_local_batches(examples, config.batch_size, seed=config.seed,
                                          process_index=process_index, process_count=process_count)

  def abstract_batch():
    tokens = jax.ShapeDtypeStruct((config.batch_size, seq_len), jnp.int32)
    return {"inputs": tokens, "labels": tokens,
            "puzzle_id": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}

  solve = solver(model, sup.max_steps)

  def evaluate(params, step):
    del step
    return evaluate_puzzles(config, solve, params, config.data.eval_puzzles)[0]

  return stages.Stage(name="trm", config=config, init_params=functools.partial(model_lib.init_params, model),
                      loss=loss, make_data=make_data, abstract_batch=abstract_batch, evaluate=evaluate,
                      init_batch_carry=lambda: boxed_carry(model_cfg, config.batch_size,
                                                           sup.max_steps if sup.stagger_starts else 0),
                      evaluate_ema=True)
