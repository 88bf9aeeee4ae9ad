"""The ASGI app: the WebUI's ``/sdapi/v1`` routes, the web page, health, auth, limits and one
log line per request. Thin on purpose: validation and mapping live in :mod:`.generation`,
batching in :mod:`.batcher`, the models in :mod:`.checkpoints`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdjax import __version__
from sdjax.call_settings import Inpainting, Upscaling
from sdjax.from_png import parse as parse_infotext
from sdjax.serve import hires_fields
from sdjax.serve.batcher import Batcher, Job, JobResult, QueueFull, ShuttingDown
from sdjax.serve.checkpoints import ModelRegistry
from sdjax.serve.controlnet_api import add_controlnet_routes, parse_png_units
from sdjax.serve.generation import (
    adapters_of,
    images_response,
    plan_img2img,
    plan_txt2img,
    run_call,
)
from sdjax.serve.http_methods import HeadAndOptions
from sdjax.serve.limits import REQUEST_FAULTS, BadRequest, Limits, request_fault
from sdjax.serve.noise_fields import DEFAULT_OPTIONS, check_options
from sdjax.serve.page_routes import add_page_routes
from sdjax.serve.progress_routes import PREVIEW_OPTIONS, add_progress_routes, check_preview_options
from sdjax.serve.request_checks import check_settings
from sdjax.serve.samplers import SAMPLER_OPTIONS, sampler_list, scheduler_list
from sdjax.serve.samplers import check_options as check_sampler_options
from sdjax.serve.schemas import (
    ImagesResponse,
    Img2ImgRequest,
    PngInfoRequest,
    Txt2ImgRequest,
)
from sdjax.serve.uploads import open_image

log = logging.getLogger("sdjax.serve")
PAGE = Path(__file__).with_name("static") / "index.html"
RETRY_AFTER_S = 5
DISCONNECT_POLL_S = 0.5
_UNAUTHENTICATED = {"/health"}
# Image-format info keys the WebUI's PNG Info leaves out of ``items``.
_FORMAT_INFO = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop",
                "background", "timestamp", "duration", "progressive", "progression",
                "icc_profile", "chromaticity", "photoshop", "transparency", "gamma", "srgb",
                "aspect"}  # for load balancers and readiness probes


def parse_credentials(spec: str | None) -> dict[str, str] | None:
    """``user:pass[,user2:pass2]`` (the WebUI's ``--api_auth``) -> {user: password}."""
    if not spec:
        return None
    creds = {}
    for pair in spec.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--api_auth takes user:password[,user2:password2]")
        creds[user] = password
    return creds


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error body: one line, in ``detail`` as FastAPI and the WebUI put it."""
    message = " ".join(str(message).split())
    return JSONResponse({"error": _REASONS.get(status, "Error"), "detail": message},
                        status_code=status, headers=headers)


_REASONS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
            413: "PayloadTooLarge", 422: "UnprocessableEntity", 500: "InternalError",
            501: "NotImplemented", 503: "ServiceUnavailable"}


class _Guard:
    """Pure ASGI middleware in front of everything: HTTP basic auth and the body-size limit.
    The body is read here (the routes need all of it anyway), so an oversized one is refused
    as soon as it passes the limit, whether or not it announced its length."""

    def __init__(self, app: ASGIApp, *, credentials: dict[str, str] | None, max_body: int):
        self.app, self.credentials, self.max_body = app, credentials, max_body

    def _authorized(self, scope: Scope) -> bool:
        if self.credentials is None or scope["path"] in _UNAUTHENTICATED:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        # compare_digest on both branches, so timing does not tell which users exist; bytes,
        # because it refuses non-ASCII str
        same = secrets.compare_digest(password.encode(),
                                      (expected or secrets.token_hex(8)).encode())
        return same and expected is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await _error(401, "incorrect username or password",
                                {"WWW-Authenticate": 'Basic realm="sdjax"'})(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        if body:
            # The API takes JSON only; FastAPI would not parse a body sent as curl's default
            # form type, and the WebUI accepts those, so treat every body as JSON.
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, f"request body is larger than this server's limit of "
                          f"{self.max_body} bytes")(scope, receive, send)


class _LogRequests:
    """One log line per HTTP request: id, method, path, status, seconds, and what a route
    added to ``request.state.detail`` (the generation's shape and the calls it ran in)."""

    def __init__(self, app: ASGIApp):
        self.app, self._ids = app, itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["id"], state["detail"] = next(self._ids), ""
        status, t0 = 0, time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:  # noqa: BLE001 - answered (500) and logged once by on_crash;
            if not status:  # Starlette re-raises it, and uvicorn would log it again
                raise
        finally:
            detail = state.get("detail")
            log.info("req %d %s %s %d %.3fs%s", state["id"], scope["method"], scope["path"],
                     status, time.perf_counter() - t0, f" {detail}" if detail else "")


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()
    if err.get("type") == "sdjax_field":  # request_checks: the message names the field
        return 422, err.get("msg", "invalid")
    where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
    return 422, f"{where}: {err.get('msg', 'invalid')}"


async def _wait(job: Job, request: Request, batcher: Batcher) -> JobResult | None:
    """The job's result, or None (and the job cancelled) when the client disconnects first,
    so a client that gives up costs the devices nothing more."""
    result = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
        if done:
            return result.result()
        if await request.is_disconnected():
            batcher.cancel(job)
            return None


def create_app(registry: ModelRegistry, *, limits: Limits | None = None,
               window_s: float = 0.03, max_batch: int = 8,
               credentials: dict[str, str] | None = None) -> FastAPI:
    """The server's app. ``max_batch``: images in one compiled call, and the batch every
    call is padded to (one compiled batch per shape); ``window_s``: how long the first
    request of a call waits for others of its shape."""
    limits = limits or Limits()
    # the noise, preview and sampler options /sdapi/v1/options sets
    webui_options = {**DEFAULT_OPTIONS, **PREVIEW_OPTIONS, **SAMPLER_OPTIONS}
    batcher = Batcher(run_call(registry, lambda *a: batcher.report(*a),
                               lambda: webui_options["live_previews_enable"], max_batch),
                      window_s=window_s, max_batch=max_batch, max_queue=limits.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn gets here after the open connections have been answered; finish the rest.
        await run_in_threadpool(batcher.stop)
        log.info("sdjax.serve: stopped after %d call(s), %d image(s)", batcher.calls,
                 batcher.images)

    app = FastAPI(title="sdjax", version=__version__, lifespan=lifespan)
    app.state.batcher, app.state.registry, app.state.limits = batcher, registry, limits
    # The last added is the outermost: every request is logged, refused ones included.
    app.add_middleware(HeadAndOptions, router=app.router)
    app.add_middleware(_Guard, credentials=credentials, max_body=limits.max_body_bytes)
    app.add_middleware(_LogRequests)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        return _error(*_validation_message(exc))

    @app.exception_handler(BadRequest)
    async def on_bad_request(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        # One line; the traceback only at debug level (the request's own line follows).
        log.error("req %s failed: %s: %s", getattr(request.state, "id", "?"),
                  type(exc).__name__, " ".join(str(exc).split()))
        log.debug("traceback", exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():  # HEAD and OPTIONS: http_methods.HeadAndOptions, as for every route
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        p = batcher.progress()
        return {"status": "ok", "model": registry.current, "queued": p["queued"],
                "running": p["running"], "calls": batcher.calls, "images": batcher.images}

    # ------------------------------------------------------------------ generation
    async def generate(req: Txt2ImgRequest | Img2ImgRequest, request: Request, plan_for):
        plan = await run_in_threadpool(request_fault, plan_for, req, registry, limits,
                                       webui_options)
        try:
            job = batcher.submit(plan.shape, plan.specs, task_id=req.force_task_id)
        except QueueFull as e:
            return _error(503, f"busy: {e}; retry in {RETRY_AFTER_S}s",
                          {"Retry-After": str(RETRY_AFTER_S)})
        except ShuttingDown as e:
            return _error(503, str(e))
        try:
            result = await _wait(job, request, batcher)
        except REQUEST_FAULTS as e:  # a merged call never sees these (planned above); alone
            raise BadRequest(f"{type(e).__name__}: {e}") from None
        if result is None:
            request.state.detail = f"job {job.id} given up: the client disconnected"
            return Response(status_code=499)  # nobody reads it; for the log line
        body = await run_in_threadpool(lambda: images_response(
            plan.request, plan, result, adapters_of(registry, plan.shape.settings.model)))
        s = plan.shape.settings
        t = s.task
        kind = "" if t is None else " x4 upscaling" if isinstance(t, Upscaling) else (
            f" {'inpainting' if isinstance(t, Inpainting) else 'img2img'} strength "
            f"{t.strength:g}")
        if s.sdxl.refiner is not None:
            kind += f" refiner {s.sdxl.refiner} at {s.sdxl.refiner_switch_at:g}"
        request.state.detail = (
            f"job {job.id} {s.size.width}x{s.size.height} {s.sampling.steps} steps "
            f"{s.sampling.scheduler} {s.model}{kind}: "
            f"{len(result.images)} image(s) in call(s) "
            + ", ".join(f"#{c} ({n} images)" for c, n in result.calls)
            + (" (interrupted)" if result.interrupted else ""))
        return JSONResponse(body)

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate(req, request, plan_txt2img)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse)
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate(req, request, plan_img2img)

    # ------------------------------------------------------------------ state and settings
    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return scheduler_list()

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return hires_fields.upscalers()

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return hires_fields.latent_upscale_modes()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return registry.listing()

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": registry.current, "samples_format": "png",
                "sd_checkpoint_hash": None, **webui_options}

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any]):
        # checked before anything changes
        noise_options = {**check_options(options), **check_preview_options(options),
                         **check_sampler_options(options)}
        try:
            check_settings(options)  # by type, as in a request's override_settings
        except ValueError as e:
            raise BadRequest(str(e)) from None
        wanted = options.get("sd_model_checkpoint")
        if wanted is not None:
            title = registry.find(wanted)
            if title is None:
                raise BadRequest(f"model {wanted!r} not found; GET /sdapi/v1/sd-models lists "
                                 "them", 404)
            await run_in_threadpool(registry.select, title)
        webui_options.update(noise_options)
        ignored = sorted(set(options) - {"sd_model_checkpoint", *webui_options})
        if ignored:
            log.info("options ignored (sdjax has no such setting): %s", ", ".join(ignored))
        return None

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request):
        ended = batcher.interrupt()
        request.state.detail = f"ended {ended} job(s)"
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: PngInfoRequest):
        image = open_image(req.image, "image")
        # As the WebUI's read_info_from_image: every info item but its image-format keys,
        # the parameters text taken out.
        items = {k: v for k, v in image.info.items() if k not in _FORMAT_INFO}
        text = items.pop("parameters", "")
        text = text if isinstance(text, str) else ""
        # Read as the WebUI reads it: its field names, quoted values (a ControlNet unit's)
        # unquoted.
        params = parse_infotext(text) if text else {}
        if params:
            # The WebUI's defaults for what an infotext leaves out: clip skip 1, its GPU noise
            # source, the sampler's own schedule.
            for key, default in (("Clip skip", "1"), ("RNG", "GPU"),
                                 ("Schedule type", "Automatic")):
                params.setdefault(key, default)
            for key, value in list(params.items()):  # "Size", "Hires resize": as the WebUI
                if re.fullmatch(r"\d+x\d+", value):
                    params[f"{key}-1"], params[f"{key}-2"] = value.split("x", 1)
            params.update(parse_png_units(params))
        return {"info": text, "items": json.loads(json.dumps(items, default=str)),
                "parameters": params}

    add_page_routes(app, registry)
    add_progress_routes(app, batcher, webui_options)
    add_controlnet_routes(app, registry, limits.max_pixels)
    return app
