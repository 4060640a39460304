"""Multi-stage runs: what the trainer needs from a paper, which stages a run trains, and loading a
trained stage as it was trained.

A config declares its stages in ``config.stages`` (``config_lib.stage_overlay`` each: the trainer
fields the stage sets for itself, the earlier stages it ``reads`` or is ``init_from``; a stage
``init_from`` itself starts from its own checkpoint in the run ``reads_from``, a finetune);
``config.stage`` names one of them or ``all``. Each stage trains in ``<workdir>/<stage>/`` with its
own checkpoints, ``metrics.jsonl`` and ``config.json`` (the stage's resolved config). The stages
run in dependency order (a stage after those it reads or starts from).

The trainer never imports a paper package by name: ``config.task`` names an entry of ``REGISTRY``,
whose module provides ``build_stage(config, workdir) -> Stage`` (``config`` is the stage's
resolved config, ``config.stage`` its name) and may provide ``validate(config)`` raising
``config_lib.ConfigError``. Stages are built one at a time, right before they train, so a stage
may read what the one before it has just written.
"""
import dataclasses
import graphlib
import importlib
import os
import sys
from typing import Any, Callable

import ml_collections

from jaxai import checkpointing, config_lib

REGISTRY = {
    "diffusion_lm": "jaxai.diffusion_lm.task",
    "dsa": "jaxai.dsa.task",
    "lm": "jaxai.lm.task",
    "trm": "jaxai.trm.task",
    "world_model": "jaxai.world_model.task",
}

Batch = Any
Params = Any


