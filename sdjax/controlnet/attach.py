"""What a pipeline does for its ControlNets: loading one beside its networks (its parameters
one more entry of the parameter store), and a call's ControlNet arguments turned into the
output size and the sampler's runtime inputs. ``StableDiffusionPipeline`` (and SDXL's)
delegate here, so the pipeline itself only names the seam."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdjax.controlnet import inputs as control_inputs
from sdjax.controlnet.source import param_name, sources
from sdjax.weights.controlnet_files import load_controlnet
from sdjax.weights.errors import WeightsError


def load_into(pipe, source: str | Path, variant: str | None = None) -> str:
    """Load a ControlNet for ``pipe`` (after those it has); returns its name."""
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
    pipe.store.add(param_name(len(pipe._controlnets)), net)
    pipe._controlnets.append((str(source), net.config))
    pipe._compiled.clear()  # a program traced for other ControlNets no longer applies
    return str(source)


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
