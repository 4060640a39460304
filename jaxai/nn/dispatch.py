"""Which implementation runs an op: a Pallas kernel only on a backend it is written for, XLA elsewhere.

Each kernel module of ``kernels_pallas`` says which platforms it is written for (``PLATFORMS``:
the attention kernels have a GPU (Triton) and a TPU (Mosaic) dialect, the shortcut-forcing loss
only a GPU one). ``impl="auto"`` picks the kernel only there, and the kernel picks its dialect
from the same platform (``kernels_pallas.backend``). The platform is that of the mesh being
traced for (``jax.set_mesh``), so a step compiled for a TPU slice from a CPU machine
(``jaxai.dry_run``) dispatches as it would on the TPU; without a mesh, jax's default backend. On CPU an explicit ``impl="pallas"`` runs the kernel in
interpret mode (tests); on any other platform the kernel is not written for, it is an error.
"""
from kernels_pallas.backend import target_platform

IMPLS = ("auto", "xla", "pallas")


def resolve(impl: str, kernel_platforms: tuple[str, ...]) -> str:
  """``xla`` or ``pallas`` for a kernel written for ``kernel_platforms``."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
  platform = target_platform()
  if impl == "auto":
    return "pallas" if platform in kernel_platforms else "xla"
  if impl == "pallas" and platform not in kernel_platforms and platform != "cpu":
    raise ValueError(f"the Pallas kernel is written for {', '.join(kernel_platforms)}, not {platform}: "
                     "use impl xla or auto there")
  return impl


def interpret() -> bool:
  """Pallas kernels run compiled on their own platforms; on CPU only interpreted."""
  return target_platform() == "cpu"
