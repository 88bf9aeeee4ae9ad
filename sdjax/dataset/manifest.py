"""``run.json``: the settings a dataset's shards were made with.

A re-run compares its own settings with the manifest before touching anything: equal settings
mean the existing shards are exactly what this run would write, so they are kept and skipped;
any difference (model, seed, steps, prompts file contents, image format…) would mix two
datasets in one folder, so the run is refused unless ``--overwrite`` asks to start over.
Settings that change only speed (devices, batch size, job split) are not part of it.
"""

from __future__ import annotations

import json

from sdjax.dataset.shards import shard_file_index
from sdjax.dataset.storage import Store

MANIFEST = "run.json"
FORMAT = "sdjax.generate/1"


class ManifestError(ValueError):
    pass


def check(store: Store, settings: dict, *, overwrite: bool) -> None:
    """Raise :class:`ManifestError` when ``store`` holds shards made with other settings (or of
    unknown origin) and ``overwrite`` is off."""
    if overwrite:
        return
    has_shards = any(shard_file_index(n) is not None for n in store.names())
    if not has_shards:
        return  # a manifest alone (a run that failed before its first shard) is replaced
    text = store.read_text(MANIFEST)
    if text is None:
        raise ManifestError(f"{store.location} already holds shards but no {MANIFEST}; "
                            "pass --overwrite to replace them, or choose another --outdir")
    try:
        old = json.loads(text)["settings"]
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"{store.path(MANIFEST)} is not a readable sdjax.generate manifest; "
                            "pass --overwrite to start over") from None
    changed = [f"{k}: {_show(old.get(k))} -> {_show(v)}" for k, v in settings.items()
               if old.get(k) != v]
    changed += [f"{k}: {_show(v)} -> (not set)" for k, v in old.items() if k not in settings]
    if changed:
        raise ManifestError(f"{store.location} was made with other settings ({'; '.join(changed)})"
                            "; pass --overwrite to replace its shards, or choose another --outdir")


def write(store: Store, settings: dict, info: dict) -> None:
    """``settings`` are compared on re-runs; ``info`` (where the prompts file was, …) is not.
    Every job of a run writes the same bytes, so concurrent jobs cannot disagree."""
    # allow_nan=False: the manifest is read by other tools, and NaN is not JSON.
    store.write_text(MANIFEST, json.dumps({"format": FORMAT, "settings": settings, **info},
                                          indent=1, ensure_ascii=False, allow_nan=False) + "\n")


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
