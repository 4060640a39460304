"""Fields every training config has, per-stage overlays, variant parsing, and up-front validation.

A config error is reported as one line ``config error: <field>: <reason>`` (see ``jaxai.main``),
so every check here names the field that is wrong. The ``check_*`` helpers are the one place such
checks are written: ``check_positive(config, "model.width", "model.num_layers")`` raises
``ConfigError("model.width", "must be positive, got 0")``.
"""
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over data and fsdp (FSDP shards the batch too); the
# parameter's embed axis is split over fsdp (ZeRO-3 style); heads/mlp/vocab over tensor (Megatron).
# ``layers`` is the stacked axis of scanned block stacks: never split.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


EXIT_CONFIG_ERROR = 2


def fail(kind: str, message: str, code: int = EXIT_CONFIG_ERROR):
  """Ends a command with one line ``<kind>: <message>`` on stderr and a non-zero exit code."""
  print(f"{kind}: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


class ConfigError(ValueError):
  """A config value that cannot work; ``field`` is the dotted config path."""

  def __init__(self, field: str, reason: str | None = None):
    if reason is None:  # re-raised by a wrapper with only the message, "field: reason"
      field, _, reason = field.partition(": ")
    super().__init__(f"{field}: {reason}")
    self.field = field
    self.reason = reason


def parse_variant(arg: str | None, variants: Sequence[str], default: str) -> str:
  variant = arg or default
  if variant not in variants:
    raise ConfigError("config", f"unknown variant {variant!r}; choose one of {', '.join(variants)}")
  return variant


def load_config_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of the config file at ``path`` (what ``--config=path:variant`` loads)."""
  spec = importlib.util.spec_from_file_location(f"jaxai_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# --- checks ---------------------------------------------------------------------------------------

def get(config, path: str) -> Any:
  """The value at dotted ``path`` of ``config``."""
  value = config
  for key in path.split("."):
    value = value[key]
  return value


def check(condition: bool, field: str, reason: str) -> None:
  if not condition:
    raise ConfigError(field, reason)


def check_positive(config, *paths: str, prefix: str = "") -> None:
  """Every field at ``paths`` (relative to ``config``; named ``prefix.path``) is > 0."""
  for path in paths:
    value = get(config, path)
    check(value > 0, prefix + path, f"must be positive, got {value}")


def check_at_least(config, minimum, *paths: str, prefix: str = "") -> None:
  for path in paths:
    value = get(config, path)
    check(value >= minimum, prefix + path, f"must be >= {minimum}, got {value}")


def check_range(config, path: str, low, high, *, high_open: bool = False, prefix: str = "") -> None:
  """``low <= value <= high`` (``< high`` with ``high_open``), said as ``[low, high]`` or ``[low, high)``."""
  value = get(config, path)
  inside = low <= value < high if high_open else low <= value <= high
  check(inside, prefix + path, f"must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def check_choice(config, path: str, choices: Sequence, *, prefix: str = "") -> None:
  value = get(config, path)
  check(value in choices, prefix + path,
        f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def is_power_of_two(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def validate_attention_heads(prefix: str, heads) -> None:
  """Checks ``heads.num_heads``/``num_kv_heads``/``head_dim`` of the model section ``prefix``."""
  check_positive(heads, "num_heads", "num_kv_heads", "head_dim", prefix=f"{prefix}.")
  check(heads.num_heads % heads.num_kv_heads == 0, f"{prefix}.num_kv_heads",
        f"num_heads={heads.num_heads} is not a multiple of num_kv_heads={heads.num_kv_heads}")
  check(heads.head_dim % 2 == 0, f"{prefix}.head_dim", f"RoPE needs an even head_dim, got {heads.head_dim}")


def validate_block_stack(prefix: str, section) -> None:
  """The scan/remat options of a block stack (``transformer.block_config``)."""
  check_choice(section, "remat", REMAT_POLICIES, prefix=f"{prefix}.")


REMAT_POLICIES = ("none", "full", "dots")


# --- the trainer's fields -------------------------------------------------------------------------

def trainer_config(**overrides) -> ml_collections.ConfigDict:
  """The trainer's fields with defaults; a paper config starts from this and adds its own.

  ``stages`` names the run's stages (``stage_overlay`` each); ``stage`` picks one of them or
  ``all``. A stage's non-None overlay fields replace these for that stage (``jaxai.stages``).
  """
  c = ml_collections.ConfigDict()
  c.task = ""
  c.stage = "all"              # a name in ``stages``, or all (every stage with in_all, in order)
  c.stages = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 8             # global, across all devices and processes
  c.grad_accum_steps = 1       # the batch is split into this many sequential micro-batches
  c.total_steps = 100
  c.max_steps_per_run = 0      # >0: stop (with a checkpoint) after this many steps, e.g. for preemptible slots
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.log_every = 10
  c.eval_every = 0             # 0: evaluate only at the end
  c.restore_step = 0           # 0: resume from the latest checkpoint; N: from step N (later ones set aside)
  c.trainable = ""             # regex on parameter paths (a/b/kernel): train only those; "": all
  c.ema_decay = 0.0            # >0: the state also keeps an exponential moving average of the params
  c.ema_warmup = False         # decay at update t: min(ema_decay, (1 + t) / (10 + t)), so that the
                               # average leaves the random initial params early (tf.train.ExponentialMovingAverage's num_updates)
  c.compute_dtype = "float32"  # parameters stay fp32; "bfloat16" runs the matmuls in bf16
  c.attention_impl = "auto"    # auto | xla | pallas ("auto": a Pallas kernel where one is written for the backend)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = DEFAULT_SHARDING_RULES
  c.optimizer = ml_collections.ConfigDict({
      "learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.1,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0,
  })
  c.distributed = ml_collections.ConfigDict({
      "initialize": False,          # also initialised when JAX_COORDINATOR_ADDRESS is set
      "coordinator_address": "",
      "num_processes": 1,
      "process_id": 0,
  })
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


# Trainer fields a stage may set for itself (None in its overlay: the top-level value).
STAGE_FIELDS = ("seed", "batch_size", "grad_accum_steps", "total_steps", "max_steps_per_run",
                "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "restore_step",
                "trainable", "ema_decay", "ema_warmup", "compute_dtype")


def stage_overlay(*, reads: Sequence[str] = (), init_from: str = "", in_all: bool = True,
                  optimizer: dict | None = None, mesh: dict | None = None,
                  **fields) -> ml_collections.ConfigDict:
  """One entry of ``config.stages``: the trainer fields this stage sets for itself, the rest None.

  Args:
    reads: earlier stages whose checkpoints this stage reads (frozen models, data made by them).
    init_from: an earlier stage whose parameters start this one where their paths match; the
      stage's own name starts it from its checkpoint in the run ``reads_from`` (a finetune).
    in_all: whether ``stage=all`` trains it (a diagnostic stage may be run only by name).
    optimizer, mesh: the stage's own optimizer and mesh fields.
    **fields: any of ``STAGE_FIELDS``.
  Every field stays overridable from the command line (``--config.stages.<name>.total_steps=N``);
  ``reads_from`` (default "": this run's workdir) says where the stages it reads were trained.
  """
  defaults = trainer_config()
  unknown = set(fields) - set(STAGE_FIELDS)
  if unknown:
    raise ConfigError("stages", f"not stage fields: {', '.join(sorted(unknown))}")
  typed = lambda default, value: config_dict.placeholder(type(default)) if value is None else value
  c = ml_collections.ConfigDict()
  for field in STAGE_FIELDS:
    c[field] = typed(defaults[field], fields.get(field))
  c.optimizer = ml_collections.ConfigDict(
      {k: typed(v, (optimizer or {}).get(k)) for k, v in defaults.optimizer.items()})
  c.mesh = ml_collections.ConfigDict({k: typed(v, (mesh or {}).get(k)) for k, v in defaults.mesh.items()})
  c.reads = tuple(reads)
  c.reads_from = ""
  c.init_from = init_from
  c.in_all = in_all
  return c


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Mesh sizes in MESH_AXES order; at most one axis may be -1 and takes the remaining devices."""
  sizes = [int(mesh[a]) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    check(size > 0 or size == -1, f"mesh.{axis}", f"must be a positive size or -1, got {size}")
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh.{fill[-1]}", "only one mesh axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    check(num_devices % known == 0, f"mesh.{fill[0]}", f"the other axes use {known} devices, which "
          f"does not divide the {num_devices} available devices")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  else:
    check(known == num_devices, "mesh", f"data x fsdp x tensor = {'x'.join(map(str, sizes))} = {known} "
          f"devices, but {num_devices} are available")
  return tuple(sizes)


def validate_trainer(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks the trainer fields (of one stage's config); returns the resolved mesh shape."""
  check_positive(config, "batch_size", "total_steps", "checkpoint_every", "log_every",
                 "grad_accum_steps", "keep_checkpoints")
  check_at_least(config, 0, "eval_every", "max_steps_per_run", "restore_step")
  check_range(config, "ema_decay", 0.0, 1.0, high_open=True)
  check_choice(config, "compute_dtype", ("float32", "bfloat16"))
  check_choice(config, "attention_impl", ("auto", "xla", "pallas"))
  try:
    re.compile(config.trainable)
  except re.error as e:
    raise ConfigError("trainable", f"not a regular expression ({e}): {config.trainable!r}") from None
  data, fsdp, tensor = resolve_mesh_shape(config.mesh, num_devices)
  data_parallel = data * fsdp
  check(config.batch_size % data_parallel == 0, "batch_size", f"{config.batch_size} is not divisible "
        f"by the data-parallel size data x fsdp = {data} x {fsdp} = {data_parallel}")
  check(config.batch_size % (data_parallel * config.grad_accum_steps) == 0, "grad_accum_steps",
        f"batch_size {config.batch_size} does not split into {config.grad_accum_steps} micro-batches "
        f"divisible by the data-parallel size {data_parallel}")
  mesh_axes = set(MESH_AXES)
  for rule in config.sharding_rules:
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [t for t in targets if t is not None and t not in mesh_axes]
    check(not unknown, "sharding_rules", f"logical axis {rule[0]!r} maps to unknown mesh axes {unknown}")
  check_positive(config, "optimizer.learning_rate")
  check_range(config, "optimizer.warmup_steps", 0, config.total_steps)
  return data, fsdp, tensor


# --- saved configs --------------------------------------------------------------------------------

# Each stage's directory keeps the config it was trained with, to resume, load and compare against.
SAVED_CONFIG_FILE = "config.json"


def write_saved_config(run_dir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, SAVED_CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))


def read_saved_config(run_dir: str) -> dict | None:
  """The config a stage in ``run_dir`` was trained with, None if its file is missing or unreadable."""
  try:
    with open(os.path.join(run_dir, SAVED_CONFIG_FILE), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  return saved if isinstance(saved, dict) else None


# Fields that only say how long and how often a run acts, or where it reads from: they never change
# what a checkpoint holds.
RUN_CONTROL_FIELDS = ("max_steps_per_run", "checkpoint_every", "keep_checkpoints", "log_every",
                      "eval_every", "restore_step")


def changed_fields(saved: dict, config: ml_collections.ConfigDict, limit: int = 4) -> list[str]:
  """``"field: saved -> now"`` for the leaves of ``config`` that differ from ``saved`` (a run's
  config.json), run-control fields and the stage overlays aside, at most ``limit`` of them: to
  name what a checkpoint of another config holds."""
  def leaves(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value
  before = dict(leaves(saved))
  now = dict(leaves(json.loads(config.to_json_best_effort())))
  changed = [f"{k}: {before.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
             for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k) and k not in RUN_CONTROL_FIELDS and not k.startswith("stages.")]
  return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])
