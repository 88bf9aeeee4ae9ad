"""The host side of a call's noise (sdjax.noise draws it on the devices): the checks of its
arguments (``rng``, ``subseed``, ``subseed_strength``, ``subseeds``, ``seed_resize_from``,
``eta_noise_seed_delta``), the runtime inputs they become, and ``pipe.noise(...)``, which runs
the compiled call's own noise code alone, sharded the same way, so that
``pipe(..., seed=s) == pipe(..., latents=pipe.noise([s], ...))`` bit for bit.
"""

from __future__ import annotations

import types
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sdjax import noise as sources
from sdjax import parallel, validation


def call_inputs(c: Any, n: int, lat_shape: tuple[int, int, int], factor: int,
                inputs: dict) -> tuple[str, tuple[int, int] | None]:
    """(the rng, the latent (h, w) the seed's noise is drawn at or None) of a call ``c``
    (a ``sdjax.call.Call``) of ``n`` images; adds its runtime noise inputs to ``inputs``:
    the subseeds and strengths when it has variation seeds, ENSD with the WebUI's sources."""
    rng = validation.check_choice(c.rng, "rng", validation.RNG_NAMES)
    subseeds, strength = validation.check_variation(c.subseed, c.subseed_strength,
                                                    c.subseeds, n)
    resize = validation.check_seed_resize_from(c.seed_resize_from, factor)
    ensd = validation.check_eta_noise_seed_delta(c.eta_noise_seed_delta)
    if resize is not None:
        resize = (resize[0] // factor, resize[1] // factor)
        resize = None if resize == tuple(lat_shape[:2]) else resize
    if c.latents is not None and (subseeds is not None or resize is not None):
        raise ValueError("latents= is the start noise: subseed and seed_resize_from (which "
                         "make it) do not go with it; pipe.noise(...) draws it")
    if subseeds is not None:  # a new subseed or strength is a new value, not a new program
        subseeds = [parallel.random_seed(s) for s in subseeds]
        inputs[sources.SUBSEEDS] = np.asarray(subseeds, np.int64).astype(np.uint32)
        inputs[sources.STRENGTH] = strength
    if rng != "jax":  # for the WebUI samplers' per-step generators (sources.step_state)
        inputs[sources.ENSD] = np.full((n,), ensd, np.uint32)
    return rng, resize


def noise(pipe, seeds, height: int, width: int, subseeds=None, subseed_strength=0.0,
          seed_resize_from=None, rng: str = "jax", image_indices=None) -> np.ndarray:
    """``pipe.noise``: entry j is the start noise of image j of ``pipe(..., seeds=seeds,
    image_indices=image_indices, subseeds=subseeds, subseed_strength=subseed_strength,
    seed_resize_from=seed_resize_from, rng=rng)``. ``image_indices`` default to 0: each seed
    is one image's own seed (with ``rng="nv"``/``"cpu"`` the WebUI's seed, so a WebUI batch
    from seed s is ``[s, s + 1, ...]``; with ``"jax"`` the key (seed, 0)); a call's
    ``seed=s`` with n images is ``seeds=[s] * n, image_indices=range(n)``."""
    if isinstance(seeds, (str, bytes, int, np.integer)):
        raise TypeError(f"seeds must be a list of seeds, got {seeds!r}")
    seeds = [validation.check_seed(s, f"seeds[{i}]", allow_random=False)
             for i, s in enumerate(seeds)]
    n = len(seeds)
    if n == 0:
        raise ValueError("seeds is empty")
    pipe.check_size(height, width)
    indices = [0] * n if image_indices is None else [
        validation.check_int(k, f"image_indices[{i}]", minimum=0, maximum=validation.MAX_SEED - 1)
        for i, k in enumerate(image_indices)]
    if len(indices) != n:
        raise ValueError(f"image_indices needs one entry per seed ({n}), got {len(indices)}")
    lat_shape = pipe.latent_shape(height, width)
    inputs: dict = {}
    given = types.SimpleNamespace(rng=rng, subseed=None, subseed_strength=subseed_strength,
                                  subseeds=subseeds, seed_resize_from=seed_resize_from,
                                  eta_noise_seed_delta=0, latents=None)
    rng, resize = call_inputs(given, n, lat_shape, pipe.vae_scale_factor, inputs)
    inputs.pop(sources.ENSD, None)
    mesh = pipe.mesh
    size = parallel.padded_size(n, mesh)

    def pad(x):
        return parallel.put_batch(parallel.pad_batch(np.asarray(x), size), mesh)

    key = (rng, lat_shape, resize, tuple(sorted(inputs)))
    cache = pipe.__dict__.setdefault("_noise_fns", {})
    if key not in cache:
        def per_device(seed_arr, index_arr, placed):
            return sources.start_noise(rng, lat_shape, seed_arr, index_arr, placed, resize)
        batch = P(parallel.AXIS)
        cache[key] = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(batch, batch, batch),
                                           out_specs=batch, check_vma=False),
                             compiler_options=parallel.compiler_options(
                                 mesh, lat_shape[0] * lat_shape[1]))
    out = cache[key](pad(np.asarray(seeds, np.int64).astype(np.uint32)),
                     pad(np.asarray(indices, np.int64).astype(np.uint32)),
                     {k: pad(v) for k, v in inputs.items()})
    return parallel.fetch(out)[:n]
