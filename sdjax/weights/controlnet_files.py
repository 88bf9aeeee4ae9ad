"""ControlNet weights: diffusers ``ControlNetModel`` folders (and hub ids), and the original
single files people download for the WebUI (``control_v11p_sd15_canny.pth`` /
``.safetensors``: ``control_model.input_blocks.*``, ``zero_convs.N.0``,
``input_hint_block.N``, ``middle_block_out.0``, with or without the ``control_model.``
prefix), both ways.

A single file says nothing of its architecture: it is the base UNet's encoder (its config)
with the conditioning embedding the file's shapes give. Either source is checked against the
pipeline's UNet (same text context, same added conditioning, one residual per skip of the
same width), so a ControlNet of another family fails in one line naming both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.models.controlnet import ControlNetConfig, ControlNetModel, unet_encoder_config
from sdjax.models.unet import TEXT_TIME, UNetConfig
from sdjax.weights import compvis_names, table_controlnet
from sdjax.weights.diffusers_folder import _ShapeOnlyRngs
from sdjax.weights.errors import WeightsError
from sdjax.weights.files import open_component_weights, open_tensor_file, read_json
from sdjax.weights.loader import load_state
from sdjax.weights.resolve import (
    SINGLE_FILE_SUFFIXES,
    TOY_CONTROLNETS,
    is_hub_id,
    snapshot,
    toy_controlnet_path,
)

PREFIX = "control_model."
_HINT = "input_hint_block."
_ZERO = "zero_convs."
_MID_OUT = "middle_block_out.0."
# Context widths of the families people have ControlNets for.
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def family_name(context: int, added: bool) -> str:
    """How a UNet (or a ControlNet's encoder) is named in errors: its family, from the width
    of the text context it attends to and whether it takes SDXL's added conditioning."""
    name = _FAMILIES.get(context, f"{context}-wide-context")
    if added and name != "SDXL":
        name += " (with SDXL's added conditioning)"
    return name


def _family(cfg: UNetConfig) -> tuple[int, bool]:
    return cfg.cross_attention_dim, cfg.addition_embed_type == TEXT_TIME


def check_family(found: tuple[int, bool], base: UNetConfig, what: str) -> None:
    """Refuse a ControlNet of another family than the pipeline's, naming both."""
    if found != _family(base):
        raise WeightsError(f"{what} is a ControlNet for {family_name(*found)} models; this "
                           f"pipeline's model is {family_name(*_family(base))}")


def skip_channels(cfg: UNetConfig) -> list[int]:
    """The channel count of each skip connection of a UNet's down path (the down residuals a
    ControlNet gives), then the mid block's."""
    ch, per = cfg.block_out_channels, cfg.layers_per_block
    out = [ch[0]]
    for i, c in enumerate(ch):
        out += [c] * (per + (0 if i == len(ch) - 1 else 1))
    return out + [ch[-1]]


def check_fits(cfg: ControlNetConfig, base: UNetConfig, what: str) -> None:
    """Refuse, in one line naming both, a ControlNet that does not fit the pipeline's UNet."""
    c = cfg.unet
    check_family(_family(c), base, what)
    if skip_channels(c) != skip_channels(base):
        raise WeightsError(f"{what}: its residuals ({skip_channels(c)} channels) do not fit "
                           f"this pipeline's UNet ({skip_channels(base)})")


def resolve(source: str | Path) -> Path:
    """A bundled toy ControlNet's name ("toy-edges"), a local ControlNet folder or file, or a
    hub id (downloaded when online)."""
    if str(source) in TOY_CONTROLNETS:
        return toy_controlnet_path(str(source))
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        return path
    name = str(source)
    if is_hub_id(name):
        return _download(name)
    raise WeightsError(f"ControlNet not found: {name} (expected a diffusers ControlNetModel "
                       "folder, a .pth/.safetensors file, a hub id or the toy's "
                       f"{', '.join(TOY_CONTROLNETS)})")


def _download(repo_id: str) -> Path:
    """A hub ControlNet's config and weights: safetensors, else (old repositories) .bin."""
    instead = "a local ControlNet folder or file"
    path = snapshot(repo_id, ("config.json", "diffusion_pytorch_model*.safetensors*"), instead)
    if not any(path.glob("*.safetensors")):
        path = snapshot(repo_id, ("config.json", "diffusion_pytorch_model*.bin*"), instead)
    return path


def _not_a_controlnet(keys: list[str], what: str) -> None:
    """A LoRA, an embedding or anything else without a ControlNet's own tensors, refused in
    one line saying what it looks like."""
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in keys):
        raise WeightsError(f"{what} is a LoRA, not a ControlNet (load it with load_lora)")
    if any(k.startswith(("string_to_param", "emb_params", "clip_l", "clip_g")) for k in keys) \
            or len(keys) <= 2:
        raise WeightsError(f"{what} is a textual-inversion embedding, not a ControlNet (load it "
                           "with load_textual_inversion)")
    ours = any(k.startswith(("controlnet_cond_embedding.", _HINT, PREFIX + _HINT)) for k in keys)
    if not ours:
        raise WeightsError(f"{what} is not a ControlNet (no input_hint_block or "
                           "controlnet_cond_embedding tensors)")


def _hint_convs(keys: list[str]) -> list[int]:
    """The indices of the conditioning embedding's convs in the original layout, in order."""
    return sorted({int(k[len(_HINT):].split(".")[0]) for k in keys if k.startswith(_HINT)})


