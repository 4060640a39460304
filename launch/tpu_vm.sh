#!/usr/bin/env bash
# Runs a jaxai config on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e), one process per host.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/lm.py:full gs://BUCKET/runs/lm [--config.field=value ...]
#
# Copies this checkout to each worker, installs it with the [tpu] extra, and starts the same command
# on all workers; jax.distributed.initialize() finds the coordinator from the TPU metadata, so no
# address is needed. The workdir should be a GCS path every host can reach (orbax writes it directly).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.overrides ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=jaxai

tar -C "$repo" --exclude=.venv --exclude=.git -czf /tmp/jaxai.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxai.tgz "$tpu":/tmp/jaxai.tgz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p $remote_dir && tar -C $remote_dir -xzf /tmp/jaxai.tgz && cd $remote_dir
  python3 -m pip install -q -e '.[tpu]'
  python3 -m jaxai.main --config=$config --workdir=$workdir --config.distributed.initialize=True $*
"
