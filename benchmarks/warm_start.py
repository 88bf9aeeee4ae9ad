"""Child process: time from a fresh interpreter to the first image, with the persistent
compilation cache the parent filled. Prints one JSON line.

    python -m benchmarks.warm_start --workload JSON --cache DIR
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: they are part of a warm start

import argparse  # noqa: E402
import json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True)
    p.add_argument("--cache", required=True)
    a = p.parse_args(argv)

    import jax

    from benchmarks.sdjax_bench import load
    from benchmarks.workload import Workload

    events: list[str] = []
    jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
    w = Workload.from_json(a.workload)
    imported = time.time()
    # As the CLIs load: the tensors are read while the executable comes out of the cache.
    pipe = load(w, a.cache, background_load=True)
    opened = time.time()
    pipe.compile(w.prompts(), **w.sdjax_kwargs())
    compiled = time.time()
    pipe.wait_for_weights()
    loaded = time.time()
    pipe(w.prompts(), **w.sdjax_kwargs())
    done = time.time()
    print(json.dumps({
        "started_at": STARTED, "done_at": done, "import_s": imported - STARTED,
        "open_s": opened - imported, "compile_s": compiled - opened,
        "load_wait_s": loaded - compiled, "first_call_s": done - loaded,
        "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
        "cache_misses": events.count("/jax/compilation_cache/cache_misses"),
    }))


if __name__ == "__main__":
    main()
