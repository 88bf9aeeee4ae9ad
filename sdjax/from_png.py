"""``python -m sdjax.sample --from_png image.png``: a WebUI PNG's ``parameters`` text as the
flags of ``sdjax.sample`` that make the same image.

:func:`settings` is pure: the text in, ``(flag values, lines)`` out, where ``lines`` says one
per parameter that cannot be honoured (an extension sdjax lacks, an upscaler model it does not
have, ...); the run carries on without them. :func:`read_text` reads the text out of a file and
:func:`apply` puts the flag values under those the command line gave (explicit flags win).

The text is read as the WebUI reads it (``modules/infotext_utils.parse_generation_parameters``:
``Key: value`` pairs, a value in double quotes JSON-unquoted, the last line the settings). A
PNG that ``sdjax.sample`` wrote is told by its ``Seed index`` field (the WebUI never writes
it): its sampler names are sdjax's labels and a missing ``RNG`` means ``jax``; a WebUI PNG's
missing ``RNG`` is the WebUI's default GPU source, i.e. ``nv``.

No JAX at import time: the CLI's argument handling imports this.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sdjax.hires_settings import check_upscaler
from sdjax.images import SAMPLER_LABELS

# As the WebUI's re_param: a key starts with a word character and may hold spaces, '-' and
# '/'; a value is a double-quoted JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")
# The WebUI's schedule types that old infotexts (before 1.9) append to the sampler's name.
_OLD_SCHEDULE_SUFFIXES = ("Karras", "Exponential", "SGM Uniform", "Uniform", "Align Your Steps",
                          "KL Optimal", "Polyexponential", "Simple", "Normal", "Beta")
# Fields that describe the image but change nothing sdjax would do differently, or are sdjax's
# own bookkeeping; read silently.
_QUIET = {"Model hash", "Model", "Seed index", "Lora hashes", "TI hashes", "Version",
          "Hypernet hashes", "VAE hash", "Emphasis", "Hires resize-1", "Hires resize-2",
          "Schedule type", "Sampler", "Steps", "CFG scale", "Seed", "Size", "Clip skip",
          "Variation seed", "Variation seed strength", "Seed resize from", "RNG", "ENSD",
          "Tiling", "Denoising strength", "Hires upscale", "Hires resize", "Hires steps",
          "Hires upscaler", "Hires sampler", "Hires prompt", "Hires negative prompt",
          "Hires schedule type",
          "Guidance rescale", "Guidance interval", "Eta DDIM", "UniPC variant",
          "UniPC skip type", "UniPC order", "UniPC lower order final"}
_IMAGE_FIELDS = {"Mask blur", "Masked content", "Inpaint area", "Masked area padding",
                 "Mask mode", "Noise level", "Image CFG scale"}
_RNG = {"GPU": "nv", "NV": "nv", "CPU": "cpu"}


class NoParameters(ValueError):
    """The file is not a PNG, or carries no ``parameters`` text."""


def read_text(path: Path) -> str:
    """The ``parameters`` text of a PNG file; ``NoParameters`` (one line) if there is none."""
    from PIL import Image, UnidentifiedImageError
    if not Path(path).is_file():
        raise NoParameters(f"--from_png {path}: file not found")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise NoParameters(f"--from_png {path}: not a PNG ({im.format})")
            im.load()
            text = im.info.get("parameters")
    except NoParameters:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise NoParameters(f"--from_png {path}: not a readable PNG ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise NoParameters(f"--from_png {path}: the PNG has no 'parameters' text (not made by "
                           "the WebUI or sdjax)")
    return text


def parse(text: str) -> dict[str, str]:
    """The WebUI's reading of an infotext: ``Prompt``, ``Negative prompt`` and every
    ``Key: value`` of the last line, values unquoted (``Size`` etc. kept whole)."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no settings line: all prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)  # a quoted value keeps its spaces
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def _size(value: str, key: str) -> tuple[int, int]:
    """``WxH`` -> (height, width)."""
    m = _SIZE.match(value.strip())
    if m is None:
        raise ValueError(f"{key}: {value!r} is not WIDTHxHEIGHT")
    return int(m.group(2)), int(m.group(1))


