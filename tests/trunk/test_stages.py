"""Multi-stage runs as a trunk service, on toy stages built here: stage order and overlays, frozen
parameters as a step input, trainable masks, parameters started from an earlier stage, batches made
on-policy inside the step (REINFORCE on a bandit), and loading a stage as it was trained."""
import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxai import checkpointing, config_lib, sharding, stages, train
from jaxai.rl import advantages, losses

CONTEXTS, ACTIONS = 4, 5


def toy_config(**stage_overlays) -> ml_collections.ConfigDict:
  c = config_lib.trainer_config(task="toy")
  c.stages = {name: config_lib.stage_overlay(**fields) for name, fields in stage_overlays.items()}
  c.update(batch_size=8, total_steps=6, log_every=1, checkpoint_every=3)
  c.optimizer.update(warmup_steps=0, learning_rate=0.1, weight_decay=0.0)
  return c


def run_stage(config, name, workdir, **stage):
  """Trains stage ``name`` of ``config`` (a Stage made of ``stage``'s fields) in ``workdir``."""
  stage_config = stages.stage_config(config, name)
  config_lib.validate_trainer(stage_config, jax.device_count())
  defaults = dict(make_data=None, abstract_batch=lambda: None)
  return train.train(stages.Stage(name=name, config=stage_config, **{**defaults, **stage}), str(workdir))


# --- a regression problem whose target comes from a frozen "teacher" stage ------------------------

X = np.linspace(-1.0, 1.0, 8 * 3, dtype=np.float32).reshape(8, 3)


def linear_init(rng):
  return {"w": jax.random.normal(rng, (3, 2)), "b": jnp.zeros((2,))}


def teacher_stage():
  target = jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2) / 6)
  return dict(init_params=linear_init,
              loss=lambda p, batch, rng: (jnp.mean((X @ p["w"] + p["b"] - X @ target) ** 2), {}))


def student_stage(seen: list):
  def loss(p, batch, rng, *, frozen):
    teacher = frozen["teacher"]
    return jnp.mean((X @ p["w"] + p["b"] - (X @ teacher["w"] + teacher["b"])) ** 2), {}

  def evaluate(params, step, *, frozen):
    seen.append(jax.device_get(frozen["teacher"]))
    return {}

  return dict(init_params=linear_init, loss=loss, evaluate=evaluate,
              frozen={"teacher": stages.Frozen("teacher", linear_init)})


def test_stages_run_after_those_they_read_and_take_their_own_fields():
  config = toy_config(b=dict(reads=("a",), total_steps=9, optimizer=dict(learning_rate=0.5)),
                      a=dict(), c=dict(init_from="b", in_all=False))
  assert stages.order(config) == ["a", "b", "c"] and stages.selected(config) == ["a", "b"]
  b = stages.stage_config(config, "b")
  assert (b.stage, b.total_steps, b.optimizer.learning_rate, b.batch_size) == ("b", 9, 0.5, 8)
  assert stages.stage_config(config, "a").total_steps == 6
  config.stages.a.reads = ("c",)
  with pytest.raises(config_lib.ConfigError, match="circle"):
    stages.order(config)


