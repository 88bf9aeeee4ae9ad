"""One strict loader shared by every network.

A network's weight table is an ordered list of :class:`Rule`: a regular expression over the
source (PyTorch/diffusers) key, the NNX parameter path it fills, and the transform from the
source layout to ours. Loading is strict: every source tensor must match exactly one rule and
land on a parameter that exists, every parameter must be filled exactly once, and shapes must
agree after the transform. Any violation fails with a :class:`WeightsError` naming the keys.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.weights.errors import WeightsError

Transform = Callable[[np.ndarray], np.ndarray]

_LOAD_THREADS = min(8, os.cpu_count() or 1)


def load_threads(wanted: int) -> int:
    """Threads to load with: ``wanted``, or 1 in a multi-process run, where placing an array
    on the global mesh is a collective that every process must issue in the same order."""
    return wanted if jax.process_count() == 1 else 1


def identity(x: np.ndarray) -> np.ndarray:
    return x


def dense(x: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> (in, out). A 1x1 conv (out, in, 1, 1) is the same map on NHWC
    features; SD1 UNets store ``proj_in``/``proj_out`` and old VAEs their attention that way."""
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x[:, :, 0, 0]
    if x.ndim != 2:
        raise WeightsError(f"expected a linear weight, got shape {x.shape}")
    return x.T


def conv(x: np.ndarray) -> np.ndarray:
    """torch Conv2d OIHW -> HWIO."""
    if x.ndim != 4:
        raise WeightsError(f"expected a conv weight, got shape {x.shape}")
    return x.transpose(2, 3, 1, 0)


@dataclass(frozen=True)
class Rule:
    pattern: str          # regex, must match the whole source key
    target: str           # NNX path template (re.sub syntax, e.g. r"blocks.\1.kernel");
                          # "" marks a known non-parameter buffer that is read and dropped
    transform: Transform = identity

    def compiled(self) -> re.Pattern:
        return re.compile(self.pattern)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def map_keys(source_keys: Iterable[str], rules: list[Rule]) -> dict[str, tuple[str, Transform]]:
    """source key -> (target path, transform). Raises on keys no rule knows."""
    compiled = [(r.compiled(), r) for r in rules]
    out: dict[str, tuple[str, Transform]] = {}
    unknown = []
    for key in source_keys:
        for rx, rule in compiled:
            if rx.fullmatch(key):
                out[key] = (rx.sub(rule.target, key), rule.transform)
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(_listing("unexpected keys (no rule maps them)", unknown))
    return out