def _sampler(label: str, schedule: str | None, ours: bool, lines: list[str]
             ) -> tuple[str | None, str | None]:
    """(scheduler, schedule_type) of a ``Sampler`` (and ``Schedule type``) field."""
    from sdjax.schedulers import WEBUI_SAMPLER_NAMES
    if schedule is None:
        if ours:  # sdjax's labels of its diffusers-equivalent schedulers
            by_label = {v: k for k, v in SAMPLER_LABELS.items()}
            if label in by_label:
                return by_label[label], None
        for suffix in _OLD_SCHEDULE_SUFFIXES:  # "DPM++ 2M Karras": the WebUI before 1.9
            if label.endswith(" " + suffix) and label[:-len(suffix) - 1] in WEBUI_SAMPLER_NAMES:
                return label[:-len(suffix) - 1], suffix
    if label in WEBUI_SAMPLER_NAMES:
        return label, schedule or "Automatic"
    from sdjax.schedulers.webui import NOT_FIXED_STEP
    if label in NOT_FIXED_STEP:
        lines.append(f"Sampler: {label}: not supported ({NOT_FIXED_STEP[label]}); using the "
                     f"model's default")
        return None, None
    lines.append(f"Sampler: {label}: sdjax has no such sampler; using the model's default")
    return None, None


