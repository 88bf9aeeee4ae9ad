"""Saving sdjax networks as a diffusers folder that diffusers/transformers load as-is.

The inverse of the loading tables: for each network an explicit, ordered list of rules from
our NNX parameter path to the diffusers/transformers key, with the layout change back
(HWIO -> OIHW convs, (in, out) -> (out, in) linears). Strict like the loader: every parameter
must match a rule, no two may land on one key, and before anything is written each exported
key is mapped back through the loader's own table and must return to the parameter it came
from with identical values, so whatever sdjax writes, sdjax reads back.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.controlnet import ControlNetModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.weights import table_clip, table_controlnet, table_unet, table_vae
from sdjax.weights.clip_bpe import EOS, write_clip_vocabulary
from sdjax.weights.compvis_names import (
    REFINER_OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    clip_to_compvis,
    openclip_to_compvis,
    unet_to_compvis,
    vae_to_compvis,
)
from sdjax.weights.errors import WeightsError
from sdjax.weights.loader import Rule, map_keys
from sdjax.weights.safetensors_io import save_safetensors

Inverse = Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _linear(x: np.ndarray) -> np.ndarray:
    """(in, out) -> torch Linear (out, in)."""
    return x.T


def _conv(x: np.ndarray) -> np.ndarray:
    """HWIO -> torch Conv2d OIHW."""
    return x.transpose(3, 2, 0, 1)


def _conv1x1(x: np.ndarray) -> np.ndarray:
    """(in, out) -> a torch 1x1 Conv2d (out, in, 1, 1), SD1's proj_in/proj_out layout."""
    return x.T[:, :, None, None]


@dataclasses.dataclass(frozen=True)
class Out:
    pattern: str      # regex over our parameter path, must match all of it
    key: str          # diffusers key template (re.sub syntax)
    transform: Inverse = _same


CLIP_OUT = [
    Out(r"embeddings\.(token|position)_embedding\.embedding",
        r"text_model.embeddings.\1_embedding.weight"),
    Out(r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
        r"\.kernel", r"text_model.encoder.layers.\1.\2.weight", _linear),
    Out(r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
        r"\.bias", r"text_model.encoder.layers.\1.\2.bias"),
    Out(r"encoder\.layers\.(\d+)\.(layer_norm[12])\.scale",
        r"text_model.encoder.layers.\1.\2.weight"),
    Out(r"encoder\.layers\.(\d+)\.(layer_norm[12])\.bias", r"text_model.encoder.layers.\1.\2.bias"),
    Out(r"final_layer_norm\.scale", "text_model.final_layer_norm.weight"),
    Out(r"final_layer_norm\.bias", "text_model.final_layer_norm.bias"),
    # CLIPTextModelWithProjection (SDXL's second encoder) keeps it outside text_model.
    Out(r"text_projection\.kernel", "text_projection.weight", _linear),
]

_VAE_ATTN = r"(encoder|decoder)\.mid_block\.attentions\.0\."
VAE_OUT = [
    Out(_VAE_ATTN + r"(to_[qkv])\.kernel", r"\1.mid_block.attentions.0.\2.weight", _linear),
    Out(_VAE_ATTN + r"to_out\.kernel", r"\1.mid_block.attentions.0.to_out.0.weight", _linear),
    Out(_VAE_ATTN + r"to_out\.bias", r"\1.mid_block.attentions.0.to_out.0.bias"),
    Out(r"(.*)\.kernel", r"\1.weight", _conv),  # every other VAE kernel is a conv
    Out(r"(.*)\.scale", r"\1.weight"),
    Out(r"(.*)\.bias", r"\1.bias"),
]

_BLOCK = r"((?:down_blocks|up_blocks)\.\d+|mid_block)"
_TB = _BLOCK + r"\.attentions\.(\d+)\.transformer_blocks\.(\d+)\."
_T = r"\1.attentions.\2.transformer_blocks.\3."


