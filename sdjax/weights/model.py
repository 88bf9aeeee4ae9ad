"""A whole model's parts from whatever the user names: a diffusers folder or a single file,
with a VAE swap and a prediction-type override, placed on a mesh now or read in the
background (``DeferredPlace``). ``from_pretrained`` of every pipeline starts here."""

from __future__ import annotations

from pathlib import Path

import jax

from sdjax import parallel
from sdjax.weights.diffusers_folder import PipelineParts, load_pipeline_folder
from sdjax.weights.errors import WeightsError
from sdjax.weights.families import PREDICTION_TYPES


def check_options(prediction_type: str | None, vae) -> None:
    """What can be refused before the model's gigabytes load."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"not {prediction_type!r}")
    if vae is not None and not Path(vae).expanduser().exists():
        raise WeightsError(f"VAE not found: {vae}")


def load_parts(source: Path, mesh, *, sdxl: bool, dtype, config=None, vae=None,
               prediction_type: str | None = None, ema: bool = False,
               variant: str | None = None, background_load: bool = False):
    """(the model's :class:`PipelineParts`, replicated on ``mesh``; the
    ``weights.loader.DeferredPlace`` whose reads are still to do, or None). ``sdxl``: the
    caller is the SDXL pipeline. See ``StableDiffusionPipeline.from_pretrained``."""
    replicated = parallel.replicated(mesh)

    def place(a):
        return jax.device_put(a, replicated)

    deferred = None
    if background_load and jax.process_count() == 1:
        # (Multi-process runs load at once: placing weights on a global mesh is a collective.)
        from sdjax.weights.loader import DeferredPlace
        place = deferred = DeferredPlace(place, replicated)
    if source.is_file():
        from sdjax.weights.single_file import load_single_file
        parts: PipelineParts = load_single_file(source, config=config,
                                                prediction_type=prediction_type, ema=ema,
                                                dtype=dtype, place=place, sdxl=sdxl)
    else:
        if config is not None or ema:
            given = " and ".join(n for n, on in (("config= (--config)", config is not None),
                                                 ("ema= (--ema)", ema)) if on)
            raise ValueError(f"{given}: for single-file checkpoints only; {source} is a "
                             "diffusers folder, which brings its own configs and weights")
        parts = load_pipeline_folder(source, dtype=dtype, place=place, variant=variant,
                                     sdxl=sdxl)
        if prediction_type is not None:
            parts.scheduler_config = {**parts.scheduler_config,
                                      "prediction_type": prediction_type}
    if vae is not None:
        from sdjax.weights.single_file import load_vae
        parts.vae = load_vae(vae, parts.vae.config, dtype=dtype, place=place)
        parts.note += f"{'; ' if parts.note else ''}VAE from {vae}"
    return parts, deferred
