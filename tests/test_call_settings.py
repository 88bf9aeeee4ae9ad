"""sdjax.call_settings: one call's settings give the pipeline's keyword arguments and the WebUI
``parameters`` text, and the three front ends build the same value for the same settings.
No model loads: the front ends' planning runs on stand-ins."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sdjax import validation
from sdjax.call_settings import SDXL, CallSettings, Img2Img, Inpainting, Sampling, Size, Upscaling
from sdjax.lora_tags import group_by_tags

TXT2IMG = CallSettings("toy", Sampling(4, "euler_a", 7.5), Size(64, 48))


def test_txt2img_kwargs_and_text():
    assert TXT2IMG.pipeline_kwargs() == {
        "num_inference_steps": 4, "guidance_scale": 7.5, "scheduler": "euler_a",
        "guidance_rescale": 0.0, "guidance_interval": None, "clip_skip": None,
        "height": 64, "width": 48}
    assert TXT2IMG.parameters("a cat", "", 3, index=1) == (
        "a cat\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Seed index: 1, "
        "Size: 48x64, Model: toy")
    hash(TXT2IMG)  # the server merges requests by it


def test_loras_and_embeddings_are_written_as_the_webui_writes_them(tmp_path):
    """Tags in the prompt (one appended for a LoRA merged outside it), ``Lora hashes`` with
    the addnet hash (or the one the file's metadata states), ``TI hashes`` for the
    embeddings the prompts use, all read back by PNG Info's parser."""
    import hashlib

    from sdjax.adapter_text import Adapters
    from sdjax.from_png import parse
    from sdjax.weights.safetensors_io import save_safetensors

    (tmp_path / "loras" / "sub").mkdir(parents=True)
    tagged = tmp_path / "loras" / "sub" / "ink,y.safetensors"
    save_safetensors({"w": np.arange(4, dtype=np.float32)}, tagged)
    fixed = tmp_path / "style.safetensors"
    save_safetensors({"w": np.ones(2, np.float32)}, fixed, {"sshs_model_hash": "ABCDEF0123456789"})
    emb = tmp_path / "glow.pt"
    emb.write_bytes(b"embedding bytes")
    data = tagged.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert addnet != hashlib.sha256(data).hexdigest()  # the header is not hashed
    adapters = Adapters(loras=(("style", 0.5, str(fixed)),),
                        embeddings=(("glow", str(emb)), ("unused", str(emb))),
                        lora_dir=str(tmp_path / "loras"))
    text = TXT2IMG.parameters("a <lora:ink,y:0.8> cat", "glow, blurry", 3, adapters=adapters)
    ti = hashlib.sha256(b"embedding bytes").hexdigest()[:12]
    assert text == (
        "a <lora:ink,y:0.8> cat <lora:style:0.5>\nNegative prompt: glow, blurry\n"
        "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 48x64, Model: toy, "
        f'Lora hashes: "inky: {addnet[:12]}, style: abcdef012345", TI hashes: "glow: {ti}"')
    p = parse(text)
    assert p["Lora hashes"] == f"inky: {addnet[:12]}, style: abcdef012345"
    assert p["TI hashes"] == f"glow: {ti}"
    # A LoRA the prompt names already is not named twice; none used: no fields.
    assert adapters.prompt("<lora:style:1> x") == "<lora:style:1> x"
    assert Adapters(lora_dir=str(tmp_path)).parameters("a cat") == {}
    fixed.unlink()  # a file gone since it was loaded: no hash to write, as the WebUI
    assert "Lora hashes" not in adapters.parameters("a cat")


def test_guidance_options_and_clip_skip():
    s = CallSettings("m,1", Sampling(20, "dpmpp_2m", 5.0, 0.7, (0.5, float("inf")), 2),
                     Size(512, 512))
    assert s.pipeline_kwargs()["guidance_interval"] == (0.5, float("inf"))
    assert s.parameters("p", "bad", 1) == (
        "p\nNegative prompt: bad\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 1, "
        "Size: 512x512, Model: m 1, Clip skip: 2, Guidance rescale: 0.7, "
        "Guidance interval: 0.5 inf")
    # The server's settings have no scale: each image brings its own.
    per_image = CallSettings("m", Sampling(20, "ddim", None), Size(8, 8))
    assert "CFG scale: 3.5," in per_image.parameters("p", "", 0, guidance_scale=3.5)


@pytest.mark.parametrize("task, kwargs, fields", [
    (Img2Img(0.6), {"strength": 0.6}, "Denoising strength: 0.6"),
    # the CLI's float flags and the server's integer fields keep their own spelling
    (Inpainting(1.0, 4.0, 32, "latent noise"),
     {"strength": 1.0, "mask_blur": 4.0, "padding_mask_crop": 32,
      "masked_content": "latent noise"},
     "Denoising strength: 1, Mask blur: 4, Masked content: latent noise, "
     "Inpaint area: Only masked, Masked area padding: 32"),
    (Inpainting(0.9, 2, invert_mask=True),
     {"strength": 0.9, "mask_blur": 2, "padding_mask_crop": None,
      "masked_content": "original"},
     "Denoising strength: 0.9, Mask blur: 2, Mask mode: Inpaint not masked, "
     "Masked content: original"),
])
def test_image_tasks(task, kwargs, fields):
    s = CallSettings("toy", Sampling(4, "euler", 7.5), Size(64, 64), task)
    assert s.pipeline_kwargs() == {**TXT2IMG.pipeline_kwargs(), "scheduler": "euler",
                                   "height": 64, "width": 64, **kwargs}
    without = s.pipeline_kwargs(task=False)
    assert not set(kwargs) & set(without) and "height" in without
    assert s.parameters("p", "", 0).endswith(f"Model: toy, {fields}")


def test_a_recorded_mask_inversion_does_not_split_calls():
    inverted = Inpainting(0.9, 2, invert_mask=True)
    assert inverted == Inpainting(0.9, 2) and hash(inverted) == hash(Inpainting(0.9, 2))


def test_upscaling_takes_its_size_from_the_image():
    s = CallSettings("up", Sampling(75, "ddim", 9.0), Size(256, 256), Upscaling(20))
    kwargs = s.pipeline_kwargs()
    assert kwargs["noise_level"] == 20 and "height" not in kwargs and "width" not in kwargs
    assert s.parameters("p", "", 0).endswith("Size: 256x256, Model: up, Noise level: 20")


def test_sdxl_and_the_refiner():
    sdxl = SDXL(prompt_2="p2", aesthetic_score=5.5, original_size=(512, 512),
                crops_coords_top_left=(0, 8), refiner="ref", refiner_switch_at=0.75)
    s = CallSettings("xl", Sampling(10, "euler", 5.0), Size(64, 64), sdxl=sdxl)
    kwargs = s.pipeline_kwargs()  # sdjax.handoff.refine's: the switch point is its argument
    assert {k: kwargs[k] for k in ("prompt_2", "aesthetic_score", "original_size",
                                   "crops_coords_top_left", "switch_at")} == {
        "prompt_2": "p2", "aesthetic_score": 5.5, "original_size": (512, 512),
        "crops_coords_top_left": (0, 8), "switch_at": 0.75}
    assert "negative_prompt_2" not in kwargs and "target_size" not in kwargs
    assert s.parameters("p", "", 0).endswith(
        "Model: xl, Refiner: ref, Refiner switch at: 0.75, Aesthetic score: 5.5, "
        "Original size: 512 512, Crop top left: 0 8")
    assert sdxl.flags()["refiner_switch_at"] == 0.75 and "refiner" not in sdxl.flags()
    assert "switch_at" not in SDXL(aesthetic_score=6.0).pipeline_kwargs()


def test_shared_rules():
    assert validation.round_size(67, 130, 8) == (64, 128)
    assert validation.default_strength(inpainting=False) == 0.8
    assert validation.default_strength(inpainting=True) == 1.0
    tags = [{"a": 1.0}, {}, {"a": 1.0}, {"b": 0.5, "a": 1.0}, {"a": 1.0, "b": 0.5}]
    assert group_by_tags(tags) == {(("a", 1.0),): [0, 2], (): [1],
                                   (("a", 1.0), ("b", 0.5)): [3, 4]}


def _cli_args(**flags) -> argparse.Namespace:
    """sdjax.sample's / sdjax.generate's flags after apply_sampling_defaults."""
    from sdjax.generate import build_parser
    argv = ["--prompts", "p.txt", "--outdir", "out", *flags.pop("argv", [])]
    args = build_parser().parse_args(argv)
    for k, v in {"steps": 4, "scheduler": "euler_a", "guidance_scale": 6.0,
                 "guidance_rescale": 0.5, "guidance_interval": None, "clip_skip": 2,
                 **flags}.items():
        setattr(args, k, v)
    return args


def _server_text(prompt: str, negative_prompt: str, seed: int, cfg_scale: float,
                 lora_dir) -> str:
    """The infotext sdjax.serve returns for a txt2img request on a stand-in model whose
    sdjax.json sets a guidance rescale of 0.5."""
    pytest.importorskip("pydantic")
    from sdjax.serve.batcher import JobResult
    from sdjax.serve.generation import images_response, plan_txt2img
    from sdjax.serve.limits import Limits
    from sdjax.serve.schemas import Txt2ImgRequest
    from sdjax.weights.diffusers_folder import load_tokenizer
    from sdjax.weights.resolve import toy_path

    model = SimpleNamespace(
        UPSCALER=False, check_size=lambda h, w: None, prompt_layout=lambda *args: (),
        sampling_settings=lambda: {"guidance_rescale": 0.5, "guidance_interval": None,
                                   "clip_skip": None},
        text_encoder_config=SimpleNamespace(num_hidden_layers=12),
        tokenizer=load_tokenizer(toy_path()), store=SimpleNamespace(embedding_tokens={}))
    registry = SimpleNamespace(find=lambda wanted: "toy", get=lambda title: model,
                               find_refiner=lambda name: None, lora_dir=lora_dir)
    req = Txt2ImgRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                         cfg_scale=cfg_scale, steps=4, width=48, height=64,
                         sampler_name="Euler a",
                         override_settings={"CLIP_stop_at_last_layers": 2})
    plan = plan_txt2img(req, registry, Limits())
    assert plan.shape.settings.pipeline_kwargs()["guidance_rescale"] == 0.5
    result = JobResult([np.zeros((64, 48, 3), np.uint8)], plan.specs, [(0, 1)], False)
    return json.loads(images_response(req, plan, result)["info"])["infotexts"][0]


