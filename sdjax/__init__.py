"""sdjax: Stable Diffusion in JAX and Flax NNX."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["StableDiffusionPipeline", "StableDiffusionUpscalePipeline",
           "StableDiffusionXLPipeline", "PipelineOutput", "pipeline_class"]


def __getattr__(name: str):
    # Lazy, so `python -m sdjax.sample --help` answers without importing JAX.
    if name == "StableDiffusionUpscalePipeline":
        from sdjax import upscale
        return upscale.StableDiffusionUpscalePipeline
    if name == "StableDiffusionXLPipeline":
        from sdjax import sdxl
        return sdxl.StableDiffusionXLPipeline
    if name == "controlnet":  # sdjax.controlnet.preprocess(...)
        import importlib
        return importlib.import_module("sdjax.controlnet")
    if name == "pipeline_class":
        from sdjax import dispatch
        return dispatch.pipeline_class
    if name in __all__:
        from sdjax import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
