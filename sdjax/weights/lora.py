"""LoRA files (kohya/A1111 and diffusers/PEFT) read and resolved to our parameters.

A LoRA layer is a low-rank update of one weight: ``W += scale * alpha / rank * up @ down``.
Files name the layer in one of several dialects:

- kohya/A1111: ``lora_unet_<diffusers or CompVis module name, dots as underscores>`` and
  ``lora_te_<transformers name>``, with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
- diffusers/PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.…``;
  older diffusers files ``<module>.lora.down.weight``, ``…lora_linear_layer.down.weight`` or
  ``<attention>.processor.to_q_lora.down.weight``.

SDXL files name its two text encoders ``lora_te1_``/``lora_te2_`` (kohya's sd-scripts) or
``text_encoder.``/``text_encoder_2.`` (diffusers), and kohya's SDXL UNet names are CompVis
(``lora_unet_input_blocks_4_1_…``) where other trainers' are diffusers names
(``lora_unet_down_blocks_1_…``: LCM-LoRA's, whose diffusers distillation scripts turn PEFT keys
into kohya ones). Which prefix names which network is the model's :data:`Prefixes` table.

Every name is resolved against the model's own parameter names (the export table gives each
parameter's diffusers key, :mod:`sdjax.weights.compvis_names` its CompVis one), so no second
name table exists and an ambiguous underscore name cannot pick the wrong layer. The factors
are kept (not the full-size deltas): merging is cheap to repeat at another scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.validation import check_adapter_dtype
from sdjax.weights import table_clip, table_unet
from sdjax.weights.compvis_names import rename_keys, unet_blocks
from sdjax.weights.errors import AdapterError, WeightsError
from sdjax.weights.export import parameter_keys
from sdjax.weights.files import open_tensor_file
from sdjax.weights.loader import Transform, map_keys

_TABLES = {"unet": table_unet.RULES, "text_encoder": table_clip.RULES,
           "text_encoder_2": table_clip.RULES}

# Our network (a key of the pipeline's params) -> (its kohya prefix, its diffusers prefix).
Prefixes = Mapping[str, tuple[str, str]]
_UNET = ("lora_unet_", "unet.")
SD_PREFIXES: Prefixes = {"unet": _UNET, "text_encoder": ("lora_te_", "text_encoder.")}
SDXL_PREFIXES: Prefixes = {"unet": _UNET, "text_encoder": ("lora_te1_", "text_encoder."),
                           "text_encoder_2": ("lora_te2_", "text_encoder_2.")}
# A refiner's one encoder (our text_encoder slot) is SDXL's second.
REFINER_PREFIXES: Prefixes = {"unet": _UNET, "text_encoder": ("lora_te2_", "text_encoder_2.")}
# Text-encoder prefixes that tell the family of a file whose layers this model lacks.
_FAMILY_PREFIXES = {"lora_te_": "an SD1.x/SD2.x LoRA", "lora_te1_": "an SDXL LoRA",
                    "lora_te2_": "an SDXL LoRA", "text_encoder_2.": "an SDXL LoRA"}

_DOWN = r"(?:lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight"
_UP = r"(?:lora_up|lora_B|lora\.up|lora_linear_layer\.up)\.weight"
_PARTS = [(re.compile(r"(.+)\." + _DOWN), "down"), (re.compile(r"(.+)\." + _UP), "up"),
          (re.compile(r"(.+)\.alpha"), "alpha")]
# diffusers' attention-processor files: <attention>.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight")
# diffusers keeps PEFT's LoraConfig (lora_alpha, alpha_pattern, use_rslora) per network in the
# safetensors metadata, as "unet.lora_alpha", … ; files without it have alpha = rank.
_PEFT_METADATA = "lora_adapter_metadata"


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One layer's update, in the file's (PyTorch) layout until :meth:`delta`."""
    network: str        # "unet" | "text_encoder"
    path: str           # our parameter path in that network
    up: np.ndarray      # (out, rank) or (out, rank, 1, 1)
    down: np.ndarray    # (rank, in) or (rank, in, kh, kw)
    scale: float        # alpha / rank
    transform: Transform  # the loader's layout change for this parameter

    def delta(self) -> np.ndarray:
        """``alpha / rank * up @ down`` in our parameter's layout (float32)."""
        rank = self.down.shape[0]
        up = self.up.reshape(self.up.shape[0], rank).astype(np.float32)
        down = self.down.reshape(rank, -1).astype(np.float32)
        full = (up @ down).reshape(self.up.shape[0], *self.down.shape[1:])
        return self.transform(full * np.float32(self.scale))

    def delta_shape(self) -> tuple[int, ...]:
        """The shape :meth:`delta` returns, without computing it (the transforms are views, so
        they take a zero-strided stand-in)."""
        if self.up.shape[2:] not in ((), (1, 1)):
            raise WeightsError(f"an up weight of shape {self.up.shape}")
        full = np.broadcast_to(np.float32(0), (self.up.shape[0], *self.down.shape[1:]))
        return tuple(self.transform(full).shape)


