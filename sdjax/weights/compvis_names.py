"""CompVis/A1111 single-file key names <-> diffusers key names, both ways.

A single file (``v1-5-pruned-emaonly.safetensors``) holds the three networks under
``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE) and ``cond_stage_model.``
(text encoder) in the original latent-diffusion layout; SDXL's (Stability's "SGM" layout,
``sd_xl_base_1.0.safetensors``) keep UNet and VAE there and the text encoders under
``conditioner.embedders.N.``. We rename those keys to the names a
diffusers folder uses, so the loader's existing ``table_*.py`` rules fill the networks; the
export goes the other way. The layout depends on the network's shape (a UNet's
``input_blocks.N`` index counts resnets, attentions and downsamplers), so the renames are
built from the network's config.

Renames are lazy views (:class:`Renamed`): a tensor is read only when the loader asks for it,
and OpenCLIP's fused ``in_proj`` q/k/v weight is sliced on that read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from sdjax.models.clip_text import CLIPTextConfig
from sdjax.models.unet import CROSS_DOWN, CROSS_UP, TEXT_TIME, UNetConfig
from sdjax.models.vae import VAEConfig
from sdjax.weights.errors import WeightsError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."       # SD 1.x: transformers' CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."         # SD 2.x: OpenCLIP's text tower
# SDXL base: CLIP ViT-L (transformers' names) and OpenCLIP ViT-bigG with its projection.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
# SDXL refiner: OpenCLIP ViT-bigG alone, the first (only) embedder.
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

# (CompVis prefix, diffusers prefix, renames of what follows the prefix)
Block = tuple[str, str, Mapping[str, str]]

_UNET_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.",
                "emb_layers.1.": "time_emb_proj.", "out_layers.0.": "norm2.",
                "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
_VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
_VAE_ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.",
                  "proj_out.": "to_out.0."}
# The VAE attention projections the original code holds as 1x1 convs, diffusers as linears.
VAE_CONV_ATTENTION = ("q.weight", "k.weight", "v.weight", "proj_out.weight")


def unet_blocks(cfg: UNetConfig) -> list[Block]:
    """The UNet's CompVis blocks: ``input_blocks`` hold, per level, ``layers_per_block``
    (resnet, attention) pairs then a downsampler; ``output_blocks`` one more pair per level,
    the upsampler sitting after the attention when there is one. An attention's
    ``transformer_blocks.N`` (SDXL: several per attention) keep their names inside it, and
    SDXL's added-conditioning MLP is ``label_emb.0``."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    out: list[Block] = [("time_embed.0.", "time_embedding.linear_1.", {}),
                        ("time_embed.2.", "time_embedding.linear_2.", {}),
                        ("input_blocks.0.0.", "conv_in.", {}),
                        ("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {}),
                        ("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET),
                        ("middle_block.1.", "mid_block.attentions.0.", {}),
                        ("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET)]
    if cfg.addition_embed_type == TEXT_TIME:
        out += [("label_emb.0.0.", "add_embedding.linear_1.", {}),
                ("label_emb.0.2.", "add_embedding.linear_2.", {})]
    for i in range(n):
        cross = cfg.down_block_types[i] == CROSS_DOWN
        for j in range(per):
            idx = 1 + i * (per + 1) + j
            out.append((f"input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}.",
                        _UNET_RESNET))
            if cross:
                out.append((f"input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}.", {}))
        if i < n - 1:
            out.append((f"input_blocks.{(i + 1) * (per + 1)}.0.op.",
                        f"down_blocks.{i}.downsamplers.0.conv.", {}))
    for i in range(n):
        cross = cfg.up_block_types[i] == CROSS_UP
        for j in range(per + 1):
            idx = i * (per + 1) + j
            out.append((f"output_blocks.{idx}.0.", f"up_blocks.{i}.resnets.{j}.", _UNET_RESNET))
            if cross:
                out.append((f"output_blocks.{idx}.1.", f"up_blocks.{i}.attentions.{j}.", {}))
        if i < n - 1:
            idx = i * (per + 1) + per
            out.append((f"output_blocks.{idx}.{2 if cross else 1}.conv.",
                        f"up_blocks.{i}.upsamplers.0.conv.", {}))
    return out


def vae_blocks(cfg: VAEConfig) -> list[Block]:
    """The VAE's CompVis blocks: ``encoder.down.i`` is diffusers' ``down_blocks.i``, but the
    decoder counts its ``up.i`` from the lowest resolution's end."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    out: list[Block] = [("quant_conv.", "quant_conv.", {}),
                        ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.conv_in.", f"{part}.conv_in.", {}),
                (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                (f"{part}.norm_out.", f"{part}.conv_norm_out.", {}),
                (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
                (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET),
                (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTENTION)]
    for i in range(n):
        for j in range(per):
            out.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                        _VAE_RESNET))
        if i < n - 1:
            out.append((f"encoder.down.{i}.downsample.conv.",
                        f"encoder.down_blocks.{i}.downsamplers.0.conv.", {}))
        up = n - 1 - i
        for j in range(per + 1):
            out.append((f"decoder.up.{up}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                        _VAE_RESNET))
        if i < n - 1:
            out.append((f"decoder.up.{up}.upsample.conv.",
                        f"decoder.up_blocks.{i}.upsamplers.0.conv.", {}))
    return out


def _rename(key: str, blocks: list[Block], forward: bool) -> str | None:
    for compvis, diffusers, inner in blocks:
        src, dst = (compvis, diffusers) if forward else (diffusers, compvis)
        if key.startswith(src):
            rest = key[len(src):]
            for a, b in inner.items():
                a, b = (a, b) if forward else (b, a)
                if rest.startswith(a):
                    return dst + b + rest[len(a):]
            return dst + rest
    return None


def rename_keys(keys: list[str], blocks: list[Block], *, forward: bool = True,
                what: str = "weights") -> dict[str, str]:
    """old key -> new key for every key; fails naming the keys no block holds."""
    out, unknown = {}, []
    for key in keys:
        new = _rename(key, blocks, forward)
        if new is None:
            unknown.append(key)
        else:
            out[key] = new
    if unknown:
        more = f" … and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise WeightsError(f"{what}: {len(unknown)} keys do not belong to a network of this "
                           f"shape: {', '.join(sorted(unknown)[:8])}{more}")
    return out


@dataclasses.dataclass(frozen=True)
class _Source:
    key: str
    part: int = 0          # which third of a fused q/k/v tensor, when parts == 3
    parts: int = 1
    transposed: bool = False   # OpenCLIP's text_projection is (in, out), a torch Linear's T


class Renamed(Mapping[str, np.ndarray]):
    """``tensors`` seen under new names, read lazily (and sliced, for fused q/k/v)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], sources: Mapping[str, _Source]):
        self._tensors, self._sources = tensors, dict(sources)

    def __getitem__(self, key: str) -> np.ndarray:
        s = self._sources[key]
        value = self._tensors[s.key]
        if s.transposed:
            return value.T
        if s.parts == 1:
            return value
        rows = value.shape[0] // s.parts
        return value[s.part * rows:(s.part + 1) * rows]

    def shape(self, key: str) -> tuple[int, ...]:
        """Without reading the tensor (the source must answer ``shape`` too)."""
        s = self._sources[key]
        shape = tuple(self._tensors.shape(s.key))
        if s.transposed:
            return shape[::-1]
        return shape if s.parts == 1 else (shape[0] // s.parts, *shape[1:])

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str,
                 drop: tuple[str, ...] = ()) -> dict[str, str]:
    """key without ``prefix`` -> key, for the keys under it (minus ``drop`` prefixes)."""
    return {k[len(prefix):]: k for k in tensors
            if k.startswith(prefix) and not k[len(prefix):].startswith(drop)}


def unet_from_compvis(tensors: Mapping[str, np.ndarray], cfg: UNetConfig,
                      keys: Mapping[str, str] | None = None) -> Renamed:
    """The UNet of a single file under diffusers names. ``keys`` (CompVis name without the
    prefix -> key in ``tensors``) picks other source keys, e.g. the EMA copies."""
    keys = keys if keys is not None else strip_prefix(tensors, UNET_PREFIX)
    names = rename_keys(list(keys), unet_blocks(cfg), what="UNet")
    return Renamed(tensors, {new: _Source(keys[old]) for old, new in names.items()})


def vae_from_compvis(tensors: Mapping[str, np.ndarray], cfg: VAEConfig,
                     prefix: str = VAE_PREFIX, drop: tuple[str, ...] = ()) -> Renamed:
    keys = strip_prefix(tensors, prefix, drop)
    names = rename_keys(list(keys), vae_blocks(cfg), what="VAE")
    return Renamed(tensors, {new: _Source(keys[old]) for old, new in names.items()})


def under_prefix(tensors: Mapping[str, np.ndarray], prefix: str,
                 drop: tuple[str, ...] = ()) -> Renamed:
    """The tensors under ``prefix``, named without it."""
    keys = strip_prefix(tensors, prefix, drop)
    return Renamed(tensors, {k: _Source(v) for k, v in keys.items()})


def clip_from_compvis(tensors: Mapping[str, np.ndarray], prefix: str = CLIP_PREFIX) -> Renamed:
    """SD 1.x (and SDXL's first encoder, under ``SDXL_CLIP_PREFIX``): transformers' own names
    under a prefix (with or without ``text_model.``)."""
    return under_prefix(tensors, prefix)


_OPENCLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.",
                   "attn.out_proj.": "self_attn.out_proj.", "mlp.c_fc.": "mlp.fc1.",
                   "mlp.c_proj.": "mlp.fc2."}
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight",
                 "ln_final.bias": "final_layer_norm.bias"}
