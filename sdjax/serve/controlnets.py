"""The server's ControlNets (``--controlnet PATH``, ``--controlnet_dir DIR``): their names and
the WebUI extension's ``name [hash]`` titles, each read once per model that uses it, and
attached to a pipeline per call.

Which ControlNets a pipeline has, in which order, is part of its compiled program, so a call
attaches exactly the ones its requests name (``sdjax.controlnet.attach.set_entries``); the
programs compiled for each set are kept, so switching back and forth never recompiles.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from sdjax.controlnet import attach
from sdjax.weights.errors import WeightsError
from sdjax.weights.files import TORCH_SUFFIXES
from sdjax.weights.hashes import model_hash
from sdjax.weights.resolve import TOY_CONTROLNETS, toy_controlnet_path

_WEIGHTS = (".safetensors", *TORCH_SUFFIXES)


def discover(paths: Iterable[str | Path], folder: str | Path | None) -> dict[str, str]:
    """name -> source: each ``--controlnet`` (named by its file's or folder's stem; the toy's
    by their names, e.g. "toy-edges"), then
    every file with weights or folder inside ``--controlnet_dir``. ValueError: a path that
    is not there, or two ControlNets of one name."""
    found: dict[str, str] = {}

    def add(path: Path) -> None:
        name = path.stem if path.is_file() else path.name
        if name in found and Path(found[name]).resolve() != path.resolve():
            raise ValueError(f"two ControlNets are both called {name!r}; rename one")
        found[name] = str(path)

    for p in paths:
        path = _toy(str(p)) if str(p) in TOY_CONTROLNETS else Path(p).expanduser()
        if not path.exists():
            raise ValueError(f"--controlnet not found: {p}")
        add(path)
    if folder is not None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ValueError(f"--controlnet_dir folder not found: {folder}")
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_dir() or path.suffix.lower() in _WEIGHTS:
                add(path)
    return found


def _toy(name: str) -> Path:
    try:
        return toy_controlnet_path(name)
    except WeightsError as e:
        raise ValueError(str(e)) from None


class ControlNetLibrary:
    """The ControlNets a server offers, by name."""

    def __init__(self, sources: dict[str, str]):
        self.sources = dict(sources)
        self._hashes: dict[str, str] = {}
        self._entries: dict[tuple[int, str], tuple] = {}   # (pipeline, name) -> its entry
        self._programs: dict[tuple[int, tuple[str, ...]], dict] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.sources)

    def title(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = model_hash(self.sources[name])
        return f"{name} [{self._hashes[name]}]"

    def titles(self) -> list[str]:
        return [self.title(name) for name in self.sources]

    def find(self, model: str) -> str | None:
        """The name a unit's ``model`` means (a name, or the extension's ``name [hash]``)."""
        name = str(model).split(" [")[0].strip()
        return name if name in self.sources else None

    def entry(self, pipe, name: str) -> tuple:
        """``name`` read for ``pipe`` (once); ValueError/WeightsError when it does not fit."""
        key = (id(pipe), name)
        with self._lock:
            if key not in self._entries:
                self._entries[key] = attach.load_entry(pipe, self.sources[name])
            return self._entries[key]

    def use(self, pipe, names: tuple[str, ...]) -> None:
        """Attach exactly ``names`` to ``pipe`` (the worker thread, between calls)."""
        current = tuple(pipe.controlnets)
        wanted = tuple(self.sources[n] for n in names)
        if current == wanted:
            return
        entries = [self.entry(pipe, n) for n in names]
        self._programs[(id(pipe), current)] = pipe._compiled
        attach.set_entries(pipe, entries, self._programs.get((id(pipe), wanted), {}))
