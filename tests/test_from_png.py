"""python -m sdjax.sample --from_png: a WebUI PNG's parameters as the run's flags, the command
line over them, what cannot be honoured said, bad input refused, and the same image again."""

import base64

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdjax.from_png import settings, use
from sdjax.sample import build_parser, main

# As the WebUI (1.10) writes it: prompt (a LoRA tag in it), negative prompt, then the settings
# line, the ControlNet unit's value quoted since it holds commas; ADetailer is an extension.
WEBUI_TEXT = (
    "masterpiece, a castle on a hill <lora:detail:0.6>, sunset\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.5, Hires steps: 10, "
    "Hires upscaler: R-ESRGAN 4x+, Variation seed: 42, Variation seed strength: 0.3, "
    "Seed resize from: 448x640, ENSD: 31337, Tiling: True, ADetailer model: face_yolov8n.pt, "
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1", '
    'Lora hashes: "detail: 1a2b3c4d5e6f", Version: v1.10.1')


def _png(path, text=None, fmt="PNG"):
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format=fmt,
                                                 **({"pnginfo": info} if fmt == "PNG" else {}))
    return path


def test_webui_text_gives_its_settings():
    flags, lines = settings(WEBUI_TEXT)
    assert flags.pop("_lora_tags") == ["detail"]
    assert flags.pop("_lora_hashes") == {"detail": "1a2b3c4d5e6f"}
    assert flags == {
        "prompt": ["masterpiece, a castle on a hill <lora:detail:0.6>, sunset"],
        "negative_prompt": "blurry, lowres", "steps": 24, "scheduler": "DPM++ 2M",
        "schedule_type": "Karras", "guidance_scale": 6.5, "seed": 1234567, "height": 768,
        "width": 512, "clip_skip": 2, "rng": "nv", "subseed": 42, "subseed_strength": 0.3,
        "seed_resize_from": (640, 448), "eta_noise_seed_delta": 31337, "tiling": True,
        "hires_scale": 1.5, "hires_denoising_strength": 0.45, "hires_steps": 10,
        "hires_upscaler": "lanczos"}
    assert len(lines) == 3
    assert lines[0].startswith("Hires upscaler: R-ESRGAN 4x+: sdjax has no such upscaler")
    assert lines[1].startswith("ADetailer model: face_yolov8n.pt: the ADetailer extension's")
    assert lines[2].startswith("ControlNet 0: Module: canny, Model: control_v11p_sd15_canny")
    # The WebUI before 1.9 named the schedule in the sampler; RNG given; img2img's strength.
    flags, lines = settings("a cat\nSteps: 8, Sampler: DPM++ 2M Karras, CFG scale: 7, "
                            "Seed: 3, Size: 64x64, RNG: CPU, Denoising strength: 0.6, "
                            "Eta: 0.5")
    assert (flags["scheduler"], flags["schedule_type"], flags["rng"], flags["strength"]) == (
        "DPM++ 2M", "Karras", "cpu", 0.6)
    assert [line.split(":")[0] for line in lines] == ["Eta"]
    # sdjax's own PNG (its "Seed index"): its labels, no RNG = jax, image i's seed with nv.
    flags, _ = settings("x\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 5, Seed index: 0, "
                        "Size: 16x16, Model: toy")
    assert (flags["scheduler"], "rng" in flags) == ("pndm", False)
    flags, _ = settings("x\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
                        "Seed: 5, Seed index: 2, Size: 16x16, Model: toy, RNG: NV")
    assert (flags["scheduler"], flags["rng"], flags["seed"]) == ("Euler a", "nv", 7)


def test_command_line_flags_win_and_unhonoured_lines_are_printed(tmp_path, capsys):
    png = _png(tmp_path / "webui.png", WEBUI_TEXT)
    parser = build_parser()
    argv = ["--from_png", str(png), "--seed", "9", "--scheduler", "Euler a", "--prompt", "a dog",
            "--model", "some/model"]
    args = parser.parse_args(argv)
    use(args, parser, argv)
    err = capsys.readouterr().err.splitlines()
    assert (args.seed, args.scheduler, args.prompt, args.model) == (9, "Euler a", ["a dog"],
                                                                      "some/model")
    # the PNG's fill in the rest (its schedule type goes with the command line's sampler)
    assert (args.steps, args.guidance_scale, args.height, args.width, args.subseed,
            args.eta_noise_seed_delta, args.rng, args.schedule_type) == (
        24, 6.5, 768, 512, 42, 31337, "nv", "Karras")
    assert err[0] == ("from_png: the PNG was made with model v1-5-pruned-emaonly, hash "
                      "6ce0161689; this run uses --model some/model")
    assert [e.split(":")[2].strip() for e in err[1:]] == [
        "Hires upscaler", "ADetailer model", "ControlNet 0"]
    assert all(e.startswith("from_png: not honoured: ") for e in err[1:])
    # The PNG's prompt, its LoRA tag left out (no --lora_dir): said; the model is the default.
    argv = ["--from_png", str(png)]
    args = parser.parse_args(argv)
    use(args, parser, argv)
    err = capsys.readouterr().err.splitlines()
    assert args.prompt == ["masterpiece, a castle on a hill , sunset"] and args.model == "toy"
    assert err[0].endswith("this run uses the default model, toy (give --model for the PNG's)")
    assert err[-1].startswith("from_png: not honoured: Lora: detail: no --lora_dir")


