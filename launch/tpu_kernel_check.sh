#!/usr/bin/env bash
# Compiled (non-interpret) checks of the Pallas kernels on a Cloud TPU VM (v4/v5e/v5p/v6e): the
# kernel tests' compiled half (skipped on CPU) against the plain-jnp references, the models' loss
# and gradients with attention_impl pallas vs xla, then the kernel benchmark (JSON lines). The TPU
# twin of launch/gpu_kernel_check.sh.
#
#   launch/tpu_kernel_check.sh [OUT_DIR]     # on the TPU VM, from a checkout of this repository
#   gcloud compute tpus tpu-vm ssh TPU --zone ZONE --worker=0 --command \
#     "cd jaxai && launch/tpu_kernel_check.sh /tmp/kernel_check"
#
# Needs jax with libtpu (pip install -e '.[tpu,test]'); no dataset. Writes OUT_DIR/kernel_tests.log
# and OUT_DIR/kernel_bench.jsonl.
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# Interpret-mode cases already run on CPU in CI, and the topology compile checks run there too;
# here only the compiled cases, the two model-level pallas-vs-xla tests and the bench smoke test.
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)
timeout 600 python3 -m pytest -q -p no:cacheprovider $per_test -rfE --durations=8 \
  -k "compiled or benchmark or xla_and_pallas" \
  tests/kernels_pallas tests/lm/test_lm_task.py tests/world_model/test_dynamics.py \
  2>&1 | tee "$out/kernel_tests.log"
timeout 600 python3 -m jaxai.bench.kernels --only=block_causal,sparse_attention,indexer \
  2>&1 | tee "$out/kernel_bench.jsonl"
