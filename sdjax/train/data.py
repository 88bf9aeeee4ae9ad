"""Training data as a deterministic stream of (image, caption) samples.

Every source answers ``get(i)`` for a global sample index ``i`` (epochs included), computed
from ``(seed, i)`` alone. The position in the stream is therefore one integer: it is saved in
each checkpoint, and a resumed run reads exactly the samples the interrupted one would have.
"""

from __future__ import annotations

import contextlib
import glob
import io
import queue
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from sdjax.train import shapes
from sdjax.train.config import DataConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")


class Source(Protocol):
    def __len__(self) -> int: ...
    def get(self, index: int) -> tuple[np.ndarray, str]: ...


def _fit(img: Image.Image, size: int, rng: np.random.Generator, *, center: bool,
         flip: bool, control: Image.Image | None = None) -> np.ndarray:
    """Resize the short side to ``size``, crop a square (centre or random), maybe flip.
    ``control``: a control map of the image's size, fitted the same way and appended as
    three more channels."""
    images = [img.convert("RGB")] + ([control.convert("RGB")] if control is not None else [])
    w, h = images[0].size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        images = [im.resize((nw, nh), Image.Resampling.BICUBIC) for im in images]
    x0 = (nw - size) // 2 if center else int(rng.integers(nw - size + 1))
    y0 = (nh - size) // 2 if center else int(rng.integers(nh - size + 1))
    arr = np.concatenate([np.asarray(im.crop((x0, y0, x0 + size, y0 + size)), np.uint8)
                          for im in images], axis=-1)
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def _check_control_size(image: Image.Image, control: Image.Image, what: str) -> None:
    if control.size != image.size:
        raise ValueError(f"{what}: the control map is {control.size[0]}x{control.size[1]}, "
                         f"its image {image.size[0]}x{image.size[1]}; they must be the same "
                         "size")


# Centre jitter of the shapes with control maps: wider than the toy's own 10%, so that where
# the shape goes is the control map's to say, not the prompt's.
CONTROL_JITTER = 0.25


class ShapesSource:
    """The toy model's synthetic shapes; an endless stream. With ``cfg.control`` ("edges" |
    "mask"), each image carries its control map as three more channels and its shape is
    placed anywhere within CONTROL_JITTER of the centre."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.size, self.seed, self.control = cfg.resolution, seed, cfg.control
        if self.control is not None and self.control not in shapes.CONTROLS:
            raise ValueError(f"data.control must be one of {', '.join(shapes.CONTROLS)} for "
                             f"data.source 'shapes', got {self.control!r}")

    def __len__(self) -> int:
        return 2**62

    def get(self, index: int) -> tuple[np.ndarray, str]:
        if self.control is None:
            return shapes.sample(self.seed, index, self.size)
        return shapes.sample(self.seed, index, self.size, control=self.control,
                             jitter=CONTROL_JITTER)


class _Epochs:
    """Global index -> (epoch, item) through one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("the dataset is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def item(self, index: int) -> int:
        epoch = index // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[index % self.n])


def control_file(image: Path, tag: str) -> Path | None:
    """The control map stored beside ``image``: ``x.<tag>.<ext>`` for ``x.<ext>``."""
    stem = image.name[: -len(image.suffix)]
    candidates = (image.with_name(f"{stem}.{tag}{e}") for e in IMAGE_EXTS)
    return next((p for p in candidates if p.exists()), None)


class FolderSource:
    """Images under ``path`` (recursively), each with a same-named ``.txt`` caption (a
    missing caption is an empty one). With ``cfg.control``, each image ``x.png`` has its
    control map ``x.<control>.png`` beside it (checked for every image at start)."""

    def __init__(self, cfg: DataConfig, seed: int):
        root = Path(cfg.path or "")
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {cfg.path}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        self.controls: list[Path] | None = None
        if cfg.control is not None:
            tag = f".{cfg.control}"
            files = [p for p in files if not p.name[: -len(p.suffix)].endswith(tag)]
            self.controls = []
            for p in files:
                found = control_file(p, cfg.control)
                if found is None:
                    raise ValueError(f"{p}: no control map beside it (data.control "
                                     f"{cfg.control!r} expects {p.stem}{tag}{p.suffix})")
                with Image.open(p) as img, Image.open(found) as ctl:
                    _check_control_size(img, ctl, str(found))
                self.controls.append(found)
        self.files = files
        self.cfg, self.seed = cfg, seed
        self.order = _Epochs(len(self.files), seed)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int) -> tuple[np.ndarray, str]:
        item = self.order.item(index)
        path = self.files[item]
        cap = next((path.with_suffix(e) for e in CAPTION_EXTS
                    if path.with_suffix(e).exists()), None)
        text = cap.read_text(encoding="utf-8").strip() if cap else ""
        rng = np.random.default_rng([self.seed, index, 1])
        with contextlib.ExitStack() as stack:
            img = stack.enter_context(Image.open(path))
            control = None
            if self.controls is not None:  # its size checked at start
                control = stack.enter_context(Image.open(self.controls[item]))
            arr = _fit(img, self.cfg.resolution, rng, center=self.cfg.center_crop,
                       flip=self.cfg.random_flip, control=control)
        return arr, text


