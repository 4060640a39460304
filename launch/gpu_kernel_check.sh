#!/usr/bin/env bash
# Compiled (non-interpret) checks of the Pallas kernels on one CUDA GPU: the kernel tests' compiled
# half (skipped on CPU) against the plain-jnp references, the models' loss and gradients with
# attention_impl pallas vs xla, then the kernel benchmark (JSON lines).
#
#   launch/gpu_kernel_check.sh [OUT_DIR]     # writes OUT_DIR/kernel_tests.log, OUT_DIR/kernel_bench.jsonl
#
# Needs jax with CUDA (pip install -e '.[gpu]', or an image that has it) and pytest; no dataset.
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# Interpret-mode cases already run on CPU in CI; here only the compiled ones, the two model-level
# pallas-vs-xla tests (compiled kernels on GPU) and the bench smoke test.
# pytest-timeout (if installed): a kernel that hangs fails its test instead of the whole run.
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=90)
timeout 240 python3 -m pytest -q -p no:cacheprovider $per_test -rfE --durations=8 \
  -k "compiled or benchmark or xla_and_pallas" \
  tests/kernels_pallas tests/lm/test_lm_task.py tests/world_model/test_dynamics.py \
  2>&1 | tee "$out/kernel_tests.log"
timeout 240 python3 -m jaxai.bench.kernels 2>&1 | tee "$out/kernel_bench.jsonl"