# CLIP's contrastive head: unused by Stable Diffusion, which takes the token features.
_OPENCLIP_UNUSED = ("text_projection", "logit_scale")


def openclip_from_compvis(tensors: Mapping[str, np.ndarray], cfg: CLIPTextConfig,
                          prefix: str = OPENCLIP_PREFIX, projection: bool = False) -> Renamed:
    """SD 2.x: OpenCLIP's text tower under transformers' names. Its fused attention input
    projection becomes q/k/v; the last of its 24 layers, which SD 2.x skips (it conditions on
    the penultimate layer's output), and the contrastive head are dropped. SDXL
    (``projection``): all layers are used (the pooled output reads the last), and
    ``text_projection``, stored (in, out), is CLIPTextModelWithProjection's Linear."""
    unused = ("logit_scale",) if projection else _OPENCLIP_UNUSED
    keys = strip_prefix(tensors, prefix, drop=unused)
    sources: dict[str, _Source] = {}
    unknown = []
    skipped = f"transformer.resblocks.{cfg.num_hidden_layers}."
    for short, key in keys.items():
        if short in _OPENCLIP_TOP:
            sources["text_model." + _OPENCLIP_TOP[short]] = _Source(key)
            continue
        if short == "text_projection":
            sources["text_projection.weight"] = _Source(key, transposed=True)
            continue
        if short.startswith(skipped):
            continue
        head, _, rest = short.partition(".resblocks.")
        layer, _, leaf = rest.partition(".")
        if head != "transformer" or not layer.isdigit():
            unknown.append(key)
            continue
        base = f"text_model.encoder.layers.{layer}."
        if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = leaf.rsplit("_", 1)[1]
            for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                sources[f"{base}self_attn.{proj}.{kind}"] = _Source(key, part, 3)
            continue
        for a, b in _OPENCLIP_LAYER.items():
            if leaf.startswith(a):
                sources[base + b + leaf[len(a):]] = _Source(key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"text encoder: {len(unknown)} OpenCLIP keys sdjax does not know: "
                           f"{', '.join(sorted(unknown)[:8])}")
    return Renamed(tensors, sources)