@dataclasses.dataclass(frozen=True)
class Lora:
    name: str                    # the file's stem, as the WebUI names a LoRA
    layers: tuple[LoraLayer, ...]


def kohya_name(network: str, module: str) -> str:
    """The kohya/A1111 name of the diffusers/transformers module ``module`` of ``network``
    (the inverse of what :func:`read_lora` resolves)."""
    return SD_PREFIXES[network][0] + module.replace(".", "_")


@dataclasses.dataclass(frozen=True)
class Target:
    """A layer a LoRA can train: our kernel's path and its diffusers/transformers module."""
    network: str
    path: tuple         # the kernel's path in nnx.to_flat_state / to_pure_dict
    module: str         # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv: bool          # a 1x1 convolution in PyTorch (SD1's proj_in/proj_out)


def lora_targets(module: nnx.Module, network: str, patterns: Iterable[str]) -> list[Target]:
    """The linear (and 1x1 conv) layers of ``module`` whose diffusers module name is one of
    ``patterns`` or ends with ``.pattern``, as PEFT matches ``target_modules``."""
    patterns = tuple(patterns)
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    paths = {".".join(map(str, p)): p for p in flat}
    out = []
    for path, (key, inverse) in parameter_keys(module).items():
        name = key.removesuffix(".weight")
        if not path.endswith(".kernel") or not any(
                name == t or name.endswith("." + t) for t in patterns):
            continue
        shape = flat[paths[path]].get_value().shape
        if len(shape) != 2:  # a 3x3 convolution, not a projection
            continue
        conv = inverse(np.zeros(shape, np.float32)).ndim == 4
        out.append(Target(network, paths[path], name, conv))
    return sorted(out, key=lambda t: t.module)


