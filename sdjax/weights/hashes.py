"""The WebUI's hashes of adapter files, as its PNG text names them (``Lora hashes``,
``TI hashes``): read once per file version (path, size, modification time) and kept.

- A LoRA ``.safetensors``: the hash its metadata states (``sshs_model_hash``, which trainers
  write), else kohya's "addnet" hash, the sha256 of the bytes after the header, so that
  editing the metadata does not change it (the WebUI's ``hashes.addnet_hash_safetensors``).
- An embedding: the sha256 of the whole file.
- A model's old-style short hash (``name [hash]`` titles, e.g. the ControlNet extension's):
  the sha256 of 64 KiB at 1 MiB, 8 hex digits.

The short form of the others is the first 12 hex digits, as the WebUI's ``shorthash``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from pathlib import Path

SHORT = 12  # hex digits of the WebUI's shorthash
_BLOCK = 1 << 20


def _digest(path: str, start: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _lora_hash(path: str, size: int, mtime_ns: int) -> str:
    from sdjax.weights.safetensors_io import SafetensorsFile
    stated = SafetensorsFile(path).metadata.get("sshs_model_hash")  # checks the header too
    if isinstance(stated, str) and stated.strip():
        return stated.strip().lower()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return _digest(path, 8 + n)


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    return _digest(path, 0)


def _version(path: str | Path) -> tuple[str, int, int]:
    resolved = str(Path(path).expanduser().resolve())
    st = os.stat(resolved)
    return resolved, st.st_size, st.st_mtime_ns


def lora_hash(path: str | Path) -> str:
    """The WebUI's hash of a LoRA ``.safetensors`` file (full sha256 hex)."""
    return _lora_hash(*_version(path))


def file_hash(path: str | Path) -> str:
    """The sha256 (hex) of a whole file: the WebUI's hash of an embedding."""
    return _file_hash(*_version(path))


def model_hash(source: str | Path) -> str:
    """The WebUI's old short model hash (sha256 of 64 KiB at 1 MiB, 8 hex digits) of a weights
    file, or of a folder's first weights file ("00000000" when it has none)."""
    from sdjax.weights.files import TORCH_SUFFIXES
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.iterdir()
                       if f.suffix.lower() in (".safetensors", *TORCH_SUFFIXES))
        if not files:
            return "00000000"
        path = files[0]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]
