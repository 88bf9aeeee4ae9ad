"""Progress, in the WebUI's two shapes: ``GET /sdapi/v1/progress`` (the server's, as its API
clients poll it) and ``POST /internal/progress`` (one request's, by the ``force_task_id`` it
was sent with, as the WebUI's own page polls it): whether it waits, and behind how many
requests, or runs, at which step, with its live preview when ``live_previews_enable`` is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from sdjax.images import png_base64
from sdjax.serve.batcher import Batcher
from sdjax.serve.limits import BadRequest

# Off by default, unlike the WebUI: a call with previews is another compiled program, and
# reports every step to the host (docs/serve.md, "Live previews").
PREVIEW_OPTIONS = {"live_previews_enable": False}


def check_preview_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The preview option of an options object, checked (422 if not a boolean)."""
    if "live_previews_enable" not in options:
        return {}
    value = options["live_previews_enable"]
    if not isinstance(value, bool):
        raise BadRequest(f"live_previews_enable must be true or false, got {value!r}")
    return {"live_previews_enable": value}


class ProgressRequest(BaseModel):
    """The WebUI's ProgressRequest: the task, and the id of the last preview the client has
    (the same preview is not sent again)."""
    model_config = ConfigDict(extra="ignore")
    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


def _steps(p: Mapping[str, Any]) -> tuple[int, int]:
    """(the step, the steps) of the running call: counted by the loop when it reports
    (previews on: its evaluations, in the request's steps), else estimated from the time, as
    the fraction is."""
    steps = p["shape"].settings.sampling.steps if p["shape"] else 0
    done = p.get("evaluations")
    if done is None:
        return int(p["fraction"] * steps), steps
    return round(done[0] * steps / done[1]), steps


def add_progress_routes(app: FastAPI, batcher: Batcher, options: Mapping[str, Any]) -> None:
    """``options``: the server's WebUI options (``live_previews_enable``)."""

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        p = batcher.progress()
        step, steps = _steps(p)
        jobs = len(p["jobs"]) + p["queued"]
        preview = p.get("preview")
        image = (png_base64(preview[1][0]) if preview is not None and not skip_current_image
                 and options.get("live_previews_enable") else None)
        return {"progress": p["fraction"], "eta_relative": p["eta"], "current_image": image,
                "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                          "job": f"jobs {p['jobs']}" if p["running"] else "",
                          "job_count": jobs, "job_no": 0, "job_timestamp": "0",
                          "sampling_step": step, "sampling_steps": steps}}

    @app.post("/internal/progress")
    async def task_progress(req: ProgressRequest):
        # The WebUI's fields, and sdjax's: queue_position (requests that run before this
        # one starts), sampling_step and sampling_steps.
        t = batcher.task(req.id_task) if req.id_task else {
            "active": False, "queued": False, "completed": False, "ahead": None}
        body = {"active": t["active"], "queued": t["queued"], "paused": False,
                "completed": t["completed"], "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": -1,
                "textinfo": (f"Queued: {t['ahead']} ahead" if t["queued"] else "Waiting..."),
                "queue_position": t["ahead"], "sampling_step": None, "sampling_steps": None}
        if not t["active"]:
            return body
        p = batcher.progress()
        step, steps = _steps(p)
        body.update(progress=p["fraction"], eta=p["eta"], sampling_step=step,
                    sampling_steps=steps, id_live_preview=req.id_live_preview,
                    textinfo=f"Step {step}/{steps}" if steps else None)
        preview = p.get("preview")
        if (preview is not None and req.live_preview and options.get("live_previews_enable")
                and preview[0] != req.id_live_preview):
            row = min(t["row"], len(preview[1]) - 1)  # this request's first image
            body.update(live_preview="data:image/png;base64," + png_base64(preview[1][row]),
                        id_live_preview=preview[0])
        return body