def test_lora_tags_load_where_found_and_the_rest_is_named(tmp_path, capsys):
    from sdjax.weights.safetensors_io import save_safetensors
    (tmp_path / "loras").mkdir()
    save_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "loras" / "detail.safetensors")
    text = ("a <lora:detail:0.6> castle <lora:gone:1>\nSteps: 4, Sampler: Euler, CFG scale: 7, "
            'Seed: 1, Size: 64x64, Lora hashes: "detail: 1a2b3c4d5e6f, gone: 0123456789ab", '
            'TI hashes: "glow: 00ff00ff00ff, other: 112233445566"')
    png = _png(tmp_path / "p.png", text)
    parser = build_parser()
    argv = ["--from_png", str(png), "--lora_dir", str(tmp_path / "loras"),
            "--embedding", str(tmp_path / "glow.pt")]
    args = parser.parse_args(argv)
    use(args, parser, argv)
    err = capsys.readouterr().err.splitlines()
    # the found tag stays (and loads), the missing one is left out and named
    assert args.prompt == ["a <lora:detail:0.6> castle "]
    lines = [e.removeprefix("from_png: not honoured: ") for e in err]
    assert lines[0] == (f"Lora: gone: not in --lora_dir {tmp_path / 'loras'}; the tags are "
                        "left out of the prompt")
    assert lines[1].startswith("Lora hashes: detail: ") and "the PNG's LoRA had 1a2b3c4d5e6f" \
        in lines[1]
    assert lines[2].startswith("TI hashes: other: embeddings the PNG's prompt uses; give "
                               "--embedding FILE")
    assert len(lines) == 3


def test_a_lora_tag_whose_name_is_not_found_finds_its_file_by_hash(tmp_path, capsys,
                                                                   monkeypatch):
    """As the WebUI pastes an infotext: a tag whose name finds no file (or one of another
    hash) names the --lora_dir file of its ``Lora hashes`` hash instead, said in one line;
    each file is hashed once however many names are looked up."""
    import hashlib

    from sdjax.weights import hashes
    from sdjax.weights.safetensors_io import save_safetensors

    def _addnet_hash(path) -> str:
        """The WebUI's LoRA hash, as tests/test_adapters.py's (not imported: it loads torch)."""
        data = path.read_bytes()
        return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()

    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    for i, name in enumerate(("a", "sub/glow_v2", "detail", "z")):
        save_safetensors({"w": np.full(2, i, np.float32)}, loras / f"{name}.safetensors")
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    glow, z = (_addnet_hash(loras / n)[:12] for n in ("sub/glow_v2.safetensors", "z.safetensors"))
    text = ("a <lora:glow:0.6> castle <lora:detail> <lora:gone:1>\nSteps: 4, Sampler: Euler, "
            f'CFG scale: 7, Seed: 1, Size: 64x64, Lora hashes: "glow: {glow}, detail: {z}, '
            'gone: 0123456789ab"')
    hashed = []
    monkeypatch.setattr(hashes, "lora_hash",
                        lambda path, real=hashes.lora_hash: hashed.append(path) or real(path))
    parser = build_parser()
    argv = ["--from_png", str(_png(tmp_path / "p.png", text)), "--lora_dir", str(loras)]
    args = parser.parse_args(argv)
    use(args, parser, argv)
    err = capsys.readouterr().err.splitlines()
    assert args.prompt == ["a <lora:glow_v2:0.6> castle <lora:z> "]
    assert err == [
        f"from_png: Lora: glow: not in --lora_dir {loras}; its hash {glow} is "
        f"{loras / 'sub' / 'glow_v2.safetensors'}: the tag now names <lora:glow_v2>",
        f"from_png: Lora: detail: {loras / 'detail.safetensors'} has hash "
        f"{_addnet_hash(loras / 'detail.safetensors')[:12]}, the PNG's LoRA had {z}; its hash "
        f"{z} is {loras / 'z.safetensors'}: the tag now names <lora:z>",
        f"from_png: not honoured: Lora: gone: not in --lora_dir {loras}; the tags are left "
        "out of the prompt"]
    assert len(hashed) == len(set(hashed)) == 5  # every file once (broken: unreadable)


HIRES_PROMPT = 'a castle, "big": at night\n BREAK  detailed'


def _hires_text(**hires) -> str:
    """sdjax's PNG text of an image of "a castle" made with the hires fix."""
    from sdjax.call_settings import CallSettings, Sampling, Size
    from sdjax.hires_settings import Hires
    settings = CallSettings("toy", Sampling(4, "Euler", 7.0), Size(16, 16),
                            hires=Hires(scale=2, **hires))
    return settings.parameters("a castle", "blurry", 5)