def test_front_ends_write_the_same_text(tmp_path):
    from sdjax.generate import Sample, Settings, sample_files

    args = _cli_args()
    sample_cli = CallSettings.from_args(args, Size(64, 48))  # what sdjax.sample builds
    generate_cli = Settings(CallSettings.from_args(args, Size(64, 48)), "float32", 0, "",
                            "png", None)
    assert generate_cli.call == sample_cli

    prompt = "a <lora:x:0.5> cat"
    files = sample_files(Sample(0, 0, 0, prompt, "dull", 7, 0), "00000",
                         np.zeros((64, 48, 3), np.uint8), generate_cli)
    from_generate = Image.open(io.BytesIO(files["png"])).text["parameters"]
    from_sample = sample_cli.parameters(prompt, "dull", 7, index=0)
    assert from_generate == from_sample == (
        "a <lora:x:0.5> cat\nNegative prompt: dull\nSteps: 4, Sampler: Euler a, CFG scale: 6, "
        "Seed: 7, Seed index: 0, Size: 48x64, Model: toy, Clip skip: 2, Guidance rescale: 0.5")
    # The server has no seed index (image k of a request is seed + k, index 0).
    (tmp_path / "x.safetensors").write_bytes(b"")  # the tag's file: found, never loaded
    served = _server_text(prompt, "dull", 7, 6.0, tmp_path)
    # and it runs the WebUI's own "Euler a" (the CLI's euler_a is diffusers'), so it writes
    # the WebUI's schedule type too
    assert served == from_sample.replace("Seed index: 0, ", "").replace(
        "Sampler: Euler a, ", "Sampler: Euler a, Schedule type: Automatic, ")


def test_sdxl_flags_reach_the_settings():
    args = _cli_args(argv=["--prompt_2", "two", "--original_size", "512,256",
                           "--refiner", "r"])
    args.refiner_switch_at = 0.8  # what check_sdxl_args fills in
    sdxl = CallSettings.from_args(args, Size(64, 64)).sdxl
    assert sdxl == SDXL(prompt_2="two", original_size=(512, 256), refiner="r",
                        refiner_switch_at=0.8)
    # sdjax.convert-like commands without the SDXL flags give none
    assert SDXL.from_args(argparse.Namespace()) == SDXL()
