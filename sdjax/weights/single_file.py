"""Loading a CompVis/A1111 single-file checkpoint (``.safetensors``, ``.ckpt``; SDXL's in
Stability's SGM layout) as a pipeline, and a VAE from a single file or a diffusers VAE folder.

The file's keys are renamed to diffusers names (``compvis_names``) and go through the same
strict tables as a diffusers folder. What the file lacks comes from its family
(``families``) or from ``config=``: network configs, tokenizer (bundled, offline), scheduler.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sdjax.models.vae import VAEConfig
from sdjax.weights import file_configs
from sdjax.weights.clip_bpe import bundled_clip_tokenizer
from sdjax.weights.compvis_names import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    REFINER_OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_from_compvis,
    openclip_from_compvis,
    strip_prefix,
    under_prefix,
    unet_from_compvis,
    vae_from_compvis,
)
from sdjax.weights.diffusers_folder import (
    PipelineParts,
    Place,
    build_network,
    check_pipeline_folder,
    folder_layout,
    has_no_first_encoder,
    is_sdxl_index,
    load_tokenizer,
    network_dtype,
    read_config,
    sdxl_options,
)
from sdjax.weights.errors import WeightsError
from sdjax.weights.families import (
    PREDICTION_TYPES,
    PRESETS,
    SDXL_REFINER,
    describe,
    detect,
    sdxl_kind,
)
from sdjax.weights.files import open_component_weights, open_tensor_file, read_json
from sdjax.weights.resolve import TOY, toy_path

_EMA = "model_ema."
# Buffers of the original LatentDiffusion module: the noise schedule it derives from its
# config (the scheduler config holds the same), and EMA bookkeeping. Read and dropped.
_LDM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
    "denoiser.sigmas",   # SGM (SDXL) files trained with Stability's code: the same schedule
}


def _yaml_prediction(path: Path) -> str | None:
    """``parameterization`` of the original LDM config beside the file (as the WebUI reads
    ``model.yaml`` next to ``model.safetensors``): ``"v"`` is v-prediction, else epsilon."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml
    try:
        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise WeightsError(f"{yaml_path}: unreadable YAML ({str(e).splitlines()[0]})") from None
    params = ((doc or {}).get("model") or {}).get("params") or {} if isinstance(doc, dict) \
        else {}
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _unet_keys(tensors, ema: bool) -> tuple[dict[str, str], str]:
    """(CompVis UNet name -> key to read, what the loading line says about EMA)."""
    keys = strip_prefix(tensors, UNET_PREFIX)
    has_ema = any(k.startswith(_EMA) and k not in _LDM_BUFFERS for k in tensors)
    if not has_ema:
        if ema:
            raise WeightsError(f"{tensors.path}: ema was asked for, but the file has one set of "
                               "UNet weights (pruned files keep only one)")
        return keys, "one set of UNet weights"
    if not ema:
        return keys, "UNet: the trained weights, not the EMA copy (diffusers' default; " \
                     "--ema / ema=True for the EMA copy)"
    # LitEma stores each parameter under its dotted name with the dots removed.
    ema_keys = {k: _EMA + ("diffusion_model." + k).replace(".", "") for k in keys}
    missing = [v for v in ema_keys.values() if v not in tensors]
    if missing:
        raise WeightsError(f"{tensors.path}: the EMA copy lacks {len(missing)} UNet tensors, "
                           f"e.g. {missing[0]}")
    return ema_keys, "UNet: the EMA copy (model_ema.*, as asked)"


def _check_unknown(tensors) -> None:
    known = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_CLIP_PREFIX,
             SDXL_OPENCLIP_PREFIX, REFINER_OPENCLIP_PREFIX, _EMA)
    stray = sorted(k for k in tensors if not k.startswith(known) and k not in _LDM_BUFFERS)
    if stray:
        more = f" … and {len(stray) - 8} more" if len(stray) > 8 else ""
        raise WeightsError(f"{tensors.path}: {len(stray)} tensors belong to no network of a "
                           f"Stable Diffusion checkpoint: {', '.join(stray[:8])}{more}")


