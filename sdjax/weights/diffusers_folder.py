"""Loading a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) into our networks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.weights import table_clip, table_unet, table_vae
from sdjax.weights.errors import WeightsError
from sdjax.weights.files import open_component_weights, read_json
from sdjax.weights.loader import Rule, load_state, load_threads

Place = Callable[[np.ndarray], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Kind:
    config: Any
    model: Any
    rules: list[Rule]


NETWORKS = {
    "text_encoder": _Kind(CLIPTextConfig, CLIPTextModel, table_clip.RULES),
    "text_encoder_2": _Kind(CLIPTextConfig, CLIPTextModelWithProjection, table_clip.RULES),
    "vae": _Kind(VAEConfig, AutoencoderKL, table_vae.RULES),
    "unet": _Kind(UNetConfig, UNet2DConditionModel, table_unet.RULES),
}


def read_config(folder: Path, component: str, kind: str | None = None):
    """The frozen config of ``folder/component`` (no weights read); ``kind`` is the network
    when the folder is not named after it (a VAE folder of any name)."""
    raw = read_json(folder / component / "config.json")
    try:
        return NETWORKS[kind or component].config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{folder / component / 'config.json'}: {e}") from None


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` while a network is built abstractly: every stream hands out
    the same key, since only shapes and dtypes survive (the loader then fills every parameter).
    A real ``Rngs`` counts each draw in a traced variable, and with flax 0.12 / jax 0.10 each
    such update scans the whole trace so far: quadratic, 4.4 s of an SD 1.5 UNet's build
    against 0.8 s with this."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self) -> jax.Array:
        return jax.random.key(0)


def network_dtype(component: str, cfg, dtype):
    """The dtype a network is built in: float16 VAEs overflow in the decoder, so those that ask
    for it (``force_upcast``) run in float32, as the reference upcasts them."""
    if component == "vae" and dtype == jnp.float16 and cfg.force_upcast:
        return jnp.float32
    return dtype


def build_network(component: str, cfg, tensors, *, dtype=jnp.float32, place: Place | None = None,
                  what: str = "model") -> nnx.Module:
    """Build ``component`` abstractly (nothing random is initialised) and fill it from
    ``tensors`` (diffusers names), tensor by tensor."""
    kind = NETWORKS[component]
    abstract = nnx.eval_shape(lambda: kind.model(cfg, dtype=dtype, rngs=_ShapeOnlyRngs()))
    return load_state(abstract, tensors, kind.rules, what=what, place=place)


def load_network(folder: Path, component: str, *, dtype=jnp.float32, place: Place | None = None,
                 variant: str | None = None, config=None) -> nnx.Module:
    """``folder/component`` from its config.json and weight files."""
    cfg = config if config is not None else read_config(folder, component)
    tensors = open_component_weights(folder / component, variant)
    return build_network(component, cfg, tensors, dtype=dtype, place=place,
                         what=str(folder / component))


@dataclasses.dataclass
class PipelineParts:
    """What a pipeline is built from, whatever the source."""
    text_encoder: nnx.Module
    vae: nnx.Module
    unet: nnx.Module
    tokenizer: Any
    scheduler_config: dict
    tokenizer_dir: Path | None   # its files, for saving; None = the bundled CLIP vocabulary
    note: str = ""               # the loading line: what was loaded and how to change it
    # SDXL's second encoder and tokenizer, and its pipeline options (force_zeros_for_empty_
    # prompt): keyword arguments of StableDiffusionXLPipeline; empty for SD 1.x/2.x.
    extra: dict = dataclasses.field(default_factory=dict)


def is_sdxl_index(index: dict) -> bool:
    """Whether a model_index.json describes an SDXL pipeline (two text encoders)."""
    return "text_encoder_2" in index or str(index.get("_class_name", "")).startswith(
        "StableDiffusionXL")


def has_no_first_encoder(index: dict) -> bool:
    """Whether an SDXL model_index.json lists no ``text_encoder`` (``[null, null]``, as
    diffusers writes a pipeline built without it): the refiner's layout, text_encoder_2 only."""
    value = index.get("text_encoder")
    return isinstance(value, list) and all(v is None for v in value)


