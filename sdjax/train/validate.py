"""Checking a whole training recipe before a run creates anything: every field's type (as the
dataclasses declare it), every range, and every path, with messages in the recipe's own terms
(``optim.learning_rate must be a number, got 'fast'``), so a typo costs no setup time and
leaves no half-made output folder behind."""

from __future__ import annotations

import dataclasses
import glob
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdjax import validation
from sdjax.train.config import TASKS, ConfigError, TrainConfig

__all__ = ["ConfigError", "check_config"]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(hint: Any) -> str:
    if _is_union(hint):
        parts = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(parts) + " (or null)"
    if dataclasses.is_dataclass(hint):
        return "a section (an object of its own keys)"
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        return "an object (a dict)"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _fits(hint: Any, value: Any) -> bool:
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_fits(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(typing.get_args(hint)[0], v)
                                                for v in value)
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_types(cfg: Any, where: str = "") -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint, name = getattr(cfg, f.name), hints[f.name], where + f.name
        if not _fits(hint, value):
            raise ConfigError(f"{name} must be {_describe(hint)}, got {_show(value)}")
        if dataclasses.is_dataclass(value):
            _check_types(value, name + ".")


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v is None or v >= low


def _above(low: float) -> Callable[[Any], bool]:
    return lambda v: v is None or v > low


def _within(low: float, high: float, *, open_high: bool = False) -> Callable[[Any], bool]:
    return lambda v: v is None or (low <= v < high if open_high else low <= v <= high)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: v in choices


# field -> (test, what it must be). Optional fields pass when None.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (_one_of(*TASKS), f"one of {', '.join(TASKS)}"),
    "batch_size": (_at_least(1), "at least 1"),
    "steps": (_at_least(1), "at least 1"),
    "seed": (_within(0, validation.MAX_SEED, open_high=True), "in [0, 2**32)"),
    "ema_decay": (_within(0, 1, open_high=True), "in [0, 1) (or null for no EMA)"),
    "compute_dtype": (_one_of("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "matmul_precision": (_one_of(None, "default", "high", "highest"),
                         "'default', 'high' or 'highest' (or null for the dtype's)"),
    "num_devices": (_at_least(1), "at least 1 (or null for all)"),
    "checkpoint_every": (_at_least(1), "at least 1"),
    "keep_checkpoints": (_at_least(1), "at least 1"),
    "log_every": (_at_least(1), "at least 1"),
    "output_dir": (bool, "a folder path, not empty"),
    "data.source": (_one_of("shapes", "folder", "webdataset"), "shapes, folder or webdataset"),
    "data.resolution": (_at_least(8), "at least 8 (pixels)"),
    "data.prefetch": (_at_least(0), "at least 0"),
    "optim.learning_rate": (_above(0), "above 0"),
    "optim.schedule": (_one_of("constant", "cosine", "linear"), "constant, cosine or linear"),
    "optim.warmup_steps": (_at_least(0), "at least 0"),
    "optim.final_lr_fraction": (_within(0, 1), "in [0, 1]"),
    "optim.b1": (_within(0, 1, open_high=True), "in [0, 1)"),
    "optim.b2": (_within(0, 1, open_high=True), "in [0, 1)"),
    "optim.eps": (_above(0), "above 0"),
    "optim.weight_decay": (_at_least(0), "at least 0"),
    "optim.grad_clip_norm": (_above(0), "above 0 (or null for no clipping)"),
    "optim.accumulate_steps": (_at_least(1), "at least 1"),
    "diffusion.prediction_type": (_one_of(None, "epsilon", "v_prediction"),
                                  "'epsilon' or 'v_prediction' (or null for the scheduler's)"),
    "diffusion.min_snr_gamma": (_above(0), "above 0 (or null)"),
    "diffusion.caption_dropout": (_within(0, 1), "in [0, 1]"),
    "autoencoder.mse_weight": (_at_least(0), "at least 0"),
    "autoencoder.l1_weight": (_at_least(0), "at least 0"),
    "autoencoder.kl_weight": (_at_least(0), "at least 0"),
    "autoencoder.scaling_batches": (_at_least(0), "at least 0"),
    "contrastive.projection_dim": (_at_least(1), "at least 1"),
    "contrastive.image_channels": (lambda v: len(v) > 0 and min(v) >= 1,
                                   "a non-empty list of positive integers"),
    "tokenizer.model_max_length": (_at_least(3), "at least 3 (start, a word, end)"),
    "textual_inversion.num_vectors": (_at_least(1), "at least 1"),
    "lora.rank": (_at_least(1), "at least 1"),
    "lora.alpha": (_above(0), "above 0 (or null for alpha = rank)"),
    "controlnet.conditioning_embedding_out_channels": (
        lambda v: v is None or (len(v) > 0 and min(v) >= 1),
        "a non-empty list of positive integers (or null for diffusers')"),
    "controlnet.name": (bool, "a file name stem, not empty"),
}
# A pretrained model, frozen, and a small part (or, for a ControlNet, a network beside it).
ADAPTER_TASKS = ("textual_inversion", "lora", "controlnet")