@dataclasses.dataclass
class _Completion:
    """What the file lacks, and from where: network configs, tokenizer, scheduler."""
    configs: dict[str, Any]          # network (a folder's component name) -> config
    tokenizer: Any
    tokenizer_dir: Path | None       # None: the bundled CLIP vocabulary
    scheduler_config: dict
    label: str                       # what the file is, for the loading line
    prediction_source: str           # where its prediction type came from
    # SDXL: the pipeline's options and tokenizer_2 (+ its dir); text_encoder_2 is added later.
    extra: dict = dataclasses.field(default_factory=dict)


def _prediction(explicit: str | None, from_yaml: str | None, default: str,
                default_source: str) -> tuple[str, str]:
    """An explicit argument wins over the .yaml beside the file, which wins over the default."""
    if explicit:
        return explicit, "as asked"
    if from_yaml:
        return from_yaml, "from the .yaml beside the file"
    return default, default_source


def _from_folder(folder: Path, kind: str | None, explicit: str | None,
                 from_yaml: str | None) -> _Completion:
    """What a diffusers folder brings: configs, tokenizer(s), scheduler, SDXL options. Its
    layout must be the file's (SD, SDXL base or SDXL refiner)."""
    index_path = folder / "model_index.json"
    if index_path.is_file() and is_sdxl_index(read_json(index_path)) != (kind is not None):
        raise WeightsError(f"config {folder} is {'not ' if kind else ''}an SDXL folder and the "
                           f"file {'is' if kind else 'is not'} an SDXL checkpoint")
    index = check_pipeline_folder(folder, sdxl=kind is not None)
    refiner = kind is not None and has_no_first_encoder(index)
    if kind is not None and refiner != (kind == SDXL_REFINER):
        raise WeightsError(f"config {folder} is an SDXL {'refiner' if refiner else 'base'} "
                           f"folder, the file an SDXL {kind}")
    components, tokenizers = folder_layout(kind is not None, refiner)
    toks = {t: load_tokenizer(folder, t) for t in tokenizers}
    extra = sdxl_options(index) if kind is not None else {}
    if kind is not None and not refiner:
        extra.update(tokenizer_2=toks["tokenizer_2"], tokenizer_2_dir=folder / "tokenizer_2")
    sched = read_json(folder / "scheduler" / "scheduler_config.json")
    pt, why = _prediction(explicit, from_yaml, sched.get("prediction_type", "epsilon"),
                          f"from {folder / 'scheduler'}")
    what = "Stable Diffusion" if kind is None else f"SDXL {kind}"
    return _Completion({c: read_config(folder, c) for c in components}, toks[tokenizers[0]],
                       folder / tokenizers[0], {**sched, "prediction_type": pt},
                       f"{what} (configs from {folder})", why, extra)


def _complete(config, tensors, explicit: str | None, from_yaml: str | None) -> _Completion:
    kind = sdxl_kind(tensors)
    if str(config) == TOY:  # the bundled toy's folder, as --model toy names it
        config = toy_path()
    if config is None and (data := file_configs.read(tensors)) is not None:
        return _from_metadata(data, kind, explicit, from_yaml)
    if config is not None and str(config) not in PRESETS:
        folder = Path(config).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"config {config!r} is neither a preset ({', '.join(PRESETS)}) "
                               "nor a diffusers folder")
        return _from_folder(folder, kind, explicit, from_yaml)
    if config is not None:
        family, how, default_why = PRESETS[str(config)], f"--config {config}", "family default"
        if family.sdxl != kind:
            file_is = f"an SDXL {kind}" if kind else "a Stable Diffusion 1.x/2.x"
            raise WeightsError(f"--config {config} is for {family.label} models; the file is "
                               f"{file_is} checkpoint")
    else:
        family, default_why = detect(tensors), "family default"
        how = "detected from the tensors; --config to choose another"
        if family.openclip and family.unet.in_channels == 4 and not family.sdxl and \
                getattr(tensors, "extras", {}).get("global_step") == 875000:
            # diffusers' rule: the SD 2 512 base model (epsilon) stopped at step 875000.
            family, default_why = PRESETS["sd21"], "global_step 875000: the SD 2 base model"
    pt, why = _prediction(explicit, from_yaml, family.prediction_type, default_why)
    family = family.for_prediction(pt)
    # A refiner's one encoder is a folder's text_encoder_2 (OpenCLIP with its projection).
    first = "text_encoder_2" if family.sdxl == SDXL_REFINER else "text_encoder"
    configs = {"unet": family.unet, "vae": family.vae, first: family.text_encoder}
    extra: dict[str, Any] = {}
    if family.sdxl:
        # stable-diffusion-xl-base-1.0's model_index.json, and -refiner-1.0's.
        refiner = family.sdxl == SDXL_REFINER
        extra = dict(force_zeros_for_empty_prompt=not refiner,
                     requires_aesthetics_score=refiner)
        if family.text_encoder_2 is not None:
            configs["text_encoder_2"] = family.text_encoder_2
            extra.update(tokenizer_2=bundled_clip_tokenizer("!"), tokenizer_2_dir=None)
    return _Completion(configs, bundled_clip_tokenizer(family.pad_token), None,
                       family.scheduler_config(pt), f"{family.label} ({how})", why, extra)


