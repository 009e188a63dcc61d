#!/usr/bin/env bash
# Runs sbmae on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags]
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b configs/polymnist.py:m10 gs://bucket/runs/pm10
#
# Every worker runs the same command; jax.distributed.initialize() finds the
# other workers from the TPU environment (TPU_WORKER_HOSTNAMES), each worker
# reads its own shard of the data, process 0 writes metrics and images, and
# Orbax checkpoints are written by all workers together. WORKDIR must be
# shared by all workers (a GCS bucket or a shared file system). Re-running the
# same command after a preemption resumes from the last checkpoint.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '3,4p' "$0"; exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=${SBMAE_REPO:-'~/sbmae'}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && pip install -q -e . 'jax[tpu]==0.10.2' &&
  python -m sbmae.main --config=$CONFIG --workdir=$WORKDIR $*"
