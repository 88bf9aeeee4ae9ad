"""Live previews: the WebUI's "Approx cheap" image of each step's denoised estimate.

A call with ``on_step`` (sdjax.call.Call) gets, after each UNet evaluation, a uint8 image per
image of the call at the latents' resolution (height/8 x width/8): the estimate of the clean
latents, mapped to RGB by a fixed linear map of the 4 latent channels (the coefficients the
WebUI's ``cheap_approximation`` uses, SDXL's for SDXL). The map runs inside the compiled loop
and only the small uint8 images reach the host, through ``jax.debug.callback``.

A call without ``on_step`` adds no input and no callback: its compiled program is the one it
was before previews existed (the inputs' names are part of sdjax.sampling.CoreSpec, so a call
with previews is another program, compiled once per shape like any other).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Latent channel -> (R, G, B) contribution, in the model's latent space (scaled latents);
# the result is in [-1, 1] like the VAE's output.
SD_COEFFICIENTS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173),
                   (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_COEFFICIENTS = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250),
                     (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))
INPUTS = ("preview_token", "preview_map")  # the batched inputs of a call with previews
KEPT_CALLS = 64  # calls whose on_step is still reachable (older ones' late reports are dropped)

# on_step(step, total, images): step counts from 1 to total (the evaluations this call runs);
# images is (n, h, w, 3) uint8, the call's images, each as its last report left it.
OnStep = Callable[[int, int, np.ndarray], None]


class _Sinks:
    """The host side: each call's on_step by a token the compiled call carries as an input
    (so that one program serves every call of its shape, whatever its on_step)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._calls: OrderedDict[int, tuple[OnStep, np.ndarray]] = OrderedDict()
        self._tokens = itertools.count(1)

    def register(self, on_step: OnStep, n: int, latent_hw: tuple[int, int]) -> int:
        with self._lock:
            token = next(self._tokens) % 2**31
            self._calls[token] = (on_step, np.zeros((n, *latent_hw, 3), np.uint8))
            while len(self._calls) > KEPT_CALLS:
                self._calls.popitem(last=False)
            return token

    def deliver(self, step, total, tokens, images, shard) -> None:
        """One device's rows of one evaluation (called by jax.debug.callback). The first
        device (it holds the first image) calls on_step, once per evaluation; the others'
        rows reach it then (a step late if their callbacks come later)."""
        with self._lock:
            found = self._calls.get(int(tokens[0]))
            if found is None:
                return
            on_step, buffer = found
            first = int(shard) * len(images)
            rows = images[:max(0, min(len(images), len(buffer) - first))]  # padding dropped
            buffer[first:first + len(rows)] = rows
            if int(shard) != 0:
                return
            view = buffer.copy()
        on_step(int(step), int(total), view)


SINKS = _Sinks()


def call_inputs(on_step: OnStep | None, n: int, latent_shape: tuple[int, int, int],
                sdxl: bool, inputs: dict) -> None:
    """Adds a call's preview inputs to ``inputs`` when it has ``on_step`` (none otherwise)."""
    if on_step is None:
        return
    if not callable(on_step):
        raise TypeError(f"on_step must be a function (step, total, images), got "
                        f"{type(on_step).__name__}")
    if latent_shape[2] != 4:
        raise ValueError(f"live previews map 4 latent channels to RGB; this model's latents "
                         f"have {latent_shape[2]}")
    token = SINKS.register(on_step, n, latent_shape[:2])
    inputs["preview_token"] = np.full((n,), token, np.int32)
    coefficients = SDXL_COEFFICIENTS if sdxl else SD_COEFFICIENTS
    inputs["preview_map"] = np.tile(np.asarray(coefficients, np.float32)[None], (n, 1, 1))


def denoised(xin: jax.Array, out: jax.Array, sigma: jax.Array, prediction_type: str
             ) -> jax.Array:
    """The clean latents the model's output implies, from its (variance-preserving) input
    ``xin`` = sqrt(a) x0 + sqrt(1 - a) noise, with sigma = sqrt((1 - a) / a)."""
    sqrt_a = jax.lax.rsqrt(1 + sigma ** 2)
    sqrt_b = sigma * sqrt_a
    if prediction_type == "v_prediction":
        return sqrt_a * xin - sqrt_b * out
    if prediction_type == "sample":
        return out
    return (xin - sqrt_b * out) / sqrt_a


def report(inputs, index, first, end, xin, out, sigma, prediction_type: str,
           axis: str) -> None:
    """Inside the loop (per device): this evaluation's preview images to the host."""
    x0 = denoised(xin.astype(jnp.float32), out, sigma, prediction_type)
    rgb = jnp.einsum("bhwc,bcr->bhwr", x0, inputs["preview_map"])
    images = jnp.round(jnp.clip(rgb / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)
    jax.debug.callback(SINKS.deliver, jnp.asarray(index - first + 1),
                       jnp.asarray(end - first),
                       inputs["preview_token"], images, jax.lax.axis_index(axis))