def _from_metadata(data: dict, kind: str | None, explicit: str | None,
                   from_yaml: str | None) -> _Completion:
    """What a single file sdjax wrote says of itself (weights.file_configs); an SDXL file's
    options and second tokenizer too."""
    if ("sdxl" in data) != (kind is not None):
        said = "an SDXL" if "sdxl" in data else "a Stable Diffusion 1.x/2.x"
        found = f"an SDXL {kind}" if kind else "a Stable Diffusion 1.x/2.x"
        raise WeightsError(f"the file's sdjax metadata describes {said} model, its tensors "
                           f"{found} checkpoint; pass --config to say which model it is")
    sched = dict(data["scheduler_config"])
    pt, why = _prediction(explicit, from_yaml, sched.get("prediction_type", "epsilon"),
                          "from the file's sdjax metadata")
    tok, tok_dir = file_configs.tokenizer(data)
    configs, extra = file_configs.configs(data), {}
    if kind is not None:
        options = data["sdxl"]
        extra = {k: bool(options.get(k, default)) for k, default in (
            ("force_zeros_for_empty_prompt", kind != SDXL_REFINER),
            ("requires_aesthetics_score", kind == SDXL_REFINER))}
        if kind == SDXL_REFINER:  # its one encoder, under its folder name
            configs["text_encoder_2"] = configs.pop("text_encoder")
        else:
            tok_2, tok_2_dir = file_configs.tokenizer(data, second=True)
            extra.update(tokenizer_2=tok_2, tokenizer_2_dir=tok_2_dir)
    what = "Stable Diffusion" if kind is None else f"SDXL {kind}"
    return _Completion(configs, tok, tok_dir, {**sched, "prediction_type": pt},
                       f"{what} (configs from the file's sdjax metadata)", why, extra)


def _text_encoder_views(tensors, kind: str | None, configs: dict) -> dict:
    """The text encoders of the file under transformers' names, by folder component."""
    if kind == SDXL_REFINER:
        return {"text_encoder_2": openclip_from_compvis(
            tensors, configs["text_encoder_2"], REFINER_OPENCLIP_PREFIX, projection=True)}
    if kind is not None:
        return {"text_encoder": clip_from_compvis(tensors, SDXL_CLIP_PREFIX),
                "text_encoder_2": openclip_from_compvis(
                    tensors, configs["text_encoder_2"], SDXL_OPENCLIP_PREFIX, projection=True)}
    if any(k.startswith(OPENCLIP_PREFIX) for k in tensors):
        return {"text_encoder": openclip_from_compvis(tensors, configs["text_encoder"])}
    return {"text_encoder": clip_from_compvis(tensors)}


def _check_pipeline(path: Path, kind: str | None, sdxl: bool) -> None:
    """An SDXL file goes to StableDiffusionXLPipeline, any other to StableDiffusionPipeline."""
    if kind is not None and not sdxl:
        raise WeightsError(f"{path} is an SDXL {kind} checkpoint: load it with "
                           "sdjax.StableDiffusionXLPipeline")
    if kind is None and sdxl:
        raise WeightsError(f"{path} is not an SDXL checkpoint (no conditioner.embedders.* "
                           "text encoders): load it with sdjax.StableDiffusionPipeline")


