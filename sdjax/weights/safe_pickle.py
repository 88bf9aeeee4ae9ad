"""Reading PyTorch checkpoints (``.ckpt``, ``.pt``, ``.bin``) without torch and without running
anything the file contains.

A checkpoint written by ``torch.save`` is a zip archive: ``<name>/data.pkl`` is a pickle of
the object (usually a dict of tensors, often under ``"state_dict"``), and each tensor's bytes
are a separate, uncompressed member ``<name>/data/<key>``. A pickle is a small program: its
GLOBAL opcodes import any callable and its REDUCE opcodes call it, which is how a hostile
``.ckpt`` runs ``os.system``. Our unpickler resolves GLOBAL itself from a short table of the
names a checkpoint of tensors needs (tensor rebuilding, storage types, ``OrderedDict``), each
mapped to our own harmless stand-in, and refuses every other name before anything is called.
Tensors come back lazily: the bytes stay on disk until a tensor is read, then are
memory-mapped, so reading a 4 GB checkpoint does not hold 4 GB in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sdjax.weights.errors import WeightsError

# The storage types torch pickles by name, and the numpy dtype of their elements. Floats are
# what checkpoints hold; the integer/bool ones appear as buffers (position_ids, num_updates).
_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# pickle protocol 0-1 files of the pre-1.6 format start with this magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    """One ``data/<key>`` member: where its bytes start in the archive file."""
    path: str
    member: str
    offset: int          # of the first byte in the file (members are stored, not compressed)
    nbytes: int
    dtype: np.dtype

    def array(self) -> np.ndarray:
        count = self.nbytes // self.dtype.itemsize
        if count == 0:
            return np.zeros((0,), self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                         shape=(count,))


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of a checkpoint, described but not read: shape and dtype are known at once."""
    storage: _Storage
    offset: int                      # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    def numpy(self) -> np.ndarray:
        """A read-only view of the bytes on disk (memory-mapped, read on first touch)."""
        base = self.storage.array()
        if not self.shape:
            return base[self.offset:self.offset + 1].reshape(())
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride,
                                                                  strict=True))
        if self.offset < 0 or min(self.stride) < 0 or extent >= base.size:
            raise WeightsError(f"{self.storage.path}: tensor data {self.storage.member} is "
                               f"shorter than its shape {self.shape} needs")
        item = self.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape, strides=[s * item for s in self.stride],
            writeable=False)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> LazyTensor:
    """Stands in for ``torch._utils._rebuild_tensor(_v2)``; the extra arguments
    (requires_grad, backward hooks, metadata) mean nothing to numpy."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_ignored):
    """``torch.nn.Parameter`` wraps a tensor; we keep the tensor."""
    return data


class _Inert:
    """What a harmless bookkeeping object of a training run (a Lightning callback's state)
    becomes: it accepts whatever the pickle hands it and keeps none of it."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


_ALLOWED: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    # Full (not pruned) CompVis checkpoints carry Lightning's checkpoint callback state.
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": _Inert,
    **{f"torch.{name}": _StorageType(np.dtype(dt)) for name, dt in _STORAGES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storages: dict[str, tuple[str, int, int]]):
        super().__init__(file)
        self._path, self._storages = path, storages
        self._built: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise WeightsError(
                f"{self._path}: refused: its pickle asks for {module}.{name}, which a "
                "checkpoint of tensors never needs (nothing from the file was run); if you "
                "trust the file, convert it to .safetensors with the tool that made it")
        return found

    def persistent_load(self, pid):
        # torch.save writes ('storage', storage type, key, location, element count).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        kind, key = pid[1], pid[2]
        if key not in self._storages:
            raise WeightsError(f"{self._path}: tensor data {key} is missing from the archive")
        if key not in self._built:
            member, offset, nbytes = self._storages[key]
            self._built[key] = _Storage(self._path, member, offset, nbytes, kind.dtype)
        elif self._built[key].dtype != kind.dtype:
            raise WeightsError(f"{self._path}: tensor data {key} is read as two dtypes")
        return self._built[key]


def _member_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose name/extra lengths
    may differ from the central directory's."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise WeightsError(f"corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` archive holds, with tensors as :class:`LazyTensor`."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
            legacy = False
            if head[:1] == b"\x80":
                f.seek(0)
                try:  # the restricted unpickler: even this first pickle is untrusted
                    legacy = _Unpickler(f, path, {}).load() == _LEGACY_MAGIC
                except WeightsError:
                    raise
                except Exception:  # noqa: BLE001 - anything unreadable is "not a checkpoint"
                    legacy = False
        if legacy:
            raise WeightsError(f"{path}: a PyTorch checkpoint in the pre-1.6 format, which sdjax "
                               "does not read; re-save it with a current torch or convert it to "
                               ".safetensors")
        raise WeightsError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            pkls = [i for i in infos if i.filename.endswith("data.pkl")
                    and i.filename.count("/") == 1]
            if len(pkls) != 1:
                raise WeightsError(f"{path}: a zip archive that is not a PyTorch checkpoint "
                                   "(no <name>/data.pkl)")
            prefix = pkls[0].filename[:-len("data.pkl")]
            order = prefix + "byteorder"
            if order in z.namelist() and z.read(order).strip() not in (b"little", b""):
                raise WeightsError(f"{path}: a big-endian PyTorch checkpoint is not supported")
            storages = {}
            with open(path, "rb") as f:
                for info in infos:
                    if info.filename.startswith(prefix + "data/") and not info.is_dir():
                        if info.compress_type != zipfile.ZIP_STORED:
                            raise WeightsError(f"{path}: tensor data {info.filename} is "
                                               "compressed; torch never writes that")
                        key = info.filename[len(prefix + "data/"):]
                        storages[key] = (info.filename, _member_offset(f, info), info.file_size)
            with z.open(pkls[0]) as pf:
                return _Unpickler(pf, path, storages).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, struct.error, RecursionError) as e:
        raise WeightsError(f"{path}: corrupt PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e)[:120]})") from None


def _flatten(tree: dict, prefix: str = "") -> dict[str, LazyTensor]:
    """The tensors of nested dicts under dotted names (an A1111 embedding keeps its vectors
    in ``string_to_param: {"*": tensor}``)."""
    out: dict[str, LazyTensor] = {}
    for key, value in tree.items():
        if isinstance(value, LazyTensor):
            out[prefix + str(key)] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


class TorchCheckpoint(Mapping[str, np.ndarray]):
    """The tensors of a ``torch.save`` file as a read-only mapping, like
    :class:`~sdjax.weights.safetensors_io.SafetensorsFile`: names and shapes at once, data
    memory-mapped on access. A top-level ``"state_dict"`` (Lightning checkpoints) is opened;
    non-tensor entries beside it (``global_step``, …) are kept in :attr:`extras`; tensors in
    nested dicts are named with dots."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        obj = load(self.path)
        if not isinstance(obj, dict):
            raise WeightsError(f"{self.path}: holds a {type(obj).__name__}, not a dict of "
                               "tensors")
        self.extras = {k: v for k, v in obj.items() if not isinstance(v, (LazyTensor, dict))}
        inner = obj.get("state_dict")
        self._tensors = _flatten(inner if isinstance(inner, dict) else obj)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name].numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