def folder_layout(sdxl: bool, one_encoder: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(networks, tokenizers) of a pipeline folder: SD's, SDXL base's (both encoders) or an
    SDXL refiner's (``one_encoder``: text_encoder_2 and tokenizer_2 only)."""
    if one_encoder:
        return ("text_encoder_2", "vae", "unet"), ("tokenizer_2",)
    return (("text_encoder", "vae", "unet") + (("text_encoder_2",) if sdxl else ()),
            ("tokenizer",) + (("tokenizer_2",) if sdxl else ()))


def sdxl_options(index: dict) -> dict:
    """StableDiffusionXLPipeline's options from an SDXL model_index.json (diffusers' defaults
    where it says nothing)."""
    return dict(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                            True)),
                requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))


def load_pipeline_folder(folder: Path, *, dtype=jnp.float32, place: Place | None = None,
                         variant: str | None = None, sdxl: bool = False) -> PipelineParts:
    """The networks, tokenizer(s) and scheduler config of a diffusers folder; ``sdxl``: the
    caller is the SDXL pipeline (an SDXL folder given to the SD pipeline, or the reverse,
    fails before any weights are read). A refiner's one encoder and tokenizer (its
    ``text_encoder_2``/``tokenizer_2``) come back as ``text_encoder``/``tokenizer``."""
    index = check_pipeline_folder(folder, sdxl=sdxl)
    one_encoder = sdxl and has_no_first_encoder(index)
    components, tokenizers = folder_layout(sdxl, one_encoder)
    configs = {c: read_config(folder, c) for c in components}
    # The networks and the tokenizers load side by side: building a network abstractly and
    # importing transformers for the tokenizer hold the GIL, reading and casting tensors
    # mostly does not, so one's Python overlaps another's reads (one thread in multi-process
    # runs: see load_threads). Results are taken in the old order, so the first failing
    # component is still the one reported.
    with ThreadPoolExecutor(load_threads(4)) as pool:
        futures = {c: pool.submit(load_network, folder, c, config=cfg, place=place,
                                  variant=variant, dtype=network_dtype(c, cfg, dtype))
                   for c, cfg in configs.items()}
        # The tokenizers load one after the other in one thread: transformers' lazy
        # `from transformers import CLIPTokenizer` is not safe to run in two threads at once
        # (one of them can fail with ImportError in a fresh process).
        tok_future = pool.submit(lambda: {t: load_tokenizer(folder, t) for t in tokenizers})
        nets = {c: f.result() for c, f in futures.items()}
        toks = tok_future.result()
    extra, first = (sdxl_options(index) if sdxl else {}), "tokenizer"
    if one_encoder:
        nets["text_encoder"], first = nets.pop("text_encoder_2"), "tokenizer_2"
    elif sdxl:
        extra.update(text_encoder_2=nets.pop("text_encoder_2"), tokenizer_2=toks["tokenizer_2"],
                     tokenizer_2_dir=folder / "tokenizer_2")
    return PipelineParts(**nets, tokenizer=toks[first],
                         scheduler_config=read_json(folder / "scheduler" /
                                                    "scheduler_config.json"),
                         tokenizer_dir=folder / first, extra=extra)


def load_tokenizer(folder: Path, component: str = "tokenizer"):
    """transformers' CLIPTokenizer from ``tokenizer/`` (or SDXL's ``tokenizer_2/``); its own
    config decides the padding token (SD2's and SDXL's second are ``!``)."""
    from transformers import CLIPTokenizer

    path = folder / component
    slow_files = (path / "vocab.json").exists() and (path / "merges.txt").exists()
    if not slow_files and not (path / "tokenizer.json").exists():
        raise WeightsError(f"missing tokenizer files in {path} (vocab.json and merges.txt, "
                           "or tokenizer.json)")
    try:
        return CLIPTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot load the tokenizer ({e})") from None


def check_pipeline_folder(folder: Path, *, sdxl: bool = False) -> dict:
    """Fail early, naming what is missing, before any weights are read."""
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").exists() \
        else {}
    if is_sdxl_index(index) and not sdxl:
        raise WeightsError(f"{folder} is an SDXL model: load it with "
                           "sdjax.StableDiffusionXLPipeline")
    if sdxl and not is_sdxl_index(index):
        raise WeightsError(f"{folder} is not an SDXL model (its model_index.json names no "
                           "text_encoder_2): load it with sdjax.StableDiffusionPipeline")
    needed = ("unet", "vae", "scheduler")
    if not (sdxl and has_no_first_encoder(index)):
        needed += ("text_encoder", "tokenizer")
    missing = [c for c in needed + (("text_encoder_2", "tokenizer_2") if sdxl else ())
               if not (folder / c).is_dir()]
    if missing:
        raise WeightsError(f"{folder} is not a complete diffusers folder: missing "
                           f"{', '.join(m + '/' for m in missing)}")
    return index
