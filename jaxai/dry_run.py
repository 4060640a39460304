"""Ahead-of-time compilation of each stage's train step, without data, parameters or training.

``python -m jaxai.main --config=configs/<paper>.py:full --workdir=DIR --dry_run [--topology=v5e:16x16]``

The state is abstract (``jax.eval_shape`` of the init: no parameter is allocated), the batch
comes from ``Stage.abstract_batch``, and the step is lowered and compiled with the shardings a real
run uses, on the current devices or, with ``topology``, on the devices of a TPU slice described
by libtpu (``jax.experimental.topologies``), which compiles for TPU from any machine: the check
MaxText runs for its pod configs. One record per stage: parameter count, FLOPs per step, and the
memory one device needs (arguments, outputs and temporaries, donated state counted once). The
FLOPs are XLA's count of the whole step as lowered (before partitioning: the global program) with
every block stack unrolled, nothing rematerialised and XLA attention (``scan_layers`` off,
``remat`` none, ``*_impl`` xla): XLA counts a loop's body once, counts a Pallas kernel's custom
call as zero, and the model's FLOPs leave remat's recomputation out.
``compiled_flops_per_device`` is XLA's count of one device's compiled program as it is (Pallas
kernels count zero). On a TPU slice the record says whether that fits a chip's memory;
``DoesNotFit`` is raised when it does not.
"""
import os

import jax
import ml_collections
from flax import linen as nn

from jaxai import checkpointing, config_lib, host, sharding, stages, train

# Memory per chip of each TPU generation (jax device_kind), in GiB.
TPU_CHIP_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


class DoesNotFit(RuntimeError):
  """A stage's step needs more memory per device than the target chip has."""


def topology_devices(topology: str):
  """The devices of TPU slice ``topology`` (``v5e:16x16``, ``v4:2x2x2``, ...) to compile against."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Without a TPU VM's metadata server libtpu prints several lines of errors while it loads; these
  # describe a one-host runtime it never starts (the slice compiled for is the one named here).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  # No TPU runtime starts here, so two processes compiling at once (pytest -n 2) need not share
  # libtpu's one-process lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # pylint: disable=broad-except
    raise config_lib.ConfigError("topology", f"cannot describe TPU slice {topology!r} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); it needs libtpu "
                                 "(pip install -e '.[tpu]')") from None


def _with_batch_shardings(batch, mesh, rules):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, rules, len(x.shape))), batch)


def _cpu_device():
  """One CPU device, or None where ``JAX_PLATFORMS`` leaves the CPU out."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _lower(stage: stages.Stage, mesh, rules):
  """(train state, the step lowered for ``stage`` on ``mesh``)."""
  if stage.make_data is not None and stage.abstract_batch is None:
    raise config_lib.ConfigError("stage", f"stage {stage.name!r} gives no abstract_batch to compile against")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = train.TrainState(stage, mesh, rules)
    abstract_state = checkpointing.abstract_like(state.abstract, state.shardings)
    batch = stage.abstract_batch() if stage.abstract_batch is not None else None
    if batch is not None:
      batch = _with_batch_shardings(batch, mesh, rules)
    return state, state.jitted_step(mesh).lower(abstract_state, batch, state.abstract_frozen)


def countable(config):
  """A copy of ``config`` whose step XLA can count: every ``scan_layers`` field (any section) off,
  ``remat`` none, and every ``*_impl`` xla (a Pallas kernel is a custom call XLA counts as zero)."""
  config = ml_collections.ConfigDict(config.to_dict())
  def walk(node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value)
      elif key == "scan_layers":
        node[key] = False
      elif key == "remat":
        node[key] = "none"
      elif key.endswith("_impl"):
        node[key] = "xla"
  walk(config)
  return config


def compile_stage(stage: stages.Stage, mesh, rules, countable_stage: stages.Stage | None = None) -> dict:
  """Compiles ``stage``'s train step on ``mesh``; returns its record. ``countable_stage``: the same
  stage as ``countable`` makes it, lowered to count FLOPs (default: ``stage`` itself)."""
  config = stage.config
  state, lowered = _lower(stage, mesh, rules)
  with jax.set_mesh(mesh):
    compiled = lowered.compile()
  # The global program's FLOPs do not depend on the mesh, and XLA counts a lowered program only
  # on CPU (a TPU topology's lowering reports none): count on one CPU device otherwise.
  counting_mesh, cpu = mesh, _cpu_device()
  if mesh.devices.flat[0].platform != "cpu" and cpu is not None:
    counting_mesh = sharding.make_mesh((1,) * len(mesh.axis_names), [cpu])
  if countable_stage is None and counting_mesh is mesh:
    flops = _flops(lowered.cost_analysis())
  else:
    flops = _flops(_lower(countable_stage or stage, counting_mesh, rules)[1].cost_analysis())
  memory = compiled.memory_analysis()
  per_device = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes}
  total = per_device["arguments"] + per_device["outputs"] - per_device["aliased"] + per_device["temporaries"]
  device = mesh.devices.flat[0]
  record = {
      "stage": stage.name, "parameters": state.num_params(), "devices": int(mesh.size),
      "mesh": dict(mesh.shape), "platform": device.platform, "device_kind": device.device_kind,
      "batch_size": config.batch_size, "flops_per_step": flops, "flops_per_device": flops / mesh.size,
      "compiled_flops_per_device": _flops(compiled.cost_analysis()), "memory_per_device_bytes": int(total),
      "memory_per_device_gib": round(total / 2**30, 3), "memory_breakdown_bytes": per_device,
  }
  chip = TPU_CHIP_MEMORY_GIB.get(device.device_kind)
  if chip is not None:
    record["chip_memory_gib"] = chip
    record["fits"] = bool(total <= chip * 2**30)
  return record


def dry_run(config, workdir: str, topology: str | None = None):
  """Yields the record of each stage ``config.stage`` selects, compiled in turn; then raises
  ``DoesNotFit`` if one needs more memory than a chip of the topology has."""
  devices = topology_devices(topology) if topology else None
  num_devices = len(devices) if devices is not None else jax.device_count()
  module, stage_configs = stages.validate_run(config, workdir, num_devices, check_reads=False)
  too_big = []
  for stage_config in stage_configs:
    stage = module.build_stage(stage_config, workdir)
    mesh = sharding.make_mesh(config_lib.resolve_mesh_shape(stage_config.mesh, num_devices), devices)
    rules = tuple(tuple(r) for r in stage_config.sharding_rules)
    flat = countable(stage_config)
    record = compile_stage(stage, mesh, rules,
                           None if flat == stage_config else module.build_stage(flat, workdir))
    record.update(topology=topology, host=host.summary())
    if record.get("fits") is False:
      too_big.append(record)
    yield record
  if too_big:
    raise DoesNotFit("; ".join(f"stage {r['stage']} needs {r['memory_per_device_gib']} GiB per device, "
                               f"a {r['device_kind']} chip has {r['chip_memory_gib']}" for r in too_big))