def _get(cfg: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if cfg is None:
            return False, None  # an optional section that is not there
        cfg = getattr(cfg, part)
    return True, cfg


def _check_ranges(cfg: TrainConfig) -> None:
    for key, (ok, what) in RANGES.items():
        present, value = _get(cfg, key)
        if present and not ok(value):
            raise ConfigError(f"{key} must be {what}, got {_show(value)}")
    if cfg.remat_policy is not None:
        import jax
        if not hasattr(jax.checkpoint_policies, cfg.remat_policy):
            raise ConfigError(f"remat_policy {cfg.remat_policy!r} is not a "
                              "jax.checkpoint_policies name (e.g. 'dots_saveable')")


def _sources(cfg: TrainConfig) -> dict[str, str]:
    """Network -> where it comes from: "fresh" (a config dict) or "pretrained"; and which of
    them the task trains, to refuse combinations the task setup would reject later."""
    frozen_te = cfg.task == "unet" and not cfg.diffusion.train_text_encoder
    frozen_all = {"unet": False, "vae": False, "text_encoder": False}
    needs = {"unet": {"unet": True, "vae": False, "text_encoder": not frozen_te},
             "vae": {"vae": True}, "clip": {"text_encoder": True},
             "textual_inversion": frozen_all, "lora": frozen_all,
             "controlnet": frozen_all}[cfg.task]
    out = {}
    for name, trainable in needs.items():
        if getattr(cfg, name) is not None:
            if not trainable:
                raise ConfigError(f"{name} is frozen in a {cfg.task!r} run, so it must come "
                                  f"from `pretrained`, not be built from a `{name}` dict")
            out[name] = "fresh"
        elif cfg.pretrained is None:
            raise ConfigError(f"a {cfg.task!r} run needs a {name}: give `pretrained` (a model "
                              f"folder) or a `{name}` config dict")
        else:
            out[name] = "pretrained"
    if cfg.task in ADAPTER_TASKS and cfg.tokenizer is not None:
        raise ConfigError(f"a {cfg.task!r} run uses the pretrained model's tokenizer; remove "
                          "`tokenizer`")
    if cfg.task in ("unet", "clip") and cfg.tokenizer is None and cfg.pretrained is None:
        raise ConfigError(f"a {cfg.task!r} run needs a tokenizer: give `pretrained` or "
                          "`tokenizer`")
    return out


def _check_networks(cfg: TrainConfig) -> None:
    from sdjax.weights.diffusers_folder import NETWORKS
    from sdjax.weights.errors import WeightsError
    from sdjax.weights.resolve import resolve_model

    sources = _sources(cfg)
    for name, source in sources.items():
        if source == "fresh":
            try:
                NETWORKS[name].config.from_dict(dict(getattr(cfg, name)))
            except (TypeError, ValueError, KeyError) as e:
                raise ConfigError(f"{name}: not a usable config ({e})") from None
    if cfg.pretrained is None:
        return
    try:
        folder = resolve_model(cfg.pretrained)
    except WeightsError as e:
        raise ConfigError(f"pretrained: {e}") from None
    wanted = [n for n, s in sources.items() if s == "pretrained"]
    if cfg.task in ("unet", "clip", *ADAPTER_TASKS) and cfg.tokenizer is None:
        wanted.append("tokenizer")
    for name in wanted:
        if not (folder / name).is_dir():
            raise ConfigError(f"pretrained {cfg.pretrained}: no {name}/ folder in it")
    if cfg.task == "textual_inversion":
        _check_textual_inversion(cfg, folder)
    if cfg.task == "lora":
        _check_lora(cfg, folder)
    if cfg.task == "controlnet":
        _check_controlnet(cfg, folder)


def _check_controlnet(cfg: TrainConfig, folder: Path) -> None:
    """The control maps are there (each image's, of its size), and the ControlNet to go on
    training fits the model (the new one's embedding downsamples as the VAE does)."""
    from sdjax.train.controlnet import embedding_channels, vae_factor
    from sdjax.train.data import make_source
    from sdjax.weights import controlnet_files
    from sdjax.weights.diffusers_folder import read_config
    from sdjax.weights.errors import WeightsError

    data, cn = cfg.data, cfg.controlnet
    try:
        make_source(data, cfg.seed)  # a folder's or shards' control maps, each checked
        if cn.pretrained is not None:
            controlnet_files.open_controlnet(controlnet_files.resolve(cn.pretrained),
                                             read_config(folder, "unet"))
        else:
            embedding_channels(cn.conditioning_embedding_out_channels,
                               vae_factor(read_config(folder, "vae")))
    except WeightsError as e:
        raise ConfigError(f"controlnet.pretrained: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _check_textual_inversion(cfg: TrainConfig, folder: Path) -> None:
    """The new token must be new, the init word one known token (the model's tokenizer)."""
    import numpy as np

    from sdjax.train.textual_inversion import init_token_id
    from sdjax.weights.diffusers_folder import load_tokenizer
    from sdjax.weights.embeddings import add_embedding

    ti = cfg.textual_inversion
    tokenizer = load_tokenizer(folder)
    try:
        init_token_id(tokenizer, ti.init_word)
        # add_embedding's own refusals (a word of the vocabulary, spaces) on a stand-in table
        add_embedding(tokenizer, np.zeros((1, 1), np.float32), ti.token,
                      np.zeros((ti.num_vectors, 1), np.float32), source="textual_inversion.token")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_lora(cfg: TrainConfig, folder: Path) -> None:
    """At least one layer must match the targets, found on the abstract networks (nothing
    is loaded or initialised)."""
    from flax import nnx

    from sdjax.train.lora import find_targets
    from sdjax.weights.diffusers_folder import NETWORKS, read_config

    def abstract(name: str) -> nnx.Module:
        config = read_config(folder, name)
        return nnx.eval_shape(lambda: NETWORKS[name].model(config, rngs=nnx.Rngs(0)))

    try:
        find_targets({name: abstract(name) for name in ("unet", "text_encoder")}, cfg.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_control(cfg: TrainConfig) -> None:
    """data.control: a ControlNet run's, and only its; for shapes one of the maps drawn."""
    from sdjax.train.shapes import CONTROLS

    control = cfg.data.control
    if cfg.task != "controlnet":
        if control is not None:
            raise ConfigError(f"data.control is for task 'controlnet', not {cfg.task!r}; "
                              "remove it")
        return
    if control is None:
        raise ConfigError("a 'controlnet' run needs data.control: the control map of each "
                          "image (for data.source 'shapes': " + " or ".join(CONTROLS) +
                          "; for a folder or shards: the tag of the map beside each image, "
                          "e.g. 'control' for x.control.png)")
    if cfg.data.source == "shapes" and control not in CONTROLS:
        raise ConfigError(f"data.control must be {' or '.join(CONTROLS)} for data.source "
                          f"'shapes', got {_show(control)}")
    if not control or "/" in control or "\\" in control:
        raise ConfigError(f"data.control must be a tag such as 'control', got {_show(control)}")


def _check_paths(cfg: TrainConfig) -> None:
    for key in ("output_dir", "export_dir"):
        path = getattr(cfg, key)
        if path is not None:
            try:
                validation.check_output_folder(Path(path), key)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    data = cfg.data
    if data.source == "folder" and not (data.path and Path(data.path).is_dir()):
        raise ConfigError(f"data.path must be a folder of images for data.source 'folder', "
                          f"got {_show(data.path)}" + (" (not found)" if data.path else ""))
    if data.source == "webdataset":
        path = data.path or ""
        found = glob.glob(str(Path(path) / "*.tar")) if Path(path).is_dir() else glob.glob(path)
        if not path or not found:
            raise ConfigError(f"data.path must name .tar shards (a folder or a glob) for "
                              f"data.source 'webdataset'; none found at {_show(data.path)}")


def check_config(cfg: TrainConfig, *, stop_at: int | None = None) -> None:
    """Raise :class:`ConfigError` for the first thing in ``cfg`` that cannot work."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"a recipe must be a TrainConfig, got {type(cfg).__name__}")
    _check_types(cfg)
    _check_ranges(cfg)
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"--stop_at must be at least 1, got {stop_at}")
    _check_control(cfg)
    _check_paths(cfg)
    _check_networks(cfg)