@dataclasses.dataclass(frozen=True)
class Frozen:
  """Parameters a stage uses but does not train: the latest checkpoint of an earlier stage.

  The trainer restores them sharded by their logical axes (from ``init_params``' boxes, on the
  stage's mesh) and passes them to the jitted step as an input, never as a constant baked into
  the program; they are not in the optimizer state and not saved again.

  Attributes:
    stage: the earlier stage, found in ``reads_dir(config, workdir)``.
    init_params: rng -> params boxed with logical axis names, of the model as that stage trained
      it (``as_trained``); only its shapes and names are used.
  """
  stage: str
  init_params: Callable[[Any], Params]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage.

  Attributes:
    name: the stage's name (``config.stages`` key); it trains in ``workdir/<name>``.
    config: the stage's resolved config (``stage_config``).
    init_params: rng -> params boxed with logical axis names (``nn.with_logical_partitioning``).
    loss: ``(params, batch, rng, **inputs) -> (loss, metrics)``, pure and jittable. ``inputs``
      holds ``frozen`` ({name: params}) when the stage has ``frozen``, ``ema_params`` (the moving
      average the state keeps at ``config.ema_decay`` > 0, never differentiated) when
      ``loss_reads_ema``, ``step`` (the 0-based number of the update, an int32 scalar) when
      ``loss_reads_step``, and ``loss_state`` when it has ``init_loss_state``; the loss then
      returns ``(loss, (metrics, new loss_state))``.
    make_data: (process_index, process_count) -> grain IterDataset of this process's batch rows;
      None for a stage whose batches ``make_batch`` makes alone.
    abstract_batch: () -> the global batch as ShapeDtypeStructs (for ``--dry_run``, which reads no
      data).
    make_batch: optional on-policy data, ``(params, batch, rng, **inputs) -> batch`` inside the
      jitted step before the loss (``batch``: the grain batch, or None without ``make_data``);
      sample, score, return what the loss trains on. Its key comes from the step, so a resumed run
      draws exactly what an uninterrupted one did.
    evaluate: optional ``(params, step, **inputs) -> dict`` of metrics (host-side; may jit
      internally); ``inputs`` holds ``frozen`` when the stage has it.
    init_loss_state: optional () -> pytree of fp32 arrays that the loss carries from step to step
      without gradients (running statistics); kept replicated in the state and checkpointed.
    init_batch_carry: optional () -> pytree of per-example arrays, the global batch first, boxed
      with logical axes whose first is ``batch`` (``nn.with_logical_partitioning``), that the loss
      carries from one update to the next without gradients: state that outlives an update, such
      as deep supervision's answers carried across updates, with finished examples replaced by the
      step's new rows. Kept in the state sharded like the batch and checkpointed; micro-batches
      get their rows of it. The loss receives ``batch_carry`` and returns ``(loss, (metrics, new
      batch_carry))``, or ``(loss, (metrics, new loss_state, new batch_carry))`` with both.
    frozen: name -> ``Frozen``: earlier stages' parameters the loss, ``make_batch`` and
      ``evaluate`` receive as ``frozen[name]``.
    loss_reads_ema: the loss receives ``ema_params`` (e.g. a teacher for bootstrap targets); needs
      ``config.ema_decay`` > 0.
    loss_reads_step: the loss receives ``step`` (a schedule inside the loss, e.g. a warm-up).
    evaluate_ema: ``evaluate`` scores the parameters' moving average (the weights a paper reports,
      e.g. TRM's EMA 0.999), not the latest ones; needs ``config.ema_decay`` > 0.
  """
  name: str
  config: ml_collections.ConfigDict
  init_params: Callable[[Any], Params]
  loss: Callable[..., tuple[Any, Any]]
  make_data: Callable[[int, int], Any] | None
  abstract_batch: Callable[[], Any] | None = None
  make_batch: Callable[..., Batch] | None = None
  evaluate: Callable[..., dict] | None = None
  init_loss_state: Callable[[], Any] | None = None
  init_batch_carry: Callable[[], Any] | None = None
  frozen: dict[str, Frozen] = dataclasses.field(default_factory=dict)
  loss_reads_ema: bool = False
  loss_reads_step: bool = False
  evaluate_ema: bool = False


def task_module(config: ml_collections.ConfigDict):
  config_lib.check(config.task in REGISTRY, "task",
                   f"unknown task {config.task!r}; known: {', '.join(sorted(REGISTRY))}")
  return importlib.import_module(REGISTRY[config.task])


# --- which stages, in which order -----------------------------------------------------------------

def order(config: ml_collections.ConfigDict) -> list[str]:
  """Every declared stage, each after the stages it reads or starts from (ties by name)."""
  names = sorted(config.stages.keys())
  config_lib.check(bool(names), "stages", "the config declares no stage")
  graph = {}
  for name in names:
    overlay = config.stages[name]
    needs = list(overlay.reads) + ([overlay.init_from] if overlay.init_from else [])
    for need in needs:
      config_lib.check(need in config.stages, f"stages.{name}.reads",
                       f"reads an unknown stage {need!r}; stages: {', '.join(names)}")
    if overlay.init_from == name:
      # A stage started from its own checkpoint in another run (a finetune) waits for nothing here.
      config_lib.check(bool(overlay.reads_from), f"stages.{name}.init_from",
                       f"names the stage itself: set stages.{name}.reads_from to the run whose "
                       f"{name!r} checkpoint it starts from")
      needs = [need for need in needs if need != name]
    graph[name] = needs
  sorter = graphlib.TopologicalSorter(graph)
  try:
    sorter.prepare()
  except graphlib.CycleError as e:
    raise config_lib.ConfigError("stages", f"the stages read one another in a circle: {e.args[1]}") from None
  ordered = []
  while sorter.is_active():
    ready = sorted(sorter.get_ready())
    ordered.extend(ready)
    sorter.done(*ready)
  return ordered


def selected(config: ml_collections.ConfigDict) -> list[str]:
  """The stages ``config.stage`` asks for: one by name, or all of those with ``in_all``."""
  ordered = order(config)
  if config.stage == "all":
    return [name for name in ordered if config.stages[name].in_all]
  config_lib.check(config.stage in config.stages, "stage",
                   f"must be all or one of {', '.join(ordered)}, got {config.stage!r}")
  return [config.stage]


def validate_run(config: ml_collections.ConfigDict, workdir: str, num_devices: int, *,
                 check_reads: bool = True):
  """The task module and each selected stage's resolved config, all checked before anything runs
  (``ConfigError`` otherwise); returns (task module, [stage configs]).

  With ``check_reads``, every stage a selected stage reads or starts from must have a checkpoint
  already, unless this run trains it first.
  """
  module = task_module(config)
  names = selected(config)
  if hasattr(module, "validate"):
    module.validate(config)
  stage_configs = [stage_config(config, name) for name in names]
  for c in stage_configs:
    config_lib.validate_trainer(c, num_devices)
  for i, c in enumerate(stage_configs):
    overlay = c.stages[c.stage]
    for need in list(overlay.reads) + ([overlay.init_from] if overlay.init_from else []):
      if not check_reads or need in names[:i]:
        continue
      checkpoints = os.path.join(reads_dir(c, workdir), need, "checkpoints")
      config_lib.check(checkpointing.Checkpointer.exists(checkpoints), f"stages.{c.stage}.reads_from",
                       f"no checkpoint of stage {need!r} in {checkpoints}: train it there first "
                       f"(--config.stage={need}), or both in turn with --config.stage=all")
  return module, stage_configs


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose trainer fields are those stage ``name`` sets (its non-None overlay
  fields), with ``stage`` = ``name``; ``reads_from`` made absolute."""
  c = ml_collections.ConfigDict(config.to_dict())
  overlay = c.stages[name]
  for field in config_lib.STAGE_FIELDS:
    if overlay[field] is not None:
      c[field] = overlay[field]
  for section in ("optimizer", "mesh"):
    for field, value in overlay[section].items():
      if value is not None:
        c[section][field] = value
  if overlay.reads_from:
    overlay.reads_from = os.path.abspath(os.path.expanduser(overlay.reads_from))
  c.stage = name
  return c


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def reads_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the stages that ``config.stage`` reads (or starts from) were trained: its
  ``reads_from``, or this run's workdir."""
  return config.stages[config.stage].reads_from or workdir