def unet_out(use_linear_projection: bool) -> list[Out]:
    """SD2-style UNets store proj_in/proj_out as linears, SD1-style as 1x1 convs; diffusers
    builds the layer from the config, so the export must match it."""
    proj = _linear if use_linear_projection else _conv1x1
    return [
        Out(r"conv_(in|out)\.kernel", r"conv_\1.weight", _conv),
        Out(r"(time_embedding|add_embedding)\.(linear_[12])\.kernel", r"\1.\2.weight", _linear),
        Out(_BLOCK + r"\.resnets\.(\d+)\.time_emb_proj\.kernel",
            r"\1.resnets.\2.time_emb_proj.weight", _linear),
        Out(_BLOCK + r"\.resnets\.(\d+)\.(conv[12]|conv_shortcut)\.kernel",
            r"\1.resnets.\2.\3.weight", _conv),
        Out(_BLOCK + r"\.attentions\.(\d+)\.(proj_in|proj_out)\.kernel",
            r"\1.attentions.\2.\3.weight", proj),
        Out(_TB + r"(attn[12])\.(to_[qkv])\.kernel", _T + r"\4.\5.weight", _linear),
        Out(_TB + r"(attn[12])\.to_out\.kernel", _T + r"\4.to_out.0.weight", _linear),
        Out(_TB + r"(attn[12])\.to_out\.bias", _T + r"\4.to_out.0.bias"),
        Out(_TB + r"ff\.geglu\.kernel", _T + "ff.net.0.proj.weight", _linear),
        Out(_TB + r"ff\.geglu\.bias", _T + "ff.net.0.proj.bias"),
        Out(_TB + r"ff\.out\.kernel", _T + "ff.net.2.weight", _linear),
        Out(_TB + r"ff\.out\.bias", _T + "ff.net.2.bias"),
        Out(r"(.*(?:downsamplers|upsamplers)\.0\.conv)\.kernel", r"\1.weight", _conv),
        Out(r"(.*)\.scale", r"\1.weight"),
        Out(r"(.*)\.bias", r"\1.bias"),
    ]


def _kind(module: nnx.Module) -> tuple[str, list[Out], list[Rule]]:
    if isinstance(module, UNet2DConditionModel):
        return "unet", unet_out(module.config.use_linear_projection), table_unet.RULES
    if isinstance(module, AutoencoderKL):
        return "vae", VAE_OUT, table_vae.RULES
    if isinstance(module, CLIPTextModel):
        return "text_encoder", CLIP_OUT, table_clip.RULES
    if isinstance(module, ControlNetModel):
        own = Out(r"(controlnet_.*)\.kernel", r"\1.weight", _conv)
        return ("controlnet", [own, *unet_out(module.config.unet.use_linear_projection)],
                table_controlnet.RULES)
    raise TypeError(f"cannot export a {type(module).__name__}")


def _flat_params(module: nnx.Module, read: bool = True) -> dict[str, np.ndarray | None]:
    """Path -> value (None without ``read``: the names alone, nothing leaves the device)."""
    state = nnx.state(module, nnx.Param)
    return {".".join(str(p) for p in path): np.asarray(var.get_value()) if read else None
            for path, var in nnx.to_flat_state(state)}


def parameter_keys(module: nnx.Module) -> dict[str, tuple[str, Inverse]]:
    """Our parameter path -> (its diffusers/transformers key, the layout change back), for
    every parameter of ``module``; strict as the export is."""
    _, rules, _ = _kind(module)
    compiled = [(re.compile(r.pattern), r) for r in rules]
    out: dict[str, tuple[str, Inverse]] = {}
    source: dict[str, str] = {}
    unmatched = []
    for path in _flat_params(module, read=False):
        for rx, rule in compiled:
            if rx.fullmatch(path):
                key = rx.sub(rule.key, path)
                if key in source:
                    raise WeightsError(f"export: {path} and {source[key]} both map to {key}")
                out[path], source[key] = (key, rule.transform), path
                break
        else:
            unmatched.append(path)
    if unmatched:
        raise WeightsError(f"export: no rule for {len(unmatched)} parameters: "
                           f"{', '.join(sorted(unmatched)[:8])}")
    return out


