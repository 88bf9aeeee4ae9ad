"""Where a dataset lives: a local folder, or a ``gs://``/``s3://``/… URL through fsspec.

Files only ever appear complete. Locally they are written under a hidden temporary name and
renamed; object stores make an upload visible only once it has finished, so there the file is
built in a local temporary folder and uploaded under its final name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
    return bool(_URL.match(path)) and not path.startswith("file://")


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise OSError(f"{url}: remote paths need fsspec (pip install fsspec gcsfs s3fs)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # fsspec's "install gcsfs to access gs://"
        raise OSError(f"{url}: {e}") from None


def open_input(path: str) -> BinaryIO:
    """Open a local file or URL for binary reading."""
    if is_url(path):
        fs, p = _filesystem(path)
        return fs.open(p, "rb")
    return open(path.removeprefix("file://"), "rb")


class Store:
    """A flat folder of files: list, read, write atomically, delete."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") if is_url(location) else location
        self._tmpdir: str | None = None
        if is_url(location):
            self._fs, self._root = _filesystem(self.location)
        else:
            self._fs, self._root = None, Path(location.removeprefix("file://"))

    @property
    def is_local(self) -> bool:
        return self._fs is None

    def path(self, name: str) -> str:
        return f"{self.location}/{name}" if not self.is_local else str(self._root / name)

    def create(self) -> None:
        if self.is_local:
            self._root.mkdir(parents=True, exist_ok=True)
        else:
            self._fs.makedirs(self._root, exist_ok=True)  # a no-op on object stores

    def exists(self) -> bool:
        """Whether the folder is there (an object store prefix exists once it holds files)."""
        return self._root.is_dir() if self.is_local else bool(self.names())

    def remove_empty_folder(self) -> None:
        """Remove the local folder if it is empty (object stores have no empty folders)."""
        if self.is_local:
            try:
                self._root.rmdir()
            except OSError:
                pass

    def names(self) -> set[str]:
        """File names in the folder (empty if it does not exist yet)."""
        if self.is_local:
            return {p.name for p in self._root.iterdir()} if self._root.is_dir() else set()
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1]
                    for p in self._fs.ls(self._root, detail=False, refresh=True)}
        except FileNotFoundError:
            return set()

    def read_text(self, name: str) -> str | None:
        try:
            if self.is_local:
                return (self._root / name).read_text(encoding="utf-8")
            return self._fs.cat_file(f"{self._root}/{name}").decode("utf-8")
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes (None when it does not exist)."""
        try:
            if self.is_local:
                return (self._root / name).read_bytes()
            return self._fs.cat_file(f"{self._root}/{name}")
        except FileNotFoundError:
            return None

    def staging_path(self, name: str) -> Path:
        """A local file to build ``name`` in before :meth:`commit` publishes it. Locally it is
        hidden beside its final name (``.NAME.partial``), so a rename publishes it and a killed
        run leaves something :meth:`partial_names` finds."""
        if self.is_local:
            return self._root / f".{name}.partial"
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="sdjax-generate-")
        return Path(self._tmpdir) / name

    def commit(self, staged: Path, name: str) -> None:
        if self.is_local:
            os.replace(staged, self._root / name)
        else:
            self._fs.put_file(str(staged), f"{self._root}/{name}")
            staged.unlink()

    def write_text(self, name: str, text: str) -> None:
        """Atomic small write; the staging name carries the pid so concurrent jobs writing
        the same file never share a temporary."""
        if self.is_local:
            tmp = self._root / f".{name}.{os.getpid()}.partial"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self._root / name)
        else:
            self._fs.pipe_file(f"{self._root}/{name}", text.encode("utf-8"))

    def remove(self, name: str) -> None:
        try:
            if self.is_local:
                (self._root / name).unlink()
            else:
                self._fs.rm_file(f"{self._root}/{name}")
        except FileNotFoundError:
            pass

    def partial_names(self) -> set[str]:
        """Hidden leftovers of interrupted local writes (``.NAME.partial``) -> NAME."""
        return {n[1:-len(".partial")] for n in self.names()
                if n.startswith(".") and n.endswith(".partial")}

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
