"""What a pipeline does for its ControlNets: loading one beside its networks (its parameters
one more entry of the parameter store), and a call's ControlNet arguments turned into the
output size and the sampler's runtime inputs. ``StableDiffusionPipeline`` (and SDXL's)
delegate here, so the pipeline itself only names the seam."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sdjax.controlnet import inputs as control_inputs
from sdjax.controlnet.source import param_name, sources
from sdjax.weights.controlnet_files import load_controlnet
from sdjax.weights.errors import WeightsError


def load_entry(pipe, source: str | Path, variant: str | None = None) -> tuple:
    """A ControlNet read and checked for ``pipe`` but not attached: (name, config, graphdef,
    params), for :func:`set_entries` (the server keeps them to attach per call)."""
    if getattr(pipe, "UPSCALER", False):
        raise ValueError("the x4 upscaler takes no ControlNet")
    if not isinstance(source, (str, Path)):
        raise TypeError(f"controlnet must be a path or a hub id, got {type(source).__name__}")
    net = load_controlnet(source, pipe.unet_config, dtype=pipe.dtype, place=pipe.store.place,
                          variant=variant)
    factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    if factor != pipe.vae_scale_factor:
        raise WeightsError(f"{source}: its conditioning embedding downsamples the control "
                           f"image {factor}x, this model's VAE {pipe.vae_scale_factor}x")
    graphdef, params = nnx.split(net)
    return str(source), net.config, graphdef, params


def entries(pipe) -> list[tuple]:
    """The pipeline's ControlNets as :func:`load_entry` gives them, in order."""
    store = pipe.store
    return [(name, config, store.graphdefs[param_name(k)], store.current[param_name(k)])
            for k, (name, config) in enumerate(pipe._controlnets)]


def set_entries(pipe, new: list[tuple], programs: dict | None = None) -> None:
    """Make ``new`` the pipeline's ControlNets, in that order. The set is part of the
    compiled program: a change drops the programs traced for the old one (``programs``:
    those compiled earlier for the new set, which a caller kept)."""
    if [e[0] for e in new] == pipe.controlnets:
        return
    store = pipe.store
    for k in range(len(pipe._controlnets)):
        store.graphdefs.pop(param_name(k), None)
        store.current.pop(param_name(k), None)
    pipe._controlnets.clear()
    for k, (name, config, graphdef, params) in enumerate(new):
        store.graphdefs[param_name(k)] = graphdef
        store.current[param_name(k)] = params
        pipe._controlnets.append((name, config))
    if programs is None:
        pipe._compiled.clear()
    else:
        pipe._compiled = programs


def load_into(pipe, source: str | Path, variant: str | None = None) -> str:
    """Load a ControlNet for ``pipe`` (after those it has); returns its name."""
    entry = load_entry(pipe, source, variant)
    set_entries(pipe, [*entries(pipe), entry])
    return entry[0]


def as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def call_size(pipe, call) -> tuple[int | None, int | None]:
    """The (height, width) a call asks for: its own, else (text-to-image with a control
    image) the control image's, rounded down to the VAE factor, as diffusers does."""
    height, width = call.height, call.width
    if (not pipe._controlnets or call.control_image is None or call.image is not None
            or call.task_inputs is not None or (height is not None and width is not None)):
        return height, width
    h, w = control_inputs.output_size(call.control_image, len(pipe._controlnets),
                                      pipe.vae_scale_factor)
    return (h if height is None else height), (w if width is None else width)


def call_inputs(pipe, call, prepared, n_prompts: int, steps: int, scheduler
                ) -> dict[str, np.ndarray]:
    """The sampler's batched ControlNet inputs of ``call`` (none without ControlNets)."""
    given = {name: getattr(call, name) for name in control_inputs.FIELDS}
    if not pipe._controlnets:
        control_inputs.check_no_control(given)
        return {}
    image = prepared.arrays.get("image")
    init = image if image is not None and image.dtype == np.uint8 and image.ndim == 4 else None
    return control_inputs.prepare(
        call, configs=[cfg for _, cfg in pipe._controlnets], n_prompts=n_prompts,
        per_prompt=call.num_images_per_prompt, height=prepared.height, width=prepared.width,
        scheduler=scheduler, steps=steps, start=prepared.start, init_images=init)


def residual_sources(pipe, count: int) -> tuple:
    return sources(pipe.store.graphdefs, count)
