"""Device mesh from config and logical-axis -> NamedSharding resolution (MaxText-style rules)."""
import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxai import config_lib


def make_mesh(shape: tuple[int, ...], devices=None) -> Mesh:
  """The ``data x fsdp x tensor`` mesh over ``devices`` (default: all of jax's; a TPU topology's
  for ahead-of-time compilation, see ``jaxai.dry_run``)."""
  # jax.make_mesh orders devices so the last (tensor) axis gets the fastest interconnect. Auto axes:
  # pjit semantics, XLA propagates shardings from the constraints the model states.
  axis_types = (jax.sharding.AxisType.Auto,) * len(config_lib.MESH_AXES)
  if devices is None:
    return jax.make_mesh(shape, config_lib.MESH_AXES, axis_types=axis_types)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  return Mesh(mesh_utils.create_device_mesh(shape, devices=devices), config_lib.MESH_AXES,
              axis_types=axis_types)


def logical_shardings(tree, mesh: Mesh, rules):
  """NamedShardings for a pytree of flax ``Partitioned`` boxes (or PartitionSpecs of logical names)."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, shardings, mesh: Mesh):
  """Raises ConfigError naming the first array whose dimension does not split over its mesh axes."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      parts = math.prod(mesh.shape[a] for a in axes)
      if dim % parts:
        name = jax.tree_util.keystr(path)
        raise config_lib.ConfigError(
            f"mesh.{axes[0]}", f"parameter {name} of shape {tuple(leaf.shape)} has a dimension of size "
            f"{dim} that does not split over mesh axes {axes} ({parts} devices)")


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Shards the leading (batch) dimension by the rule for ``batch``, replicates the rest."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch_from_local(local_batch, mesh: Mesh, rules):
  """Assembles each process's rows of the global batch into sharded global arrays."""
  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x, global_shape)
  return jax.tree.map(put, local_batch)
