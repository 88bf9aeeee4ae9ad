"""Webdataset shards: ``00000.tar``, ``00001.tar``, … each holding ``samples_per_shard``
consecutive samples as ``KEY.png|jpg|webp``, ``KEY.txt`` and ``KEY.json``, plus a small
``00000_stats.json`` beside each shard (img2dataset's naming).

Everything in a tar is a function of the sample (fixed mtime, owner and order), so a shard made
twice, by any job on any number of devices, is the same bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdjax.dataset.storage import Store
from sdjax.images import encode_png

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_SHARD = re.compile(r"^(\d+)\.tar$")
_SHARD_FILE = re.compile(r"^(\d+)(\.tar|_stats\.json)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sample ``i = row * images_per_prompt + k``; shard ``s`` holds samples
    ``[s * samples_per_shard, (s + 1) * samples_per_shard)``."""
    num_rows: int
    images_per_prompt: int
    samples_per_shard: int

    @property
    def num_samples(self) -> int:
        return self.num_rows * self.images_per_prompt

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def samples_in(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def shard_of(self, sample: int) -> int:
        return sample // self.samples_per_shard

    def key(self, sample: int) -> str:
        # At least 9 digits (img2dataset's width) and never fewer than the largest index needs,
        # so keys sort as numbers do.
        return f"{sample:0{max(9, len(str(self.num_samples - 1)))}d}"

    def shard_name(self, shard: int) -> str:
        return f"{shard:0{max(5, len(str(self.num_shards - 1)))}d}.tar"

    def stats_name(self, shard: int) -> str:
        return self.shard_name(shard).replace(".tar", "_stats.json")


def shard_index(name: str) -> int | None:
    """``00042.tar`` -> 42; anything else -> None."""
    m = _SHARD.match(name)
    return int(m.group(1)) if m else None


def shard_file_index(name: str) -> int | None:
    """The shard a tar or its stats file belongs to, or None for other files."""
    m = _SHARD_FILE.match(name)
    return int(m.group(1)) if m else None


def encode_image(image: np.ndarray, fmt: str, quality: int | None,
                 png_parameters: str | None = None) -> bytes:
    """uint8 (H, W, 3) -> file bytes. PNGs carry A1111's ``parameters`` text like
    sdjax.sample's, so image viewers and A1111 tools read the settings."""
    if fmt == "png" and png_parameters is not None:
        return encode_png(image, png_parameters)
    buf = io.BytesIO()
    kw = {} if fmt == "png" else {"quality": quality}
    Image.fromarray(image).save(buf, format=IMAGE_FORMATS[fmt], **kw)
    return buf.getvalue()


class ShardWriter:
    """Builds one shard in a staging file; :meth:`commit` publishes it with its stats."""

    def __init__(self, store: Store, layout: Layout, shard: int, started: float | None = None):
        """``started``: perf_counter() time the shard's work began (default: now)."""
        self.store, self.layout, self.shard = store, layout, shard
        self.expected = layout.samples_in(shard)
        self.count = 0
        self.started = time.perf_counter() if started is None else started
        self._staged = store.staging_path(layout.shard_name(shard))
        self._tar = tarfile.open(self._staged, "w", format=tarfile.PAX_FORMAT)

    @property
    def full(self) -> bool:
        return self.count == len(self.expected)

    def add(self, sample: int, files: dict[str, bytes]) -> None:
        """``files``: extension -> bytes, in the order they go into the tar."""
        if sample != self.expected[self.count]:
            raise RuntimeError(f"shard {self.shard}: got sample {sample}, expected "
                               f"{self.expected[self.count]}")
        key = self.layout.key(sample)
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self, extra_stats: dict) -> dict:
        """Close the tar, write the stats file, then publish the tar. The tar is the mark of a
        complete shard, so it goes last: a crash in between leaves only a stats file, which
        the re-run rewrites."""
        self._tar.close()
        seconds = time.perf_counter() - self.started
        stats = {"shard": self.layout.shard_name(self.shard), "count": self.count,
                 "first_key": self.layout.key(self.expected.start),
                 "last_key": self.layout.key(self.expected.stop - 1),
                 "bytes": Path(self._staged).stat().st_size,
                 "sha256": hashlib.sha256(Path(self._staged).read_bytes()).hexdigest(),
                 "seconds": round(seconds, 3),
                 "images_per_second": round(self.count / max(seconds, 1e-9), 3),
                 "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 **extra_stats}
        self.store.write_text(self.layout.stats_name(self.shard),
                              json.dumps(stats, indent=1) + "\n")
        self.store.commit(self._staged, self.layout.shard_name(self.shard))
        return stats

    def abort(self) -> None:
        self._tar.close()
        Path(self._staged).unlink(missing_ok=True)
