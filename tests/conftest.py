"""Every test process sees 8 CPU devices, so sharded meshes (2x2x2, 1x2x4, ...) run on CPU.

Shared helpers: ``run_main`` (the CLI in a fresh process), ``config_of`` (a config file's
variant with dotted overrides; also the ``load_config`` fixture) and ``compile_for_tpu`` (a
function compiled for TPU chips from this machine). Session fixtures for what
several test files need and is slow to make (the tiny Craftax dataset, the tiny world model
trained as written) are made once per test run, not once per xdist worker: the first worker to
ask makes it in a directory all workers share, under a file lock, and the others read it.
"""
import fcntl
import math
import os
import pathlib
import subprocess
import sys
import tempfile

# Compilation, not running, dominates the tests' tiny programs on CPU: LLVM's optimisation level 0
# compiles them ~30% faster (the same HLO; vectorised and scalar code may sum in another order).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test process (and of the subprocesses tests start) with ``devices`` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"


def subprocess_env(devices: int = 8, **extra) -> dict:
  """The environment of a subprocess a test starts: CPU only, ``devices`` devices, fast compiles."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)


# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
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
  full_env = subprocess_env(devices)
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "jaxai.main", *args], cwd=REPO_ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def config_of(name: str, variant: str | None = "tiny", **overrides):
  """``configs/<name>.py``'s ``get_config(variant)``; ``overrides`` use ``__`` for dots
  (``stages__lm__total_steps=3``) or plain names."""
  from jaxai import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", f"{name}.py"), variant)
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.fixture(name="load_config")
def fixture_load_config():
  return config_of


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """``make(path)`` run once for the whole test run (every xdist worker shares the result)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the directory the workers' own temp directories are made in
  path = root / name
  with open(root / f"{name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not (root / f"{name}.done").exists():
      make(path)
      (root / f"{name}.done").touch()
  return path


@pytest.fixture(scope="session", name="tiny_craftax_data")
def fixture_tiny_craftax_data(tmp_path_factory) -> str:
  """A data dir holding the ``tiny`` craftax_offline variant (~30 s to record). Read only."""
  from jaxai.craftax import dataset  # pylint: disable=g-import-not-at-top
  return str(made_once(tmp_path_factory, "craftax_offline", lambda path: dataset.generate(str(path), "tiny")))


@pytest.fixture(scope="session", name="tiny_world_model")
def fixture_tiny_world_model(tmp_path_factory):
  """``configs/world_model.py:tiny`` trained as written (stage all, synthetic episodes):
  (config, workdir). Read only."""
  from jaxai import main  # pylint: disable=g-import-not-at-top
  config = config_of("world_model", "tiny")
  return config, made_once(tmp_path_factory, "tiny_world_model", lambda path: main.run(config, str(path)))


@pytest.fixture(scope="session", name="tiny_agent")
def fixture_tiny_agent(tmp_path_factory, tiny_world_model):
  """The tiny world model's agent: ``configs/world_model.py:tiny`` stage ``agent`` on it, then stage
  ``imagination``, both in one workdir (returned). Read only."""
  from jaxai import main  # pylint: disable=g-import-not-at-top
  _, world_model_dir = tiny_world_model

  def make(path):
    config = config_of("world_model", "tiny", stage="agent")
    config.stages.agent.reads_from = str(world_model_dir)
    main.run(config, str(path))
    main.run(config_of("world_model", "tiny", stage="imagination"), str(path))

  return made_once(tmp_path_factory, "tiny_agent", make)


@pytest.fixture(scope="session", name="tiny_trm_puzzles")
def fixture_tiny_trm_puzzles(tmp_path_factory) -> str:
  """A data dir holding both TRM tasks' ``tiny`` puzzle variants (~10 s to generate). Read only."""
  from jaxai.trm import dataset  # pylint: disable=g-import-not-at-top

  def make(path):
    for task in dataset.TASKS:
      dataset.generate(str(path), task, "tiny")

  return str(made_once(tmp_path_factory, "trm_puzzles", make))


@pytest.fixture(scope="session", name="tiny_trm")
def fixture_tiny_trm(tmp_path_factory, tiny_trm_puzzles):
  """``configs/trm.py:tiny`` (Sudoku) trained as written on the tiny puzzles: (config, workdir).
  Read only."""
  from jaxai import main  # pylint: disable=g-import-not-at-top
  config = config_of("trm", "tiny", data__dir=tiny_trm_puzzles)
  return config, made_once(tmp_path_factory, "tiny_trm", lambda path: main.run(config, str(path)))


@pytest.fixture(scope="session", name="tiny_diffusion_lm")
def fixture_tiny_diffusion_lm(tmp_path_factory):
  """``configs/diffusion_lm.py:tiny`` trained as written (both stages): (config, workdir). Read only."""
  from jaxai import main  # pylint: disable=g-import-not-at-top
  config = config_of("diffusion_lm", "tiny")
  return config, made_once(tmp_path_factory, "tiny_diffusion_lm", lambda path: main.run(config, str(path)))


@pytest.fixture(scope="session", name="tiny_dsa")
def fixture_tiny_dsa(tmp_path_factory):
  """``configs/dsa.py:tiny`` trained as written (all six stages): (config, workdir). Read only."""
  from jaxai import main  # pylint: disable=g-import-not-at-top
  config = config_of("dsa", "tiny")
  return config, made_once(tmp_path_factory, "tiny_dsa", lambda path: main.run(config, str(path)))


@pytest.fixture(name="repo_root")
def fixture_repo_root():
  return REPO_ROOT


# Interpret-mode Pallas kernels become large XLA loops whose compile time dominates the kernel
# tests; optimisation level 0 compiles them several times faster and changes no arithmetic.
INTERPRET_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# Chips whose Mosaic rules the TPU kernels are compiled against (libtpu's topology descriptions).
TPU_TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")


def compile_for_tpu(fn, *args, topology, mesh_shape=(1,), axis_names=("chip",), in_specs=None):
  """`fn` compiled for the first chips of TPU slice `topology` as a mesh, without chips (args:
  ShapeDtypeStructs, laid out by `in_specs`, replicated by default), traced under that mesh as
  model code is, so kernels with backend=None pick their TPU dialect. Returns the compiled HLO
  text; skips without libtpu."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxai import config_lib, dry_run  # pylint: disable=g-import-not-at-top
  try:
    devices = dry_run.topology_devices(topology)
  except config_lib.ConfigError as e:
    pytest.skip(str(e))
  chips = math.prod(mesh_shape)
  mesh = jax.sharding.Mesh(np.array(devices[:chips]).reshape(mesh_shape), axis_names)
  in_specs = in_specs or [jax.sharding.PartitionSpec()] * len(args)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
          for a, spec in zip(args, in_specs)]
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*args).compile().as_text()


def play_two_slots(player, frames, *, worlds=(100, 200), restart_at: int = 2, restart_world: int = 300):
  """Drives a two-slot ``evaluation.Policy``-like player over ``frames`` [T, 2, 63, 63, 3]: both
  slots start on ``worlds``, slot 1 restarts on ``restart_world`` before frame ``restart_at``.
  Returns (actions [T, 2], the player's ``logits`` after each act [T, 2, A])."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  player.reset(np.array([0, 1]), np.array(worlds))
  actions, logits = [], []
  for t in range(len(frames)):
    if t == restart_at:
      player.reset(np.array([1]), np.array([restart_world]))
    actions.append(player.act(frames[t]))
    logits.append(player.logits.copy())
  return np.stack(actions), np.stack(logits)
