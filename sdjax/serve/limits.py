"""What one request may ask of the server, and the checks that hold requests to it.

Every check gives a one-line reason; the HTTP layer turns :class:`BadRequest` into a 4xx.
"""

from __future__ import annotations

import dataclasses

from sdjax import validation


class BadRequest(ValueError):
    """A request the server refuses; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024     # width * height of one image
    max_steps: int = 150
    max_images: int = 64              # batch_size * n_iter of one request
    max_body_bytes: int = 32 << 20    # init images and masks come base64 in the body
    max_queue: int = 64               # requests waiting for the devices

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"--{f.name} must be at least 1")


def check_generation(*, width: int, height: int, steps: int, batch_size: int, n_iter: int,
                     cfg_scale: float, seed: int, limits: Limits) -> None:
    """The numeric fields of a txt2img/img2img request: the value rules every entry point
    shares (sdjax.validation), then this server's own limits."""
    try:
        for name, v in (("width", width), ("height", height)):
            validation.check_size(v, name)  # multiples of the model's VAE factor: its
            # pipeline's check_size (plan_txt2img), the rule the CLIs use
        validation.check_number(cfg_scale, "cfg_scale", minimum=0)
        validation.check_seed(seed)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    if width * height > limits.max_pixels:
        raise BadRequest(f"{width}x{height} is more than this server's limit of "
                         f"{limits.max_pixels} pixels per image")
    if not 1 <= steps <= limits.max_steps:
        raise BadRequest(f"steps must be between 1 and {limits.max_steps}, got {steps}")
    if batch_size < 1 or n_iter < 1:
        raise BadRequest(f"batch_size and n_iter must be at least 1, got {batch_size} and "
                         f"{n_iter}")
    if batch_size * n_iter > limits.max_images:
        raise BadRequest(f"batch_size * n_iter = {batch_size * n_iter} is more than this "
                         f"server's limit of {limits.max_images} images per request")



# Exceptions that, raised while a request is checked and planned, are the request's fault
# (a value no rule caught earlier): answered 422, never 500.
REQUEST_FAULTS = (ValueError, TypeError, UnicodeError, OverflowError, KeyError, IndexError)


def request_fault(plan, *args):
    """``plan(*args)``, an exception from REQUEST_FAULTS turned into a 422 naming its kind."""
    try:
        return plan(*args)
    except BadRequest:
        raise
    except REQUEST_FAULTS as e:
        raise BadRequest(f"{type(e).__name__}: {' '.join(str(e).split())}") from None
