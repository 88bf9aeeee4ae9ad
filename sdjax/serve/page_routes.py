"""The small read-only routes the web page needs beyond generation: what a model does by
default, what this server can do, and the LoRAs and embeddings a prompt can name.

``/sdapi/v1/loras`` and ``/sdapi/v1/embeddings`` answer in the WebUI's shapes (its clients
read them too); ``/sdjax/v1/...`` are ours (the WebUI has no route that says a model's own
defaults).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from sdjax import handoff
from sdjax.images import SAMPLER_LABELS
from sdjax.lora_tags import EXTENSIONS
from sdjax.serve.checkpoints import ModelRegistry
from sdjax.serve.limits import BadRequest
from sdjax.serve.schemas import Txt2ImgRequest, unsupported


def model_defaults(pipe, title: str) -> dict:
    """What a request that leaves them out gets from this model (its sdjax.json, else its
    class's, else the library's), in the WebUI's field names. The upscaler has no size of
    its own (its output is 4x its image): width and height are None."""
    settings = pipe.sampling_settings()
    height, width = (None, None) if pipe.UPSCALER else pipe.default_hw
    scheduler = pipe.default_scheduler
    return {"model": title, "width": width, "height": height,
            "steps": settings["num_inference_steps"], "cfg_scale": settings["guidance_scale"],
            "sampler_name": SAMPLER_LABELS.get(scheduler, scheduler),
            "upscaler": bool(pipe.UPSCALER), "sdxl": bool(pipe.SDXL)}


def features(registry: ModelRegistry) -> dict:
    """What this server takes beyond plain txt2img/img2img: its refiner, and whether the
    requests' hires-fix, tiling and variation-seed fields are served or refused
    (schemas.unsupported)."""
    return {"refiner": registry.refiner, "refiner_switch_at": handoff.DEFAULT_SWITCH_AT,
            "hires": unsupported(Txt2ImgRequest(enable_hr=True)) is None,
            "tiling": unsupported(Txt2ImgRequest(tiling=True)) is None,
            "variations": unsupported(Txt2ImgRequest(subseed_strength=0.5)) is None,
            "loras": registry.lora_dir is not None,
            "controlnet": bool(getattr(registry, "controlnets", None))}


def lora_list(lora_dir: Path | None) -> list[dict]:
    """``GET /sdapi/v1/loras``: the files a ``<lora:name:w>`` tag finds (sdjax.lora_tags),
    in the WebUI's shape, the first of each name (as find_lora picks it)."""
    if lora_dir is None or not Path(lora_dir).expanduser().is_dir():
        return []
    found: dict[str, Path] = {}
    for ext in EXTENSIONS:
        for path in sorted(Path(lora_dir).expanduser().rglob("*" + ext)):
            if path.is_file():
                found.setdefault(path.name[:-len(ext)], path)
    return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
            for name, path in sorted(found.items())]


def embedding_list(pipe) -> dict:
    """``GET /sdapi/v1/embeddings``: the textual-inversion tokens the current model has
    loaded, in the WebUI's shape."""
    tokens = pipe.store.embedding_tokens
    return {"loaded": {token: {"step": None, "sd_checkpoint": None,
                               "sd_checkpoint_name": None, "shape": None,
                               "vectors": len(names)}
                       for token, names in tokens.items()},
            "skipped": {}}


def add_page_routes(app: FastAPI, registry: ModelRegistry) -> None:
    @app.get("/sdjax/v1/model-defaults")
    async def get_model_defaults(model: str | None = None):
        title = registry.find(model)
        if title is None:
            raise BadRequest(f"model {model!r} not found; GET /sdapi/v1/sd-models lists them",
                             404)
        pipe = await run_in_threadpool(registry.get, title)  # may load it, as choosing it would
        return model_defaults(pipe, title)

    @app.get("/sdjax/v1/features")
    async def get_features():
        return features(registry)

    @app.get("/sdapi/v1/loras")
    async def get_loras():
        return await run_in_threadpool(lora_list, registry.lora_dir)

    @app.get("/sdapi/v1/embeddings")
    async def get_embeddings():
        pipe = await run_in_threadpool(registry.get, registry.current)
        return embedding_list(pipe)
