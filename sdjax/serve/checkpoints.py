"""The models a server offers (``--model``, ``--models_dir``), loaded when first used.

The WebUI names a model by its checkpoint "title"; ours is the name given on the command line
for ``toy`` and hub ids, and the folder name for local folders.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from sdjax.lora_tags import TagLoras
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.serve.controlnets import ControlNetLibrary
from sdjax.weights.resolve import TOY

Loader = Callable[[str], StableDiffusionPipeline]


def _title(source: str) -> str:
    path = Path(source).expanduser()
    return path.name if source != TOY and path.is_dir() else source


def discover(models: Iterable[str], models_dir: Path | None) -> dict[str, str]:
    """title -> source, in the order given: every ``--model``, then each diffusers folder
    directly inside ``models_dir``. Raises ValueError on a title given twice or a
    ``models_dir`` that is not a folder."""
    sources = list(models)
    if models_dir is not None:
        if not models_dir.is_dir():
            raise ValueError(f"--models_dir {models_dir} is not a folder")
        # Diffusers folders only: single-file checkpoints are listed here once the loader
        # reads them (resolve_model then accepts the same paths).
        sources += [str(p) for p in sorted(models_dir.iterdir())
                    if (p / "model_index.json").is_file()]
    titles: dict[str, str] = {}
    for source in sources:
        title = _title(source)
        if title in titles:
            raise ValueError(f"two models are both called {title!r}; rename one folder")
        titles[title] = source
    if not titles:
        raise ValueError("no model given: pass --model (or --models_dir with diffusers folders)")
    return titles


class ModelRegistry:
    """Titles, the current one (``sd_model_checkpoint``) and the pipelines loaded so far.
    Loaded pipelines stay loaded: switching back costs neither a load nor a compile."""

    def __init__(self, sources: dict[str, str], load: Loader, lora_dir: Path | None = None,
                 refiner: str | None = None, controlnets: dict[str, str] | None = None):
        self.sources = dict(sources)
        # --controlnet / --controlnet_dir: name -> source (sdjax.serve.controlnets)
        self.controlnets = ControlNetLibrary(controlnets or {})
        self.lora_dir = lora_dir  # where prompts' <lora:name:w> tags find their files
        self._load = load
        self._loaded: dict[str, StableDiffusionPipeline] = {}
        self._tag_loras: dict[str, TagLoras] = {}
        self._lock = threading.Lock()
        self.current = next(iter(self.sources))
        # The one refiner requests may name (refiner_checkpoint). As in the WebUI it is one
        # of the checkpoints too: listed, and loaded once for both uses.
        self.refiner: str | None = None
        if refiner is not None:
            title = _title(refiner)
            listed = self.sources.setdefault(title, refiner)  # --models_dir may hold it too
            if Path(listed).expanduser().resolve() != Path(refiner).expanduser().resolve():
                raise ValueError(f"two models are both called {title!r}; rename one folder")
            self.refiner = title

    def find_refiner(self, name: str | None) -> str | None:
        """The refiner a request's ``refiner_checkpoint`` names, or None when it names none
        (absent, empty or the WebUI's "None"); ValueError when it names another model."""
        if name is None or name.strip() in ("", "None", "none"):
            return None
        # The refiner first: a base model's folder may have the same name.
        if self.refiner is None or not self._names(self.refiner, name):
            offered = (f"this server's refiner is {self.refiner!r}" if self.refiner else
                       "this server has no refiner (python -m sdjax.serve --refiner MODEL)")
            raise ValueError(f"refiner_checkpoint {name!r} is not a refiner here: {offered}")
        return self.refiner

    def find(self, name: str | None) -> str | None:
        """The title a client means (a title, its file name, or the WebUI's ``title [hash]``
        form), or None when there is no such model."""
        if name is None or name == "":
            return self.current
        return next((title for title in self.sources if self._names(title, name)), None)

    def _names(self, title: str, name: str) -> bool:
        """Whether ``name`` (a title, a file name, ``title [hash]``) means ``title``."""
        source = self.sources[title]
        return name.split(" [")[0].strip() in (title, source, Path(source).name)

    def get(self, title: str) -> StableDiffusionPipeline:
        with self._lock:  # one load at a time; a second request for it waits for the first
            if title not in self._loaded:
                self._loaded[title] = self._load(self.sources[title])
            return self._loaded[title]

    def tag_loras(self, title: str) -> TagLoras:
        """The LoRA state of model ``title`` across calls: the LoRAs it was loaded with, and
        those its prompts' tags merge (made when first asked, after the load)."""
        pipe = self.get(title)
        with self._lock:
            if title not in self._tag_loras:
                self._tag_loras[title] = TagLoras(pipe, self.lora_dir)
            found = self._tag_loras[title]
            found.lora_dir = self.lora_dir  # the folder tags are found in now
            return found

    def select(self, title: str) -> None:
        """Make ``title`` the default model, loading it now so errors reach the caller."""
        self.get(title)
        self.current = title

    def listing(self) -> list[dict]:
        """``GET /sdapi/v1/sd-models``: the WebUI's SDModelItem shape."""
        return [{"title": title, "model_name": title, "hash": None, "sha256": None,
                 # its name only: the server's own paths are not the client's business
                 "filename": TOY if source == TOY else Path(source).expanduser().name,
                 "config": None}
                for title, source in self.sources.items()]
