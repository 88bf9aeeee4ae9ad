"""What a single file written by sdjax carries besides its tensors, so that it loads back as
the model it was made from with no flags: its networks' configs, its scheduler config, its
``sdjax.json`` sampling defaults and (when small: a model's own, as the toy's) its tokenizer
files, as one JSON string under the safetensors metadata key :data:`KEY`. Other tools ignore
it; the WebUI and diffusers read the tensors as they always did.

Stable Diffusion 1.x/2.x files only (SDXL files are written and read as before).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdjax.weights.errors import WeightsError

KEY = "sdjax"
NETWORK_NAMES = ("unet", "vae", "text_encoder")
MAX_TOKENIZER_BYTES = 256 << 10  # larger tokenizers are CLIP's own, which sdjax bundles


def metadata(*, unet, vae, text_encoder, tokenizer, tokenizer_dir: Path | None,
             scheduler_config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata entry that describes the model of a single file."""
    from sdjax.weights.export import network_config, text_encoder_token_ids
    files: dict[str, str] | None = None
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        found = [f for f in sorted(src.iterdir()) if f.is_file()]
        if sum(f.stat().st_size for f in found) <= MAX_TOKENIZER_BYTES:
            files = {f.name: f.read_text(encoding="utf-8") for f in found}
    data = {"format": 1,
            "configs": {"unet": network_config(unet), "vae": network_config(vae),
                        "text_encoder": network_config(text_encoder,
                                                       text_encoder_token_ids(tokenizer))},
            "scheduler_config": dict(scheduler_config), "defaults": dict(defaults),
            "tokenizer_files": files, "pad_token": str(tokenizer.pad_token)}
    return {KEY: json.dumps(data, separators=(",", ":"))}


def read(tensors) -> dict | None:
    """The file's sdjax entry (None: the file was not written by sdjax, or is SDXL)."""
    raw = (getattr(tensors, "metadata", None) or {}).get(KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or set(NETWORK_NAMES) - set(data["configs"]):
            raise ValueError("not the expected object")
    except (ValueError, KeyError, TypeError) as e:
        path = getattr(tensors, "path", "the file")
        raise WeightsError(f"{path}: its {KEY!r} metadata is unreadable ({e}); pass --config "
                           "to say which model it is") from None
    return data


def configs(data: dict) -> dict[str, Any]:
    """The networks' frozen configs."""
    from sdjax.weights.diffusers_folder import NETWORKS
    return {c: NETWORKS[c].config.from_dict(data["configs"][c]) for c in NETWORK_NAMES}


def tokenizer(data: dict):
    """(the tokenizer, its folder): the file's own files, written once to a folder named by
    their hash (so the model can be saved as a folder again), else the bundled CLIP."""
    from sdjax.weights.clip_bpe import bundled_clip_tokenizer
    from sdjax.weights.diffusers_folder import load_tokenizer
    files = data.get("tokenizer_files")
    if not files:
        return bundled_clip_tokenizer(data.get("pad_token") or "<|endoftext|>"), None
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / "sdjax-file-tokenizers" / digest
    folder = root / "tokenizer"
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_made(root.parent)))
        (staging / "tokenizer").mkdir()
        for name, text in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise WeightsError(f"the file's tokenizer file name {name!r} is not a plain name")
            (staging / "tokenizer" / name).write_text(text, encoding="utf-8")
        try:
            staging.rename(root)
        except OSError:  # another process wrote it first
            pass
    return load_tokenizer(root, "tokenizer"), folder


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def defaults(path: Path) -> dict[str, Any]:
    """The ``sdjax.json`` defaults a single file carries ({} without them)."""
    from sdjax import model_defaults
    if path.suffix != ".safetensors":
        return {}
    from sdjax.weights.safetensors_io import SafetensorsFile
    data = read(SafetensorsFile(path))
    if not data:
        return {}
    try:
        return {k: model_defaults.check_value(k, v) for k, v in data["defaults"].items()}
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: its sdjax.json defaults: {e}") from None