def settings(text: str) -> tuple[dict[str, Any], list[str]]:
    """(flag values of ``sdjax.sample`` by dest name, one line per parameter not honoured)
    of a PNG's ``parameters`` text. Raises ``ValueError`` (one line) on a value that is not
    the WebUI's format."""
    p = parse(text)
    ours = "Seed index" in p
    lines: list[str] = []
    flags: dict[str, Any] = {"prompt": [p["Prompt"]], "negative_prompt": p["Negative prompt"]}

    def num(key, kind=int):
        try:
            return kind(p[key])
        except ValueError:
            raise ValueError(f"{key}: {p[key]!r} is not a number") from None

    if "Steps" in p:
        flags["steps"] = num("Steps")
    if "Sampler" in p:
        scheduler, schedule = _sampler(p["Sampler"], p.get("Schedule type"), ours, lines)
        if scheduler is not None:
            flags["scheduler"] = scheduler
            if schedule is not None:
                flags["schedule_type"] = schedule
    if "CFG scale" in p:
        flags["guidance_scale"] = num("CFG scale", float)
    if "Seed" in p:
        flags["seed"] = num("Seed")
    if "Size" in p:
        flags["height"], flags["width"] = _size(p["Size"], "Size")
    if "Clip skip" in p:
        flags["clip_skip"] = num("Clip skip")
    if "Guidance rescale" in p:
        flags["guidance_rescale"] = num("Guidance rescale", float)
    if "Guidance interval" in p:
        flags["guidance_interval"] = tuple(float(v) for v in p["Guidance interval"].split())
    # The noise.
    rng = p.get("RNG")
    if rng is not None:
        if rng.upper() not in _RNG:
            lines.append(f"RNG: {rng}: sdjax has no such noise source; using nv (the WebUI's "
                         "GPU)")
        flags["rng"] = _RNG.get(rng.upper(), "nv")
    elif not ours:
        flags["rng"] = "nv"  # the WebUI's default source: its GPU's
    strength = num("Variation seed strength", float) if "Variation seed strength" in p else 0.0
    if strength and "Variation seed" in p:
        flags["subseed"], flags["subseed_strength"] = num("Variation seed"), strength
    if "Seed resize from" in p:
        flags["seed_resize_from"] = _size(p["Seed resize from"], "Seed resize from")
    if "ENSD" in p:
        flags["eta_noise_seed_delta"] = num("ENSD")
    if ours and num("Seed index") > 0:  # image i of an sdjax run: noise (seed, i)
        index = num("Seed index")
        if flags.get("rng", "jax") == "jax":
            lines.append(f"Seed index: {index}: image {index} of a run with jax noise; this "
                         f"run makes image 0 (add --num_images {index + 1}: the last is it)")
        elif "subseed" in flags:
            flags["subseed"] += index  # nv/cpu: image i is subseed + i
        else:
            flags["seed"] += index  # nv/cpu: image i is seed + i
    # The WebUI's sampler options by their infotext names (the WebUI reads them back so).
    options = [(name, num(key, kind)) for key, (name, kind) in _SAMPLER_OPTIONS.items()
               if key in p]
    if options:
        flags["sampler_option"] = options
    if p.get("Tiling") == "True":
        flags["tiling"] = True
    # The hires fix, whose "Denoising strength" is its own; without it, img2img's.
    if "Hires upscale" in p or "Hires resize" in p:
        if "Hires upscale" in p:
            flags["hires_scale"] = num("Hires upscale", float)
        else:
            flags["hires_size"] = _size(p["Hires resize"], "Hires resize")
        if "Denoising strength" in p:
            flags["hires_denoising_strength"] = num("Denoising strength", float)
        if "Hires steps" in p and num("Hires steps") > 0:  # 0: the first pass's
            flags["hires_steps"] = num("Hires steps")
        if p.get("Hires upscaler") == "None":  # the WebUI resizes the image with Lanczos
            flags["hires_upscaler"] = "lanczos"
        elif "Hires upscaler" in p:
            try:
                flags["hires_upscaler"] = check_upscaler(p["Hires upscaler"])
            except ValueError:
                lines.append(f"Hires upscaler: {p['Hires upscaler']}: sdjax has no such "
                             "upscaler model; using Lanczos (not the same image)")
                flags["hires_upscaler"] = "lanczos"
        if p.get("Hires sampler", "Use same sampler") != "Use same sampler":
            scheduler, _ = _sampler(p["Hires sampler"], None, ours, lines)
            if scheduler is not None:
                flags["hires_scheduler"] = scheduler
        if "Hires schedule type" in p:
            _hires_schedule(p["Hires schedule type"], flags, lines)
        for key, flag in (("Hires prompt", "hires_prompt"),
                          ("Hires negative prompt", "hires_negative_prompt")):
            if p.get(key):
                flags[flag] = p[key]
    elif "Denoising strength" in p:
        flags["strength"] = num("Denoising strength", float)  # kept only with an --image
    # LoRA tags stay in the prompt: --lora_dir finds their files (sdjax.lora_tags).
    lora_names = _LORA_TAG.findall(p["Prompt"])
    # Everything else: said once per field (a ControlNet unit, an extension's field, ...).
    for key, value in p.items():
        if key in _QUIET or key in ("Prompt", "Negative prompt"):
            continue
        lines.append(f"{key}: {_short(value)}: {_why(key)}")
    if lora_names:
        flags["_lora_tags"] = lora_names
    for key, flag in (("Lora hashes", "_lora_hashes"), ("TI hashes", "_ti_hashes")):
        if p.get(key):
            flags[flag] = _hashes(p[key])
    return flags, lines


def _hashes(value: str) -> dict[str, str]:
    """``"name: hash, name2: hash2"`` (the WebUI's ``Lora hashes``, ``TI hashes``) ->
    {name: hash}; an entry without a hash is left out."""
    out = {}
    for entry in value.split(","):
        name, _, short = entry.rpartition(":")
        if name.strip() and short.strip():
            out[name.strip()] = short.strip().lower()
    return out


def _hires_schedule(label: str, flags: dict[str, Any], lines: list[str]) -> None:
    """A ``Hires schedule type``: the one the hires pass runs with the first pass's schedule
    type (sdjax has one schedule type for both passes), or a line saying it is not."""
    from sdjax.schedulers.webui import infotext_schedule
    sampler = flags.get("hires_scheduler", flags.get("scheduler"))
    runs = None if sampler is None else infotext_schedule(sampler, flags.get("schedule_type"))
    if runs != label:
        own = runs or "the sampler's own"
        lines.append(f"Hires schedule type: {label}: sdjax's hires pass takes the first "
                     f"pass's schedule type ({own})")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# infotext name -> (the WebUI's option name, its type)
