"""Which implementation runs an op: a Pallas kernel only on a backend it is written for, XLA elsewhere.

Each kernel module of ``kernels_pallas`` says which platforms it is written for (``PLATFORMS``:
today's kernels are GPU kernels, Triton-style with GPU atomics). ``impl="auto"`` picks the kernel
only there. The platform is that of the mesh being traced for (``jax.set_mesh``), so a step
compiled for a TPU slice from a CPU machine (``jaxai.dry_run``) dispatches as it would on the TPU;
without a mesh, jax's default backend. On CPU an explicit ``impl="pallas"`` runs the kernel in
interpret mode (tests); on any other platform the kernel is not written for, it is an error.
"""
import jax

IMPLS = ("auto", "xla", "pallas")


def target_platform() -> str:
  """``cpu``, ``gpu`` or ``tpu``: where the program being traced will run."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


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
