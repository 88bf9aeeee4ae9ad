"""Writing trained adapters as the files other tools load: LoRA in diffusers/PEFT layout
(``pytorch_lora_weights.safetensors``, what ``load_lora_weights`` reads) and kohya layout
(``lora_unet_…`` with ``.alpha``, what the WebUI reads); textual-inversion vectors as
diffusers' ``learned_embeds.safetensors`` (``{token: vectors}``) and the WebUI's
``.safetensors`` (``emb_params``, named by the file's stem). The names come from
:mod:`sdjax.weights.lora`, the same resolution that reads them back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sdjax.weights.lora import Target, kohya_name
from sdjax.weights.safetensors_io import save_safetensors

PEFT_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"


def _torch_factors(target: Target, down: np.ndarray, up: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Our (in, rank) and (rank, out) factors -> PyTorch's down (rank, in) and up (out, rank),
    with 1x1 kernel dimensions for a convolution."""
    down_t, up_t = np.asarray(down, np.float32).T, np.asarray(up, np.float32).T
    if target.conv:
        down_t, up_t = down_t[:, :, None, None], up_t[:, :, None, None]
    return np.ascontiguousarray(down_t), np.ascontiguousarray(up_t)


def save_lora(folder: Path, targets: Sequence[Target], factors: Sequence[Mapping],
              *, rank: int, alpha: float, name: str) -> list[Path]:
    """Write ``factors`` (``{"down": (in, rank), "up": (rank, out)}`` per target, in our
    layout) as ``folder/pytorch_lora_weights.safetensors`` (PEFT names, LoraConfig in the
    metadata as diffusers' save_lora_weights writes it) and ``folder/<name>.safetensors``
    (kohya names). Returns the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    peft, kohya = {}, {}
    modules: dict[str, list[str]] = {}
    for target, f in zip(targets, factors, strict=True):
        down, up = _torch_factors(target, f["down"], f["up"])
        key = f"{target.network}.{target.module}"
        peft[f"{key}.lora_A.weight"], peft[f"{key}.lora_B.weight"] = down, up
        k = kohya_name(target.network, target.module)
        kohya[f"{k}.lora_down.weight"], kohya[f"{k}.lora_up.weight"] = down, up
        kohya[f"{k}.alpha"] = np.array(alpha, np.float32)
        # PEFT's target_modules for transformers' CLIPTextModel have no text_model. level
        modules.setdefault(target.network, []).append(target.module.removeprefix("text_model."))
    config = {}
    for net, names in modules.items():
        config |= {f"{net}.r": rank, f"{net}.lora_alpha": alpha, f"{net}.target_modules": names}
    paths = [folder / PEFT_FILE, folder / f"{name}.safetensors"]
    save_safetensors(peft, paths[0], {"format": "pt",
                                      "lora_adapter_metadata": json.dumps(config)})
    save_safetensors(kohya, paths[1], {"format": "pt", "ss_network_dim": str(rank),
                                       "ss_network_alpha": str(alpha)})
    return paths


def webui_stem(token: str) -> str:
    """A file stem for ``token`` that Windows accepts too (the WebUI names an embedding by
    its file): ``<magenta>`` -> ``magenta``."""
    return re.sub(r'[<>:"/\\|?*]', "", token) or "embedding"


def save_embedding(folder: Path, token: str, vectors: np.ndarray) -> list[Path]:
    """Write the ``(n, width)`` ``vectors`` of ``token`` as ``folder/learned_embeds.safetensors``
    (diffusers) and ``folder/<token without <>…>.safetensors`` (the WebUI). Returns both."""
    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(np.asarray(vectors, np.float32))
    paths = [folder / EMBEDDING_FILE, folder / f"{webui_stem(token)}.safetensors"]
    save_safetensors({token: vectors}, paths[0])
    save_safetensors({"emb_params": vectors}, paths[1])
    return paths
