#!/usr/bin/env bash
# Run one command on every host of a TPU pod slice, as one multi-host JAX program.
#   bash tpu/launch_pod.sh TPU_NAME ZONE "COMMAND"
# The repository must already be at ~/sdjax on every host, e.g.
#   gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:~/sdjax --zone=ZONE --worker=all
#   bash tpu/launch_pod.sh TPU_NAME ZONE "bash tpu/setup.sh"
# Set PROJECT to use a project other than gcloud's default. See docs/tpu-gpu.md.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 TPU_NAME ZONE \"COMMAND\"" >&2
  exit 2
fi
name=$1 zone=$2 cmd=$3
# SDJAX_DISTRIBUTED=1: each process calls jax.distributed.initialize(), which finds the
# other hosts through the TPU VM metadata.
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" ${PROJECT:+--project="$PROJECT"} \
  --worker=all --command="cd ~/sdjax && SDJAX_DISTRIBUTED=1 $cmd"
