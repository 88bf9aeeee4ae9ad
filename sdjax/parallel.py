"""Data parallelism: a 1-D mesh over the chosen devices, replicated params, batches sharded on
their first axis, padded to a multiple of the device count and trimmed afterwards."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
# Variables that mean "this process is one of several". Launchers (Cloud TPU, SLURM, Open MPI,
# Kubernetes' JobSet) describe the run to jax.distributed.initialize() themselves; the first two
# ask for that. A cluster no launcher describes gives the coordinator's host:port plus the
# process count and this process's index (the SDJAX_* pair, passed on explicitly).
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SDJAX_DISTRIBUTED")
NUM_PROCESSES_ENV = "SDJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "SDJAX_PROCESS_ID"


def distributed_arguments(environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments of ``jax.distributed.initialize`` that the environment asks for,
    or None on a single-process run. Raises ValueError (a one-line message) on a half-given or
    malformed process description."""
    env = os.environ if environ is None else environ
    explicit = [v for v in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if env.get(v)]
    if not any(env.get(v) for v in _MULTIHOST_ENV):
        if explicit:
            raise ValueError(f"{explicit[0]} is set but JAX_COORDINATOR_ADDRESS (host:port of "
                             "process 0) is not")
        return None
    if not explicit:
        return {}  # the launcher's environment says the rest; JAX detects it
    if len(explicit) == 1:
        raise ValueError(f"set both {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, or neither")
    if not env.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError(f"{NUM_PROCESSES_ENV}/{PROCESS_ID_ENV} need JAX_COORDINATOR_ADDRESS "
                         "(host:port of process 0)")
    try:
        num, pid = int(env[NUM_PROCESSES_ENV]), int(env[PROCESS_ID_ENV])
    except ValueError:
        raise ValueError(f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be integers, got "
                         f"{env[NUM_PROCESSES_ENV]!r} and {env[PROCESS_ID_ENV]!r}") from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"{PROCESS_ID_ENV} must be in [0, {NUM_PROCESSES_ENV}), got "
                         f"{pid} of {num}")
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": num,
            "process_id": pid}


def maybe_initialize_distributed() -> None:
    """Join a multi-host run (TPU pod slice, several GPU hosts, CPU processes) when the
    environment says this is one; single-host runs never touch jax.distributed."""
    kwargs = distributed_arguments()
    if kwargs is None or jax.distributed.is_initialized():
        return
    # CPU processes exchange data (the final gather of images) through a collectives library;
    # older JAX defaults to none, which fails at the first cross-process transfer. Gloo needs
    # only TCP. A choice the user made (e.g. "mpi") is kept; accelerators ignore the setting.
    if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


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


# XLA:CPU hands convolutions and dots to YNNPACK by default (jaxlib 0.10). Which is faster
# depends on the shapes (python -m benchmarks.cpu_ops --model mid|mid8 --size 256|512): XLA's
# own kernels win up to 256x256 pixels (the UNet at batch 2: 1.2x on an AMD EPYC, 1.06x on an
# Intel Xeon), YNNPACK above (512x512 on the Xeon: 1.14x with `mid`, 1.65x with `mid8`'s 8
# heads). So CPU executables on latent grids up to 32x32 turn the hand-off off.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_XLA_KERNELS_UP_TO = 32 * 32  # latent cells


def compiler_options(mesh: Mesh, latent_cells: int | None = None) -> dict[str, str] | None:
    """XLA options for the executables sdjax compiles over ``mesh`` (None: XLA's defaults).
    ``latent_cells``: height x width of the latent grid the executable works on (None: small,
    as in training and tests). Passed per executable, so the user's own JAX code in the
    process is left as it is."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    if latent_cells is not None and latent_cells > _XLA_KERNELS_UP_TO:
        return None
    return dict(_CPU_COMPILER_OPTIONS)


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