class WebDatasetSource:
    """webdataset-style ``.tar`` shards: members grouped by key (the name up to the first dot
    of the basename), an image member and a ``.txt``/``.caption`` member per sample.

    The shards are indexed once at start (member offsets), so any sample is one seek away;
    each epoch visits the shards in a seeded order and each shard's samples in a seeded
    order, which keeps reads local to one shard at a time."""

    def __init__(self, cfg: DataConfig, seed: int):
        path = cfg.path or ""
        shards = sorted(glob.glob(str(Path(path) / "*.tar"))) if Path(path).is_dir() \
            else sorted(glob.glob(path))
        if not shards:
            raise FileNotFoundError(f"no .tar shards at {path}")
        self.cfg, self.seed = cfg, seed
        self.shards = shards
        self.samples = [self._index(s) for s in shards]  # per shard: [(img, cap, ctl)]
        self.sizes = np.array([len(s) for s in self.samples])
        self.total = int(self.sizes.sum())
        if self.total == 0:
            raise ValueError(f"no image+caption samples in the shards at {path}")
        self._files: dict[int, io.BufferedReader] = {}

    def _index(self, shard: str) -> list[tuple]:
        """(image, caption or None, control map or None) member (offset, size) per sample.
        With data.control, each image member ``key.png`` needs ``key.<control>.png``."""
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                head, _, base = m.name.rpartition("/")
                key, dot, ext = base.partition(".")
                groups.setdefault(f"{head}/{key}", {})["." + ext.lower() if dot else ""] = m
        tag = self.cfg.control
        out = []
        for key in sorted(groups):
            g = groups[key]
            img = next((g[e] for e in IMAGE_EXTS if e in g), None)
            cap = next((g[e] for e in CAPTION_EXTS if e in g), None)
            if img is None:
                continue
            ctl = None
            if tag is not None:
                ctl = next((g[f".{tag}{e}"] for e in IMAGE_EXTS if f".{tag}{e}" in g), None)
                if ctl is None:
                    raise ValueError(f"{shard}: sample {key.lstrip('/')} has no control map "
                                     f"(data.control {tag!r} expects a member "
                                     f"{key.rpartition('/')[2]}.{tag}.png)")
            out.append(tuple(None if m is None else (m.offset_data, m.size)
                             for m in (img, cap, ctl)))
        return out

    def __len__(self) -> int:
        return self.total

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115
        f.seek(where[0])
        return f.read(where[1])

    def get(self, index: int) -> tuple[np.ndarray, str]:
        epoch, k = divmod(index, self.total)
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(self.shards))
        ends = np.cumsum(self.sizes[shard_order])
        pos = int(np.searchsorted(ends, k, side="right"))
        shard = int(shard_order[pos])
        within = k - (int(ends[pos - 1]) if pos else 0)
        item = int(np.random.default_rng([self.seed, epoch, shard]).permutation(
            int(self.sizes[shard]))[within])
        img_at, cap_at, ctl_at = self.samples[shard][item]
        text = self._read(shard, cap_at).decode("utf-8").strip() if cap_at else ""
        with contextlib.ExitStack() as stack:
            img = stack.enter_context(Image.open(io.BytesIO(self._read(shard, img_at))))
            control = None
            if ctl_at is not None:
                control = stack.enter_context(Image.open(io.BytesIO(self._read(shard, ctl_at))))
                _check_control_size(img, control, f"{self.shards[shard]} sample {item}")
            arr = _fit(img, self.cfg.resolution, np.random.default_rng([self.seed, index, 1]),
                       center=self.cfg.center_crop, flip=self.cfg.random_flip, control=control)
        return arr, text


def make_source(cfg: DataConfig, seed: int) -> Source:
    kinds = {"shapes": ShapesSource, "folder": FolderSource, "webdataset": WebDatasetSource}
    if cfg.source not in kinds:
        raise ValueError(f"data.source must be one of {', '.join(kinds)}, got {cfg.source!r}")
    return kinds[cfg.source](cfg, seed)


Batch = dict[str, np.ndarray]
Prepare = Callable[[np.ndarray, list[str], np.ndarray], Batch]


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the VAE's input range."""
    return images.astype(np.float32) / 127.5 - 1.0


def batches(source: Source, batch_size: int, start: int, prepare: Prepare,
            prefetch: int = 2) -> Iterator[tuple[int, Batch]]:
    """(position after the batch, batch) from sample ``start`` on, prepared ``prefetch``
    batches ahead on a host thread so the accelerator is not kept waiting."""

    def make(pos: int) -> Batch:
        idx = np.arange(pos, pos + batch_size)
        items = [source.get(int(i)) for i in idx]
        images = np.stack([im for im, _ in items])
        return prepare(images, [c for _, c in items], idx)

    if prefetch <= 0:
        pos = start
        while True:
            yield pos + batch_size, make(pos)
            pos += batch_size

    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work():
        pos = start
        while not stop.is_set():
            try:
                item = (pos + batch_size, make(pos))
            except Exception as e:  # handed to the consumer, which re-raises it
                item = e
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            pos += batch_size

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
