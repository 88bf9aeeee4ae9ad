"""The WebUI samplers' per-step noise from the WebUI's own per-image generators.

With ``rng="nv"`` or ``"cpu"`` the WebUI (``modules/rng.py``'s ``ImageRNG``, which
k-diffusion's ``torch.randn_like`` is routed to in ``sd_samplers_common.TorchHijack``) keeps one
generator per image, seeded with the image's seed; its first draw is the start noise, and each
later ``ImageRNG.next()`` call (one per noise draw of an ancestral sampler: ``Euler a``,
``DPM2 a``, ``DPM++ 2S a``) draws the next noise of every image from it. With an ENSD
(``eta_noise_seed_delta``) other than 0 the generators are re-seeded with ``seed + ENSD`` after
the start noise. With variation seeds the generators are the seed's (every image the same one:
the subseed's noise is drawn elsewhere).

Here the loop of a call whose spec selects it (:func:`follows_generators`: a stochastic WebUI
sampler with ``rng`` ``"nv"``/``"cpu"``) carries those generators (:func:`sdjax.noise.step_state`)
and asks :func:`take` for each evaluation's noise, in the sampler's draw order
(``WebUIState.draw``); every other call keeps the loop's jax keys and today's program.

``nv`` needs no state beyond the offset (draw k of a run is the Philox counter at the
generator's offset + k); ``cpu`` advances MT19937 through the loop, one ``randn`` per draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sdjax import noise as sources
from sdjax.schedulers.webui import WebUISampler


def follows_generators(rng: str, scheduler: Any) -> bool:
    """Whether a call's per-step noise comes from the WebUI's per-image generators: a WebUI
    sampler that draws noise (ancestral or SDE, ``eta`` not 0) and a WebUI noise source. Both
    are ``CoreSpec`` fields, so this selects a compiled path."""
    return (rng in ("nv", "cpu") and isinstance(scheduler, WebUISampler)
            and scheduler.stochastic)


def start(rng: str, shape: tuple[int, int, int], seeds: jax.Array, indices: jax.Array,
          inputs: Mapping[str, jax.Array]) -> Any:
    """The per-image generators after the start noise (the loop's carry)."""
    return sources.step_state(rng, shape, seeds, indices, inputs)


def take(rng: str, shape: tuple[int, int, int], state: Any, draw: jax.Array
         ) -> tuple[jax.Array, Any]:
    """(the (B, h, w, C) noise of the evaluation whose draw index is ``draw`` (traced; -1: it
    draws none, zeros then), the generators after). Draws come in order 0, 1, 2, ... as the
    sampler makes them, so the ``cpu`` generators advance one ``randn`` per draw."""
    b = jax.tree.leaves(state)[0].shape[0]
    zeros = jnp.zeros((b, *shape), jnp.float32)
    if rng == "nv":
        lo, hi, offset = state

        def drawn(k):
            return sources.next_step_noise(rng, shape, (lo, hi, offset + k))[0]
        return jax.lax.cond(draw >= 0, drawn, lambda k: zeros, draw), state
    return jax.lax.cond(draw >= 0, lambda s: sources.next_step_noise(rng, shape, s),
                        lambda s: (zeros, s), state)
