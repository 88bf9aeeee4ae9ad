"""Control-image preprocessors that need no neural network, computed as the WebUI ControlNet
extension (Mikubill/sd-webui-controlnet) computes them: its
``scripts/preprocessor/model_free_preprocessors.py`` and ``legacy/processor.py``, with the
sliders (``threshold_a``/``threshold_b``, ``processor_res``) of its preprocessor table.

- "none", "invert" (white background and black lines -> the opposite);
- "canny": OpenCV's Canny edges (threshold_a, threshold_b: low and high thresholds);
- "tile_resample": the image shrunk by the "Down Sampling Rate" threshold_a with OpenCV's area
  interpolation (below 1.1: unchanged); "tile_colorfix" adds a colour fix inside the sampler
  (the VAE latent of the image), not a preprocessor, and is not here;
- "blur_gaussian": OpenCV's Gaussian blur of sigma threshold_a;
- "threshold": white where every channel is above threshold_a, black elsewhere;
- "color" (the UI's "t2ia_color_grid"): the image reduced to a grid of 64-pixel cells;
- "lineart_standard": lines from a white background, black lines (a difference of Gaussians);
- "scribble_xdog": XDoG edges over threshold_a;
- "shuffle": the image's content moved by a smooth random flow, from ``seed`` (the extension
  seeds NumPy with the generation's seed + subseed before it runs);
- "binary": the extension's removed (April 2023, "to avoid confusing") binarization: gray,
  inverted, at threshold_a (0 or 255: Otsu's), on its older 64-multiple resize.

The resizing ones resize the short side to ``processor_res`` (cubic interpolation when
enlarging, area when shrinking), pad the edges to a multiple of 64, run, and crop the padding
off, as the extension does. Annotators that need a network (depth, pose, lineart, ...) and
the "inpaint" ones (their control is -1 where masked, outside the [0, 1] control images of
the pipeline) are not here. OpenCV is the ``[controlnet]`` extra
(``opencv-python-headless``), imported only when a preprocessor that needs it runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from sdjax import validation


@dataclasses.dataclass(frozen=True)
class Slider:
    """One of the extension's sliders: its label, default and range."""
    label: str
    value: float
    minimum: float
    maximum: float
    step: float = 1.0