# ---------------------------------------------------------------- export (diffusers -> CompVis)

def unet_to_compvis(tensors: Mapping[str, np.ndarray], cfg: UNetConfig) -> dict[str, np.ndarray]:
    names = rename_keys(list(tensors), unet_blocks(cfg), forward=False, what="UNet export")
    return {UNET_PREFIX + new: tensors[old] for old, new in names.items()}


def vae_to_compvis(tensors: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[str, np.ndarray]:
    names = rename_keys(list(tensors), vae_blocks(cfg), forward=False, what="VAE export")
    out = {}
    for old, new in names.items():
        value = tensors[old]
        if ".mid.attn_1." in new and new.endswith(VAE_CONV_ATTENTION) and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_to_compvis(tensors: Mapping[str, np.ndarray],
                    prefix: str = CLIP_PREFIX) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in tensors.items()}


def openclip_to_compvis(tensors: Mapping[str, np.ndarray],
                        prefix: str = OPENCLIP_PREFIX) -> dict[str, np.ndarray]:
    """transformers' names -> OpenCLIP's, with q/k/v fused back into ``in_proj`` (and SDXL's
    ``text_projection`` back to OpenCLIP's (in, out))."""
    top = {"text_model." + v: k for k, v in _OPENCLIP_TOP.items()}
    out: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    for key, value in tensors.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = np.ascontiguousarray(value.T)
            continue
        head, _, rest = key.partition("text_model.encoder.layers.")
        layer, _, leaf = rest.partition(".")
        if head or not layer.isdigit():
            raise WeightsError(f"text encoder export: no OpenCLIP name for {key}")
        base = f"{prefix}transformer.resblocks.{layer}."
        if leaf.startswith("self_attn.") and leaf.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            proj, kind = leaf.split(".")[1:3]
            slot = fused.setdefault(f"{base}attn.in_proj_{kind}", [None] * 3)
            slot[("q_proj", "k_proj", "v_proj").index(proj)] = value
            continue
        for a, b in _OPENCLIP_LAYER.items():
            if leaf.startswith(b):
                out[base + a + leaf[len(b):]] = value
                break
        else:
            raise WeightsError(f"text encoder export: no OpenCLIP name for {key}")
    for key, parts in fused.items():
        if any(p is None for p in parts):
            raise WeightsError(f"text encoder export: {key} lacks one of q/k/v")
        out[key] = np.concatenate(parts, axis=0)
    return out
