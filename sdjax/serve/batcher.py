"""Merging concurrent requests into compiled calls.

Requests that share a compiled shape (model, size, steps, sampler, and for img2img and
inpainting the task and its per-call settings) and arrive within a short window run as one
sharded call over all devices, up to ``max_batch`` images. Each image carries its own prompt,
negative prompt, seed, guidance scale and input images: those are runtime inputs of the
compiled call, so merging never recompiles. Every call of a shape runs at one batch (the
server's ``run`` pads it to ``max_batch``, sdjax.serve.generation.run_call), and what a call
compiles in from its prompts and guidance is part of the shape, so merging never changes an
image either: a request's pixels are bit for bit those it gets alone. One worker thread owns
the devices; the HTTP side only enqueues and waits on a future.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sdjax.call_settings import CallSettings

FIRST_CALL_S = 20.0  # how /progress guesses a first call's length (compile included)
FINISHED_TASKS = 64  # task ids remembered as completed (the WebUI keeps 16)


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one call shares: its settings (with the per-device batch, which the pipeline
    picks, they fix the compiled program; their image task, None for text to image, says
    the strength and the masks' handling, one for the call) and the prompt's <lora:name:w>
    tags, merged into the shared weights, so one set per call. ``source_size``: "only
    masked" inpainting pastes back into the input's size, one per call. ``prompt_layout``:
    what its prompts compile to (``pipe.prompt_layout``: chunk bucket, prompt editing's and
    AND's buckets), so that merged prompts never need another program or fail to share one,
    and each prompt gets the context length it gets alone. ``guided``: whether its guidance
    scale is above 1; a call with no guided image compiles without the unconditional pass
    (sdjax.sampling.guidance_array), and an unguided image in a guided call would be
    ``uncond + 1 * (cond - uncond)``: the same value, not the same bits."""
    settings: CallSettings
    loras: tuple[tuple[str, float], ...] = ()
    source_size: tuple[int, int] | None = None
    prompt_layout: tuple = ()
    guided: bool = True


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image's runtime inputs; ``task_inputs`` (its image, and mask, prepared by the
    pipeline when the request was checked: ``sdjax.task_inputs.TaskInputs``) only for
    img2img / inpainting."""
    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float
    task_inputs: Any = dataclasses.field(default=None, compare=False, repr=False)
    subseed: int | None = None  # the WebUI's variation seed of this image (sdjax.noise)
    # (its control image, preprocessed; the unit) per ControlNet unit: the images, weights,
    # windows and modes are runtime inputs (sdjax.serve.controlnet_api)
    control_images: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class JobResult:
    images: list[np.ndarray]         # in request order; shorter than asked if interrupted
    specs: list[ImageSpec]           # the specs of those images
    calls: list[tuple[int, int]]     # (call number, images in that call) this job ran in
    interrupted: bool


class Job:
    """One request: its images are scheduled in order, possibly over several calls."""

    def __init__(self, job_id: int, shape: Shape, specs: Sequence[ImageSpec],
                 task_id: str | None = None):
        self.id, self.shape, self.specs = job_id, shape, list(specs)
        self.task_id = task_id  # the client's name for it (the WebUI's force_task_id)
        self.arrived = time.monotonic()
        self.future: concurrent.futures.Future[JobResult] = concurrent.futures.Future()
        self._images: list[np.ndarray | None] = [None] * len(self.specs)
        self.next = 0          # first image not yet handed to a call
        self.outstanding = 0   # images in a call on the devices now
        self.calls: list[tuple[int, int]] = []
        self.interrupted = False

    def _finish(self) -> None:
        done = [(im, sp) for im, sp in zip(self._images, self.specs, strict=True)
                if im is not None]
        self._settle(JobResult([im for im, _ in done], [sp for _, sp in done], self.calls,
                               self.interrupted))

    def _settle(self, outcome: JobResult | BaseException) -> None:
        # The HTTP side cancels the future when its client goes away; that must not reach
        # the worker thread as an error.
        try:
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)
        except concurrent.futures.InvalidStateError:
            pass


RunCall = Callable[[Shape, list[ImageSpec]], np.ndarray]


class Batcher:
    """A bounded queue of jobs and the worker thread that runs them in merged calls.

    ``run(shape, specs)`` must return uint8 images, one per spec, in order.
    """

    def __init__(self, run: RunCall, *, window_s: float = 0.03, max_batch: int = 8,
                 max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and the window >= 0")
        self._run = run
        self.window_s, self.max_batch, self.max_queue = window_s, max_batch, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()   # jobs with images not yet handed to a call
        self._running: list[Job] = []
        self._running_since = 0.0
        self._running_shape: Shape | None = None
        self._rows: dict[int, int] = {}       # job id -> its first row in the running call
        self._reported: tuple | None = None   # the running call's last report (see report)
        self.reports = 0                      # step reports received so far
        self._last_seconds: dict[tuple[Shape, int], float] = {}
        self._next_id = 0
        self._finished_tasks: deque[str] = deque(maxlen=FINISHED_TASKS)
        self.calls = 0                        # compiled calls made so far
        self.images = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sdjax-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ HTTP side
    def submit(self, shape: Shape, specs: Sequence[ImageSpec],
               task_id: str | None = None) -> Job:
        """Queue a job; raises QueueFull or ShuttingDown instead of waiting. ``task_id``:
        the client's name for it, which ``task`` answers about."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._next_id += 1
            job = Job(self._next_id, shape, specs, task_id)
            self._pending.append(job)
            self._cond.notify_all()
            return job

    def cancel(self, job: Job) -> None:
        """Its client has gone: make none of its images that are not on the devices yet."""
        with self._cond:
            if job.future.cancel() and job in self._pending:
                self._pending.remove(job)
            self._cond.notify_all()

    def interrupt(self) -> int:
        """End every job accepted so far: what is on the devices now finishes (a compiled call
        cannot stop half-way) and is returned; nothing more starts for them. Returns how many
        jobs it ended."""
        with self._cond:
            jobs = list(self._pending) + [j for j in self._running if j not in self._pending]
            self._pending.clear()
            for job in jobs:
                job.interrupted = True
                if job.outstanding == 0:
                    self._end(job)
            self._cond.notify_all()
            return len(jobs)

    def report(self, step: int, total: int, images: np.ndarray) -> None:
        """The running call has done ``step`` of its ``total`` evaluations; ``images`` are
        its rows' live previews (sdjax.previews, when the call makes them)."""
        with self._cond:
            self.reports += 1
            self._reported = (self.reports, step, total, images)

    def progress(self) -> dict:
        """How far the running call is, estimated from the last call of the same shape (the
        compiled loop reports no steps while it runs)."""
        with self._cond:
            waiting = len(self._pending)
            if not self._running:
                return {"running": False, "fraction": 0.0, "eta": 0.0, "queued": waiting,
                        "shape": None, "jobs": []}
            elapsed = time.monotonic() - self._running_since
            n = sum(j.outstanding for j in self._running)
            expected = self._last_seconds.get((self._running_shape, n))
            reported = self._reported
            if reported is not None:  # the loop's own count (previews on)
                _, step, total, _ = reported
                fraction = step / total
                eta = elapsed * (total - step) / step
            elif expected:
                fraction, eta = min(elapsed / expected, 0.99), max(expected - elapsed, 0.0)
            else:  # the first call of this shape (it compiles too): no measure to go by, so a
                # fraction that rises with time and never reaches 1 (half-way at FIRST_CALL_S)
                fraction = min(elapsed / (elapsed + FIRST_CALL_S), 0.99)
                eta = max(FIRST_CALL_S - elapsed, 1.0)
            return {"running": True, "fraction": fraction, "eta": eta, "queued": waiting,
                    "shape": self._running_shape, "jobs": [j.id for j in self._running],
                    "evaluations": None if reported is None else reported[1:3],
                    "preview": None if reported is None else (reported[0], reported[3])}

    def task(self, task_id: str) -> dict:
        """Where the job a client named ``task_id`` is: ``active`` (images of it on the
        devices now), ``queued`` (waiting) with ``ahead``, the requests that run before it
        starts (those on the devices, then those queued before it), or ``completed``."""
        with self._cond:
            running = [j for j in self._running if j.outstanding > 0]
            for job in running:
                if job.task_id == task_id:
                    return {"active": True, "queued": False, "completed": False, "ahead": 0,
                            "row": self._rows.get(job.id, 0)}
            for k, job in enumerate(self._pending):
                if job.task_id == task_id:
                    before = set(running) | set(list(self._pending)[:k])
                    return {"active": False, "queued": True, "completed": False,
                            "ahead": len(before - {job})}
            return {"active": False, "queued": False,
                    "completed": task_id in self._finished_tasks, "ahead": None}

    def stop(self, timeout: float | None = None) -> None:
        """Finish every accepted job, then end the worker (graceful shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _end(self, job: Job, error: BaseException | None = None) -> None:
        """Answer the job (under the lock), and remember its task id as completed."""
        if error is None:
            job._finish()
        else:
            job._settle(error)
        if job.task_id is not None:
            self._finished_tasks.append(job.task_id)

    def _waiting_images(self, shape: Shape) -> int:
        return sum(len(j.specs) - j.next for j in self._pending if j.shape == shape)

    def _take(self, shape: Shape) -> list[tuple[Job, int, int]]:
        """Up to max_batch images of ``shape`` from the queue, oldest job first."""
        parts, room = [], self.max_batch
        for job in list(self._pending):
            if room == 0:
                break
            if job.shape != shape:
                continue
            stop = min(len(job.specs), job.next + room)
            parts.append((job, job.next, stop))
            room -= stop - job.next
            job.outstanding += stop - job.next
            job.next = stop
            if stop == len(job.specs):
                self._pending.remove(job)
        return parts

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return  # stopping, and everything accepted has been answered
                first = self._pending[0]
                deadline = first.arrived + self.window_s
                while (not self._stopping and self._pending and self._pending[0] is first
                       and self._waiting_images(first.shape) < self.max_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._pending:
                    continue  # interrupted while waiting
                shape = self._pending[0].shape
                parts = self._take(shape)
                self.calls += 1
                call_id = self.calls
                self._running = [job for job, _, _ in parts]
                starts = np.cumsum([0] + [b - a for _, a, b in parts])
                self._rows = {job.id: int(r)
                              for (job, _, _), r in zip(parts, starts[:-1], strict=True)}
                self._reported = None
                self._running_shape, self._running_since = shape, time.monotonic()
            specs = [s for job, a, b in parts for s in job.specs[a:b]]
            error, images = None, None
            try:
                images = self._run(shape, specs)
            except Exception as e:  # noqa: BLE001 - handed to the requests that made the call
                error = e
            with self._cond:
                seconds = time.monotonic() - self._running_since
                self._last_seconds[(shape, len(specs))] = seconds
                self.images += len(specs) if error is None else 0
                offset = 0
                for job, a, b in parts:
                    job.outstanding -= b - a
                    if error is not None:
                        self._end(job, error)
                        if job in self._pending:
                            self._pending.remove(job)
                        continue
                    job._images[a:b] = list(images[offset:offset + b - a])
                    offset += b - a
                    job.calls.append((call_id, len(specs)))
                    finished = job.next == len(job.specs) or job.interrupted
                    if finished and job.outstanding == 0:
                        self._end(job)
                self._running = []
                self._running_shape, self._reported = None, None
                self._cond.notify_all()