def load_single_file(path: Path, *, config=None, prediction_type: str | None = None,
                     ema: bool = False, dtype=jnp.float32, place: Place | None = None,
                     sdxl: bool = False) -> PipelineParts:
    """A CompVis/A1111 (SDXL: SGM) checkpoint as pipeline parts. ``config``: None (detect the
    family), a preset name, or a diffusers folder whose configs, tokenizer(s) and scheduler to
    use. ``sdxl``: the caller is StableDiffusionXLPipeline (a file of the other kind fails
    before any weights are read)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"not {prediction_type!r}")
    tensors = open_tensor_file(path)
    what = describe(tensors)
    if what is not None:
        raise WeightsError(f"{path}: {what}")
    kind = sdxl_kind(tensors)
    _check_pipeline(path, kind, sdxl)
    _check_unknown(tensors)
    unet_keys, ema_note = _unet_keys(tensors, ema)
    done = _complete(config, tensors, prediction_type, _yaml_prediction(path))
    cfgs = done.configs
    views = {"unet": unet_from_compvis(tensors, cfgs["unet"], unet_keys),
             "vae": vae_from_compvis(tensors, cfgs["vae"]),
             **_text_encoder_views(tensors, kind, cfgs)}
    nets = {c: build_network(c, cfgs[c], views[c], dtype=network_dtype(c, cfgs[c], dtype),
                             place=place, what=f"{path} ({c}, keys renamed from CompVis)")
            for c in cfgs}
    extra = dict(done.extra)
    if kind == SDXL_REFINER:
        nets["text_encoder"] = nets.pop("text_encoder_2")
    elif kind is not None:
        extra["text_encoder_2"] = nets.pop("text_encoder_2")
    pt = done.scheduler_config["prediction_type"]
    note = (f"{path.name}: {done.label}; {ema_note}; prediction type {pt} "
            f"({done.prediction_source}; --prediction_type / prediction_type= to change)")
    return PipelineParts(**nets, tokenizer=done.tokenizer,
                         scheduler_config=done.scheduler_config,
                         tokenizer_dir=done.tokenizer_dir, note=note, extra=extra)


def load_vae(source: str | Path, cfg: VAEConfig | None = None, *, dtype=jnp.float32,
             place: Place | None = None) -> nnx.Module:
    """Another VAE: a diffusers VAE folder (``config.json`` + weights), or a single VAE file
    (CompVis ``encoder.*``/``decoder.*`` keys, with or without ``first_stage_model.``; or
    diffusers names) built with ``cfg``, the model's own VAE config (default: SD's VAE)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"VAE folder {path} has no config.json (expected a diffusers "
                               "VAE folder)")
        cfg = read_config(path.parent, path.name, kind="vae")
        return build_network("vae", cfg, open_component_weights(path),
                             dtype=network_dtype("vae", cfg, dtype), place=place, what=str(path))
    if not path.is_file():
        raise WeightsError(f"VAE not found: {source}")
    cfg = cfg or VAEConfig.sd15()
    tensors = open_tensor_file(path)
    what = describe(tensors)
    if what is None:
        raise WeightsError(f"{path}: a full model, not a VAE (pass it as the model)")
    if "a VAE alone" not in what:
        raise WeightsError(f"{path}: not a VAE: {what}")
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in tensors) else ""
    # VAE files from training runs may carry the discriminator/LPIPS loss and EMA counters.
    drop = ("loss.", "model_ema.")
    if any(k.startswith(prefix + "encoder.down_blocks.") for k in tensors):
        view = under_prefix(tensors, prefix, drop)   # already diffusers names
    else:
        view = vae_from_compvis(tensors, cfg, prefix=prefix, drop=drop)
    return build_network("vae", cfg, view, dtype=network_dtype("vae", cfg, dtype), place=place,
                         what=f"{path} (VAE)")