def _listing(what: str, keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {', '.join(keys[:limit])}{more}"


def load_state(abstract: nnx.Module, tensors: Mapping[str, np.ndarray], rules: list[Rule],
               *, what: str = "model",
               place: Callable[[np.ndarray], jax.Array] | None = None) -> nnx.Module:
    """Fill ``abstract`` (from ``nnx.eval_shape``) with ``tensors`` mapped through ``rules``.

    Every shape is checked before any data is read. Then each tensor is read, transformed,
    cast to the parameter's dtype and placed (``place``, default ``jnp.asarray``) by one of a
    few threads, one tensor per thread at a time, so nothing but the final arrays and a few
    tensors in flight stay alive.
    """
    graphdef, state = nnx.split(abstract)
    targets = {_path_str(path): (path, var) for path, var in nnx.to_flat_state(state)}
    mapping = map_keys(tensors.keys(), rules)

    by_target: dict[str, list[str]] = {}
    for key, (tgt, _) in mapping.items():
        if not tgt:
            continue
        by_target.setdefault(tgt, []).append(key)
    problems = []
    dupes = [f"{t} <- {srcs}" for t, srcs in by_target.items() if len(srcs) > 1]
    if dupes:
        problems.append(_listing("parameters filled twice", dupes))
    stray = [f"{srcs[0]} -> {t}" for t, srcs in by_target.items() if t not in targets]
    if stray:
        problems.append(_listing("keys mapped to no parameter of the model", stray))
    missing = [t for t in targets if t not in by_target]
    if missing:
        problems.append(_listing("parameters missing from the weights", missing))
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))

    place = place or jnp.asarray
    jobs = []
    mismatched = []
    for tgt, (path, var) in targets.items():
        key = by_target[tgt][0]
        _, transform = mapping[key]
        # Transforms are views of the memory-mapped tensor: its shape costs no read. The view
        # is dropped here and taken again in the worker, so mapped pages never pile up.
        shape = tuple(transform(tensors[key]).shape)
        want = var.get_value() if hasattr(var, "get_value") else var.value
        if shape != tuple(want.shape):
            mismatched.append(f"{key} {shape} vs {tgt} {tuple(want.shape)}")
            continue
        jobs.append((path, var, key, transform, want.dtype))
    if mismatched:
        raise WeightsError(f"{what}: " + _listing("shape mismatches", mismatched))

    if isinstance(place, DeferredPlace):
        return place.defer(graphdef, tensors, jobs)

    def fill(job: tuple) -> tuple:
        path, var, key, transform, dtype = job
        return path, var.replace(place(_read(tensors, key, transform, dtype)))

    # Page faults, copies and numpy's casts (bfloat16 included) release the GIL, so a few
    # threads overlap reading the file with casting; each holds one tensor at a time.
    # python benchmarks/load_memory.py --shape sd15 --dtype bfloat16 --source folder
    with ThreadPoolExecutor(load_threads(_LOAD_THREADS)) as pool:
        filled = list(pool.map(fill, jobs))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _read(tensors: Mapping[str, np.ndarray], key: str, transform: Transform,
          dtype) -> np.ndarray:
    return np.asarray(transform(tensors[key])).astype(dtype)


class DeferredPlace:
    """A ``place`` for :func:`load_state` that reads no tensor data yet.

    :func:`load_state` checks every key and shape as usual, then returns the network with
    abstract leaves (``jax.ShapeDtypeStruct`` with ``sharding``: all that compiling against
    it needs) and leaves the reads here; :meth:`fill` does them later, placing each tensor
    with ``place`` into those same variables. sdjax.pipeline compiles while it runs."""

    def __init__(self, place: Callable[[np.ndarray], jax.Array], sharding: jax.sharding.Sharding):
        self.place, self.sharding = place, sharding
        self._pending: list[tuple] = []  # (variable, tensors, key, transform, dtype)
        self._lock = threading.Lock()     # loaders build their networks in several threads

    def defer(self, graphdef: nnx.GraphDef, tensors: Mapping[str, np.ndarray],
              jobs: list[tuple]) -> nnx.Module:
        abstract = nnx.from_flat_state([
            (path, var.replace(jax.ShapeDtypeStruct(var.get_value().shape, dtype,
                                                    sharding=self.sharding)))
            for path, var, _, _, dtype in jobs])
        module = nnx.merge(graphdef, abstract)
        # The module's own variables: the pipeline's parameters share them, so filling them
        # in place fills the pipeline.
        variables = dict(nnx.to_flat_state(nnx.state(module)))
        with self._lock:
            self._pending += [(variables[path], tensors, key, transform, dtype)
                              for path, _, key, transform, dtype in jobs]
        return module

    def fill(self, wanted: Sequence[nnx.Variable]) -> None:
        """Read, cast and place the deferred tensors of the ``wanted`` variables (a network
        replaced after loading, as by ``vae=``, is never read)."""
        with self._lock:
            jobs, self._pending = self._pending, []
        ids = {id(v) for v in wanted}
        jobs = [job for job in jobs if id(job[0]) in ids]

        def fill(job: tuple) -> None:
            var, tensors, key, transform, dtype = job
            var.set_value(self.place(_read(tensors, key, transform, dtype)))

        # As in load_state: a few threads, one tensor each at a time.
        with ThreadPoolExecutor(load_threads(_LOAD_THREADS)) as pool:
            list(pool.map(fill, jobs))