def _layer_names(networks: Mapping[str, nnx.Module],
                 prefixes: Prefixes) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give a layer -> (network, diffusers weight key)."""
    names: dict[str, tuple[str, str]] = {}
    for net, (kohya, dotted) in prefixes.items():
        keys = [key for path, (key, _) in parameter_keys(networks[net]).items()
                if path.endswith(".kernel")]
        for key in keys:
            module = key[:-len(".weight")]
            names[dotted + module] = (net, key)
            names[kohya + module.replace(".", "_")] = (net, key)
            if net == "unet":  # old diffusers files: UNet names without a prefix
                names[module] = (net, key)
            else:  # transformers 5 saves without text_model.
                names[dotted + module.removeprefix("text_model.")] = (net, key)
        if net == "unet":
            # SDXL's added-conditioning MLP keeps its diffusers names only: the LoRAs
            # trainers write for SDXL leave it alone.
            compvis = rename_keys([k for k in keys if not k.startswith("add_embedding.")],
                                  unet_blocks(networks[net].config), forward=False)
            for key, old in compvis.items():
                names[kohya + old[:-len(".weight")].replace(".", "_")] = (net, key)
    return names


def _group(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """layer name -> {"down"|"up"|"alpha": key}, and the keys no LoRA dialect names."""
    layers: dict[str, dict[str, str]] = {}
    unknown = []
    for key in tensors:
        m = _PROCESSOR.fullmatch(key)
        if m:
            proj = "to_out.0" if m[2] == "to_out" else m[2]
            layers.setdefault(f"{m[1]}.{proj}", {})[m[3]] = key
            continue
        for rx, part in _PARTS:
            m = rx.fullmatch(key)
            if m:
                layers.setdefault(m[1], {})[part] = key
                break
        else:
            unknown.append(key)
    return layers, unknown


def _peft_configs(tensors: Mapping[str, np.ndarray], path: Path) -> dict[str, dict]:
    """network -> its LoraConfig fields from a diffusers file's metadata (empty: none)."""
    raw = (getattr(tensors, "metadata", None) or {}).get(_PEFT_METADATA)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        raise AdapterError(f"{path}: unreadable {_PEFT_METADATA} metadata") from None
    out: dict[str, dict] = {}
    for key, value in packed.items() if isinstance(packed, dict) else ():
        net, _, field = key.partition(".")
        out.setdefault(net, {})[field] = value
    return out


def _peft_scale(config: dict, module: str, rank: int) -> float:
    """alpha / rank as PEFT computes it for ``module`` (alpha_pattern: a name suffix)."""
    alpha = config.get("lora_alpha", rank)
    try:
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    except (re.error, TypeError, ValueError, AttributeError):
        raise AdapterError(f"unreadable {_PEFT_METADATA} metadata for {module}") from None


