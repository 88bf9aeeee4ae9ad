"""What a single file written by sdjax carries besides its tensors, so that it loads back as
the model it was made from with no flags: its networks' configs, its scheduler config, its
``sdjax.json`` sampling defaults and (when small: a model's own, as the toy's) its tokenizer
files, as one JSON string under the safetensors metadata key :data:`KEY`. Other tools ignore
it; the WebUI and diffusers read the tensors as they always did.

SDXL files carry the same, plus their second text encoder's config and tokenizer and the
pipeline's options (``sdxl``: ``force_zeros_for_empty_prompt``,
``requires_aesthetics_score``). A refiner's one encoder (a folder's ``text_encoder_2``) is
written as the pipeline holds it, under ``text_encoder``.
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


def _tokenizer_files(tokenizer_dir: Path | None) -> dict[str, str] | None:
    """A tokenizer folder's files, when small enough to carry (None: the bundled CLIP's)."""
    if tokenizer_dir is None:
        return None
    found = [f for f in sorted(Path(tokenizer_dir).iterdir()) if f.is_file()]
    if sum(f.stat().st_size for f in found) > MAX_TOKENIZER_BYTES:
        return None
    return {f.name: f.read_text(encoding="utf-8") for f in found}


def metadata(*, unet, vae, text_encoder, tokenizer, tokenizer_dir: Path | None,
             scheduler_config: Mapping[str, Any], defaults: Mapping[str, Any],
             text_encoder_2=None, tokenizer_2=None, tokenizer_2_dir: Path | None = None,
             sdxl: Mapping[str, bool] | None = None) -> dict[str, str]:
    """The safetensors metadata entry that describes the model of a single file. ``sdxl``:
    an SDXL pipeline's options (and ``text_encoder_2``/``tokenizer_2`` a base's second
    encoder)."""
    from sdjax.weights.export import network_config, text_encoder_token_ids
    data = {"format": 1,
            "configs": {"unet": network_config(unet), "vae": network_config(vae),
                        "text_encoder": network_config(text_encoder,
                                                       text_encoder_token_ids(tokenizer))},
            "scheduler_config": dict(scheduler_config), "defaults": dict(defaults),
            "tokenizer_files": _tokenizer_files(tokenizer_dir),
            "pad_token": str(tokenizer.pad_token)}
    if sdxl is not None:
        data["sdxl"] = {k: bool(v) for k, v in sdxl.items()}
        if text_encoder_2 is not None:
            data["configs"]["text_encoder_2"] = network_config(
                text_encoder_2, text_encoder_token_ids(tokenizer_2))
            data["sdxl"].update(tokenizer_2_files=_tokenizer_files(tokenizer_2_dir),
                                pad_token_2=str(tokenizer_2.pad_token))
    return {KEY: json.dumps(data, separators=(",", ":"))}


def read(tensors) -> dict | None:
    """The file's sdjax entry (None: the file was not written by sdjax)."""
    raw = (getattr(tensors, "metadata", None) or {}).get(KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or set(NETWORK_NAMES) - set(data["configs"]):
            raise ValueError("not the expected object")
        if not isinstance(data.get("sdxl", {}), dict):
            raise ValueError("its sdxl options are not an object")
    except (ValueError, KeyError, TypeError) as e:
        path = getattr(tensors, "path", "the file")
        raise WeightsError(f"{path}: its {KEY!r} metadata is unreadable ({e}); pass --config "
                           "to say which model it is") from None
    return data


def configs(data: dict) -> dict[str, Any]:
    """The networks' frozen configs (an SDXL base's second encoder's too)."""
    from sdjax.weights.diffusers_folder import NETWORKS
    names = NETWORK_NAMES + (("text_encoder_2",) if "text_encoder_2" in data["configs"] else ())
    return {c: NETWORKS[c].config.from_dict(data["configs"][c]) for c in names}


def tokenizer(data: dict, second: bool = False):
    """(the tokenizer, its folder): the file's own files, written once to a folder named by
    their hash (so the model can be saved as a folder again), else the bundled CLIP.
    ``second``: an SDXL base's second tokenizer (OpenCLIP's, padded with ``!``)."""
    from sdjax.weights.clip_bpe import bundled_clip_tokenizer
    from sdjax.weights.diffusers_folder import load_tokenizer
    if second:
        options = data.get("sdxl") or {}
        files, pad = options.get("tokenizer_2_files"), options.get("pad_token_2") or "!"
    else:
        files, pad = data.get("tokenizer_files"), data.get("pad_token") or "<|endoftext|>"
    if not files:
        return bundled_clip_tokenizer(pad), None
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