def network_tensors(module: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters under diffusers/transformers key names and layouts (float32)."""
    _, _, load_rules = _kind(module)
    params = _flat_params(module)
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for path, (key, transform) in parameter_keys(module).items():
        out[key] = np.ascontiguousarray(transform(params[path]).astype(np.float32))
        source[key] = path
    # Read back through the loader's table: the same parameter, the same numbers.
    back = map_keys(out.keys(), load_rules)
    for key, (target, transform) in back.items():
        if target != source[key] or not np.array_equal(
                transform(out[key]), params[source[key]].astype(np.float32)):
            raise WeightsError(f"export: {key} does not load back into {source[key]} "
                               f"(the loader maps it to {target or 'nothing'})")
    return out


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _diffusers_version() -> dict[str, str]:
    try:
        return {"_diffusers_version": importlib.metadata.version("diffusers")}
    except importlib.metadata.PackageNotFoundError:
        return {}


def network_config(module: nnx.Module, extra: Mapping[str, Any] | None = None) -> dict:
    """The ``config.json`` diffusers/transformers build the same network from."""
    kind, _, _ = _kind(module)
    if kind == "controlnet":
        return {**module.config.to_dict(), **_diffusers_version(), **(extra or {})}
    fields = {k: _jsonable(v) for k, v in dataclasses.asdict(module.config).items()}
    if kind == "text_encoder":
        head = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "dtype": "float32"}
    else:
        cls = "UNet2DConditionModel" if kind == "unet" else "AutoencoderKL"
        head = {"_class_name": cls, **_diffusers_version()}
    return {**head, **fields, **(extra or {})}


def save_network(folder: str | Path, module: nnx.Module,
                 extra_config: Mapping[str, Any] | None = None) -> Path:
    """``folder/config.json`` + weights named as diffusers (``diffusion_pytorch_model``) or
    transformers (``model``) name them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind, _, _ = _kind(module)
    tensors = network_tensors(module)
    stem = "model" if kind == "text_encoder" else "diffusion_pytorch_model"
    (folder / "config.json").write_text(
        json.dumps(network_config(module, extra_config), indent=2) + "\n")
    save_safetensors(tensors, folder / f"{stem}.safetensors", {"format": "pt"})
    return folder


def text_encoder_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for the text encoder's config.json (transformers pools at eos)."""
    return {"bos_token_id": int(tokenizer.bos_token_id), "eos_token_id":
            int(tokenizer.eos_token_id), "pad_token_id": int(tokenizer.pad_token_id)}


def save_tokenizer(folder: str | Path, tokenizer_dir: str | Path | None,
                   pad_token: str = EOS) -> Path:
    """Copy the CLIPTokenizer files (vocab.json + merges.txt or tokenizer.json, configs); without a
    ``tokenizer_dir``, write the bundled CLIP vocabulary (single-file models)."""
    if tokenizer_dir is None:
        return write_clip_vocabulary(folder, pad_token=pad_token)
    folder, src = Path(folder), Path(tokenizer_dir)
    slow_files = (src / "vocab.json").exists() and (src / "merges.txt").exists()
    if not slow_files and not (src / "tokenizer.json").exists():
        raise WeightsError(f"{src} has no tokenizer files to export (vocab.json and "
                           "merges.txt, or tokenizer.json)")
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.resolve() != (folder / f.name).resolve():
            shutil.copyfile(f, folder / f.name)
    return folder


def save_scheduler(folder: str | Path, config: Mapping[str, Any]) -> Path:
    folder = Path(folder)
    if "_class_name" not in config:
        raise WeightsError("the scheduler config needs a _class_name (e.g. DDIMScheduler)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(
        {**dict(config), **_diffusers_version()}, indent=2) + "\n")
    return folder


def save_model_index(folder: str | Path, scheduler_class: str,
                     sdxl: Mapping[str, Any] | None = None) -> Path:
    """model_index.json of a Stable Diffusion folder, or with ``sdxl`` (the SDXL pipeline's
    entries: text_encoder_2, tokenizer_2, options) of an SDXL one."""
    index = {
        "_class_name": "StableDiffusionPipeline", **_diffusers_version(),
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl is not None:
        # diffusers' SDXL pipelines have no safety checker.
        for key in ("requires_safety_checker", "safety_checker"):
            del index[key]
        index.update(sdxl)
    path = Path(folder) / "model_index.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def save_pipeline(folder: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                  text_encoder: CLIPTextModel, tokenizer_dir: str | Path | None,
                  scheduler_config: Mapping[str, Any], tokenizer=None) -> Path:
    """A complete diffusers Stable Diffusion folder. ``tokenizer`` (a loaded CLIPTokenizer)
    fills the text encoder's token ids; without it they are read from ``tokenizer_dir``
    (None: the bundled CLIP vocabulary, padded as ``tokenizer`` pads)."""
    folder = Path(folder)
    save_network(folder / "unet", unet)
    save_network(folder / "vae", vae)
    save_text_encoder(folder, "", text_encoder, tokenizer, tokenizer_dir)
    save_scheduler(folder / "scheduler", scheduler_config)
    save_model_index(folder, scheduler_config["_class_name"])
    return folder


