"""What a training task hands the loop: a hashable loss description (part of the compiled
step's static arguments, so two runs of one recipe in a process share the executable), the
initial trained and frozen weights, the host-side batch preparation, and the export."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jax

from sdjax.train.components import Params
from sdjax.train.data import Prepare

Metrics = dict[str, jax.Array]


class Loss(Protocol):
    def loss(self, params: dict[str, Params], frozen: dict[str, Params],
             batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]: ...


@dataclasses.dataclass
class Setup:
    task: Loss
    params: dict[str, Params]   # trained networks, float32 master weights
    frozen: dict[str, Params]   # fixed networks, in the compute dtype
    prepare: Prepare
    # (trained weights to export, folder) -> writes the task's part of a diffusers folder
    export: Callable[[dict[str, Params], Path], None]


def remat(fn: Callable, policy: str | None) -> Callable:
    """``fn`` under ``jax.checkpoint`` with a named policy: activations the policy does not
    keep are recomputed in the backward pass instead of being held in memory."""
    if policy is None:
        return fn
    if not hasattr(jax.checkpoint_policies, policy):
        raise ValueError(f"unknown remat_policy {policy!r}; see jax.checkpoint_policies")
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))
