#!/usr/bin/env bash
# Install sdjax with TPU JAX on a TPU VM (run from the repository root).
set -euo pipefail
python3 -m pip install --upgrade pip
python3 -m pip install -e ".[tpu]"
python3 -c "import jax; print(jax.device_count(), 'TPU cores:', jax.devices())"
