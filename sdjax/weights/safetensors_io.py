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


def _bad(path: str, what: str) -> WeightsError:
    return WeightsError(f"{path}: corrupt safetensors header ({what})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_header(path: str, header, data_size: int) -> tuple[dict, dict]:
    """(metadata, entries) of a parsed header, after checking every field the reader relies
    on: the types, a known dtype, a byte range of exactly shape x itemsize inside the data
    area, and no two tensors sharing bytes."""
    if not isinstance(header, dict):
        raise _bad(path, f"a JSON {type(header).__name__} instead of an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    ranges = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise _bad(path, f"tensor {name!r} is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
        if missing:
            raise _bad(path, f"tensor {name!r} has no {', '.join(missing)}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str):
            raise _bad(path, f"tensor {name!r}: dtype must be a string, got {dtype!r}")
        if dtype not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _bad(path, f"tensor {name!r}: shape must be a list of non-negative "
                             f"integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                _is_int(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise _bad(path, f"tensor {name!r}: data_offsets must be [begin, end] with "
                             f"0 <= begin <= end, got {offsets!r}")
        start, end = offsets
        expected = np.dtype(_DTYPES[dtype]).itemsize
        for d in shape:
            expected *= d
        if end - start != expected:
            raise WeightsError(f"{path}: tensor {name!r} has inconsistent offsets ({end - start} "
                               f"bytes for shape {shape} of {dtype}, which needs {expected})")
        if end > data_size:
            raise WeightsError(f"{path}: file is truncated or offsets are out of range (tensor "
                               f"{name!r} ends at byte {end} of a {data_size}-byte data area)")
        ranges.append((start, end, name))
    ranges.sort()
    reach, last = 0, None  # the furthest byte any earlier tensor covers, and which one
    for start, end, name in ranges:
        if start < reach and start < end:
            raise _bad(path, f"tensors {last!r} and {name!r} overlap")
        if end > reach:
            reach, last = end, name
    return metadata, header


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping from tensor name to a lazily memory-mapped numpy array.

    The whole header is validated when the file is opened, so a corrupt or hostile file fails
    here with one line naming it, never later inside numpy or a loader."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise WeightsError(f"{self.path}: corrupt or truncated safetensors header (its "
                                   f"length, {n} bytes, runs past the end of the file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        self._base = 8 + n
        self.metadata, self._entries = _check_header(self.path, header, size - self._base)

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