def _listing(keys: list[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_lora(path: str | Path, networks: Mapping[str, nnx.Module],
              prefixes: Prefixes = SD_PREFIXES) -> Lora:
    """The layers of the LoRA file ``path``, resolved to ``networks`` (the modules that
    ``prefixes`` names: SD's ``"unet"`` and ``"text_encoder"``, SDXL's ``"text_encoder_2"``
    too) and checked against their shapes. Raises :class:`AdapterError` naming what does not
    fit; nothing is changed."""
    path = Path(path)
    try:
        tensors = open_tensor_file(path)
        if len(tensors) == 0:
            raise AdapterError(f"{path}: holds no tensors, not a LoRA file")
        layers, unknown = _group(tensors)
        for parts in layers.values():  # floating point only (validation.ADAPTER_DTYPES)
            for part in ("down", "up"):
                if part in parts:
                    try:
                        check_adapter_dtype(tensors[parts[part]].dtype, "LoRA", str(path))
                    except ValueError as e:
                        raise AdapterError(str(e)) from None
        if unknown:
            raise AdapterError(f"{path}: {len(unknown)} keys are not LoRA weights sdjax "
                               f"reads: {_listing(unknown)}")
        names = _layer_names(networks, prefixes)
        peft = _peft_configs(tensors, path)
        missing = [n for n in layers if n not in names]
        _refuse_other_family(path, missing, prefixes)
        if missing:
            raise AdapterError(f"{path}: {len(missing)} LoRA layers that this model does not "
                               f"have (a LoRA for another architecture?): {_listing(missing)}")
        shapes = {net: {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in
                        nnx.to_flat_state(nnx.state(networks[net], nnx.Param))}
                  for net in prefixes}
        out, misfits = [], []
        for name, parts in sorted(layers.items()):
            if "down" not in parts or "up" not in parts:
                raise AdapterError(f"{path}: LoRA layer {name} lacks its "
                                   f"{'down' if 'down' not in parts else 'up'} weight")
            net, key = names[name]
            target, transform = map_keys([key], _TABLES[net])[key]
            # Copies, in float32: the file may change on disk while the LoRA stays loaded.
            down = np.array(tensors[parts["down"]], np.float32)
            up = np.array(tensors[parts["up"]], np.float32)
            if (up.ndim not in (2, 4) or down.ndim != up.ndim or down.shape[0] == 0
                    or up.shape[1] != down.shape[0]):
                misfits.append(f"{name} (up {up.shape}, down {down.shape})")
                continue
            rank = down.shape[0]
            if "alpha" in parts:
                alpha = np.asarray(tensors[parts["alpha"]])
                if np.size(alpha) != 1:
                    raise AdapterError(f"{path}: {parts['alpha']} is not a single number")
                scale = float(np.reshape(alpha, -1)[0]) / rank
            else:
                scale = _peft_scale(peft.get(net, {}), key[:-len(".weight")], rank)
            layer = LoraLayer(net, target, up, down, scale, transform)
            try:
                delta_shape = layer.delta_shape()
            except WeightsError:
                delta_shape = None
            if delta_shape != shapes[net][target]:
                misfits.append(f"{name} (up {up.shape}, down {down.shape})")
                continue
            out.append(layer)
        if misfits:
            raise AdapterError(f"{path}: {len(misfits)} LoRA layers do not fit this model's "
                               f"shapes (a LoRA for another architecture, e.g. SD2 on SD1?): "
                               f"{_listing(misfits, 2)}")
    except AdapterError:
        raise
    except WeightsError as e:  # missing, unreadable or corrupt file
        raise AdapterError(str(e)) from None
    return Lora(path.stem, tuple(out))


def _refuse_other_family(path: Path, missing: list[str], prefixes: Prefixes) -> None:
    """One line naming the mismatch when layers this model lacks are named as another
    family's text encoder (an SDXL file on SD1, an SD1 file on SDXL or on a refiner)."""
    for name in missing:
        family = next((f for p, f in _FAMILY_PREFIXES.items() if name.startswith(p)), None)
        if family is not None:
            model = "an SDXL refiner" if prefixes is REFINER_PREFIXES else (
                "SDXL" if prefixes is SDXL_PREFIXES else "SD1.x/SD2.x")
            raise AdapterError(f"{path}: {family} (it has {name}); this model is {model}")


Pristine = dict[tuple[str, tuple], jax.Array]   # (network, parameter path) -> un-merged value


def merge_loras(params: Mapping[str, nnx.State], pristine: Pristine,
                loras: Iterable[tuple[Lora, float]],
                place: Callable[[jax.Array], jax.Array]) -> tuple[dict[str, nnx.State], Pristine]:
    """(``params`` with every parameter a LoRA touches = its un-merged value + the sum of
    ``scale * delta``, cast to its dtype and placed; ``pristine`` with the newly touched
    parameters' un-merged values added). Nothing is changed in place."""
    flat = {net: dict(nnx.to_flat_state(state)) for net, state in params.items()}
    paths = {net: {".".join(map(str, p)): p for p in flat[net]} for net in flat}
    deltas: dict[tuple[str, tuple], np.ndarray] = {}
    for lora, scale in loras:
        for layer in lora.layers:
            k = (layer.network, paths[layer.network][layer.path])
            d = layer.delta() * np.float32(scale)
            deltas[k] = deltas[k] + d if k in deltas else d
    pristine = dict(pristine)
    for (net, path), d in deltas.items():
        base = pristine.setdefault((net, path), flat[net][path].get_value())
        merged = (base.astype(jnp.float32) + d).astype(base.dtype)
        flat[net][path] = flat[net][path].replace(place(merged))
    return {net: nnx.from_flat_state(list(f.items())) for net, f in flat.items()}, pristine


def restore_pristine(params: Mapping[str, nnx.State], pristine: Pristine) -> dict[str, nnx.State]:
    """``params`` with every parameter that ``pristine`` holds back at its un-merged value
    (what unloading a LoRA re-merges the others from)."""
    flat = {net: dict(nnx.to_flat_state(state)) for net, state in params.items()}
    for (net, path), value in pristine.items():
        flat[net][path] = flat[net][path].replace(value)
    return {net: nnx.from_flat_state(list(f.items())) for net, f in flat.items()}
