"""Whether a shard on disk is the one its stats file describes, so that a re-run skips only
shards that read back, and ``stats.json`` never counts samples that cannot be read.

A shard is good when its stats file is there and readable, the tar's size is the stats'
``bytes``, its SHA-256 the stats' ``sha256`` (shards written since this check existed; older
ones skip this) and a full read of the tar finds every member of every sample the layout puts
in it, each of its stated size. A truncated copy, a full disk or a flipped byte each fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from sdjax.dataset.shards import Layout
from sdjax.dataset.storage import Store


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_problem(store: Store, layout: Layout, shard: int) -> str | None:
    """Why shard ``shard`` is not complete and readable (one phrase), or None when it is."""
    name, stats_name = layout.shard_name(shard), layout.stats_name(shard)
    try:
        stats = json.loads(store.read_text(stats_name) or "null")
    except ValueError:
        stats = None
    if not isinstance(stats, dict):
        return f"its {stats_name} is missing or unreadable"
    try:
        data = store.read_bytes(name)
    except OSError as e:
        return f"it cannot be read ({e})"
    if data is None:
        return "it is missing"
    if stats.get("bytes") != len(data):
        return f"it is {len(data)} bytes, its stats say {stats.get('bytes')}"
    if "sha256" in stats and stats["sha256"] != sha256(data):
        return "its SHA-256 is not the one its stats record"
    expected = {layout.key(i) for i in layout.samples_in(shard)}
    found: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                f = tar.extractfile(member)
                if f is None or len(f.read()) != member.size:
                    return f"its member {member.name} is cut short"
                found.add(member.name.split(".", 1)[0])
    except (tarfile.TarError, EOFError, OSError) as e:
        return f"it is not a readable tar ({' '.join(str(e).split())})"
    missing = sorted(expected - found)
    if missing:
        return f"{len(missing)} of its {len(expected)} samples are missing (first {missing[0]})"
    return None


def bad_shards(store: Store, layout: Layout, shards) -> dict[int, str]:
    """{shard: problem} of the given shards that are present as tars but do not read back."""
    names = store.names()
    return {s: p for s in shards if layout.shard_name(s) in names
            and (p := shard_problem(store, layout, s)) is not None}


def verify_dataset(location: str) -> int:
    """``python -m sdjax.generate --outdir D --verify``: read every shard of the dataset in
    ``location`` back; print one line per shard that is missing or does not read back, then a
    summary. Returns 0 when every shard reads back, 1 otherwise."""
    from sdjax.cli_args import UsageError
    from sdjax.dataset.manifest import MANIFEST
    store = Store(location)
    try:
        settings = json.loads(store.read_text(MANIFEST) or "null")["settings"]
        layout = Layout(int(settings["prompt_rows"]), int(settings["images_per_prompt"]),
                        int(settings["samples_per_shard"]))
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{store.path(MANIFEST)} is missing or not an sdjax.generate "
                         "manifest: --verify checks a dataset sdjax.generate made") from None
    names, bad = store.names(), 0
    for s in range(layout.num_shards):
        name = layout.shard_name(s)
        problem = ("it is missing" if name not in names
                   else shard_problem(store, layout, s))
        if problem is not None:
            bad += 1
            print(f"{store.path(name)}: {problem}")
    good = layout.num_shards - bad
    print(f"{good} of {layout.num_shards} shard(s) read back"
          + ("" if not bad else f"; {bad} do not: re-run the generate command to remake them"))
    return 1 if bad else 0
