#!/usr/bin/env bash
# Runs a jaxai config on CUDA GPUs: one process per GPU, on one machine or across a Slurm allocation.
#
# Single machine, all local GPUs (one process per GPU, coordinator on localhost):
#   launch/gpu.sh configs/lm.py:full /data/runs/lm [--config.field=value ...]
# Slurm (inside sbatch/salloc; one task per GPU, e.g. `srun --ntasks-per-node=8 --gpus-per-task=1`):
#   srun launch/gpu.sh configs/lm.py:full /shared/runs/lm
#
# Install once per machine with:  pip install -e '.[gpu]'
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.overrides ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
# XLA reserves 75% of GPU memory by default; the latency-hiding scheduler overlaps collectives.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

if [[ -n "${SLURM_PROCID:-}" ]]; then
  # jax.distributed.initialize() reads SLURM_* (coordinator = first node of the allocation).
  exec python3 -m jaxai.main --config="$config" --workdir="$workdir" \
    --config.distributed.initialize=True "$@"
fi

num_gpus=$(nvidia-smi --list-gpus | wc -l)
port=${JAXAI_COORDINATOR_PORT:-12355}
pids=()
for ((i = 0; i < num_gpus; i++)); do
  CUDA_VISIBLE_DEVICES=$i python3 -m jaxai.main --config="$config" --workdir="$workdir" \
    --config.distributed.initialize=True \
    --config.distributed.coordinator_address="localhost:$port" \
    --config.distributed.num_processes="$num_gpus" --config.distributed.process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
