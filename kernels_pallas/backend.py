"""Which dialect of a kernel runs: the GPU (Triton) one or the TPU (Mosaic) one.

A kernel module with both dialects takes ``backend="gpu" | "tpu" | None``. ``None`` means the
platform of the program being traced: the abstract mesh's devices under ``jax.set_mesh`` (so a step
compiled for a TPU slice from a CPU machine gets the TPU kernels), else jax's default backend. On
CPU, where kernels only run interpreted, ``None`` means the GPU dialect; tests name ``"tpu"`` to run
the TPU dialect in Pallas' TPU interpreter.
"""
from __future__ import annotations

import math

import jax
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("gpu", "tpu")


def target_platform() -> str:
  """``cpu``, ``gpu`` or ``tpu``: where the program being traced will run."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve(backend: str | None) -> str:
  """``gpu`` or ``tpu``."""
  if backend is None:
    platform = target_platform()
    return platform if platform in BACKENDS else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
  return backend


def interpret_params(backend: str, interpret: bool):
  """``pallas_call``'s ``interpret`` argument: the TPU dialect needs the TPU interpreter."""
  if not interpret:
    return False
  return pltpu.InterpretParams() if backend == "tpu" else True


def mesh_split(batch: int, heads: int = 1) -> tuple[frozenset, tuple, tuple] | None:
  """How a kernel independent across batch and heads runs per device on the mesh being traced
  for (XLA cannot partition a Pallas call): (the mesh's free axes, those that split the batch,
  those that split the heads). Each axis, in mesh order, splits the batch if it divides what is
  left of it, else the heads, else replicates the work. None without a multi-device mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = [a for a in mesh.axis_names if a not in mesh.manual_axes]
  if not axes or math.prod(mesh.shape[a] for a in axes) == 1:
    return None
  on_batch, on_heads = [], []
  for axis in axes:
    size = mesh.shape[axis]
    if size == 1:
      continue
    if batch % (size * math.prod(mesh.shape[a] for a in on_batch)) == 0:
      on_batch.append(axis)
    elif heads % (size * math.prod(mesh.shape[a] for a in on_heads)) == 0:
      on_heads.append(axis)
  return frozenset(axes), tuple(on_batch), tuple(on_heads)
