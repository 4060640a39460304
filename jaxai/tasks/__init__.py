"""What the trainer needs from a paper module, and the registry that finds it by name.

The trainer never imports a paper module itself: ``config.task`` names an entry of ``REGISTRY``,
whose module provides ``build_stages(config, workdir) -> list[Task]`` and may provide
``validate(config)`` raising ``config_lib.ConfigError``.
"""
import dataclasses
import importlib
from typing import Any, Callable

import ml_collections

from jaxai import config_lib

REGISTRY = {
    "lm": "jaxai.tasks.lm",
    "world_model": "jaxai.world_model.task",
}

Batch = Any
Params = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """One training stage.

  Attributes:
    name: stage name; multi-stage tasks train each stage in ``workdir/<name>``.
    config: the trainer fields for this stage (see ``config_lib.trainer_config``).
    init_params: rng -> params boxed with logical axis names (``nn.with_logical_partitioning``).
    loss: (params, batch, rng) -> (scalar loss, dict of scalar metrics); pure and jittable. With
      ``init_loss_state`` set it is (params, loss_state, batch, rng) -> (loss, (metrics, new
      loss_state)) instead.
    make_data: (process_index, process_count) -> grain IterDataset of this process's batch rows.
    evaluate: optional (params, step) -> dict of metrics (host-side; may jit internally).
    subdir: workdir subfolder of this stage ("" trains in the workdir itself).
    init_loss_state: optional () -> pytree of fp32 arrays that the loss carries from step to step
      without gradients (running statistics such as the running RMS of loss terms); the trainer
      keeps it replicated in the state and checkpoints it.
  """
  name: str
  config: ml_collections.ConfigDict
  init_params: Callable[[Any], Params]
  loss: Callable[[Params, Batch, Any], tuple[Any, dict]]
  make_data: Callable[[int, int], Any]
  evaluate: Callable[[Params, int], dict] | None = None
  subdir: str = ""
  init_loss_state: Callable[[], Any] | None = None


def task_module(config: ml_collections.ConfigDict):
  if config.task not in REGISTRY:
    raise config_lib.ConfigError("task", f"unknown task {config.task!r}; known: {', '.join(sorted(REGISTRY))}")
  return importlib.import_module(REGISTRY[config.task])