def original_blocks(cfg: ControlNetConfig, hint: list[int]) -> list[compvis_names.Block]:
    """The original layout's blocks (the UNet encoder's, then the ControlNet's own)."""
    blocks = [b for b in compvis_names.unet_blocks(cfg.unet)
              if not b[0].startswith(("out.", "output_blocks."))]
    names = (["controlnet_cond_embedding.conv_in."]
             + [f"controlnet_cond_embedding.blocks.{i}." for i in range(len(hint) - 2)]
             + ["controlnet_cond_embedding.conv_out."])
    blocks += [(f"{_HINT}{i}.", name, {}) for i, name in zip(hint, names, strict=True)]
    blocks += [(f"{_ZERO}{i}.0.", f"controlnet_down_blocks.{i}.", {})
               for i in range(cfg.num_residuals)]
    return blocks + [(_MID_OUT, "controlnet_mid_block.", {})]


def _single_file_config(tensors, keys: dict[str, str], base: UNetConfig,
                        what: str) -> ControlNetConfig:
    hint = _hint_convs(list(keys))
    if len(hint) < 2:
        raise WeightsError(f"{what}: its input_hint_block has {len(hint)} convolutions")
    shape = functools.partial(_shape, tensors)
    first = shape(keys[f"{_HINT}{hint[0]}.weight"])
    # conv_in, then (conv, strided conv) per channel step, then conv_out: the inputs of
    # every other conv after conv_in are the embedding's channels.
    channels = [first[0]] + [shape(keys[f"{_HINT}{i}.weight"])[0] for i in hint[2:-1:2]]
    ctx = shape(keys["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"])[1] \
        if "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys else None
    ctx = ctx or _first_context(tensors, keys) or base.cross_attention_dim
    check_family((ctx, any(k.startswith("label_emb.") for k in keys)), base, what)
    return ControlNetConfig(unet=unet_encoder_config(base), conditioning_channels=first[1],
                            conditioning_embedding_out_channels=tuple(channels))


def _first_context(tensors, keys: dict[str, str]) -> int | None:
    for k in sorted(keys):
        if k.endswith("attn2.to_k.weight"):
            return _shape(tensors, keys[k])[1]
    return None


def _shape(tensors, key: str) -> tuple[int, ...]:
    return tuple(tensors.shape(key)) if hasattr(tensors, "shape") else tuple(tensors[key].shape)


def open_controlnet(path: Path, base: UNetConfig, *, variant: str | None = None
                    ) -> tuple[ControlNetConfig, Mapping[str, np.ndarray]]:
    """(config, tensors under diffusers' names) of a ControlNet folder or single file, checked
    to be a ControlNet that fits the pipeline whose UNet is ``base``."""
    what = str(path)
    if path.is_dir():
        raw = read_json(path / "config.json")
        try:
            cfg = ControlNetConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{path / 'config.json'}: {e}") from None
        tensors = open_component_weights(path, variant)
        _not_a_controlnet(list(tensors), what)
        check_fits(cfg, base, what)
        return cfg, tensors
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise WeightsError(f"{what}: not a ControlNet (expected a folder or a "
                           f"{', '.join(SINGLE_FILE_SUFFIXES)} file)")
    tensors = open_tensor_file(path)
    _not_a_controlnet(list(tensors), what)
    prefixed = any(k.startswith(PREFIX) for k in tensors)
    # Old full checkpoints carry the whole SD model beside control_model.*: only the latter.
    keys = compvis_names.strip_prefix(tensors, PREFIX) if prefixed else {k: k for k in tensors}
    cfg = _single_file_config(tensors, keys, base, what)
    check_fits(cfg, base, what)
    names = compvis_names.rename_keys(list(keys), original_blocks(cfg, _hint_convs(list(keys))),
                                      what=what)
    return cfg, compvis_names.Renamed(
        tensors, {new: compvis_names._Source(keys[old]) for old, new in names.items()})


def load_controlnet(source: str | Path, base: UNetConfig, *, dtype=jnp.float32,
                    place: Callable[[np.ndarray], jax.Array] | None = None,
                    variant: str | None = None) -> ControlNetModel:
    """A ControlNet (folder, single file or hub id) for a pipeline whose UNet is ``base``,
    loaded strictly (every tensor used, every parameter filled, shapes checked)."""
    path = resolve(source)
    cfg, tensors = open_controlnet(path, base, variant=variant)
    abstract = nnx.eval_shape(lambda: ControlNetModel(cfg, dtype=dtype, rngs=_ShapeOnlyRngs()))
    return load_state(abstract, tensors, table_controlnet.RULES, what=str(path), place=place)


# ---------------------------------------------------------------- export

def original_tensors(model: ControlNetModel, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """The ControlNet's parameters in the original single-file layout (float32)."""
    from sdjax.weights.export import network_tensors
    tensors = network_tensors(model)
    n = len(model.controlnet_cond_embedding.blocks)
    hint = list(range(0, 2 * (n + 2), 2))
    names = compvis_names.rename_keys(list(tensors), original_blocks(model.config, hint),
                                      forward=False, what="ControlNet export")
    return {prefix + new: tensors[old] for old, new in names.items()}


def save_original(path: str | Path, model: ControlNetModel, prefix: str = PREFIX) -> Path:
    """A ``.safetensors`` ControlNet in the original layout, as the WebUI loads it."""
    from sdjax.weights.safetensors_io import save_safetensors
    path = Path(path)
    save_safetensors(original_tensors(model, prefix), path, {"format": "pt"})
    return path