_SAMPLER_OPTIONS = {"Eta DDIM": ("eta_ddim", float), "UniPC variant": ("uni_pc_variant", str),
                    "UniPC skip type": ("uni_pc_skip_type", str),
                    "UniPC order": ("uni_pc_order", int),
                    "UniPC lower order final": ("uni_pc_lower_order_final",
                                                "True".__eq__)}


def _why(key: str) -> str:
    if key.startswith("ControlNet"):
        return "a ControlNet unit (give --controlnet with its model and image to use one)"
    if key.startswith("ADetailer"):
        return "the ADetailer extension's; sdjax has no ADetailer"
    if key in ("Eta", "Schedule max sigma", "Schedule min sigma", "Schedule rho",
               "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise", "s_noise"):
        return "a sampler option sdjax does not take; its default is used"
    if key in _IMAGE_FIELDS:
        return "an img2img/inpainting field; give --image (--mask) and its flag to use it"
    if key in ("Hires checkpoint", "Hires schedule type", "Refiner", "Refiner switch at"):
        return "not taken from a PNG; give the flag to use it"
    return "not a parameter sdjax knows (an extension's?); ignored"


def apply(args, explicit: set[str], flags: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Put ``flags`` into ``args`` under the ones the command line gave (``explicit``: their
    dest names); returns (notes on what is not honoured: LoRA tags, a strength kept aside;
    notes on what was changed to honour it: a LoRA tag renamed to the file of its hash)."""
    notes: list[str] = []
    changed: list[str] = []
    for dest, value in flags.items():
        if dest.startswith("_") or dest in explicit:
            continue
        if dest == "strength" and getattr(args, "image", None) is None:
            notes.append(f"Denoising strength: {value:g}: an img2img image's; give --image "
                         "to use it")
            continue
        setattr(args, dest, value)
    if flags.get("_lora_tags") and "prompt" not in explicit:
        lines, changed = _lora_notes(args, flags["_lora_tags"], flags.get("_lora_hashes", {}))
        notes += lines
    notes += _embedding_notes(args, flags.get("_ti_hashes", {}))
    return notes, changed


def _lora_notes(args, names: list[str], hashes: dict[str, str]
                ) -> tuple[list[str], list[str]]:
    """The PNG's LoRA tags: kept in the prompt where ``--lora_dir`` has the file (which then
    loads); where its name finds no file, or one of another hash, and the PNG's ``Lora
    hashes`` gives the hash, the file of that hash (as the WebUI finds a renamed LoRA: the
    tag is rewritten to its name, and said); else left out (and said), or, a file of that
    name but another hash, kept and said. Returns (not honoured, changed) lines."""
    from sdjax.lora_tags import find_lora
    lora_dir = getattr(args, "lora_dir", None)
    missing, notes, changed, renamed = [], [], [], {}
    if lora_dir is None:
        missing = list(dict.fromkeys(names))
        where = "no --lora_dir to find the files in"
    else:
        where = f"not in --lora_dir {lora_dir}"
        by_hash = _LorasByHash(lora_dir)
        for name in dict.fromkeys(names):
            want = hashes.get(name.replace(":", "").replace(",", ""))
            try:
                path, problem = find_lora(name, lora_dir), None
            except ValueError:
                path, problem = None, where
            if path is not None:
                have = by_hash.of(path)
                if have is None:
                    continue  # the run says what is wrong with the file when it loads it
                if not want or have.startswith(want):
                    continue
                problem = f"{path} has hash {have[:len(want)]}, the PNG's LoRA had {want}"
            found = by_hash.find(want, lambda p: _finds(p, lora_dir)) if want else None
            if found is not None:
                renamed[name] = found.stem
                changed.append(f"Lora: {name}: {problem}; its hash {want} is {found}: the "
                               f"tag now names <lora:{found.stem}>")
            elif path is None:
                missing.append(name)
            else:
                notes.append(f"Lora hashes: {name}: {problem} (another file of that name: "
                             "not the same image)")
    if missing:
        notes.insert(0, f"Lora: {', '.join(missing)}: {where}; the tags are left out of the "
                        "prompt")
    gone = set(missing)

    def tag(m: re.Match) -> str:
        name = m.group(1)
        if name in gone:
            return ""
        if name in renamed:
            return "<lora:" + renamed[name] + m.group(0)[len("<lora:") + len(name):]
        return m.group(0)

    if gone or renamed:
        args.prompt = [_LORA_TAG.sub(tag, p) for p in args.prompt]
    return notes, changed


def _finds(path: Path, lora_dir) -> bool:
    """Whether a tag of ``path``'s name loads ``path`` (not another file of that name)."""
    from sdjax.lora_tags import find_lora
    try:
        return find_lora(path.stem, lora_dir).resolve() == path.resolve()
    except ValueError:
        return False


