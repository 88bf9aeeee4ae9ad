"""Writing images: PNGs with an A1111-compatible ``parameters`` text chunk, never overwriting."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

# A1111's names for the samplers, so its UI and tools that read its metadata understand ours.
SAMPLER_LABELS = {
    "pndm": "PLMS", "ddim": "DDIM", "ddpm": "DDPM", "lms": "LMS", "euler": "Euler",
    "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras", "lcm": "LCM",
}


def format_parameters(*, prompt: str, negative_prompt: str, steps: int, sampler: str,
                      guidance_scale: float, seed: int, width: int, height: int, model: str,
                      index: int | None = None, extra: dict[str, object] | None = None,
                      schedule_type: str | None = None) -> str:
    """The ``parameters`` text A1111 writes: prompt, optional negative line, then
    ``Key: value`` pairs. ``Seed index`` is ours: image i of a run uses (seed, i). ``extra``
    pairs follow, as the WebUI's img2img fields do (``Denoising strength: 0.6``,
    ``Mask blur: 4``, ...)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = [("Steps", steps), ("Sampler", SAMPLER_LABELS.get(sampler, sampler))]
    if schedule_type is not None:  # the WebUI's samplers (1.9 on): "Schedule type: Karras"
        pairs.append(("Schedule type", schedule_type))
    pairs += [("CFG scale", f"{guidance_scale:g}"), ("Seed", seed)]
    if index is not None:
        pairs.append(("Seed index", index))
    pairs += [("Size", f"{width}x{height}"), ("Model", model.replace(",", " "))]
    pairs += [(k, _value(v)) for k, v in (extra or {}).items()]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


def guidance_parameters(rescale: float, interval: tuple[float, float] | None,
                        clip_skip: int | None = None) -> dict[str, str]:
    """The ``parameters`` fields of the guidance options and clip skip an image used (none
    for plain guidance and the last layer)."""
    fields = {}
    if (clip_skip or 1) > 1:
        fields["Clip skip"] = str(clip_skip)  # as the WebUI writes it: only when not 1
    if rescale:
        fields["Guidance rescale"] = f"{rescale:g}"
    if interval is not None:
        # "LO HI": the parameters line separates its fields with commas.
        fields["Guidance interval"] = " ".join(f"{v:g}" for v in interval)
    return fields


def quote(text: str) -> str:
    """A field's value as the WebUI's ``infotext_utils.quote`` writes it: as it is, or a JSON
    string where it holds a comma, a colon or a line break."""
    if not any(c in text for c in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)


def _value(v: object) -> str:
    """A field's text: commas would end it, so they become spaces, unless the value is
    quoted as the WebUI quotes one with commas in it (``ControlNet 0: "Module: ..., ..."``,
    :func:`quote`)."""
    text = str(v)
    if len(text) > 1 and text[0] == text[-1] == '"':
        if '"' not in text[1:-1]:
            return text
        try:
            if isinstance(json.loads(text), str):  # quote()'s, with quotes inside
                return text
        except ValueError:
            pass
    return text.replace(",", " ")


# A value is either quoted (the WebUI's quote(): JSON string) or runs to the next comma.
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)')


def _unquote(value: str) -> str:
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_parameters(text: str) -> dict:
    """Inverse of :func:`format_parameters` (also reads A1111's own files)."""
    lines = text.split("\n")
    out: dict = {"prompt": "", "negative_prompt": ""}
    body, settings = lines[:-1], lines[-1]
    neg = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if neg:
        out["prompt"] = "\n".join(body[:neg[0]])
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
    else:
        out["prompt"] = "\n".join(body)
    for key, value in _PAIR.findall(settings):
        out[key.strip()] = _unquote(value.strip())
    return out


def next_index(outdir: Path) -> int:
    """First free running number in ``outdir`` (files are named ``NNNNN-...png``)."""
    taken = [int(m.group(1)) for p in outdir.glob("*.png")
             if (m := re.match(r"(\d+)-", p.name))]
    return max(taken, default=-1) + 1


def encode_png(image: np.ndarray, parameters: str | None = None) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) image with its ``parameters`` text chunk (none when
    None: a preview, a preprocessor's map)."""
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_base64(image: np.ndarray, parameters: str | None = None) -> str:
    """:func:`encode_png` as the WebUI's API sends images: base64 text."""
    return base64.b64encode(encode_png(image, parameters)).decode("ascii")


def save_png(image: np.ndarray, path: Path, parameters: str) -> None:
    """Write atomically (temporary name, then rename) and refuse to replace a file."""
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(encode_png(image, parameters))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile (N, H, W, 3) images into one image, row-major, padding with black."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return grid
