"""python -m sdjax.serve: start the HTTP server.

Bad flags, a missing model or a taken port get one line on stderr and exit code 2. The first
model loads before the server listens; nothing compiles until a request (or ``--warmup``)
needs it. Ctrl-C / SIGTERM stop taking requests and finish the ones accepted.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from sdjax.cli_args import Parser, UsageError, add_flag, resolve_dtype, run_main

log = logging.getLogger("sdjax.serve")


def build_parser() -> argparse.ArgumentParser:
    from sdjax.serve.limits import Limits
    d = Limits()
    p = Parser(
        prog="python -m sdjax.serve",
        description="Serve the AUTOMATIC1111 WebUI's HTTP API (/sdapi/v1/...) and a web page, "
                    "merging concurrent requests into one compiled call over all devices.")
    add_flag(p, "model", action="append", default=None,
             help="'toy', a diffusers folder or a hub id; repeat to offer several (the first "
                  "is the default; clients switch with sd_model_checkpoint)")
    add_flag(p, "models_dir", type=Path, default=None,
             help="also offer every diffusers folder inside this folder")
    add_flag(p, "refiner", default=None, metavar="MODEL",
             help="an SDXL refiner (diffusers folder or hub id), loaded at start: txt2img "
                  "requests that name it in refiner_checkpoint (by its title, as "
                  "/sdapi/v1/sd-models lists it) hand over to it at refiner_switch_at "
                  "(default 0.8)")
    add_flag(p, "config", default=None, help="single-file models: a preset (sd15, sd21, ..., "
             "toy) or a diffusers folder with their configs (default: what the file says, or "
             "detected from its tensors); folders bring their own")
    add_flag(p, "lora_dir", type=Path, default=None, help="where a prompt's "
             "<lora:name:weight> tags find name.safetensors (here or in a folder below)")
    add_flag(p, "controlnet", action="append", default=[], metavar="PATH",
             help="a ControlNet requests may use (a diffusers folder or an original "
                  "control_*.pth/.safetensors), named by its file's stem; repeatable")
    add_flag(p, "controlnet_dir", type=Path, default=None,
             help="also offer every ControlNet file or folder inside this folder")
    add_flag(p, "host", default="127.0.0.1",
             help="address to listen on; 0.0.0.0 exposes the server to the network")
    add_flag(p, "port", type=int, default=7860, help="TCP port")
    add_flag(p, "api_auth", default=None,
             help="user:password[,user2:password2]: HTTP basic auth on every route but /health")
    add_flag(p, "num_devices", type=int, default=None, help="devices to use (default: all)")
    add_flag(p, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
             help="compute dtype; auto = float32 on CPU, bfloat16 on TPU/GPU")
    add_flag(p, "max_batch", type=int, default=None,
             help="images in one compiled call, and the batch every call runs (padded, so "
                  "a request's pixels never depend on what shares its call; default: one "
                  "per device): raise it for throughput under concurrent load, at the cost "
                  "of a lone request's time and memory")
    add_flag(p, "batch_window_ms", type=float, default=30.0,
             help="how long a request waits for others of the same shape to share its call")
    add_flag(p, "max_pixels", type=int, default=d.max_pixels, help="width*height of an image")
    add_flag(p, "max_steps", type=int, default=d.max_steps, help="steps of a request")
    add_flag(p, "max_images", type=int, default=d.max_images,
             help="images of a request (batch_size * n_iter)")
    add_flag(p, "max_body_bytes", type=int, default=d.max_body_bytes, help="request body size")
    add_flag(p, "max_queue", type=int, default=d.max_queue,
             help="requests waiting; past it, 503 with Retry-After")
    add_flag(p, "warmup", action="append", default=[], metavar="WxH[:STEPS[:SAMPLER]]",
             help="compile this shape before listening (steps default 50, sampler Euler, as "
                  "the API's defaults); repeatable")
    return p


def parse_warmup(spec: str) -> tuple[int, int, int, str]:
    """``512x512:20:Euler a`` -> (width, height, steps, WebUI sampler name)."""
    size, _, rest = spec.partition(":")
    steps, _, sampler = rest.partition(":")
    try:
        w, h = (int(v) for v in size.lower().split("x"))
        return w, h, int(steps or 50), sampler or "Euler"
    except ValueError:
        raise UsageError(f"--warmup {spec!r}: expected WxH[:STEPS[:SAMPLER]]") from None


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from sdjax.serve.app import create_app, parse_credentials
    except ImportError as e:
        raise UsageError(f"sdjax.serve needs the [serve] extra (pip install 'sdjax[serve]'): "
                         f"{e}") from None
    from sdjax import handoff
    from sdjax.dispatch import pipeline_class
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.serve.checkpoints import ModelRegistry, discover
    from sdjax.serve.generation import run_call
    from sdjax.serve.limits import Limits
    from sdjax.serve.samplers import sampler_settings

    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps,
                    max_images=args.max_images, max_body_bytes=args.max_body_bytes,
                    max_queue=args.max_queue)
    credentials = parse_credentials(args.api_auth)
    if args.num_devices is not None and args.num_devices < 1:
        raise UsageError("--num_devices must be at least 1")
    if args.batch_window_ms < 0:
        raise UsageError("--batch_window_ms must not be negative")
    if args.max_batch is not None and args.max_batch < 1:  # before any model loads
        raise UsageError("--max_batch must be at least 1")
    warmups = [parse_warmup(w) for w in args.warmup]
    for _, _, _, sampler in warmups:
        sampler_settings(sampler)
    _check_port(args.host, args.port)
    dtype = resolve_dtype(args.dtype)

    def load(source: str) -> StableDiffusionPipeline:
        log.info("loading %s (%s)", source, dtype)
        # --warmup compiles while the tensors load.
        single = args.config is not None and Path(source).expanduser().is_file()
        return pipeline_class(source).from_pretrained(source, dtype=dtype,
                                                      num_devices=args.num_devices,
                                                      background_load=True,
                                                      **({"config": args.config} if single
                                                         else {}))

    if args.lora_dir is not None and not args.lora_dir.expanduser().is_dir():
        raise UsageError(f"--lora_dir folder not found: {args.lora_dir}")
    if args.refiner is not None:
        handoff.check_refiner(args.refiner)  # before the base models load
    from sdjax.serve.controlnets import discover as discover_controlnets
    try:
        controlnets = discover_controlnets(args.controlnet, args.controlnet_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    registry = ModelRegistry(discover(args.model or ["toy"], args.models_dir), load,
                             lora_dir=args.lora_dir, refiner=args.refiner,
                             controlnets=controlnets)
    pipe = registry.get(registry.current)
    if registry.refiner is not None:
        registry.get(registry.refiner)  # loaded once, now: a request never waits for it
    max_batch = pipe.num_devices if args.max_batch is None else args.max_batch
    for w, h, steps, sampler in warmups:
        from sdjax.call_settings import CallSettings, Size
        from sdjax.serve.batcher import ImageSpec, Shape
        from sdjax.serve.generation import request_sampling
        log.info("warmup: compiling %dx%d, %d steps, %s", w, h, steps, sampler)
        # The shape a request with no overrides compiles: the model's own clip skip too.
        clip_skip = pipe.sampling_settings()["clip_skip"] or 1
        sampling = request_sampling(pipe, steps, *sampler_settings(sampler)[:1], clip_skip,
                                    sampler_settings(sampler)[1])
        # (the one batch every call of the shape runs: run_call pads to max_batch)
        run_call(registry, max_batch=max_batch)(
            Shape(CallSettings(registry.current, sampling, Size(h, w))),
            [ImageSpec("", "", 0, 7.0)])
    for title in (registry.current, registry.refiner):
        if title is not None:  # a file that fails to read stops the start, not a request
            registry.get(title).wait_for_weights()
    app = create_app(registry, limits=limits, window_s=args.batch_window_ms / 1000,
                     max_batch=max_batch, credentials=credentials)
    if not _is_loopback(args.host) and credentials is None:
        log.warning("listening on %s without --api_auth: anyone who can reach this port can "
                    "use the devices", args.host)
    log.info("sdjax.serve: %s on %d device(s), up to %d images per call; "
             "http://%s:%d/ (API under /sdapi/v1)", registry.current, pipe.num_devices,
             max_batch, args.host, args.port)
    # timeout_graceful_shutdown=None: on SIGINT/SIGTERM, answer every accepted request first.
    # (uvicorn then re-raises the signal, so the exit status says what stopped the server.)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                  log_level="warning", timeout_graceful_shutdown=None)).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.INFO)  # our request lines; other libraries stay at warnings
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
