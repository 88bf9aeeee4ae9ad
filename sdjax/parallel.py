"""Data parallelism: a 1-D mesh over the chosen devices, replicated params, batches sharded on
their first axis, padded to a multiple of the device count and trimmed afterwards."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
# Variables that mean "this process is one of several" (set by launchers such as the tpu/
# scripts, SLURM-style setups, or by hand); jax.distributed.initialize() reads them itself.
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SDJAX_DISTRIBUTED")


def maybe_initialize_distributed() -> None:
    """Join a multi-host run (TPU pod slice, several GPU hosts) when the environment says this
    is one; single-host runs never touch jax.distributed."""
    if not any(os.environ.get(v) for v in _MULTIHOST_ENV):
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize()


def make_mesh(num_devices: int | None = None, *, local: bool = False) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all of them when None; under
    jax.distributed these are the global devices of every process). ``local=True`` uses only
    this process's devices, for tools whose processes work independently (sdjax.generate)."""
    devices = jax.local_devices() if local else jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if n < 1:
        raise ValueError("num_devices must be at least 1")
    if n > len(devices):
        raise ValueError(f"num_devices={n} but only {len(devices)} "
                         f"{devices[0].platform.upper()} device(s) are available")
    if not local and jax.process_count() > 1 and n != len(devices):
        raise ValueError("on a multi-host run num_devices must cover every device")
    return Mesh(np.array(devices[:n]), (AXIS,))


# XLA:CPU hands convolutions and dots to YNNPACK by default (jaxlib 0.10); at the UNet and
# VAE shapes XLA's own kernels are faster (UNet about 1.2x on the project's 2-core benchmark
# machine: python -m benchmarks.cpu_ops), so our CPU executables turn the hand-off off.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """XLA options for the executables sdjax compiles over ``mesh`` (None: XLA's defaults).
    Passed per executable, so the user's own JAX code in the process is left as it is."""
    return dict(_CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def padded_size(n: int, mesh: Mesh, per_device: int | None = None) -> int:
    """The smallest batch >= n (or exactly per_device * devices) that splits evenly."""
    d = mesh.size
    if per_device is not None:
        return per_device * d
    return -(-n // d) * d


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the first axis to ``size`` by repeating the last row (its outputs are dropped)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)], axis=0)


def put_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Host array (global batch, identical on every process) -> array sharded on axis 0."""
    sharding = batch_sharded(mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def fetch(x: jax.Array) -> np.ndarray:
    """Device array -> host numpy, gathering across processes on multi-host runs."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def random_seed(requested: int) -> int:
    """``requested``, or for -1 a random seed that every process of a multi-host run shares
    (process 0's): each process draws its own, and mixed seeds would mix the batch."""
    from sdjax.validation import RANDOM_SEED, resolve_seed

    seed = resolve_seed(requested)
    if requested == RANDOM_SEED and jax.process_count() > 1:
        from jax.experimental import multihost_utils
        seed = int(multihost_utils.broadcast_one_to_all(np.uint32(seed)))
    return seed
