"""Bad inputs at every entry point: each gets one clear message (exit 2 from the CLIs, a
TypeError/ValueError naming the argument from the Python API), no traceback, and nothing new
on disk.

The cases are one table (``CASES``); to add one, append a ``Case``. CLI arguments may use
``{model}`` (a tiny SD1 folder), ``{out}`` (the output folder, which must stay untouched),
``{in}`` (a folder of ready-made input files, see ``_write_inputs``) and ``{tmp}``. API
keyword values may be callables of the pipeline (for shapes that depend on the model).
The harness (``run_case``, ``problems``) is plain Python so the same table can be replayed
against another checkout of sdjax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sdjax import generate
from sdjax.convert import main as convert_main
from sdjax.sample import main as sample_main
from sdjax.train.__main__ import main as train_main

MAX_ERR_LINES = 3  # the error line, plus at most a notice (toy model, random seed)
MODULES = {"sample": "sdjax.sample", "generate": "sdjax.generate", "train": "sdjax.train",
           "convert": "sdjax.convert"}
CLIS: dict[str, Callable[[list[str]], int]] = {
    "sample": sample_main, "generate": generate.main, "train": train_main,
    "convert": convert_main}
BASE_ARGS = {
    "sample": ["--model", "{model}", "--prompt", "a cat", "--steps", "2", "--num_devices", "1",
               "--outdir", "{out}"],
    "generate": ["--model", "{model}", "--prompts", "{in}/prompts.txt", "--outdir", "{out}",
                 "--steps", "2", "--num_devices", "1"],
    "train": ["--config", "{in}/recipe.json", "--output_dir", "{out}"],
    "convert": [],
}
API_DEFAULTS = {"prompt": "a cat", "num_inference_steps": 2}
RECIPE = {"task": "unet", "pretrained": "toy", "data": {"source": "shapes", "resolution": 16},
          "steps": 2, "batch_size": 2, "num_devices": 1, "log_every": 1, "progress": False}


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str                     # "sample" | "generate" | "train" | "api"
    name: str
    args: tuple[str, ...] | dict   # CLI arguments after BASE_ARGS, or API keyword arguments
    expect: str                    # a piece of the message
    code: int = 2                  # CLI exit status
    error: type = ValueError       # API exception type
    process: bool = False          # also run as a real process (exit status, no traceback)

    @property
    def id(self) -> str:
        return f"{self.entry}-{self.name}"


def _c(entry: str, name: str, args, expect: str, **kw) -> Case:
    return Case(entry, name, tuple(args) if isinstance(args, list) else args, expect, **kw)


def _latents(*shape_edit, fill=0.0, kind=np.float32):
    def make(pipe):
        h, w = pipe.default_hw
        f = pipe.vae_scale_factor
        shape = [1, h // f, w // f, pipe.unet_config.in_channels]
        for axis, size in shape_edit:
            shape[axis] = size
        arr = np.zeros(shape, np.float32)
        arr.flat[0] = fill
        return arr.astype(kind)
    return make


S, G, T, A, C = "sample", "generate", "train", "api", "convert"
SEED_RANGE = "must be in [0, 2**32)"
CASES: list[Case] = [
    # --- sdjax.sample: seeds (kind 1)
    _c(S, "seed-2**32", ["--seed", str(2**32)], SEED_RANGE),
    _c(S, "seed-2**70", ["--seed", str(2**70)], SEED_RANGE, process=True),
    _c(S, "seed-minus-2", ["--seed", "-2"], SEED_RANGE),
    _c(S, "seed-float", ["--seed", "1.5"], "invalid int value"),
    _c(S, "seed-text", ["--seed", "abc"], "invalid int value"),
    # non-finite and out-of-range numbers (kinds 3, 4)
    _c(S, "guidance-nan", ["--guidance_scale", "nan"], "--guidance_scale must be a finite"),
    _c(S, "guidance-inf", ["--guidance_scale", "inf"], "--guidance_scale must be a finite"),
    _c(S, "guidance-negative", ["--guidance_scale", "-1"], "must not be negative"),
    _c(S, "height-100000", ["--height", "100000"], "--height 100000 is too large"),
    _c(S, "4096-squared", ["--height", "4096", "--width", "4096"], "more than the limit"),
    _c(S, "max-pixels-small", ["--height", "16", "--width", "16", "--max_pixels", "100"],
       "more than the limit of 100"),
    _c(S, "max-pixels-zero", ["--max_pixels", "0"], "--max_pixels must be at least 1"),
    _c(S, "height-zero", ["--height", "0"], "--height must be at least 1"),
    _c(S, "width-negative", ["--width", "-8"], "--width must be at least 1"),
    _c(S, "height-not-multiple-of-factor", ["--height", "21"], "multiple of 2, got 21"),
    _c(S, "steps-zero", ["--steps", "0"], "--steps must be at least 1"),
    _c(S, "steps-huge", ["--steps", "5000"], "--steps must be at most 1000"),
    _c(S, "steps-float", ["--steps", "2.5"], "invalid int value"),
    _c(S, "num-images-zero", ["--num_images", "0"], "--num_images must be at least 1"),
    _c(S, "num-images-huge", ["--num_images", "20000"], "more images than sdjax.sample makes"),
    _c(S, "batch-size-zero", ["--batch_size", "0"], "--batch_size must be at least 1"),
    _c(S, "num-devices-zero", ["--num_devices", "0"], "--num_devices must be at least 1"),
    _c(S, "num-devices-too-many", ["--num_devices", "99"], "only 8 CPU device(s)"),
    _c(S, "scheduler", ["--scheduler", "plms2"], "unknown --scheduler 'plms2'"),
    _c(S, "dtype", ["--dtype", "float8"], "invalid choice"),
    _c(S, "unknown-flag", ["--sampler_name", "euler"], "unrecognized arguments"),
    _c(S, "flag-without-value", ["--prompt"], "expected one argument"),
    # files and folders
    _c(S, "prompts-file-empty", ["--prompts_file", "{in}/empty.txt"], "has no prompts"),
    _c(S, "prompts-file-blank", ["--prompts_file", "{in}/blank.txt"], "has no prompts"),
    _c(S, "prompts-file-missing", ["--prompts_file", "{in}/nope.txt"],
       "cannot read --prompts_file"),
    _c(S, "prompts-file-latin1", ["--prompts_file", "{in}/latin1.txt"],
       "cannot read --prompts_file"),
    _c(S, "model-missing", ["--model", "{tmp}/nowhere"], "model not found"),
    _c(S, "outdir-under-a-file", ["--outdir", "{in}/file.txt/out"], "is not a folder"),
    # LoRA and textual-inversion files (written by _write_adapters for the tiny SD1 model)
    _c(S, "lora-missing", ["--lora", "{in}/nope.safetensors"], "nope.safetensors: file not found"),
    _c(S, "lora-scale-nan", ["--lora", "{in}/lora_sd2.safetensors:nan"], "must be a finite"),
    _c(S, "lora-corrupt", ["--lora", "{in}/corrupt.safetensors"], "not a safetensors file"),
    _c(S, "lora-unknown-keys", ["--lora", "{in}/lora_unknown.safetensors"],
       "are not LoRA weights"),
    _c(S, "lora-sdxl", ["--lora", "{in}/lora_sdxl.safetensors"], "an SDXL LoRA"),
    _c(S, "lora-sd2-on-sd1", ["--lora", "{in}/lora_sd2.safetensors:0.8"],
       "do not fit this model's shapes"),
    _c(S, "lora-missing-layer", ["--lora", "{in}/lora_other.safetensors"],
       "that this model does not have"),
    _c(S, "lora-tag-not-found", ["--prompt", "a <lora:nope:0.5> dog", "--lora_dir", "{in}"],
       "<lora:nope>: no nope.safetensors in"),
    _c(S, "lora-tag-without-dir", ["--prompt", "a <lora:style> dog"],
       "<lora:style> needs a LoRA folder (--lora_dir)"),
    _c(S, "lora-tag-multiplier", ["--prompt", "<lora:lora_sd2:abc>", "--lora_dir", "{in}"],
       "the multiplier must be a finite number"),
    _c(S, "lora-tag-nan", ["--prompt", "<lora:lora_sd2:nan>", "--lora_dir", "{in}"],
       "the multiplier must be a finite number"),
    _c(S, "lora-tag-path", ["--prompt", "<lora:../x>", "--lora_dir", "{in}"],
       "the name is a file name, not a path"),
    _c(S, "lora-tag-other-model", ["--prompt", "<lora:lora_sd2:0.8> a dog", "--lora_dir",
                                   "{in}"], "do not fit this model's shapes"),
    _c(S, "lora-dir-missing", ["--lora_dir", "{in}/nope"], "--lora_dir folder not found"),
    _c(S, "clip-skip-zero", ["--clip_skip", "0"], "--clip_skip must be at least 1"),
    _c(S, "clip-skip-past-the-encoder", ["--clip_skip", "3"], "clip_skip must be at most 2"),
    _c(S, "embedding-missing", ["--embedding", "{in}/nope.pt"], "nope.pt: file not found"),
    # issue 28: messages that say what is wrong, one rule everywhere
    _c(S, "lora-scale-text", ["--lora", "{in}/lora_sd2.safetensors:abc"],
       "the scale 'abc' is not a number"),
    _c(S, "lora-int8", ["--lora", "{in}/lora_int8.safetensors"], "LoRA tensors are int8"),
    _c(S, "lora-bool", ["--lora", "{in}/lora_bool.safetensors"], "LoRA tensors are bool"),
    _c(S, "embedding-int32", ["--embedding", "{in}/int32.safetensors"],
       "embedding tensors are int32"),
    _c(S, "embedding-folder", ["--embedding", "{in}/emptymodel"], "is a folder; give a file"),
    _c(S, "image-folder", ["--image", "{in}/emptymodel"], "is a folder; give an image file"),
    _c(S, "model-empty", ["--model", ""], "--model is empty"),
    _c(S, "config-on-a-folder", ["--config", "sd15"], "--config: for single-file checkpoints only"),
    _c(S, "mask-blur-without-mask", ["--mask_blur", "3"], "--mask_blur needs a --mask"),
    _c(S, "noise-level-negative", ["--noise_level", "-5"], "--noise_level must not be negative"),
    _c(S, "noise-level-not-upscaler", ["--noise_level", "5"], "applies to x4 upscaler models"),
    _c(S, "mask-empty", ["--image", "{in}/gray.png", "--mask", "{in}/black.png"],
       "the mask is empty: nothing to inpaint"),
    _c(S, "prompt-past-the-limit", ["--prompt", "red " * 1900], "past the limit of 24 chunks"),
    _c(C, "dst-folder-missing", ["toy", "{tmp}/nope/x.safetensors"],
       "/nope does not exist"),
    _c(C, "prediction-type-on-a-folder", ["toy", "{out}.safetensors", "--prediction_type",
                                          "epsilon"], "--prediction_type applies to a single"),
    _c(A, "mask-empty", {"image": np.zeros((16, 16, 3), np.uint8),
                         "mask_image": np.zeros((16, 16), np.uint8)},
       "the mask is empty: nothing to inpaint"),
    _c(S, "embedding-width", ["--embedding", "{in}/wide.safetensors"], "vectors of width 48"),
    _c(S, "embedding-collides", ["--embedding", "{in}/cat.safetensors"], "already a word"),
    _c(S, "embedding-not-one", ["--embedding", "{in}/lora_sd2.safetensors"],
       "not a textual-inversion embedding"),
    _c(G, "lora-sd2-on-sd1", ["--lora", "{in}/lora_sd2.safetensors"],
       "do not fit this model's shapes"),

    # --- sdjax.generate (kind 5 and the shared flags)
    _c(G, "guidance-nan", ["--guidance_scale", "nan"], "--guidance_scale must be a finite",
       process=True),
    _c(G, "guidance-inf", ["--guidance_scale=-inf"], "--guidance_scale must be a finite"),
    _c(G, "seed-random", ["--seed", "-1"], SEED_RANGE),
    _c(G, "seed-2**32", ["--seed", str(2**32)], SEED_RANGE),
    _c(G, "height-100000", ["--height", "100000"], "is too large"),
    _c(G, "height-not-multiple-of-factor", ["--height", "15"], "multiple of 2, got 15"),
    _c(G, "steps-zero", ["--steps", "0"], "--steps must be at least 1"),
    _c(G, "prompts-missing", ["--prompts", "{in}/nope.txt"], "No such file"),
    _c(G, "prompts-empty", ["--prompts", "{in}/empty.txt"], "no prompts in the file"),
    _c(G, "csv-unterminated-quote", ["--prompts", "{in}/unterminated.csv"], "never closed"),
    _c(G, "jsonl-broken", ["--prompts", "{in}/broken.jsonl"], "not valid JSON"),
    _c(G, "prompts-type", ["--prompts", "{in}/prompts.doc"], "unsupported prompt file type"),
    _c(G, "images-per-prompt-zero", ["--images_per_prompt", "0"], "must be at least 1"),
    _c(G, "samples-per-shard-zero", ["--samples_per_shard", "0"], "must be at least 1"),
    _c(G, "job-index", ["--num_jobs", "2", "--job_index", "2"], "--job_index must be in"),
    _c(G, "quality-png", ["--quality", "90"], "--quality applies to"),
    _c(G, "quality-range", ["--format", "jpg", "--quality", "101"], "must be in [1, 100]"),
    _c(G, "format", ["--format", "gif"], "invalid choice"),
    _c(G, "encode-threads", ["--encode_threads", "0"], "--encode_threads must be at least 1"),
    _c(G, "outdir-under-a-file", ["--outdir", "{in}/file.txt/data"], "is not a folder"),

    # --- sdjax.train (kind 6)
    _c(T, "learning-rate-text", ["--set", "optim.learning_rate=fast"],
       "optim.learning_rate must be a number, got 'fast'", process=True),
    _c(T, "learning-rate-nan", ["--set", "optim.learning_rate=NaN"],
       "optim.learning_rate must be a number"),
    _c(T, "learning-rate-zero", ["--set", "optim.learning_rate=0"],
       "optim.learning_rate must be above 0"),
    _c(T, "log-every-zero", ["--set", "log_every=0"], "log_every must be at least 1"),
    _c(T, "steps-text", ["--set", "steps=abc"], "steps must be an integer, got 'abc'"),
    _c(T, "steps-as-section", ["--set", "steps.x=1"], "'steps.x': steps has no keys"),
    _c(T, "batch-size-zero", ["--set", "batch_size=0"], "batch_size must be at least 1"),
    _c(T, "progress-text", ["--set", "progress=yes"], "progress must be true or false"),
    _c(T, "section-as-value", ["--set", "optim=3"], "optim must be a section"),
    _c(T, "unknown-key", ["--set", "learning_rate=1"], "unknown config key 'learning_rate'"),
    _c(T, "unknown-nested-key", ["--set", "optim.lr=1"], "unknown config key 'optim.lr'"),
    _c(T, "set-without-value", ["--set", "steps"], "--set expects KEY=VALUE"),
    _c(T, "seed-negative", ["--set", "seed=-1"], "seed must be in [0, 2**32)"),
    _c(T, "ema-decay", ["--set", "ema_decay=1.5"], "ema_decay must be in [0, 1)"),
    _c(T, "task", ["--set", "task=gan"],
       "task must be one of unet, vae, clip, textual_inversion, lora"),
    _c(T, "compute-dtype", ["--set", "compute_dtype=float16"], "compute_dtype must be"),
    _c(T, "data-source", ["--set", "data.source=web"], "data.source must be shapes, folder"),
    _c(T, "data-folder-missing", ["--set", "data.source=folder", "--set",
                                  "data.path={tmp}/nowhere"], "(not found)"),
    _c(T, "shards-missing", ["--set", "data.source=webdataset", "--set",
                             "data.path={tmp}/nowhere/*.tar"], "none found"),
    _c(T, "pretrained-missing", ["--set", "pretrained={tmp}/nowhere"], "model not found"),
    _c(T, "pretrained-incomplete", ["--set", "pretrained={in}/emptymodel"], "no unet/ folder"),
    _c(T, "ti-init-word-not-one-token", ["--set", "task=textual_inversion", "--set",
                                         "textual_inversion.init_word=magenta"],
       "textual_inversion.init_word 'magenta' is not one token"),
    _c(T, "ti-token-taken", ["--set", "task=textual_inversion", "--set",
                             "textual_inversion.token=red"], "'red' is already a word"),
    _c(T, "ti-vectors-zero", ["--set", "task=textual_inversion", "--set",
                              "textual_inversion.num_vectors=0"],
       "textual_inversion.num_vectors must be at least 1"),
    _c(T, "lora-rank-zero", ["--set", "task=lora", "--set", "lora.rank=0"],
       "lora.rank must be at least 1"),
    _c(T, "lora-no-targets", ["--set", "task=lora", "--set", 'lora.unet_targets=["to_z"]'],
       "no layer of the model matches lora.unet_targets ['to_z']"),
    _c(T, "unet-config-key", ["--set", 'unet={"bogus": 1}'], "unknown UNet config key"),
    _c(T, "output-is-a-file", ["--output_dir", "{in}/file.txt"], "is not a folder"),
    _c(T, "stop-at-zero", ["--stop_at", "0"], "--stop_at must be at least 1"),
    _c(T, "config-missing", ["--config", "{in}/nope.json"], "config file not found"),
    _c(T, "config-yaml", ["--config", "{in}/recipe.yaml"], "must be a .py or .json file"),
    _c(T, "config-not-json", ["--config", "{in}/broken.json"], "not valid JSON"),
    _c(T, "config-json-list", ["--config", "{in}/list.json"], "must be an object"),
    _c(T, "config-py-raises", ["--config", "{in}/raises.py"], "the recipe failed"),

    # --- the Python API (kind 7): TypeError for a wrong type, ValueError for a wrong value
    _c(A, "prompt-none", {"prompt": None}, "prompt must be a string or a list of strings",
       error=TypeError),
    _c(A, "prompt-int", {"prompt": 123}, "prompt must be a string", error=TypeError),
    _c(A, "prompt-list-with-none", {"prompt": ["a", None]}, "prompt[1] must be a string",
       error=TypeError),
    _c(A, "prompt-bytes", {"prompt": b"a cat"}, "prompt must be a string", error=TypeError),
    _c(A, "prompt-empty-list", {"prompt": []}, "prompt is an empty list"),
    _c(A, "negative-int", {"negative_prompt": 5}, "negative_prompt must be", error=TypeError),
    _c(A, "negative-count", {"negative_prompt": ["x", "y"]}, "2 entries in negative_prompt"),
    _c(A, "guidance-text", {"guidance_scale": "7"}, "guidance_scale must be a number",
       error=TypeError),
    _c(A, "guidance-nan", {"guidance_scale": float("nan")}, "guidance_scale must be a finite"),
    _c(A, "guidance-inf", {"guidance_scale": float("inf")}, "guidance_scale must be a finite"),
    _c(A, "guidance-negative", {"guidance_scale": -1.0}, "guidance_scale must not be negative"),
    _c(A, "steps-bool", {"num_inference_steps": True}, "num_inference_steps must be an integer",
       error=TypeError),
    _c(A, "steps-text", {"num_inference_steps": "3"}, "num_inference_steps must be an integer",
       error=TypeError),
    _c(A, "steps-float", {"num_inference_steps": 2.5}, "num_inference_steps must be an integer",
       error=TypeError),
    _c(A, "steps-zero", {"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
    _c(A, "seed-2**32", {"seed": 2**32}, "seed must be in [0, 2**32)"),
    _c(A, "seed-2**70", {"seed": 2**70}, "seed must be in [0, 2**32)"),
    _c(A, "seed-minus-5", {"seed": -5}, "seed must be in [0, 2**32)"),
    _c(A, "seed-float", {"seed": 1.5}, "seed must be an integer", error=TypeError),
    _c(A, "seed-bool", {"seed": True}, "seed must be an integer", error=TypeError),
    _c(A, "seeds-count", {"seeds": [1, 2]}, "seeds needs one entry per image"),
    _c(A, "seeds-range", {"seeds": [2**32]}, "seeds[0] must be in [0, 2**32)"),
    _c(A, "height-factor", {"height": 21}, "height must be a positive multiple of 2"),
    _c(A, "height-text", {"height": "16"}, "height must be an integer", error=TypeError),
    _c(A, "width-zero", {"width": 0}, "width must be a positive multiple of 2"),
    _c(A, "images-per-prompt-zero", {"num_images_per_prompt": 0},
       "num_images_per_prompt must be at least 1"),
    _c(A, "images-per-prompt-float", {"num_images_per_prompt": 1.0},
       "num_images_per_prompt must be an integer", error=TypeError),
    _c(A, "latents-nan", {"latents": _latents(fill=np.nan)}, "latents contain NaN"),
    _c(A, "latents-inf", {"latents": _latents(fill=np.inf)}, "latents contain NaN"),
    _c(A, "latents-shape", {"latents": _latents((1, 3))}, "latents must have shape"),
    _c(A, "latents-text", {"latents": "noise"}, "latents must be a float array",
       error=TypeError),
    _c(A, "scheduler", {"scheduler": "plms2"}, "unknown scheduler 'plms2'"),
    _c(A, "clip-skip-zero", {"clip_skip": 0}, "clip_skip must be at least 1"),
    _c(A, "clip-skip-text", {"clip_skip": "2"}, "clip_skip must be an integer", error=TypeError),
]


# ------------------------------------------------------------------ harness (plain Python)
def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"prompts.txt": "a cat\na red circle\n", "empty.txt": "", "blank.txt": "\n  \n\n",
             "unterminated.csv": 'prompt\n"a cat\nb\n', "broken.jsonl": '{"prompt": "a"\n',
             "prompts.doc": "a cat\n", "file.txt": "x", "recipe.json": json.dumps(RECIPE),
             "recipe.yaml": "task: unet\n", "broken.json": "{", "list.json": "[1]",
             "raises.py": "raise RuntimeError('boom')\n"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    from PIL import Image
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(folder / "gray.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "black.png")
    _write_adapters(folder)
    (folder / "emptymodel").mkdir(exist_ok=True)


def _write_adapters(folder: Path) -> None:
    """LoRA and embedding files that do not fit the tiny SD1 model (width 32)."""
    from sdjax.weights.safetensors_io import save_safetensors

    def lora(name: str, n_in: int, n_out: int = 32) -> dict:
        return {f"{name}.lora_down.weight": np.zeros((4, n_in), np.float32),
                f"{name}.lora_up.weight": np.zeros((n_out, 4), np.float32)}

    attn2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    files = {"lora_sd2": lora(attn2, 48),  # SD2's 1024-wide context, in miniature
             "lora_sdxl": lora("lora_te2_text_model_encoder_layers_0_mlp_fc1", 32),
             "lora_other": lora("lora_unet_down_blocks_7_attentions_0_proj_in", 32),
             "lora_unknown": {"model.diffusion_model.conv_in.weight": np.zeros((1,), np.float32)},
             "wide": {"emb_params": np.zeros((1, 48), np.float32)},
             "int32": {"emb_params": np.zeros((1, 32), np.int32)},
             "lora_int8": {k: v.astype(np.int8) for k, v in lora(attn2, 32).items()},
             "lora_bool": {k: v.astype(bool) for k, v in lora(attn2, 32).items()},
             "cat": {"emb_params": np.zeros((1, 32), np.float32)}}
    for name, tensors in files.items():
        save_safetensors(tensors, folder / f"{name}.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00")


def _argv(case: Case, tmp: Path, model: str) -> list[str]:
    places = {"{model}": model, "{out}": str(tmp / "out"), "{in}": str(tmp / "in"),
              "{tmp}": str(tmp)}
    argv = []
    for arg in (*BASE_ARGS[case.entry], *case.args):
        for key, value in places.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    return argv


def _snapshot(root: Path) -> set:
    return {(str(p.relative_to(root)), p.is_dir(), 0 if p.is_dir() else p.stat().st_size)
            for p in root.rglob("*")}


@dataclasses.dataclass
class Result:
    code: int | None = None        # CLI exit status (1 for an escaped exception)
    err: str = ""                  # CLI stderr
    error: BaseException | None = None  # what the API raised (None: nothing)
    unchanged: bool = True         # the case's folder holds nothing new
    compiled: bool = False         # the API compiled a sampler before refusing


def run_case(case: Case, tmp: Path, model: str, pipe=None) -> Result:
    """Run one case in this process, in a fresh folder ``tmp``."""
    _write_inputs(tmp / "in")
    before = _snapshot(tmp)
    result = Result()
    if case.entry == "api":
        kwargs = {**API_DEFAULTS, **{k: v(pipe) if callable(v) else v
                                     for k, v in case.args.items()}}
        compile_before = pipe.compile_seconds
        try:
            pipe(**kwargs)
        except Exception as e:  # noqa: BLE001 (judged by problems())
            result.error = e
        result.compiled = pipe.compile_seconds != compile_before
    else:
        argv = _argv(case, tmp, model)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                result.code = CLIS[case.entry](argv)
            except SystemExit as e:
                result.code = e.code if isinstance(e.code, int) else 1
            except Exception:  # noqa: BLE001 (what the process would print)
                traceback.print_exc()
                result.code = 1
        result.err = err.getvalue()
    result.unchanged = _snapshot(tmp) == before
    return result


def problems(case: Case, r: Result, *, strict: bool = True) -> list[str]:
    """What is wrong with how ``case`` was handled (empty: handled well). ``strict=False``
    does not require this project's wording, only a clear message."""
    found = []
    if not r.unchanged:
        found.append("files were created or changed")
    if case.entry == "api":
        if r.compiled:
            found.append("compiled before refusing")
        if r.error is None:
            return found + ["no error raised"]
        if not isinstance(r.error, (TypeError, ValueError)):
            found.append(f"raised {type(r.error).__name__}")
        elif strict and not isinstance(r.error, case.error):
            found.append(f"raised {type(r.error).__name__}, not {case.error.__name__}")
        message = str(r.error)
        if strict and case.expect not in message:
            found.append(f"message {message!r} lacks {case.expect!r}")
        arg = next(iter(case.args)).split("[")[0]
        if not strict and arg not in message:
            found.append(f"message {message!r} does not name {arg}")
        return found
    lines = r.err.strip().splitlines()
    if r.code != case.code:
        found.append(f"exit status {r.code}, not {case.code}")
    if "Traceback" in r.err:
        found.append("traceback")
    # Not strict: argparse's own usage block before its error line also counts as clear.
    if (len(lines) > (MAX_ERR_LINES if strict else 15) or not lines
            or not (lines[-1].startswith("error: ") or (not strict and "error:" in lines[-1]))):
        found.append(f"stderr is not one short error line: {r.err[-300:]!r}")
    if strict and case.expect not in r.err:
        found.append(f"stderr lacks {case.expect!r}: {r.err[-300:]!r}")
    return found


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def api_pipe(sd1_folder):
    from sdjax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