class _LorasByHash:
    """The LoRA files of a folder and their WebUI hashes: each file hashed at most once per
    run, and only as far as a search needs (a large folder is not hashed per name)."""

    def __init__(self, folder):
        self._folder = Path(folder).expanduser()
        self._files: list[Path] | None = None
        self._hashes: dict[Path, str | None] = {}

    def of(self, path: Path) -> str | None:
        """``path``'s hash (None: not a file the WebUI could hash either)."""
        from sdjax.weights.errors import WeightsError
        from sdjax.weights.hashes import lora_hash
        key = path.resolve()
        if key not in self._hashes:
            try:
                self._hashes[key] = lora_hash(path)
            except (OSError, ValueError, WeightsError):
                self._hashes[key] = None
        return self._hashes[key]

    def find(self, short: str, usable) -> Path | None:
        """The first file whose hash starts with ``short`` and that ``usable`` accepts."""
        if self._files is None:
            self._files = sorted(self._folder.rglob("*.safetensors"))
        for path in self._files:
            full = self.of(path)
            if full is not None and full.startswith(short) and usable(path):
                return path
        return None


def _embedding_notes(args, hashes: dict[str, str]) -> list[str]:
    """The PNG's embeddings (``TI hashes``) this run has no ``--embedding`` for (named as
    the WebUI names them: by their file's stem)."""
    given = {Path(path).stem.replace(":", "").replace(",", "")
             for path in getattr(args, "embedding", None) or []}
    missing = [name for name in hashes if name not in given]
    if not missing:
        return []
    return [f"TI hashes: {', '.join(missing)}: embeddings the PNG's prompt uses; give "
            "--embedding FILE for each to use them (without, their names are plain words)"]


def given_flags(parser, argv: list[str] | None) -> set[str]:
    """The dest names of the flags a command line gives (parsed again, defaults left out)."""
    import argparse
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


def use(args, parser, argv: list[str] | None, out=None) -> None:
    """``--from_png``: fill ``args`` from the PNG, the command line's flags first, and say on
    ``out`` (stderr) what the PNG names that this run does not honour, one line each."""
    import sys
    out = out or sys.stderr
    if getattr(args, "from_png", None) is None:
        return
    text = read_text(args.from_png)
    flags, lines = settings(text)
    explicit = given_flags(parser, argv)
    if "prompts_file" in explicit:
        explicit.add("prompt")
    unhonoured, changed = apply(args, explicit, flags)
    lines += unhonoured
    named = parse(text)
    made = ", ".join(f"{k} {named[key]}" for k, key in (("model", "Model"),
                                                       ("hash", "Model hash")) if key in named)
    if made:
        decides = ("--model " + str(args.model) if "model" in explicit
                   else "the default model, toy (give --model for the PNG's)")
        print(f"from_png: the PNG was made with {made}; this run uses {decides}", file=out)
    for line in changed:
        print(f"from_png: {line}", file=out)
    for line in lines:
        print(f"from_png: not honoured: {line}", file=out)