@dataclasses.dataclass(frozen=True)
class Spec:
    """A preprocessor as the extension lists it: its UI name, whether ``processor_res``
    applies, and its threshold_a / threshold_b sliders (None: not used)."""
    label: str
    resolution: bool = True
    a: Slider | None = None
    b: Slider | None = None


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
SPECS = {
    "none": Spec("none", resolution=False),
    "invert": Spec("invert (from white bg & black line)", resolution=False),
    "canny": Spec("canny", a=Slider("Low Threshold", 100, 1, 255),
                  b=Slider("High Threshold", 200, 1, 255)),
    "tile_resample": Spec("tile_resample", resolution=False,
                          a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)),
    "blur_gaussian": Spec("blur_gaussian", a=Slider("Sigma", 9.0, 0.01, 64.0, 0.01)),
    "threshold": Spec("threshold", a=Slider("Binarization Threshold", 127, 0, 255)),
    "color": Spec("t2ia_color_grid"),
    "lineart_standard": Spec("lineart_standard (from white bg & black line)"),
    "scribble_xdog": Spec("scribble_xdog", a=Slider("XDoG Threshold", 32, 1, 64)),
    "shuffle": Spec("shuffle"),
    "binary": Spec("binary", a=Slider("Binary threshold", 0, 0, 255)),
}
PREPROCESSORS = tuple(SPECS)
ALIASES = {name: spec.label for name, spec in SPECS.items()}
# The canny thresholds' older names (sdjax's first preprocess signature).
_CANNY_NAMES = {"low_threshold": "threshold_a", "high_threshold": "threshold_b"}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("this preprocessor needs OpenCV: pip install "
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


def check_params(name: str, threshold_a=None, threshold_b=None) -> tuple[float | None, ...]:
    """(threshold_a, threshold_b) of ``name``: None takes the extension's default; a value
    outside its slider's range is refused in one line; an unused one must be None."""
    spec = SPECS[name]
    out = []
    for key, slider, value in (("threshold_a", spec.a, threshold_a),
                               ("threshold_b", spec.b, threshold_b)):
        if slider is None:
            if value is not None:
                raise ValueError(f"the {name} preprocessor takes no {key}")
            out.append(None)
            continue
        if value is None:
            out.append(float(slider.value))
            continue
        v = validation.check_number(value, f"{name}'s {key} ({slider.label})")
        if not slider.minimum <= v <= slider.maximum:
            raise ValueError(f"{name}'s {key} ({slider.label}) must be in "
                             f"[{slider.minimum:g}, {slider.maximum:g}], got {v:g}")
        out.append(v)
    return tuple(out)


def preprocess(name: str, image, *, processor_res: int = 512, threshold_a=None,
               threshold_b=None, seed: int | None = None, **canny) -> np.ndarray:
    """The control image ``name`` makes of ``image``: uint8 (H, W, 3). ``threshold_a`` /
    ``threshold_b`` are the extension's sliders of that preprocessor (None: its default;
    canny also takes them as ``low_threshold`` / ``high_threshold``); ``processor_res`` the
    short side the resizing ones work at; ``seed`` shuffle's NumPy seed (required there)."""
    name = validation.check_choice(name, "preprocessor", PREPROCESSORS)
    for old, new in _CANNY_NAMES.items():
        if old in canny:
            if name != "canny" or (threshold_a if new == "threshold_a" else threshold_b) \
                    is not None:
                raise ValueError(f"{old} is canny's {new}: give one of them")
            value = canny.pop(old)
            threshold_a, threshold_b = (value, threshold_b) if new == "threshold_a" else (
                threshold_a, value)
    if canny:
        raise TypeError(f"preprocess() got an unexpected argument {next(iter(canny))!r}")
    a, b = check_params(name, threshold_a, threshold_b)
    img = hwc3(image)
    if name == "none":
        return img
    if name == "invert":
        return 255 - img
    if name == "tile_resample":
        return _tile_resample(img, a)
    res = validation.check_int(processor_res, "processor_res", minimum=1)
    if name == "shuffle":
        if seed is None:
            raise ValueError("the shuffle preprocessor needs a seed (the extension seeds "
                             "NumPy with the generation's seed + subseed)")
        seed = validation.check_int(seed, "seed", minimum=0, maximum=2**32 - 1)
    return hwc3(_RESIZING[name](img, res, a, b, seed))


def _tile_resample(img: np.ndarray, rate: float) -> np.ndarray:
    if rate < 1.1:
        return img
    h, w = int(float(img.shape[0]) / float(rate)), int(float(img.shape[1]) / float(rate))
    if min(h, w) < 1:
        raise ValueError(f"tile_resample's threshold_a {rate:g} leaves no pixel of a "
                         f"{img.shape[1]}x{img.shape[0]} image")
    return _cv2().resize(img, (w, h), interpolation=_cv2().INTER_AREA)


def _canny(img, res, low, high, seed):
    padded, crop = resize_with_pad(img, res)
    return crop(_cv2().Canny(padded, int(low), int(high)))


def _blur_gaussian(img, res, sigma, b, seed):
    padded, crop = resize_with_pad(img, res)
    return _cv2().GaussianBlur(crop(padded), (0, 0), float(sigma))


def _threshold(img, res, level, b, seed):
    padded, crop = resize_with_pad(img, res)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[np.min(padded, axis=2) > level] = 255
    return crop(result)


def _color(img, res, a, b, seed):
    cv2 = _cv2()
    if res < 64:
        raise ValueError(f"the color preprocessor needs processor_res >= 64 (its cells are "
                         f"64 pixels), got {res}")
    h, w = img.shape[:2]  # the short side to res, with area interpolation either way
    if h < w:
        nh, nw = res, int(round(w / h * res))
    else:
        nw, nh = res, int(round(h / w * res))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    grid = cv2.resize(img, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST)


def _lineart_standard(img, res, a, b, seed):
    padded, crop = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    g = _cv2().GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    bright = intensity[intensity > 8]
    # the extension's max(16, median) (an empty median is NaN, and max keeps 16)
    intensity /= max(16, float(np.median(bright)) if bright.size else math.nan)
    intensity *= 127
    return crop(intensity.clip(0, 255).astype(np.uint8))


def _scribble_xdog(img, res, level, b, seed):
    cv2 = _cv2()
    padded, crop = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    g1, g2 = cv2.GaussianBlur(x, (0, 0), 0.5), cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(padded, dtype=np.uint8)
    # uint8 arithmetic, as the extension's (2 * (255 - dog) wraps past 255)
    result[2 * (255 - dog) > level] = 255
    return crop(result)


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """annotator/util.py's make_noise_disk with C = 1."""
    cv2 = _cv2()
    noise = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f: f + h, f: f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def _shuffle(img, res, a, b, seed):
    """annotator/shuffle's ContentShuffleDetector (f = 256) after np.random.seed(seed)."""
    padded, crop = resize_with_pad(img, res)
    img = crop(padded)
    h, w = img.shape[:2]
    rng = np.random.RandomState(seed)  # np.random.seed(seed)'s stream
    x = _noise_disk(rng, h, w, 256) * float(w - 1)
    y = _noise_disk(rng, h, w, 256) * float(h - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return _cv2().remap(img, flow, None, _cv2().INTER_LINEAR)


def _binary(img, res, level, b, seed):
    cv2 = _cv2()
    h, w = float(img.shape[0]), float(img.shape[1])  # the older resize_image: to 64s
    k = float(res) / min(h, w)
    ht, wt = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    if min(ht, wt) < 64:
        raise ValueError(f"the binary preprocessor's image rounds to no pixel at "
                         f"processor_res {res}")
    img = cv2.resize(img, (wt, ht), interpolation=cv2.INTER_LANCZOS4 if k > 1 else
                     cv2.INTER_AREA)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if level in (0, 255):
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, level, 255, cv2.THRESH_BINARY_INV)
    return out


_RESIZING = {"canny": _canny, "blur_gaussian": _blur_gaussian, "threshold": _threshold,
             "color": _color, "lineart_standard": _lineart_standard,
             "scribble_xdog": _scribble_xdog, "shuffle": _shuffle, "binary": _binary}
