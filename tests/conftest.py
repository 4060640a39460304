"""Every test process sees 8 CPU devices, so sharded meshes (2x2x2, 1x2x4, ...) run on CPU."""
import os
import subprocess
import sys
import tempfile

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and their subprocesses) compile the same tiny programs: a persistent cache turns
# a ~10 s compile into a file read.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxai-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, *, devices: int = 8, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs ``python -m jaxai.main ARGS`` in a fresh process with ``devices`` CPU devices."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "jaxai.main", *args], cwd=REPO_ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(name="repo_root")
def fixture_repo_root():
  return REPO_ROOT


# Interpret-mode Pallas kernels become large XLA loops whose compile time dominates the kernel
# tests; optimisation level 0 compiles them several times faster and changes no arithmetic.
INTERPRET_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
