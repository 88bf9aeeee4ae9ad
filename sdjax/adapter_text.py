"""The LoRAs and embeddings an image used, in its PNG text as the WebUI writes them, so that
PNG Info (the WebUI's, ``/sdapi/v1/png-info``, ``sdjax.sample --from_png``) makes it again:

- every LoRA is a ``<lora:name:multiplier>`` tag in the prompt: a prompt's own tags stay as
  they are, and a LoRA merged outside the prompt (``--lora``, ``pipe.load_lora``) gets one
  appended, named by its file's stem as the WebUI names it;
- ``Lora hashes: "name: hash, ..."``, the WebUI's short hash of each LoRA file
  (:mod:`sdjax.weights.hashes`), names without ``:`` and ``,`` as it writes them;
- ``TI hashes: "name: hash, ..."``, for the embeddings the prompt or negative prompt uses.

A file that cannot be read any more (moved since it was loaded) is left out of the hashes,
as the WebUI leaves out one it has no hash for. No JAX at import time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from sdjax.lora_tags import find_lora, split_tags
from sdjax.weights.hashes import SHORT, file_hash, lora_hash


def _alias(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def _quoted(entries: list[str]) -> str:
    # The WebUI's quote(): a value with ':' or ',' is written as a JSON string.
    return json.dumps(", ".join(entries), ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """What a pipeline has beyond its checkpoint, as an image's text names it."""
    loras: tuple[tuple[str, float, str], ...] = ()  # merged outside prompts: (name, scale, file)
    embeddings: tuple[tuple[str, str], ...] = ()  # (token, file)
    lora_dir: str | None = None  # where the prompts' tags were found

    @classmethod
    def of(cls, pipe, lora_dir: str | Path | None = None,
           fixed: Mapping[str, float] | None = None) -> Adapters:
        """The adapters of ``pipe``: ``fixed`` ({file: scale}, default all its merged LoRAs)
        are the LoRAs merged outside prompts (``lora_tags.TagLoras.fixed``)."""
        store = pipe.store
        fixed = pipe.loras if fixed is None else fixed
        return cls(tuple((store.lora_name(path), scale, path) for path, scale in fixed.items()),
                   tuple(store.embedding_files.items()),
                   None if lora_dir is None else str(lora_dir))

    def prompt(self, prompt: str) -> str:
        """``prompt`` with a tag for each LoRA merged outside it (one it names already is
        not named twice)."""
        named = _tags(prompt)
        extra = [f"<lora:{name}:{scale:g}>" for name, scale, _ in self.loras
                 if name not in named and not set(name) & set(":<>")]
        if not extra:
            return prompt
        return " ".join(([prompt.rstrip()] if prompt.strip() else []) + extra)

    def parameters(self, prompt: str, negative_prompt: str = "") -> dict[str, str]:
        """``Lora hashes`` and ``TI hashes`` of an image whose prompt (as given, its tags in
        it) and negative prompt are these; none when it used none."""
        files: dict[str, str] = {}
        for name in _tags(prompt):
            try:
                files[name] = str(find_lora(name, self.lora_dir))
            except ValueError:
                continue  # not an image this text could describe; nothing to hash
        for name, _, path in self.loras:
            files.setdefault(name, path)
        fields = {}
        loras = _hashed(files, lora_hash)
        if loras:
            fields["Lora hashes"] = _quoted(loras)
        text = f"{prompt}\n{negative_prompt}"
        used = {token: path for token, path in self.embeddings if token in text}
        embeddings = _hashed(used, file_hash)
        if embeddings:
            fields["TI hashes"] = _quoted(embeddings)
        return fields


def _tags(prompt: str) -> dict[str, float]:
    try:
        return split_tags(prompt)[1]
    except ValueError:
        return {}


def _hashed(files: Mapping[str, str], hash_of) -> list[str]:
    out = []
    for name, path in files.items():
        try:
            out.append(f"{_alias(name)}: {hash_of(path)[:SHORT]}")
        except (OSError, ValueError):
            continue
    return out
