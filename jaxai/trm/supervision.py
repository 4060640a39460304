"""Deep supervision with a learned halt: one pure update step over a batch of carried examples.

Each example is worked on over up to ``max_steps`` (N_sup = 16) supervision steps. Each step is one
optimizer update: the reasoner (``recursion.reason``) improves the carried (y, z), the answer read
from y gets its loss, and (y, z) are carried to the next step detached, so no gradient crosses
steps: a step learns to improve whatever answer it is handed. The loss of an example is

    stable-max cross-entropy of its answer (mean over its tokens)
    + 0.5 * BCE(halt logit, "the answer is now exactly right").

In training an example halts when its halt logit is > 0 or at step ``max_steps``; ``exploration``
(10%) of the examples get a random minimum step in [2, max_steps] below which they do not halt,
drawn afresh at every step as the official code does. ``stagger_starts`` (not the official
code's) offsets the slots' first examples so that they do not all halt together (``init_carry``).
Evaluation runs every example all
``max_steps`` steps (``solve``), so a batch finishes together.

The carry (``init_carry``) is a dict of per-example arrays, batch first (``CARRY_AXES``): y, z,
``steps`` taken, ``halted``, and the example itself (``inputs``, ``labels``, ``puzzle_id``).
``supervision_step`` first starts every halted slot afresh on the batch's row in that slot
(``reset_carry``: initial y and z, step 0; the batch's other rows are unused this update), so a
trainer feeds a fresh batch every update and carries the dict: ``Stage.init_batch_carry``'s
contract. The initial y and z are fixed random vectors (``initial_state``), broadcast over
batch and positions, not trained.

The single pass has nothing to carry: every example halts after its one step and there is no
halt loss.

EMA of the weights (the paper's 0.999) is the trainer's (``ema_decay`` of the stage config).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxai.trm import losses, recursion
from jaxai.trm import model as model_lib

# Logical axes of the carry's arrays, for a trainer that boxes ``init_carry`` (sharded as the batch).
CARRY_AXES = {"y": ("batch", "length", "embed"), "z": ("batch", "length", "embed"),
              "steps": ("batch",), "halted": ("batch",), "inputs": ("batch", "length"),
              "labels": ("batch", "length"), "puzzle_id": ("batch",)}


@dataclasses.dataclass(frozen=True)
class SupervisionConfig:
  max_steps: int = 16        # N_sup
  exploration: float = 0.1   # fraction of examples given a random minimum number of steps
  halt_loss_weight: float = 0.5
  stagger_starts: bool = False  # slots' first examples start at steps 0..max_steps-1 (init_carry)

  def __post_init__(self):
    if self.max_steps < 1 or not 0 <= self.exploration <= 1 or self.halt_loss_weight < 0:
      raise ValueError(f"supervision needs max_steps >= 1, exploration in [0, 1] and halt_loss_weight "
                       f">= 0, got {self.max_steps}, {self.exploration}, {self.halt_loss_weight}")


def initial_state(config: model_lib.ModelConfig) -> tuple[jax.Array, jax.Array]:
  """The fixed initial y and z, [D] each: standard normal truncated at +-2 (the official buffers),
  drawn with numpy from ``state_seed``, so they are the same constants in every program."""
  rng = np.random.default_rng(config.state_seed)

  def draw():
    values = rng.standard_normal(config.width)
    while np.any(outside := np.abs(values) > 2):
      values[outside] = rng.standard_normal(int(outside.sum()))
    return jnp.asarray(values, config.dtype)

  return draw(), draw()


def init_carry(config: model_lib.ModelConfig, batch_size: int, *, stagger: int = 0) -> dict:
  """A carry of ``batch_size`` empty slots, all halted: the first step fills them from its batch.

  With ``stagger`` > 1 (``max_steps``), slot ``i``'s first example starts at step ``i % stagger``
  instead of 0 (a negative ``steps`` in the empty slot tells ``reset_carry``), so it halts that
  many steps early. Without it every slot starts together and, until the halt head first fires,
  they all halt together: every update then trains one supervision step of every example, the
  same step, cycling through 1..max_steps (the official code's behaviour). Staggered, each update
  mixes all steps. The model never sees the step count, so only the first examples are cut short.
  """
  state = jnp.zeros((batch_size, config.length, config.width), config.dtype)
  tokens = jnp.zeros((batch_size, config.seq_len), jnp.int32)
  offsets = jnp.arange(batch_size, dtype=jnp.int32) % max(stagger, 1)
  return {"y": state, "z": state, "steps": -offsets,
          "halted": jnp.ones((batch_size,), bool), "inputs": tokens, "labels": tokens,
          "puzzle_id": jnp.zeros((batch_size,), jnp.int32)}


def _batch_data(batch: dict) -> dict:
  if batch["inputs"].shape != batch["labels"].shape:
    raise ValueError(f"batch inputs {list(batch['inputs'].shape)} and labels "
                     f"{list(batch['labels'].shape)} must have one shape")
  data = {"inputs": batch["inputs"], "labels": batch["labels"],
          "puzzle_id": batch.get("puzzle_id", jnp.zeros(batch["inputs"].shape[:1], jnp.int32))}
  return {k: jnp.asarray(v).astype(jnp.int32) for k, v in data.items()}


def reset_carry(config: model_lib.ModelConfig, carry: dict, batch: dict) -> dict:
  """``carry`` with each halted slot started afresh on ``batch``'s row in that slot: the
  example's data, the initial y and z, 0 steps (``-steps`` for an empty slot of a staggered
  ``init_carry``), not halted. Other slots are kept."""
  if batch["inputs"].shape != carry["inputs"].shape:
    raise ValueError(f"batch inputs {list(batch['inputs'].shape)} must match the carry's "
                     f"{list(carry['inputs'].shape)} (batch size and seq_len)")
  halted = carry["halted"]
  pick = lambda new, old: jnp.where(halted.reshape(halted.shape + (1,) * (old.ndim - 1)), new, old)
  y0, z0 = initial_state(config)
  new = {k: pick(v, carry[k]) for k, v in _batch_data(batch).items()}
  return {**new, "y": pick(y0, carry["y"]), "z": pick(z0, carry["z"]),
          "steps": jnp.where(halted, jnp.maximum(-carry["steps"], 0), carry["steps"]),
          "halted": jnp.zeros_like(halted)}


def halting(steps, halt_logit, rng, *, config: SupervisionConfig, training: bool):
  """bool [B]: which examples stop after the step that brought them to ``steps`` [B] (1 after the
  first). Evaluation stops only at ``max_steps``; training also when the halt logit > 0, except
  for the ``exploration`` fraction drawn a minimum step in [2, max_steps] not yet reached."""
  halted = steps >= config.max_steps
  if not training or config.max_steps == 1:
    return halted
  explore_key, minimum_key = jax.random.split(rng)
  explore = jax.random.uniform(explore_key, steps.shape) < config.exploration
  minimum = jnp.where(explore, jax.random.randint(minimum_key, steps.shape, 2, config.max_steps + 1), 0)
  return (halted | (halt_logit > 0)) & (steps >= minimum)


def _ratio(numerator, denominator):
  return jnp.sum(numerator) / jnp.maximum(jnp.sum(denominator), 1)


def supervision_step(model: model_lib.Reasoner, params, carry: dict, batch: dict, rng, *,
                     config: SupervisionConfig, training: bool = True):
  """One deep-supervision step -> (loss, (metrics, new carry)); differentiate w.r.t. ``params``.

  ``batch``: ``inputs`` and ``labels`` [B, seq_len] (``losses.IGNORE_LABEL`` marks a label that
  does not count), optional ``puzzle_id`` [B]; its rows fill the carry's halted slots. ``rng``
  draws the exploration. Metrics are batch means at this step (``exact_accuracy``,
  ``token_accuracy``, losses) and, over the slots that halt now, ``halted_fraction``,
  ``halted_exact_accuracy`` and ``halted_steps`` (the answers a trainer would score).
  """
  c = model.config
  carry = reset_carry(c, carry, batch)
  variables = {"params": params}
  x = model.apply(variables, carry["inputs"], carry["puzzle_id"], method=model_lib.Reasoner.embed)
  y, z = recursion.reason(model, params, x, carry["y"], carry["z"])
  logits = model.apply(variables, y, method=model_lib.Reasoner.answer_logits)
  labels = carry["labels"]
  answer_loss = losses.answer_loss(logits, labels)
  exact = losses.exactly_right(logits, labels)
  steps = carry["steps"] + 1
  if c.reasoner == "single_pass":
    halt_loss = jnp.zeros_like(answer_loss)
    halted = jnp.ones_like(carry["halted"])
    halt_right = exact
  else:
    halt_logit = model.apply(variables, y, method=model_lib.Reasoner.halt_logit)
    halt_loss = losses.halt_loss(halt_logit, exact)
    halted = halting(steps, jax.lax.stop_gradient(halt_logit), rng, config=config, training=training)
    halt_right = (halt_logit > 0) == exact
  loss = jnp.mean(answer_loss + config.halt_loss_weight * halt_loss)
  counted = labels != losses.IGNORE_LABEL
  metrics = {
      "answer_loss": jnp.mean(answer_loss), "halt_loss": jnp.mean(halt_loss),
      "token_accuracy": _ratio(losses.token_correct(logits, labels), counted),
      "exact_accuracy": jnp.mean(exact), "halt_accuracy": jnp.mean(halt_right),
      "halted_fraction": jnp.mean(halted), "halted_exact_accuracy": _ratio(halted & exact, halted),
      "halted_steps": _ratio(jnp.where(halted, steps, 0), halted),
  }
  new_carry = {**carry, "y": jax.lax.stop_gradient(y), "z": jax.lax.stop_gradient(z), "steps": steps,
               "halted": halted}
  return loss, (metrics, new_carry)


def solve(model: model_lib.Reasoner, params, batch: dict, *, steps: int) -> dict:
  """Evaluation: every example through ``steps`` supervision steps from the initial state ->
  ``predictions`` [steps, B, seq_len] (argmax answer after each step), ``exact`` [steps, B] and
  ``halt_logit`` [steps, B] (zeros for the single pass)."""
  c = model.config
  data = _batch_data(batch)
  variables = {"params": params}
  x = model.apply(variables, data["inputs"], data["puzzle_id"], method=model_lib.Reasoner.embed)
  y0, z0 = initial_state(c)
  shape = x.shape
  state = (jnp.broadcast_to(y0, shape), jnp.broadcast_to(z0, shape))

  def step(state, _):
    y, z = recursion.reason(model, params, x, *state)
    logits = model.apply(variables, y, method=model_lib.Reasoner.answer_logits)
    halt = (jnp.zeros(shape[:1]) if c.reasoner == "single_pass"
            else model.apply(variables, y, method=model_lib.Reasoner.halt_logit))
    out = {"predictions": jnp.argmax(logits, axis=-1).astype(jnp.int32),
           "exact": losses.exactly_right(logits, data["labels"]), "halt_logit": halt}
    return (y, z), out

  _, outputs = jax.lax.scan(step, state, None, length=steps)
  return outputs
