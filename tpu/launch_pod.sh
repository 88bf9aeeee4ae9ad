#!/usr/bin/env bash
# Run one command on every host of a TPU pod slice, as one multi-host JAX program.
#   bash tpu/launch_pod.sh TPU_NAME ZONE "COMMAND"
# The repository must already be at ~/sdjax on every host (e.g. git clone there first, then
# `bash tpu/launch_pod.sh NAME ZONE "bash tpu/setup.sh"`).
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 TPU_NAME ZONE \"COMMAND\"" >&2
  exit 2
fi
name=$1 zone=$2 cmd=$3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd ~/sdjax && SDJAX_DISTRIBUTED=1 $cmd"
