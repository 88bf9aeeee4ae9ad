#!/usr/bin/env bash
# Install sdjax with TPU JAX on a TPU VM (run from the repository root), plus gcsfs so that
# sdjax.generate can read prompts from and write shards to gs:// buckets.
set -euo pipefail
python3 -m pip install --upgrade pip
python3 -m pip install -e ".[tpu]" gcsfs
# Only the version: on a pod slice, touching the devices from one host alone would wait for
# the others (run python -m sdjax.sample through launch_pod.sh to use them).
python3 -c "import jax, sdjax; print('jax', jax.__version__, 'sdjax', sdjax.__version__)"
