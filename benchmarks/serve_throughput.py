"""sdjax.serve throughput: requests merged into shared calls vs one request at a time.

    python -m benchmarks.serve_throughput --model toy --steps 8 --requests_per_client 4

One pipeline on ``--num_devices`` fake CPU devices (8 unless XLA_FLAGS says otherwise) is
loaded and compiled once; every request asks for one image of the same shape, so every call
runs the same executable (one image per device). Then, for each mode, a server on a free
localhost port and 1, 4 and 8 concurrent clients, each sending ``--requests_per_client``
txt2img requests back to back through HTTP:

  batched       the server's default: a 30 ms window, up to one image per device per call
  one at a time ``max_batch=1``: every request is its own call (the WebUI's behaviour)

It reports requests/s, images/s (one image per request, so the same), the mean latency and
the images per call. Then the latency the server adds over ``pipe(...)`` for the same image,
two ways: the median difference over ``--pairs`` alternating (pipe call, request) pairs with
the real model (one client), and the median request latency against a stand-in model that
returns its images at once (the server's own cost alone: HTTP, JSON, validation, the queue,
PNG and base64 encoding, plus the batching window where there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from benchmarks import report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_throughput",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", help="'toy' or a diffusers folder")
    p.add_argument("--num_devices", type=int, default=8, help="fake CPU devices")
    p.add_argument("--size", type=int, default=32, help="width and height in pixels")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default="Euler a", help="a WebUI sampler name")
    p.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated")
    p.add_argument("--requests_per_client", type=int, default=4)
    p.add_argument("--window_ms", type=float, default=30.0, help="the batched mode's window")
    p.add_argument("--pairs", type=int, default=9, help="(pipe, request) latency pairs")
    p.add_argument("--json", default=None, help="also write the result record to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("XLA_FLAGS",
                          f"--xla_force_host_platform_device_count={args.num_devices}")
    import httpx
    import jax
    import numpy as np

    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.serve.app import create_app
    from sdjax.serve.background import BackgroundServer
    from sdjax.serve.checkpoints import ModelRegistry
    from sdjax.serve.samplers import scheduler_for

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype="float32",
                                                   num_devices=args.num_devices)
    scheduler = scheduler_for(args.sampler)
    shape = dict(num_inference_steps=args.steps, height=args.size, width=args.size,
                 scheduler=scheduler)
    t0 = time.perf_counter()
    pipe("a red circle", **shape)
    compile_s = time.perf_counter() - t0
    direct = []
    for i in range(5):
        t0 = time.perf_counter()
        pipe("a red circle", seed=i, **shape)
        direct.append(time.perf_counter() - t0)
    pipe_s = statistics.median(direct)

    registry = ModelRegistry({args.model: args.model}, lambda source: pipe)
    body = {"prompt": "a red circle", "width": args.size, "height": args.size,
            "steps": args.steps, "sampler_name": args.sampler}
    modes = {"batched": dict(window_s=args.window_ms / 1000, max_batch=pipe.num_devices),
             "one at a time": dict(window_s=0.0, max_batch=1)}
    rows, added, overhead = [], {}, {}
    for mode, options in modes.items():
        app = create_app(registry, **options)
        server = BackgroundServer(app)
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                client.post("/sdapi/v1/txt2img", json=body).raise_for_status()  # warm path
                for clients in (int(c) for c in args.clients.split(",")):
                    calls_before = app.state.batcher.calls

                    def one_client(k: int) -> list[float]:
                        times = []
                        for r in range(args.requests_per_client):
                            t = time.perf_counter()
                            resp = client.post("/sdapi/v1/txt2img",
                                               json={**body, "seed": 1000 * k + r})
                            resp.raise_for_status()
                            times.append(time.perf_counter() - t)
                        return times

                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(clients) as ex:
                        latencies = [x for ts in ex.map(one_client, range(clients)) for x in ts]
                    wall = time.perf_counter() - t0
                    n = len(latencies)
                    calls = app.state.batcher.calls - calls_before
                    rows.append({"mode": mode, "clients": clients, "requests": n,
                                 "seconds": round(wall, 2),
                                 "requests_per_s": round(n / wall, 2),
                                 "images_per_s": round(n / wall, 2),
                                 "mean_latency_s": round(statistics.mean(latencies), 3),
                                 "median_latency_s": round(statistics.median(latencies), 3),
                                 "calls": calls, "images_per_call": round(n / calls, 2)})
                    print(json.dumps(rows[-1]), file=sys.stderr)
                # the added latency, pairing each request with a pipe call made just before
                diffs = []
                for i in range(args.pairs):
                    t0 = time.perf_counter()
                    pipe("a red circle", seed=i, **shape)
                    t1 = time.perf_counter()
                    client.post("/sdapi/v1/txt2img", json={**body, "seed": i}).raise_for_status()
                    diffs.append((time.perf_counter() - t1) - (t1 - t0))
                added[mode] = round(statistics.median(diffs), 4)
        finally:
            server.stop()

    class InstantPipe:
        """Stands in for the model: images at once, so only the server's own time is left."""
        def __init__(self, real):
            self.check_size, self.num_devices = real.check_size, real.num_devices

        def __call__(self, prompts, **kwargs):
            return SimpleNamespace(images=np.zeros((len(prompts), kwargs["height"],
                                                    kwargs["width"], 3), np.uint8))

    instant = ModelRegistry({args.model: args.model}, lambda source: InstantPipe(pipe))
    for mode, options in modes.items():
        server = BackgroundServer(create_app(instant, **options))
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                times = []
                for i in range(20):
                    t0 = time.perf_counter()
                    client.post("/sdapi/v1/txt2img", json={**body, "seed": i}).raise_for_status()
                    times.append(time.perf_counter() - t0)
                overhead[mode] = round(statistics.median(times[1:]), 4)
        finally:
            server.stop()

    record = {
        "benchmark": "serve_throughput", "command": " ".join(["python -m benchmarks."
                                                               "serve_throughput", *sys.argv[1:]]),
        "model": args.model, "size": f"{args.size}x{args.size}", "steps": args.steps,
        "sampler": args.sampler,
        "devices": f"{pipe.num_devices} x {jax.devices()[0].platform} (fake)"
        if jax.devices()[0].platform == "cpu" else f"{pipe.num_devices} x "
        f"{jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "first_call_s": round(compile_s, 2), "pipe_call_median_s": round(pipe_s, 3),
        "window_ms": args.window_ms,
        "server_added_latency_s": {"real model, median of paired differences": added,
                                   "instant model, median request latency": overhead},
        "rows": rows,
    }
    report.emit_json(record, args.json)
    print("\n| mode | clients | requests/s | images/s | mean latency s | images/call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests_per_s']} | {r['images_per_s']} "
              f"| {r['mean_latency_s']} | {r['images_per_call']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
