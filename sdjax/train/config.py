"""Typed training recipes: frozen dataclasses, read from a Python file (``config()`` or
``CONFIG``) or a JSON file, with dotted command-line overrides. No global config object:
every function gets the recipe it needs passed in."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TASKS = ("unet", "vae", "clip", "textual_inversion", "lora", "controlnet")


class ConfigError(ValueError):
    """A recipe that cannot be run; the message names the field (sdjax.train.validate checks
    the whole recipe)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"        # "shapes" (synthetic, on the fly) | "folder" | "webdataset"
    path: str | None = None       # folder of images + .txt captions, or .tar shards (dir/glob)
    resolution: int = 32          # square training size in pixels
    center_crop: bool = True      # False: random crop after resizing the short side
    random_flip: bool = False
    prefetch: int = 2             # batches prepared ahead on a host thread
    # task="controlnet": each sample's control map. shapes: "edges" (the shape's outline) or
    # "mask" (the shape filled); folder/webdataset: the tag of the control map stored beside
    # each image, e.g. "control" reads x.control.png for x.png (same size as the image).
    control: str | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    schedule: str = "constant"    # after warm-up: "constant" | "cosine" | "linear"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0  # cosine/linear end at learning_rate * this
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip_norm: float | None = 1.0
    accumulate_steps: int = 1     # micro-batches per optimizer step (optax.MultiSteps)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """task="unet": denoising loss on VAE latents."""
    prediction_type: str | None = None  # "epsilon" | "v_prediction"; None: the scheduler's
    min_snr_gamma: float | None = None  # Hang et al. 2023 loss weighting, e.g. 5.0
    train_text_encoder: bool = False
    caption_dropout: float = 0.0        # share of captions replaced by "" (for guidance)
    # scheduler_config.json contents; None: the pretrained folder's. Its noise schedule is
    # the training one and it is what the export writes.
    scheduler: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """task="vae": reconstruction + KL."""
    mse_weight: float = 1.0
    l1_weight: float = 0.0
    kl_weight: float = 1e-6
    # Batches whose latent spread sets the exported scaling_factor (1 / std, as SD's 0.18215
    # was chosen); 0 keeps the configured value.
    scaling_batches: int = 8


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """task="clip": the text encoder against a small image tower, CLIP's symmetric loss."""
    projection_dim: int = 64
    image_channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 conv stage each
    init_logit_scale: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature


@dataclasses.dataclass(frozen=True)
class TextualInversionConfig:
    """task="textual_inversion": new token vectors for a frozen model, nothing else trained."""
    token: str = "<concept>"      # the new word; a prompt uses it by name
    init_word: str = "*"          # one existing token whose vector each new one starts from
    num_vectors: int = 1          # vectors per token: ``token``, ``token_1``, …


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """task="lora": low-rank updates ``W + alpha / rank * up @ down`` of a frozen model's
    layers, named as PEFT's target_modules are (a diffusers module name or its last parts)."""
    rank: int = 4
    alpha: float | None = None    # None: alpha = rank (scale 1)
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # e.g. ("q_proj", "k_proj", "v_proj", "out_proj"); empty: the text encoder stays frozen
    text_encoder_targets: tuple[str, ...] = ()
    name: str = "lora"            # the kohya file's stem: what <lora:name:w> calls it