# --- loading a trained stage ----------------------------------------------------------------------

def as_trained(config: ml_collections.ConfigDict, directory: str, sections: tuple[str, ...],
               absent: dict | None = None) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``sections`` are those the stage in ``directory`` was trained with
  (its config.json), field by field. A field the file lacks (added since) takes its value in
  ``absent[section]`` (what runs from before the field computed as), else ``config``'s.
  ``config`` itself when there is no config.json (nothing trained there yet). Differences are
  said on stderr, one line per section.

  Why: some fields change what a model computes but no parameter shape (the tokenizer's
  ``aligned_inputs``, the dynamics' ``shortcut``), so a checkpoint loaded into a model built from
  another config would run as another model without an error.
  """
  saved = config_lib.read_saved_config(directory)
  if saved is None:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  for section in sections:
    trained = saved.get(section)
    if not isinstance(trained, dict):
      continue
    now = config[section].to_dict()
    before_fields = (absent or {}).get(section, {})
    merged = {**now, **before_fields, **{k: v for k, v in trained.items() if k in now}}
    changed = config_lib.changed_fields({section: merged}, ml_collections.ConfigDict({section: now}))
    if changed:
      print(f"{section}: built as trained ({directory}/config.json), not as this config says "
            f"({'; '.join(changed)})", file=sys.stderr, flush=True)
    config[section] = ml_collections.ConfigDict(merged)
  return config


@dataclasses.dataclass(frozen=True)
class TrainedStage:
  """A stage's checkpoint with the config it was trained with."""
  config: ml_collections.ConfigDict  # the caller's config, with the stage's sections as trained
  step: int
  params: Params
  directory: str                     # workdir/<stage>
  workdir: str                       # the run's workdir, where the stage's own reads are by default


def load_stage(config: ml_collections.ConfigDict, workdir: str, name: str, *,
               sections: tuple[str, ...] = (), absent: dict | None = None, step: int | None = None,
               abstract_params=None, key: str = "params") -> TrainedStage:
  """Stage ``name`` of the run in ``workdir`` as it was trained: its config's ``sections`` (see
  ``as_trained``, with ``absent``) and the params of checkpoint ``step`` (default: the latest), as host arrays, or
  laid out as ``abstract_params`` says (``key="ema_params"``: their moving average). ``config.stage``
  becomes ``name``; where the stage read its
  own inputs (``stages.<name>.reads_from``) is the saved one unless ``config`` names one.

  Raises FileNotFoundError (no checkpoint) or ``checkpointing.CheckpointCorrupt``.
  """
  directory = stage_dir(workdir, name)
  trained = as_trained(config, directory, sections, absent)
  trained = ml_collections.ConfigDict(trained.to_dict())
  trained.stage = name
  saved = config_lib.read_saved_config(directory) or {}
  saved_reads = saved.get("stages", {}).get(name, {}).get("reads_from", "")
  if name in trained.stages and not trained.stages[name].reads_from and saved_reads:
    trained.stages[name].reads_from = saved_reads
  step, params = checkpointing.restore_params(os.path.join(directory, "checkpoints"), step,
                                              abstract_params, key=key)
  return TrainedStage(config=trained, step=step, params=params, directory=directory, workdir=workdir)
