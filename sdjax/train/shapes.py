"""The toy model's data: one flat-coloured shape on a plain background, with its caption,
drawn on the fly; and the pixel-statistics classifier that checks generated images.

Sample ``i`` of seed ``s`` depends on ``(s, i)`` only, so a training run can resume at any
sample position and get the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "white": (255, 255, 255), "black": (0, 0, 0),
}
# A colour the toy never saw in training: the new word that configs/toy_ti.py and
# configs/toy_lora.py teach it. Not in COLOURS, so the toy's own data and prompts stay as they
# were. Not magenta: the toy's VAE, trained on COLOURS only, cannot draw it (a magenta shape
# comes back from encode + decode 151/255 off per channel, orange 25/255), so no adapter of
# the text encoder or UNet could teach it.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"orange": (255, 128, 0)}
SHAPES = ("circle", "square", "triangle")
VOCABULARY = ("a", "on", "background", *COLOURS, *SHAPES)
_SUPERSAMPLE = 4  # sub-pixels per side: anti-aliased edges, as a real photo of a shape has
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def shape_mask(shape: str, size: int, cx: float, cy: float, side: float) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a ``size``x``size`` image by the shape whose
    bounding box is a ``side`` square centred at (cx, cy) (pixel units)."""
    n = size * _SUPERSAMPLE
    c = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = c[None, :] - cx, c[:, None] - cy
    h = side / 2
    if shape == "circle":
        inside = x * x + y * y <= h * h
    elif shape == "square":
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        # Apex up, base down; width grows linearly from the apex, so it fills half its box.
        t = (y + h) / side
        inside = (t >= 0) & (t <= 1) & (np.abs(x) <= h * t)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(colour: str, shape: str, background: str, *, size: int, cx: float, cy: float,
           side: float) -> np.ndarray:
    """uint8 (size, size, 3)."""
    m = shape_mask(shape, size, cx, cy, side)[..., None]
    known = {**COLOURS, **NEW_COLOURS}
    fg, bg = np.array(known[colour], np.float32), np.array(known[background], np.float32)
    return np.round(m * fg + (1 - m) * bg).astype(np.uint8)


def sample(seed: int, index: int, size: int, *, colour: str | None = None,
           word: str | None = None, control: str | None = None,
           jitter: float = 0.1) -> tuple[np.ndarray, str]:
    """Sample ``index`` of the stream ``seed``: (uint8 image, caption). Side 35-60% of the
    image, centre jittered by up to ``jitter`` (10%) of the image side. ``colour`` (e.g. one
    of NEW_COLOURS) replaces the drawn shape colour, and ``word`` names it in the caption.
    ``control`` ("edges" | "mask"): the image has the shape's :func:`control_map` as three
    more channels."""
    rng = np.random.default_rng([seed, index])
    drawn, background = rng.choice(len(_NAMES), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = rng.uniform(0.35, 0.60) * size
    cx, cy = size / 2 + rng.uniform(-jitter, jitter, size=2) * size
    fg, bg = colour or _NAMES[drawn], _NAMES[background]
    image = render(fg, shape, bg, size=size, cx=cx, cy=cy, side=side)
    if control is not None:
        image = np.concatenate([image, control_map(control, shape, size, cx, cy, side)], -1)
    return image, caption(word or fg, shape, bg)


CONTROLS = ("edges", "mask")


def control_map(kind: str, shape: str, size: int, cx: float, cy: float,
                side: float) -> np.ndarray:
    """The control map of a shape, uint8 (size, size, 3), white on black: "mask" the pixels
    the shape covers at least half, "edges" those of them next to one it does not (a
    one-pixel outline, as an edge detector draws it)."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control map {kind!r}; choose one of {', '.join(CONTROLS)}")
    inside = shape_mask(shape, size, cx, cy, side) >= 0.5
    if kind == "edges":
        pad = np.pad(inside, 1, constant_values=False)
        interior = (pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
        inside = inside & ~interior
    return np.repeat(inside[..., None].astype(np.uint8) * 255, 3, axis=-1)


def filled(control: np.ndarray) -> np.ndarray:
    """The region a control map (edges or mask, uint8 or [0, 1]) outlines, as a boolean
    (H, W) mask: its white pixels with every hole they enclose filled."""
    c = np.asarray(control, np.float32)
    white = (c.mean(-1) if c.ndim == 3 else c) > (127.5 if c.max() > 1 else 0.5)
    outside = np.zeros_like(white)  # flood fill of the background from the border
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = (~white[0], ~white[-1],
                                                              ~white[:, 0], ~white[:, -1])
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~white
        if (grown == outside).all():
            return ~outside
        outside = grown


def shape_region(image: np.ndarray) -> np.ndarray:
    """The boolean (H, W) mask of a generated image's shape: the pixels whose nearest palette
    colour is not the background's (the border's most frequent one)."""
    img = np.asarray(image, np.float32)
    nearest = np.argmin(((img[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    border = np.concatenate([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    return nearest != np.bincount(border, minlength=len(_NAMES)).argmax()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def classify(image: np.ndarray) -> tuple[str, str, str]:
    """(shape colour, shape, background colour) of a uint8 RGB image from plain pixel
    statistics: the border's colour is the background, the most frequent other palette
    colour is the shape's, and how much of its bounding box the shape fills tells the shape
    (square 1, circle pi/4, triangle 1/2)."""
    img = np.asarray(image, np.float32)
    nearest = np.argmin(((img[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    border = np.concatenate([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    counts = np.bincount(nearest.ravel(), minlength=len(_NAMES))
    counts[bg] = 0
    fg = int(counts.argmax())
    mask = nearest == fg
    if not mask.any():
        return _NAMES[fg], "none", _NAMES[bg]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = mask.sum() / box
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    return _NAMES[fg], shape, _NAMES[bg]


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of :func:`caption`."""
    words = text.split()
    return words[1], words[2], words[5]


def prompt_grid(n: int = 24) -> list[str]:
    """``n`` captions covering every colour as shape and as background, and every shape,
    in a fixed order (for evaluating prompt following)."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        fg = _NAMES[i % len(_NAMES)]
        bg = _NAMES[(i // len(_NAMES) + 1 + i) % len(_NAMES)]
        if bg == fg:
            bg = _NAMES[(_NAMES.index(bg) + 1) % len(_NAMES)]
        out.append(caption(fg, SHAPES[(i + i // len(_NAMES)) % len(SHAPES)], bg))
        i += 1
    return out


def accuracy(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose classified colours/shape match their prompt: ``colour``
    counts both colours (shape and background) right, ``shape`` the shape."""
    colour = shape = 0
    for img, p in zip(images, prompts, strict=True):
        want, got = parse_caption(p), classify(img)
        colour += (want[0], want[2]) == (got[0], got[2])
        shape += want[1] == got[1]
    n = len(prompts)
    return {"colour": colour / n, "shape": shape / n}


def colour_share(image: np.ndarray, colour: str) -> float:
    """Fraction of the pixels of a uint8 RGB image nearer to ``colour`` (of COLOURS or
    NEW_COLOURS) than to any other of those colours."""
    known = {**COLOURS, **NEW_COLOURS}
    palette = np.array(list(known.values()), np.float32)
    img = np.asarray(image, np.float32)
    nearest = np.argmin(((img[..., None, :] - palette) ** 2).sum(-1), axis=-1)
    return float(np.mean(nearest == list(known).index(colour)))
