"""The WebUI's ``<lora:name:multiplier>`` prompt tags: taken out of the prompt text, ``name``
found in a LoRA folder, and the pipeline's merged LoRAs kept in step with the tags of the
batch that runs.

LoRAs are merged into the shared weights, so one compiled call has one LoRA set: the CLIs
group prompts by their tags (:func:`group_by_tags`), the server's batcher separates them by
:func:`tag_key`. The multiplier defaults to 1; the WebUI's separate text-encoder/UNet
multipliers (``<lora:x:0.8:0.5>``) and other extra networks (``<hypernet:…>``) are not
supported: refused, and left as text.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from sdjax import validation

_TAG = re.compile(r"<lora:([^>]*)>")
EXTENSIONS = (".safetensors",)

LoraSet = tuple[tuple[str, float], ...]  # (name, multiplier) sorted by name: a grouping key


def split_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """(``prompt`` without its ``<lora:…>`` tags, {name: multiplier}); a name given twice
    keeps its last multiplier. A tag without a name or with a multiplier that is not a
    number raises ValueError."""
    tags: dict[str, float] = {}

    def take(m: re.Match) -> str:
        name, *rest = m.group(1).split(":")
        name = name.strip()
        if not name or len(rest) > 1:
            raise ValueError(f"{m.group(0)}: a LoRA tag is <lora:name> or "
                             "<lora:name:multiplier>")
        try:
            scale = float(rest[0]) if rest else 1.0
            tags[name] = validation.check_number(scale, f"{m.group(0)}: the multiplier")
        except ValueError:
            raise ValueError(f"{m.group(0)}: the multiplier must be a finite number") from None
        return ""

    return _TAG.sub(take, prompt), tags


def lora_line(name: str, scale: float) -> str:
    """What the CLIs print for a LoRA they merge, from ``--lora`` or a prompt's tag alike."""
    return f"LoRA {name} x{scale:g}"


def tag_key(tags: Mapping[str, float]) -> LoraSet:
    """A hashable, order-free form of a tag set, for grouping prompts into calls."""
    return tuple(sorted(tags.items()))


def group_by_tags(tag_sets: Iterable[Mapping[str, float]]) -> dict[LoraSet, list[int]]:
    """The indices of ``tag_sets`` grouped by tag set, groups and members in first-seen
    order: one compiled call has one LoRA set, so each group is its own call (or calls)."""
    groups: dict[LoraSet, list[int]] = {}
    for i, tags in enumerate(tag_sets):
        groups.setdefault(tag_key(tags), []).append(i)
    return groups


def find_lora(name: str, lora_dir: str | Path | None) -> Path:
    """The file of ``<lora:name>``: ``name.safetensors`` in ``lora_dir`` or a folder below it
    (the first in sorted order when several hold one)."""
    if lora_dir is None:
        raise ValueError(f"<lora:{name}> needs a LoRA folder (--lora_dir) to find it in")
    folder = Path(lora_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"LoRA folder not found: {folder}")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"<lora:{name}>: the name is a file name, not a path")
    for ext in EXTENSIONS:
        direct = folder / f"{name}{ext}"
        if direct.is_file():
            return direct
        found = sorted(p for p in folder.rglob(glob.escape(name) + ext) if p.is_file())
        if found:
            return found[0]
    raise ValueError(f"<lora:{name}>: no {name}.safetensors in {folder}")


class TagLoras:
    """A pipeline's LoRAs: the fixed ones (``--lora``) plus the tags of the batch in hand.
    :meth:`use` merges exactly that set (one re-merge when it changes, never a recompile).
    ``say``: told :func:`lora_line` of each tag's LoRA and multiplier the first time a
    batch uses it (the line ``--lora`` prints), once per run, not per batch."""

    def __init__(self, pipe, lora_dir: str | Path | None,
                 say: Callable[[str], None] | None = None):
        self.pipe, self.lora_dir, self._say = pipe, lora_dir, say
        self._fixed = dict(pipe.loras)  # what was loaded before tags came into play
        self._said: set[tuple[str, float]] = set()

    @property
    def fixed(self) -> dict[str, float]:
        """The LoRAs merged outside prompts ({resolved path: scale})."""
        return dict(self._fixed)

    def files(self, tags: Mapping[str, float]) -> dict[str, float]:
        """{resolved path: scale} for ``tags``; raises ValueError for a name not found."""
        return {str(find_lora(name, self.lora_dir).resolve()): scale
                for name, scale in tags.items()}

    def use(self, tags: Mapping[str, float]) -> None:
        """Merge the fixed LoRAs and those of ``tags``, nothing else. A LoRA that does not fit
        raises ValueError and leaves the merged set as it was."""
        self.pipe.set_loras({**self._fixed, **self.files(tags)})
        for pair in tags.items():
            if self._say is not None and pair not in self._said:
                self._said.add(pair)
                self._say(lora_line(*pair))
