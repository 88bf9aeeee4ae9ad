"""ControlNet as a residual source of the sampling core's denoiser seam
(``sampling.Networks.residuals``): traced into the one loop, its parameters an entry of the
call's parameter pytree (``"controlnet_K"``), everything a user changes between calls (images,
scales, windows, guess mode, control mode) read from the call's batched inputs
(``sdjax.controlnet.inputs``), so none of it recompiles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


def param_name(k: int) -> str:
    """The parameter-pytree entry of ControlNet ``k``."""
    return f"controlnet_{k}"


@dataclasses.dataclass(frozen=True)
class ControlNetSource:
    """ControlNet ``k``'s (down residuals, mid residual) for every row of the UNet batch:
    [unconditional; conditional] groups of rows under classifier-free guidance (a conditional
    group per part of a composable ``AND`` prompt), the conditional alone without it."""

    k: int
    graphdef: nnx.GraphDef

    def __call__(self, params, inputs, step, x: jax.Array, cond) -> tuple[list, jax.Array]:
        net = nnx.merge(self.graphdef, params[param_name(self.k)])
        image = inputs[f"control_image_{self.k}"].astype(jnp.float32) / 255.0
        b = image.shape[0]
        w = inputs["control_weights"][:, self.k] * inputs["control_keep"][:, self.k,
                                                                          step.index][:, None]
        if x.shape[0] % b:
            raise ValueError(f"ControlNet: {x.shape[0]} UNet rows for {b} images")
        groups = x.shape[0] // b  # [unconditional; conditional (one group per AND part)]
        if groups > 1:
            w = jnp.concatenate([w * inputs["control_uncond"][:, self.k, None]]
                                + [w] * (groups - 1))
            image = jnp.tile(image, (groups, 1, 1, 1))
        t = jnp.broadcast_to(step.t, (x.shape[0],))
        down, mid = net(x, t, cond.context, image, cond.added)
        w = w.astype(mid.dtype)
        down = [d * w[:, r, None, None, None] for r, d in enumerate(down)]
        return down, mid * w[:, -1, None, None, None]


def sources(graphdefs, count: int) -> tuple[ControlNetSource, ...]:
    """The residual sources of a call with ``count`` ControlNets (their sum goes to the UNet)."""
    return tuple(ControlNetSource(k, graphdefs[param_name(k)]) for k in range(count))
