"""Turning what a user passes as ``model`` into a local diffusers folder."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from sdjax.weights.errors import WeightsError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

TOY = "toy"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the pipeline reads: configs, tokenizer, and safetensors weights (with .bin as a
# fallback for old repos); never the duplicate full-precision .ckpt files some repos carry.
_ALLOW = ["model_index.json", "scheduler/*.json", "low_res_scheduler/*.json", "tokenizer/*",
          "*/config.json",
          "unet/*.safetensors*", "vae/*.safetensors*", "text_encoder/*.safetensors*",
          "tokenizer_2/*", "text_encoder_2/*.safetensors*"]  # SDXL's second encoder


# The ControlNets bundled for the toy model (sdjax/assets/<name>), passed by name.
TOY_CONTROLNETS = ("toy-edges",)


def toy_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "toy"


def toy_controlnet_path(name: str) -> Path:
    """The folder of the bundled toy ControlNet ``name`` (one of TOY_CONTROLNETS)."""
    path = toy_path().with_name(name)
    if not (path / "config.json").exists():
        raise WeightsError(f"the bundled toy ControlNet {name!r} is missing from this install "
                           f"({path})")
    return path


def resolve_model(model: str) -> Path:
    """``"toy"`` | a local diffusers folder | a single checkpoint file | a hub id (downloaded
    when online) -> a local folder or file."""
    if model == TOY:
        path = toy_path()
        if not (path / "model_index.json").exists():
            raise WeightsError(f"the bundled toy model is missing from this install ({path})")
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise WeightsError(f"{model}: not a model (expected a diffusers folder or a "
                               f"{', '.join(SINGLE_FILE_SUFFIXES)} checkpoint)")
        return path
    if is_hub_id(model):
        return _download(model)
    raise WeightsError(f"model not found: {model} (expected 'toy', a diffusers folder, a "
                       ".safetensors/.ckpt file or a hub id such as "
                       "stable-diffusion-v1-5/stable-diffusion-v1-5)")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face Hub repository id (``owner/name``)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/"))


def _download(repo_id: str) -> Path:
    return snapshot(repo_id, tuple(_ALLOW), "a local diffusers folder with --model PATH, or "
                    "use the bundled 'toy' model")


# Once per process, repository and file patterns: online, every snapshot_download asks the hub
# for the repository's files, and a CLI resolves its --model more than once (which pipeline,
# then loading). A failure is not cached, so it is asked again.
@functools.cache
def snapshot(repo_id: str, patterns: tuple[str, ...], instead: str) -> Path:
    """The local copy of hub repository ``repo_id``'s files matching ``patterns``; a
    WeightsError in one line otherwise, whose advice for no connection is to pass
    ``instead``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError("huggingface_hub is needed to download hub models") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as e:  # hub errors span requests/httpx/hub classes; one message for all
        name = type(e).__name__
        # LocalEntryNotFoundError is the hub's "offline and not cached", not "no such repo".
        if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise WeightsError(f"{repo_id}: not found on the Hugging Face Hub or not "
                               f"accessible ({name})") from None
        raise WeightsError(f"cannot download {repo_id}: no connection to the Hugging Face Hub "
                           f"({name}). Pass {instead}.") from None
