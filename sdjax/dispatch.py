"""Which pipeline class loads a model: the one place that knows them all (SD 1.x/2.x, SDXL
base and refiner, the x4 upscaler), above the pipelines in the import order. Every front end
(the CLIs, the server, the notebooks through ``sdjax.pipeline_class``) asks here."""

from __future__ import annotations

from pathlib import Path

from sdjax.pipeline import StableDiffusionPipeline
from sdjax.sdxl import StableDiffusionXLPipeline
from sdjax.upscale import StableDiffusionUpscalePipeline
from sdjax.weights.errors import WeightsError
from sdjax.weights.resolve import resolve_model


def _is_sdxl_file(path: Path) -> bool:
    """Whether a single file is an SDXL checkpoint (from its tensor names); a file that cannot
    be read is left to from_pretrained, which says why."""
    from sdjax.weights.families import sdxl_kind
    from sdjax.weights.files import open_tensor_file
    try:
        return sdxl_kind(open_tensor_file(path)) is not None
    except WeightsError:
        return False


def is_upscaler(source: Path) -> bool:
    """An x4 upscaler folder: it has the low-res image's noise scheduler."""
    return (source / "low_res_scheduler").is_dir()


def pipeline_class(model: str) -> type[StableDiffusionPipeline]:
    """The pipeline that loads ``model`` (any form from_pretrained takes; a hub id is
    fetched, as loading it would): x4 upscaler folders (``low_res_scheduler/``) take
    StableDiffusionUpscalePipeline; SDXL folders (``text_encoder_2`` in model_index.json) and
    SDXL single files (``conditioner.embedders`` text encoders) StableDiffusionXLPipeline;
    everything else StableDiffusionPipeline."""
    from sdjax.weights.diffusers_folder import is_sdxl_index
    from sdjax.weights.files import read_json

    source = resolve_model(model)
    if source.is_dir() and is_upscaler(source):
        return StableDiffusionUpscalePipeline
    index = source / "model_index.json"
    if (index.is_file() and is_sdxl_index(read_json(index))) or (
            source.is_file() and _is_sdxl_file(source)):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


__all__ = ["pipeline_class", "is_upscaler"]
