"""Fields every training config has, variant parsing, and up-front validation.

A config error is reported as one line ``config error: <field>: <reason>`` (see ``jaxai.main``),
so every check here names the field that is wrong.
"""
import json
import math
import os
import sys
from typing import Sequence

import ml_collections

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over data and fsdp (FSDP shards the batch too); the
# parameter's embed axis is split over fsdp (ZeRO-3 style); heads/mlp/vocab over tensor (Megatron).
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
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


def trainer_config(**overrides) -> ml_collections.ConfigDict:
  """The trainer's fields with defaults; a paper config starts from this and adds its own."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0
  c.batch_size = 8             # global, across all devices and processes
  c.grad_accum_steps = 1       # the batch is split into this many sequential micro-batches
  c.total_steps = 100
  c.max_steps_per_run = 0      # >0: stop (with a checkpoint) after this many steps, e.g. for preemptible slots
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.log_every = 10
  c.eval_every = 0             # 0: evaluate only at the end
  c.compute_dtype = "float32"  # parameters stay fp32; "bfloat16" runs the matmuls in bf16
  c.attention_impl = "auto"    # auto | xla | pallas ("auto": xla on CPU, pallas on GPU/TPU)
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


def validate_attention_heads(prefix: str, heads) -> None:
  """Checks ``heads.num_heads``/``num_kv_heads``/``head_dim`` of the model section ``prefix``."""
  if heads.num_heads % heads.num_kv_heads:
    raise ConfigError(f"{prefix}.num_kv_heads", f"num_heads={heads.num_heads} is not a multiple of "
                      f"num_kv_heads={heads.num_kv_heads}")
  if heads.head_dim % 2:
    raise ConfigError(f"{prefix}.head_dim", f"RoPE needs an even head_dim, got {heads.head_dim}")


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Mesh sizes in MESH_AXES order; at most one axis may be -1 and takes the remaining devices."""
  sizes = [int(mesh[a]) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", f"must be a positive size or -1, got {size}")
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh.{fill[1]}", "only one mesh axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh.{fill[0]}", f"the other axes use {known} devices, which does not divide "
                        f"the {num_devices} available devices")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  elif known != num_devices:
    shape = "x".join(map(str, sizes))
    raise ConfigError("mesh", f"data x fsdp x tensor = {shape} = {known} devices, but {num_devices} "
                      "are available")
  return tuple(sizes)


def validate_trainer(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks the trainer fields; returns the resolved mesh shape."""
  for field in ("batch_size", "total_steps", "checkpoint_every", "log_every", "grad_accum_steps",
                "keep_checkpoints"):
    if int(config[field]) <= 0:
      raise ConfigError(field, f"must be positive, got {config[field]}")
  for field in ("eval_every", "max_steps_per_run"):
    if int(config[field]) < 0:
      raise ConfigError(field, f"must be >= 0, got {config[field]}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError("compute_dtype", f"must be float32 or bfloat16, got {config.compute_dtype!r}")
  if config.attention_impl not in ("auto", "xla", "pallas"):
    raise ConfigError("attention_impl", f"must be auto, xla or pallas, got {config.attention_impl!r}")
  data, fsdp, tensor = resolve_mesh_shape(config.mesh, num_devices)
  data_parallel = data * fsdp
  if config.batch_size % data_parallel:
    raise ConfigError("batch_size", f"{config.batch_size} is not divisible by the data-parallel size "
                      f"data x fsdp = {data} x {fsdp} = {data_parallel}")
  if config.batch_size % (data_parallel * config.grad_accum_steps):
    raise ConfigError("grad_accum_steps", f"batch_size {config.batch_size} does not split into "
                      f"{config.grad_accum_steps} micro-batches divisible by the data-parallel size "
                      f"{data_parallel}")
  mesh_axes = set(MESH_AXES)
  for rule in config.sharding_rules:
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [t for t in targets if t is not None and t not in mesh_axes]
    if unknown:
      raise ConfigError("sharding_rules", f"logical axis {rule[0]!r} maps to unknown mesh axes {unknown}")
  opt = config.optimizer
  if opt.learning_rate <= 0:
    raise ConfigError("optimizer.learning_rate", f"must be positive, got {opt.learning_rate}")
  if not 0 <= opt.warmup_steps <= config.total_steps:
    raise ConfigError("optimizer.warmup_steps", f"must be in [0, total_steps={config.total_steps}]")
  return data, fsdp, tensor


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


# Fields that only say how long and how often a run acts: they never change what a checkpoint holds.
RUN_CONTROL_FIELDS = ("max_steps_per_run", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every")


def changed_fields(saved: dict, config: ml_collections.ConfigDict, limit: int = 4) -> list[str]:
  """``"field: saved -> now"`` for the leaves of ``config`` that differ from ``saved`` (a run's
  config.json), run-control fields aside, at most ``limit`` of them: to name what a checkpoint of
  another config holds."""
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
             if before.get(k) != now.get(k) and k not in RUN_CONTROL_FIELDS]
  return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])
