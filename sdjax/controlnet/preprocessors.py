"""Control-image preprocessors that need no neural network, as the WebUI ControlNet extension
computes them (its ``scripts/preprocessor/legacy/processor.py``): "none" (the image as it
is), "invert" (white background and black lines -> the opposite) and "canny" (OpenCV's Canny
edges). The resizing ones resize the short side to ``processor_res`` (OpenCV's cubic
interpolation when enlarging, area when shrinking), pad the edges to a multiple of 64, run,
and crop the padding off, as the extension does.

Annotators that need a network (depth, pose, lineart, ...) are not here yet. OpenCV is the
``[controlnet]`` extra (``opencv-python-headless``), imported only when a preprocessor that
needs it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from sdjax import validation

PREPROCESSORS = ("none", "invert", "canny")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("the canny preprocessor needs OpenCV: pip install "
                          "'sdjax[controlnet]' (opencv-python-headless)") from None
    return cv2


def hwc3(image) -> np.ndarray:
    """uint8 (H, W, 3) of a PIL image or a uint8 array (gray, RGB, or RGBA over white), as
    the extension's HWC3."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA") if "A" in image.mode else
                           image.convert("RGB"), np.uint8)
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"a control image array must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.size == 0:
        raise ValueError(f"a control image must be (H, W), (H, W, 3) or (H, W, 4), got "
                         f"shape {a.shape}")
    if a.shape[2] == 1:
        return np.concatenate([a, a, a], axis=2)
    if a.shape[2] == 4:
        color = a[:, :, :3].astype(np.float32)
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return a


def _pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_with_pad(image: np.ndarray, resolution: int
                    ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(the image with its short side at ``resolution``, edge-padded to multiples of 64; the
    crop that takes the padding off a result)."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    k = float(resolution) / float(min(h, w))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    ht, wt = int(np.round(float(h) * k)), int(np.round(float(w) * k))
    image = cv2.resize(image, (wt, ht), interpolation=interpolation)
    padded = np.pad(image, [[0, _pad64(ht)], [0, _pad64(wt)], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), lambda x: np.ascontiguousarray(x[:ht, :wt])


def preprocess(name: str, image, *, processor_res: int = 512, low_threshold: int = 100,
               high_threshold: int = 200) -> np.ndarray:
    """The control image ``name`` makes of ``image``: uint8 (H, W, 3). "canny" takes the
    extension's thresholds (its threshold_a/threshold_b) and ``processor_res``."""
    name = validation.check_choice(name, "preprocessor", PREPROCESSORS)
    img = hwc3(image)
    if name == "none":
        return img
    if name == "invert":
        return 255 - img
    res = validation.check_int(processor_res, "processor_res", minimum=1)
    low = validation.check_int(low_threshold, "low_threshold", minimum=0)
    high = validation.check_int(high_threshold, "high_threshold", minimum=0)
    padded, crop = resize_with_pad(img, res)
    edges = crop(_cv2().Canny(padded, low, high))
    return hwc3(edges)