def test_frozen_parameters_are_a_step_input_kept_bit_identical_and_never_saved(tmp_path):
  config = toy_config(teacher=dict(), student=dict(reads=("teacher",)))
  run_stage(config, "teacher", tmp_path, **teacher_stage())
  _, teacher = checkpointing.restore_params(str(tmp_path / "teacher" / "checkpoints"))
  seen = []
  result = run_stage(config, "student", tmp_path, **student_stage(seen))
  first = train.read_metrics(str(tmp_path / "student"))[0]["loss"]
  assert result["loss"] < 0.05 * first  # the student learnt the teacher's outputs
  for frozen in seen:  # what the step and the evaluation received: the checkpoint, bit for bit
    jax.tree.map(np.testing.assert_array_equal, frozen, teacher)
  # The student's checkpoint holds its own params and optimizer state only.
  manager = ocp.CheckpointManager(str(tmp_path / "student" / "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=False),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  saved = manager.item_metadata(manager.latest_step())["state"]
  assert set(saved) == {"step", "params", "opt_state"} and set(saved["params"]) == {"w", "b"}
  opt_sizes = sum(int(np.prod(m.shape)) for m in jax.tree.leaves(saved["opt_state"]))
  assert opt_sizes == 2 * (6 + 2) + 2  # Adam's moments of the student's 8 values; Adam's and the schedule's counts
  # The frozen params enter the compiled step as arguments, not as constants.
  stage_config = stages.stage_config(config, "student")
  stage = stages.Stage(name="student", config=stage_config, make_data=None, **student_stage([]))
  mesh = sharding.make_mesh((jax.device_count(), 1, 1))
  state = train.TrainState(stage, mesh, config.sharding_rules)
  lowered = state.jitted_step(mesh).lower(checkpointing.abstract_like(state.abstract, state.shardings),
                                          None, state.abstract_frozen)
  frozen_args = jax.tree.leaves(lowered.args_info[0][2])  # ((state, batch, frozen), kwargs)
  assert len(frozen_args) == 2 and {a.shape for a in frozen_args} == {(3, 2), (2,)}
  assert not any(a.donated for a in frozen_args)


def test_a_stage_without_the_stage_it_reads_is_a_config_error(tmp_path):
  config = toy_config(teacher=dict(), student=dict(reads=("teacher",)))
  with pytest.raises(config_lib.ConfigError, match="must be trained first"):
    run_stage(config, "student", tmp_path, **student_stage([]))


def test_a_trainable_mask_leaves_the_other_parameters_unchanged(tmp_path):
  config = toy_config(head=dict(trainable="^b$"))
  init = linear_init(jax.random.fold_in(jax.random.key(config.seed), train.INIT_KEY))  # the trainer's init key
  run_stage(config, "head", tmp_path, **teacher_stage())
  _, params = checkpointing.restore_params(str(tmp_path / "head" / "checkpoints"))
  np.testing.assert_array_equal(params["w"], init["w"])  # masked: bit-identical
  assert np.abs(params["b"]).max() > 1e-3  # trained
  config.stages.head.trainable = "no_such_param"
  with pytest.raises(config_lib.ConfigError, match="matches no parameter"):
    run_stage(config, "head", tmp_path / "other", **teacher_stage())


def test_a_stage_can_start_from_an_earlier_stages_parameters(tmp_path):
  config = toy_config(first=dict(), second=dict(init_from="first", total_steps=1,
                                                optimizer=dict(learning_rate=1e-9)))
  run_stage(config, "first", tmp_path, **teacher_stage())
  _, first = checkpointing.restore_params(str(tmp_path / "first" / "checkpoints"))
  run_stage(config, "second", tmp_path, **teacher_stage())
  _, second = checkpointing.restore_params(str(tmp_path / "second" / "checkpoints"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), second, first)


def test_a_stage_started_from_itself_is_a_finetune_of_another_runs_checkpoint(tmp_path):
  config = toy_config(first=dict())
  run_stage(config, "first", tmp_path / "base", **teacher_stage())
  _, base = checkpointing.restore_params(str(tmp_path / "base" / "first" / "checkpoints"))
  config.stages.first.update(init_from="first", total_steps=1, optimizer=dict(learning_rate=1e-9))
  with pytest.raises(config_lib.ConfigError, match="names the stage itself"):
    stages.order(config)
  config.stages.first.reads_from = str(tmp_path / "base")
  assert stages.order(config) == ["first"]
  run_stage(config, "first", tmp_path / "tuned", **teacher_stage())
  step, tuned = checkpointing.restore_params(str(tmp_path / "tuned" / "first" / "checkpoints"))
  assert step == 1  # a fresh run of one update, not the base run resumed
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned, base)


def test_sigterm_checkpoints_the_stage_and_stops_the_run_there(tmp_path):
  config = toy_config(first=dict(eval_every=2))

  def evaluate(params, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the loop stops at the step's end
    return {}

  with pytest.raises(train.Preempted, match="at step 2"):
    run_stage(config, "first", tmp_path, **teacher_stage(), evaluate=evaluate)
  assert checkpointing.restore_params(str(tmp_path / "first" / "checkpoints"))[0] == 2
  assert run_stage(config, "first", tmp_path, **teacher_stage())["step"] == 6  # resumed to the end


@pytest.mark.parametrize("warmup", [False, True])
def test_the_parameters_moving_average_follows_its_formula_and_reaches_the_loss(tmp_path, warmup):
  config = toy_config(ema=dict(ema_decay=0.75, ema_warmup=warmup))
  # tf.train.ExponentialMovingAverage's num_updates rule: min(decay, (1 + t) / (10 + t)) at update t
  decays = [min(0.75, (1 + t) / (10 + t)) if warmup else 0.75 for t in range(4)]
  target = jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2) / 6)

  def loss(p, batch, rng, *, ema_params):
    fit = jnp.mean((X @ p["w"] - X @ target) ** 2) + jnp.mean((p["w"] - ema_params["w"]) ** 2)
    return fit, {"ema_w00": ema_params["w"][0, 0]}

  stage_config = stages.stage_config(config, "ema")
  stage = stages.Stage(name="ema", config=stage_config, make_data=None, init_params=linear_init, loss=loss,
                       loss_reads_ema=True)
  mesh = sharding.make_mesh((jax.device_count(), 1, 1))
  with jax.set_mesh(mesh):
    train_state = train.TrainState(stage, mesh, config.sharding_rules)
    state = train._initial_state(train_state, str(tmp_path))  # pylint: disable=protected-access
    step_fn = train_state.jitted_step(mesh)
    ema = jax.device_get(state["params"])  # the average starts at the initial parameters
    np.testing.assert_array_equal(jax.device_get(state["ema_params"])["w"], ema["w"])
    for decay in decays:
      state, metrics = step_fn(state, None, {})
      assert float(metrics["ema_w00"]) == pytest.approx(float(ema["w"][0, 0]))  # the loss saw the average
      new = jax.device_get(state["params"])
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, new)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                   jax.device_get(state["ema_params"]), ema)
  with pytest.raises(config_lib.ConfigError, match="ema_decay"):
    train.make_train_step(dataclasses.replace(stage, config=stages.stage_config(toy_config(ema=dict()), "ema")),
                          train_state.tx, train_state.schedule)