def test_hires_prompts_sampler_and_schedule_type_as_the_webui_writes_them():
    """As the WebUI's create_infotext: each only where it differs from the first pass's (the
    image's prompts, the sampler, its Schedule type), a value with a comma, colon or line
    break quoted as JSON; read back by --from_png (sdjax.from_png)."""
    text = _hires_text(prompt=HIRES_PROMPT, negative_prompt="blurry, lowres",
                       scheduler="DPM++ 2M")
    assert text.endswith(
        "Hires upscale: 2, Hires upscaler: Latent, Hires sampler: DPM++ 2M, "
        "Hires schedule type: Karras, "  # DPM++ 2M's own schedule; Euler's is the model's
        'Hires prompt: "a castle, \\"big\\": at night\\n BREAK  detailed", '
        'Hires negative prompt: "blurry, lowres"')
    flags, lines = settings(text)
    assert (flags["hires_prompt"], flags["hires_negative_prompt"], flags["hires_scheduler"],
            flags["scheduler"], flags["schedule_type"]) == (
        HIRES_PROMPT, "blurry, lowres", "DPM++ 2M", "Euler", "Automatic")
    assert lines == []
    # The first pass's own: not written.
    same = _hires_text(prompt="a castle", negative_prompt="blurry", scheduler="Euler")
    assert "Hires prompt" not in same and "Hires negative" not in same
    assert "Hires sampler" not in same and "Hires schedule" not in same
    plain = _hires_text(prompt="a tower at dawn")  # nothing to quote: as it is
    assert plain.endswith("Hires prompt: a tower at dawn")
    assert settings(plain)[0]["hires_prompt"] == "a tower at dawn"
    # A hires schedule type sdjax's hires pass would not run (one schedule type for both).
    flags, lines = settings(text.replace("schedule type: Karras", "schedule type: Exponential"))
    assert flags["hires_scheduler"] == "DPM++ 2M" and len(lines) == 1
    assert lines[0].startswith("Hires schedule type: Exponential: sdjax's hires pass takes the "
                               "first pass's schedule type (Karras)")


@pytest.mark.parametrize("case", ["no text", "not a PNG", "missing"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    path = {"no text": lambda: _png(tmp_path / "a.png"),
            "not a PNG": lambda: _png(tmp_path / "a.jpg", fmt="JPEG"),
            "missing": lambda: tmp_path / "nope.png"}[case]()
    out = tmp_path / "out"
    rc = main(["--from_png", str(path), "--outdir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: --from_png")
    assert not out.exists()


def test_png_info_reads_quoted_values_with_the_webui_names(tmp_path):
    from fastapi.testclient import TestClient

    from sdjax.serve.app import create_app
    from sdjax.serve.checkpoints import ModelRegistry
    png = _png(tmp_path / "webui.png", WEBUI_TEXT)
    app = create_app(ModelRegistry({"tiny": "tiny"}, lambda source: None))
    r = TestClient(app).post("/sdapi/v1/png-info",
                             json={"image": base64.b64encode(png.read_bytes()).decode()})
    assert r.status_code == 200, r.text
    p = r.json()["parameters"]
    assert p["Prompt"].endswith("<lora:detail:0.6>, sunset")
    assert p["ControlNet 0"] == ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], "
                                 "Weight: 1")
    assert (p["Variation seed"], p["Variation seed strength"], p["ENSD"]) == ("42", "0.3",
                                                                             "31337")
    assert (p["Seed resize from-1"], p["Seed resize from-2"]) == ("448", "640")
    assert (p["Size-1"], p["Size-2"], p["Hires upscale"], p["Schedule type"]) == (
        "512", "768", "1.5", "Karras")
    assert (p["Clip skip"], p["RNG"]) == ("2", "GPU")  # RNG: the WebUI's default, as it says
    assert p["Lora hashes"] == "detail: 1a2b3c4d5e6f"
    png = _png(tmp_path / "hires.png", _hires_text(prompt=HIRES_PROMPT, scheduler="DPM++ 2M"))
    r = TestClient(app).post("/sdapi/v1/png-info",
                             json={"image": base64.b64encode(png.read_bytes()).decode()})
    p = r.json()["parameters"]
    assert (p["Hires prompt"], p["Hires sampler"], p["Hires schedule type"]) == (
        HIRES_PROMPT, "DPM++ 2M", "Karras")


def test_from_png_makes_the_same_image(sd1_folder, tmp_path, capsys):
    # The shape test_sample_cli compiles: 16x16, 2 steps, the model's scheduler.
    first = ["--model", str(sd1_folder), "--num_devices", "1"]
    assert main([*first, "--prompt", "x", "--steps", "2", "--seed", "11",
                 "--outdir", str(tmp_path / "a")]) == 0
    (made,) = sorted((tmp_path / "a").glob("*.png"))
    rc = main([*first, "--from_png", str(made), "--outdir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 0, err
    (again,) = sorted((tmp_path / "b").glob("*.png"))
    assert "not honoured" not in err
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(again)))
    assert Image.open(made).text["parameters"] == Image.open(again).text["parameters"]