def test_the_table_covers_every_entry_point_and_kind():
    by_entry = {e: sum(c.entry == e for c in CASES) for e in ("sample", "generate", "train",
                                                               "api")}
    assert len(CASES) >= 60 and min(by_entry.values()) >= 15, by_entry
    assert len({c.id for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, sd1_folder, request):
    pipe = None
    if case.entry == "api":
        pipe = request.getfixturevalue("api_pipe")
    r = run_case(case, tmp_path, str(sd1_folder), pipe)
    assert problems(case, r) == []


@pytest.mark.parametrize("case", [c for c in CASES if c.process], ids=lambda c: c.id)
def test_bad_input_in_a_real_process(case, tmp_path, sd1_folder):
    _write_inputs(tmp_path / "in")
    before = _snapshot(tmp_path)
    argv = _argv(case, tmp_path, str(sd1_folder))
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", MODULES[case.entry], *argv], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == case.code, r.stderr
    assert "Traceback" not in r.stderr and case.expect in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ conventions around them
@pytest.fixture()
def shared_pipe(api_pipe, monkeypatch):
    """sdjax.sample runs on the API tests' pipeline: one compile for the CLI and API runs."""
    from sdjax.pipeline import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kw: api_pipe))


def test_random_seed_is_reported_used_and_written(sd1_folder, tmp_path, capfd, shared_pipe):
    from PIL import Image

    from sdjax.images import parse_parameters

    rc = sample_main(["--model", str(sd1_folder), "--prompt", "a red circle", "--seed", "-1",
                      "--steps", "2", "--num_devices", "1", "--outdir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert rc == 0, err
    seed = int(err.split("seed: ")[1].split()[0])
    (png,) = tmp_path.glob("*.png")
    assert png.name == f"00000-{seed}-0.png"
    assert parse_parameters(Image.open(png).text["parameters"])["Seed"] == str(seed)


def test_api_random_seed_is_returned_and_reproduces(api_pipe):
    first = api_pipe("a cat", num_inference_steps=2, seed=-1)
    (seed,) = first.seeds
    assert 0 <= seed < 2**32
    again = api_pipe("a cat", num_inference_steps=2, seed=seed)
    assert again.seeds == [seed]
    np.testing.assert_array_equal(first.images, again.images)


def test_ctrl_c_stops_after_the_batch_and_says_what_was_written(sd1_folder, tmp_path, capsys,
                                                               monkeypatch, shared_pipe):
    from sdjax import images

    save = images.save_png

    def save_then_interrupt(*args, **kw):
        save(*args, **kw)
        signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C now

    monkeypatch.setattr(images, "save_png", save_then_interrupt)
    # What the process had: Python's default handler, or SIG_IGN when started in the
    # background of a non-interactive shell.
    before = signal.getsignal(signal.SIGINT)
    rc = sample_main(["--model", str(sd1_folder), "--prompt", "a cat", "--num_images", "3",
                      "--batch_size", "1", "--steps", "2", "--num_devices", "1",
                      "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 130
    assert len(list(tmp_path.glob("*.png"))) == 1
    assert "interrupted: wrote 1 file(s)" in err and "2 of 3 image(s) not made" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone again


def test_generate_failure_leaves_nothing_and_a_lone_manifest_does_not_block(
        sd1_folder, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "data"
    argv = ["--model", str(sd1_folder), "--prompts", str(prompts), "--outdir", str(out),
            "--steps", "2", "--num_devices", "1"]

    def fail(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(generate, "generate_shards", fail)
    assert generate.main(argv) == 2
    assert "disk full" in capsys.readouterr().err
    assert not out.exists()
    # What an older version left behind after a failure: a manifest and no shard.
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": "sdjax.generate/1",
                                              "settings": {"guidance_scale": 1.0}}))
    monkeypatch.setattr(generate, "generate_shards", lambda *args, **kw: [])
    assert generate.main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["guidance_scale"] == 7.5


@pytest.mark.parametrize("parser", ["sample", "generate"])
def test_help_states_each_default_once(parser):
    from sdjax import sample

    text = {"sample": sample, "generate": generate}[parser].build_parser().format_help()
    assert "(default: None)" not in text and "(default: )" not in text
    assert "(default: 0)" in text  # the seed's: a zero default is still shown
    flat = " ".join(text.split())
    for chunk in flat.split(" --"):
        assert chunk.count("(default") <= 1, chunk
    assert "--max_pixels" in text and "-1 for a random seed" in text
