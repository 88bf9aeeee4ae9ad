"""Memory-mapped safetensors reading (and writing) with plain numpy.

We parse the header ourselves instead of going through ``safetensors.safe_open`` because its
numpy backend cannot hand out bfloat16 tensors, and because a lazy per-tensor ``np.memmap`` is
what keeps peak host memory near the final model size while loading: each tensor is read,
cast and moved to the device one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from sdjax.weights.errors import WeightsError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping from tensor name to a lazily memory-mapped numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise WeightsError(f"{self.path}: corrupt or truncated safetensors header")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries = header
        for name, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                   f"{e.get('dtype')!r}")
            start, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(
                _DTYPES[e["dtype"]]).itemsize
            if end - start != expected:
                raise WeightsError(f"{self.path}: tensor {name!r} has inconsistent offsets")
            if self._base + end > size:
                raise WeightsError(f"{self.path}: file is truncated (tensor {name!r} runs past "
                                   f"the end; {size} bytes on disk)")

    def __getitem__(self, name: str) -> np.ndarray:
        e = self._entries[name]
        start, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        shape = tuple(e["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._base + start,
                         shape=shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (a temporary name, then rename)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise ValueError(f"cannot write dtype {a.dtype} for {name}")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