@dataclasses.dataclass(frozen=True)
class ControlNetTrainConfig:
    """task="controlnet": a ControlNet for a frozen model (Zhang et al. 2023), trained on
    (image, control map, caption) triples with the denoising loss; the UNet, VAE and text
    encoder stay fixed."""
    # An existing ControlNet (folder or single file) to train on; None: a new one made from
    # the UNet's encoder, with zero convolutions.
    pretrained: str | None = None
    # The conditioning embedding's channels, one stride-2 conv per step after the first;
    # None: diffusers' (16, 32, 96, 256), its first entries as many as the VAE's factor needs.
    conditioning_embedding_out_channels: tuple[int, ...] | None = None
    name: str = "controlnet"      # the single file's stem (the original layout, for the WebUI)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """A fresh byte-level BPE vocabulary in which each of ``words`` is one token."""
    words: tuple[str, ...] = ()
    model_max_length: int = 77


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    task: str = "unet"
    output_dir: str = "runs/train"      # checkpoints/, log.jsonl, export/
    # Diffusers folder, "toy" or hub id: frozen components and the starting point of the
    # trained ones (unless a config dict below asks for a fresh network).
    pretrained: str | None = None
    unet: Mapping[str, Any] | None = None          # config.json-style dicts: build this
    vae: Mapping[str, Any] | None = None           # network from scratch (random init)
    text_encoder: Mapping[str, Any] | None = None  # instead of loading it
    tokenizer: TokenizerConfig | None = None       # None: the pretrained folder's
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    textual_inversion: TextualInversionConfig = TextualInversionConfig()
    lora: LoraConfig = LoraConfig()
    controlnet: ControlNetTrainConfig = ControlNetTrainConfig()
    batch_size: int = 32          # global images per micro-step, split over the devices
    steps: int = 1000             # optimizer steps
    seed: int = 0
    ema_decay: float | None = None
    compute_dtype: str = "float32"  # "bfloat16": bf16 compute, float32 master weights
    # Dots and convolutions on GPUs/TPUs: null = "highest" for float32 compute (true float32,
    # as the sampler), XLA's default for bfloat16; "default" lets float32 use TF32/bf16 passes.
    matmul_precision: str | None = None
    remat_policy: str | None = None  # a jax.checkpoint_policies name, e.g. "dots_saveable"
    num_devices: int | None = None  # None: all
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    export_dir: str | None = None   # default: output_dir/export
    export_ema: bool = True         # export the EMA weights when there are any
    progress: bool = True           # tqdm bar
    # Types, ranges and paths are checked as a whole by sdjax.train.validate.check_config
    # (train() calls it first), not here: a value of the wrong type must get a message, not
    # a comparison error from a half-built recipe.


def from_dict(cls: type, d: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors (a typo in a
    recipe should not silently train something else)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be an object of {cls.__name__} keys, got "
                          f"{type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """JSON shapes -> the field's: objects to sections, lists to tuples, integers to floats.
    Values of the wrong type are left for the validation to name."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    for opt in options:
        if dataclasses.is_dataclass(opt) and isinstance(value, Mapping):
            return from_dict(opt, value, where)
        if typing.get_origin(opt) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if opt is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def load_config(path: str | Path) -> TrainConfig:
    """A recipe file: ``.py`` defining ``config() -> TrainConfig`` (or ``CONFIG``), or
    ``.json`` with TrainConfig's fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return from_dict(TrainConfig, raw, path.name)
    if path.suffix != ".py":
        raise ConfigError(f"config must be a .py or .json file, got {path}")
    spec = importlib.util.spec_from_file_location(f"sdjax_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        cfg = module.config() if hasattr(module, "config") else getattr(module, "CONFIG", None)
    except Exception as e:  # a recipe is the user's code: any error in it is theirs to fix
        raise ConfigError(f"{path}: the recipe failed ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path} must define config() returning a TrainConfig (or CONFIG)")
    return cfg


def override(cfg: Any, dotted: Mapping[str, Any]) -> Any:
    """``override(cfg, {"optim.learning_rate": 3e-4, "steps": 10})``."""
    for key, value in dotted.items():
        head, _, rest = key.partition(".")
        if head not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"unknown config key {key!r}")
        if rest:
            section = getattr(cfg, head)
            if section is None:  # an optional section not given yet: start from its defaults
                hint = typing.get_type_hints(type(cfg))[head]
                kinds = [o for o in typing.get_args(hint) if dataclasses.is_dataclass(o)]
                section = kinds[0]() if kinds else None
            if not dataclasses.is_dataclass(section):
                raise ConfigError(f"unknown config key {key!r}: {head} has no keys of its own")
            try:
                value = override(section, {rest: value})
            except ConfigError as e:
                raise ConfigError(str(e).replace(repr(rest), repr(key))) from None
        else:
            value = _coerce(typing.get_type_hints(type(cfg))[head], value, key)
        cfg = dataclasses.replace(cfg, **{head: value})
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a recipe (written next to the checkpoints and the log)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=dict))