# --- on-policy: REINFORCE on a contextual bandit, batches sampled from the current policy ---------

def bandit_stage():
  """Context c of each row is random; the policy's logits are a table [contexts, actions]; the
  reward is 1 for action (3c + 1) mod A. Each step samples contexts and actions from the current
  policy inside the jitted step (``make_batch``) and trains on them with REINFORCE."""
  best = (3 * jnp.arange(CONTEXTS) + 1) % ACTIONS

  def make_batch(params, batch, rng):
    del batch
    context_rng, action_rng = jax.random.split(rng)
    contexts = jax.random.randint(context_rng, (8,), 0, CONTEXTS)
    actions = jax.random.categorical(action_rng, params["logits"][contexts])
    rewards = (actions == best[contexts]).astype(jnp.float32)
    return {"contexts": contexts, "actions": actions, "rewards": rewards}

  def loss(params, batch, rng):
    del rng
    adv = advantages.get("group_mean")(batch["rewards"][None])[0]
    value, metrics = losses.get("reinforce")(params["logits"][batch["contexts"]], batch["actions"], adv,
                                             jnp.ones_like(adv))
    return value, {"reward": jnp.mean(batch["rewards"]), **metrics}

  def evaluate(params, step):
    del step
    probs = jax.nn.softmax(params["logits"])
    return {"eval/p_best": float(jnp.mean(probs[jnp.arange(CONTEXTS), best]))}

  return dict(init_params=lambda rng: {"logits": jnp.zeros((CONTEXTS, ACTIONS))}, loss=loss,
              make_batch=make_batch, evaluate=evaluate)


def test_reinforce_through_make_batch_learns_and_resumes_exactly(tmp_path):
  config = toy_config(bandit=dict(total_steps=60, checkpoint_every=10, log_every=1, eval_every=60))
  config.optimizer.learning_rate = 0.5
  result = run_stage(config, "bandit", tmp_path / "straight", **bandit_stage())
  assert result["eval/p_best"] > 0.8  # from 1/5 at the start
  straight = {r["step"]: r["loss"] for r in train.read_metrics(str(tmp_path / "straight" / "bandit"))}
  config.stages.bandit.max_steps_per_run = 25  # stops with a checkpoint at 25; lose it, as a crash would
  run_stage(config, "bandit", tmp_path / "resumed", **bandit_stage())
  os.rename(tmp_path / "resumed" / "bandit" / "checkpoints" / "25", tmp_path / "lost")
  config.stages.bandit.max_steps_per_run = 0
  run_stage(config, "bandit", tmp_path / "resumed", **bandit_stage())  # from step 20
  resumed = {r["step"]: r["loss"] for r in train.read_metrics(str(tmp_path / "resumed" / "bandit"))}
  assert resumed == straight  # exact: the batches are drawn from the step's key and the params


# --- loading a stage as it was trained --------------------------------------------------------------

def test_load_stage_builds_sections_as_trained_and_says_so(tmp_path, capsys):
  config = toy_config(teacher=dict())
  config.model = {"width": 4, "switch": True}
  run_stage(config, "teacher", tmp_path, **teacher_stage())
  now = toy_config(teacher=dict())
  now.model = {"width": 4, "switch": False, "added_since": 1}
  trained = stages.load_stage(now, str(tmp_path), "teacher", sections=("model",))
  assert trained.config.model.to_dict() == {"width": 4, "switch": True, "added_since": 1}
  assert trained.step == 6 and set(trained.params) == {"w", "b"}
  assert "model: built as trained" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError):
    stages.load_stage(now, str(tmp_path), "student")