def save_text_encoder(folder: Path, suffix: str, text_encoder: CLIPTextModel, tokenizer,
                      tokenizer_dir: str | Path | None) -> None:
    """``text_encoder{suffix}/`` and ``tokenizer{suffix}/``; ``tokenizer`` (a loaded
    CLIPTokenizer, or None: read from ``tokenizer_dir``) fills the token ids."""
    if tokenizer is None:
        from transformers import CLIPTokenizer
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    save_network(folder / f"text_encoder{suffix}", text_encoder,
                 text_encoder_token_ids(tokenizer))
    save_tokenizer(folder / f"tokenizer{suffix}", tokenizer_dir, pad_token=tokenizer.pad_token)
    if len(tokenizer) > tokenizer.vocab_size:
        # Textual-inversion tokens live in the loaded tokenizer only; the files it came from
        # lack them, and the text encoder's grown token table needs them.
        tokenizer.save_pretrained(str(folder / f"tokenizer{suffix}"))


def save_sdxl_pipeline(folder: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                       text_encoder: CLIPTextModel, tokenizer, tokenizer_dir: str | Path | None,
                       text_encoder_2: CLIPTextModel | None, tokenizer_2,
                       tokenizer_2_dir: str | Path | None, scheduler_config: Mapping[str, Any],
                       force_zeros_for_empty_prompt: bool,
                       requires_aesthetics_score: bool) -> Path:
    """A complete diffusers SDXL folder. Without ``text_encoder_2`` it is a refiner's: the one
    encoder (``text_encoder``) goes to ``text_encoder_2/`` and ``text_encoder``/``tokenizer``
    are ``[null, null]``, as diffusers' StableDiffusionXLImg2ImgPipeline writes it."""
    folder = Path(folder)
    refiner = text_encoder_2 is None
    save_network(folder / "unet", unet)
    save_network(folder / "vae", vae)
    if refiner:
        save_text_encoder(folder, "_2", text_encoder, tokenizer, tokenizer_dir)
    else:
        save_text_encoder(folder, "", text_encoder, tokenizer, tokenizer_dir)
        save_text_encoder(folder, "_2", text_encoder_2, tokenizer_2, tokenizer_2_dir)
    save_scheduler(folder / "scheduler", scheduler_config)
    entries: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner
        else "StableDiffusionXLPipeline",
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt}
    if refiner:
        entries.update(text_encoder=[None, None], tokenizer=[None, None],
                       requires_aesthetics_score=requires_aesthetics_score)
    save_model_index(folder, scheduler_config["_class_name"], sdxl=entries)
    return folder


def _text_encoders_to_compvis(unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                              text_encoder_2: CLIPTextModel | None) -> dict[str, np.ndarray]:
    """The text encoders under the names their family stores them with: SDXL (a UNet with
    added conditioning) under ``conditioner.embedders.N.`` (base: CLIP ViT-L then OpenCLIP
    bigG; refiner: OpenCLIP bigG alone); SD 2.x's OpenCLIP (GELU) with fused q/k/v; SD 1.x's
    OpenAI CLIP (quick-GELU) under transformers' names."""
    te = network_tensors(text_encoder)
    if unet.config.addition_embed_type is not None:
        if text_encoder_2 is None:
            return openclip_to_compvis(te, REFINER_OPENCLIP_PREFIX)
        return {**clip_to_compvis(te, SDXL_CLIP_PREFIX),
                **openclip_to_compvis(network_tensors(text_encoder_2), SDXL_OPENCLIP_PREFIX)}
    if text_encoder_2 is not None:
        raise WeightsError("a second text encoder belongs to SDXL models only")
    return openclip_to_compvis(te) if text_encoder.config.hidden_act == "gelu" \
        else clip_to_compvis(te)


def single_file_tensors(*, unet: UNet2DConditionModel, vae: AutoencoderKL,
                        text_encoder: CLIPTextModel,
                        text_encoder_2: CLIPTextModel | None = None) -> dict[str, np.ndarray]:
    """The networks under CompVis/A1111 (SDXL: SGM) single-file names (float32)."""
    return {**unet_to_compvis(network_tensors(unet), unet.config),
            **vae_to_compvis(network_tensors(vae), vae.config),
            **_text_encoders_to_compvis(unet, text_encoder, text_encoder_2)}


def save_single_file(path: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                     text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModel | None = None,
                     half: bool = False, metadata: Mapping[str, str] | None = None) -> Path:
    """A CompVis-layout (SDXL: SGM-layout) ``.safetensors`` (float16 with ``half``), written
    atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: single files are written as .safetensors")
    tensors = single_file_tensors(unet=unet, vae=vae, text_encoder=text_encoder,
                                  text_encoder_2=text_encoder_2)
    if half:
        tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_safetensors(tensors, path, {"format": "pt", **(metadata or {})})
    return path
