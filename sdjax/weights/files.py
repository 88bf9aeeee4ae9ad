"""Finding and opening the weight files of one component folder (``unet/``, ``vae/``, …)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from sdjax.weights.errors import WeightsError
from sdjax.weights.safe_pickle import TorchCheckpoint
from sdjax.weights.safetensors_io import SafetensorsFile

_STEMS = ("diffusion_pytorch_model", "model")


class _Merged(Mapping[str, np.ndarray]):
    """Several shard files seen as one mapping (sharded checkpoints)."""

    def __init__(self, parts: list[Mapping[str, np.ndarray]]):
        self._where: dict[str, Mapping[str, np.ndarray]] = {}
        for part in parts:
            for key in part:
                if key in self._where:
                    raise WeightsError(f"tensor {key!r} appears in two shard files")
                self._where[key] = part

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def open_tensor_file(path: str | Path) -> Mapping[str, np.ndarray]:
    """One weights file, lazily: ``.safetensors``, or a PyTorch ``.ckpt``/``.pt``/``.bin``.
    The mapping also answers ``shape(name)`` without reading the tensor."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchCheckpoint(path)
    raise WeightsError(f"{path}: unknown weights file type (expected .safetensors, "
                       f"{', '.join(TORCH_SUFFIXES)})")


def open_component_weights(folder: Path, variant: str | None = None) -> Mapping[str, np.ndarray]:
    """The tensors of one component folder, lazily. Prefers safetensors over .bin, and the
    ``variant`` (e.g. ``fp16``) file when it exists."""
    if not folder.is_dir():
        raise WeightsError(f"missing component folder: {folder}")
    suffixes = ([f".{variant}"] if variant else []) + [""]
    for ext in (".safetensors", ".bin"):
        for stem in _STEMS:
            for suffix in suffixes:
                single = folder / f"{stem}{suffix}{ext}"
                index = folder / f"{stem}{ext}.index{suffix}.json"
                if not index.exists():
                    index = folder / f"{stem}{suffix}{ext}.index.json"
                if single.exists():
                    return open_tensor_file(single)
                if index.exists():
                    return _open_sharded(index, ext)
    # Files saved with variant only (e.g. just model.fp16.safetensors) when no variant was asked.
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return SafetensorsFile(found[0])
    raise WeightsError(f"no weights file in {folder} (looked for "
                       f"{' or '.join(s + '.safetensors' for s in _STEMS)})")


def _open_sharded(index: Path, ext: str) -> Mapping[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"{index}: unreadable shard index ({e})") from None
    files = sorted(set(weight_map.values()))
    # .bin files are read by our restricted unpickler: no torch needed, nothing in them runs.
    opener = SafetensorsFile if ext == ".safetensors" else TorchCheckpoint
    missing = [f for f in files if not (index.parent / f).exists()]
    if missing:
        raise WeightsError(f"{index.parent}: shard files missing: {', '.join(missing)}")
    return _Merged([opener(index.parent / f) for f in files])


def read_json(path: Path) -> dict:
    if not path.exists():
        raise WeightsError(f"missing {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data
