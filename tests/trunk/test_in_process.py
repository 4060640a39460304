"""Trunk behaviours cheap enough to run in-process on the 8 fake devices."""
import os

import jax
import numpy as np
import pytest

from conftest import config_of
from jaxai import config_lib, main, train


def tiny_lm(**overrides):
  return config_of("lm", "tiny", **{k.replace(".", "__"): v for k, v in overrides.items()})


def test_gradient_accumulation_matches_full_batch(tmp_path):
  full = main.run(tiny_lm(total_steps=3), str(tmp_path / "full"))
  accumulated = main.run(tiny_lm(total_steps=3, grad_accum_steps=2, **{"mesh.data": 2, "mesh.tensor": 4}),
                         str(tmp_path / "accum"))
  rows = [train.read_metrics(str(tmp_path / d / "lm")) for d in ("full", "accum")]
  np.testing.assert_allclose([r["loss"] for r in rows[0]], [r["loss"] for r in rows[1]], rtol=1e-5)
  np.testing.assert_allclose(full[0]["grad_norm"], accumulated[0]["grad_norm"], rtol=1e-4)


def test_bf16_compute_trains_with_fp32_params(tmp_path):
  result = main.run(tiny_lm(compute_dtype="bfloat16", total_steps=3), str(tmp_path))
  assert np.isfinite(result[0]["loss"])


def test_metrics_files_and_tensorboard(tmp_path):
  main.run(tiny_lm(total_steps=2), str(tmp_path))
  rows = train.read_metrics(str(tmp_path / "lm"))
  assert [r["step"] for r in rows] == [1, 2]
  assert {"loss", "learning_rate", "grad_norm", "steps_per_sec", "eval/loss"} <= set(rows[-1])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "lm" / "tensorboard"))


def test_mesh_fill_axis():
  assert config_lib.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(config_lib.ConfigError, match="mesh.data"):
    config_lib.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  assert jax.device_count() == 8


def test_loss_state_is_carried_through_steps_and_micro_batches():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxai.stages import Stage  # pylint: disable=g-import-not-at-top

  def loss(params, batch, rng, *, loss_state):
    del rng
    value = jnp.mean(jnp.square(params["w"] * batch["x"]))
    seen = loss_state["rows_seen"] + batch["x"].shape[0]
    return value, ({"rows_seen_before": loss_state["rows_seen"]}, {"rows_seen": seen})

  tx = optax.sgd(0.1)
  batch = {"x": jnp.arange(1.0, 5.0)}
  results = {}
  for accum in (1, 2):
    stage = Stage(name="toy", config=tiny_lm(grad_accum_steps=accum), init_params=None, loss=loss,
                  make_data=None, init_loss_state=lambda: {"rows_seen": jnp.zeros((), jnp.float32)})
    step = jax.jit(train.make_train_step(stage, tx, optax.constant_schedule(0.1)))
    params = {"w": jnp.ones(())}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "loss_state": stage.init_loss_state()}
    for _ in range(3):
      state, metrics = step(state, batch, {})
    assert float(state["loss_state"]["rows_seen"]) == 12.0  # 4 rows per step, however micro-batched
    results[accum] = float(state["params"]["w"])
  # w <- w - 0.1 * 2 w mean(x^2) three times, whatever the micro-batching.
  expected = (1 - 0.2 * np.mean(np.arange(1.0, 5.0) ** 2)) ** 3
  np.testing.assert_allclose([results[1], results[2]], expected, rtol=1e-5)


def test_batch_carry_keeps_its_rows_through_steps_micro_batches_and_shards():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from jaxai import sharding  # pylint: disable=g-import-not-at-top
  from jaxai.stages import Stage  # pylint: disable=g-import-not-at-top

  rows = 8
  def loss(params, batch, rng, *, loss_state, batch_carry):
    del rng
    value = jnp.mean(jnp.square(params["w"] * batch["x"]))
    # Per row: the sum of the row's x over updates, and of what the row had carried before.
    carry = {"sum_x": batch_carry["sum_x"] + batch["x"], "sum_before": batch_carry["sum_before"] + batch_carry["sum_x"]}
    return value, ({}, {"updates": loss_state["updates"] + 1.0}, carry)

  def init_carry():
    zeros = nn.with_logical_partitioning(jnp.zeros, ("batch",))
    return {"sum_x": zeros((rows,)), "sum_before": zeros((rows,))}

  x = jnp.arange(1.0, rows + 1.0)
  for accum in (1, 2):
    config = tiny_lm(grad_accum_steps=accum, **{"mesh.data": 8, "mesh.tensor": 1})
    stage = Stage(name="toy", config=config, init_params=lambda rng: {"w": jnp.ones(())}, loss=loss,
                  make_data=None, init_loss_state=lambda: {"updates": jnp.zeros((), jnp.float32)},
                  init_batch_carry=init_carry)
    mesh = sharding.make_mesh(config_lib.resolve_mesh_shape(config.mesh, jax.device_count()))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      train_state = train.TrainState(stage, mesh, rules)
      assert train_state.shardings["batch_carry"]["sum_x"].spec[0] is not None  # split over the batch
      state = jax.jit(lambda: nn.unbox(train_state.init_boxed()), out_shardings=train_state.shardings)()
      step = train_state.jitted_step(mesh)
      for _ in range(3):
        state, _ = step(state, {"x": x}, {})
    np.testing.assert_allclose(state["batch_carry"]["sum_x"], 3 * x)  # each row kept its own
    np.testing.assert_allclose(state["batch_carry"]["sum_before"], (0 + 1 + 2) * x)
    # The loss state passes through every micro-batch once per update.
    assert float(state["loss_state"]["updates"]) == 3.0 * accum
