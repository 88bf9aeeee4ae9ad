"""python -m sdjax.sample with --image/--mask/--strength/--noise_level: outputs, the WebUI's
metadata fields, and bad input (one line, exit 2, nothing written)."""

import numpy as np
import pytest
from PIL import Image

from sdjax.images import parse_parameters
from sdjax.sample import main


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    r = np.random.RandomState(0)
    image = r.randint(0, 256, (32, 32, 3)).astype(np.uint8)
    Image.fromarray(image).save(d / "in.png")
    Image.fromarray(image).convert("RGBA").save(d / "rgba.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[10:18, 12:20] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:16]).save(d / "small_mask.png")
    Image.fromarray(image[:8, :8]).save(d / "low.png")
    (d / "text.png").write_text("not an image")
    return d


def test_only_masked_inpainting_keeps_everything_outside_the_region(sd1_folder, files,
                                                                    tmp_path, capsys):
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompt", "a cat", "--steps", "3",
                      "--num_devices", "1", "--image", files / "in.png", "--mask",
                      files / "mask.png", "--only_masked_padding", "2", "--mask_blur", "1",
                      "--masked_content", "fill", "--outdir", tmp_path)
    assert rc == 0, err
    [png] = tmp_path.glob("*.png")
    meta = parse_parameters(Image.open(png).text["parameters"])
    assert (meta["Denoising strength"], meta["Mask blur"], meta["Inpaint area"],
            meta["Masked area padding"], meta["Masked content"]) == (
        "1", "1", "Only masked", "2", "fill")
    # The flag's choices are the pipeline's masked_content values, spelled with underscores.
    from sdjax import tasks
    from sdjax.sample import MASKED_CONTENT_FLAGS
    assert [c.replace("_", " ") for c in MASKED_CONTENT_FLAGS] == list(tasks.MASKED_CONTENT)
    out = np.asarray(Image.open(png)).astype(int)
    original = np.asarray(Image.open(files / "in.png")).astype(int)
    # Outside the blurred mask the original comes back exactly; inside, new content.
    assert (out[:6] == original[:6]).all() and (out[24:] == original[24:]).all()
    assert np.abs(out[12:16, 14:18] - original[12:16, 14:18]).mean() > 10


def test_upscaler_writes_four_times_the_input(upscaler_folder, files, tmp_path, capsys):
    # No --guidance_scale: the upscaler's own 9 runs and is recorded (--steps 2 keeps it cheap;
    # test_upscaler_defaults_are_the_pipelines checks the 75 steps).
    rc, _, err = _run(capsys, "--model", upscaler_folder, "--prompt", "a cat", "--steps", "2",
                      "--num_devices", "1", "--image", files / "low.png", "--noise_level",
                      "30", "--outdir", tmp_path)
    assert rc == 0, err
    [png] = tmp_path.glob("*.png")
    assert Image.open(png).size == (32, 32)
    params = parse_parameters(Image.open(png).text["parameters"])
    assert params["Noise level"] == "30"
    assert (params["CFG scale"], params["Steps"]) == ("9", "2")


@pytest.mark.parametrize("argv, expected", [
    ([], {"upscaler": (75, 9.0), "sd": (50, 7.5)}),
    (["--steps", "20", "--guidance_scale", "4"], {"upscaler": (20, 4.0), "sd": (20, 4.0)}),
])
def test_upscaler_defaults_are_the_pipelines(argv, expected):
    """Unset --steps/--guidance_scale resolve through the pipeline class's defaults (no
    sdjax.json here): the upscaler's are diffusers' 75 and 9."""
    from sdjax.model_defaults import resolve
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.sample import build_parser
    from sdjax.upscale import StableDiffusionUpscalePipeline
    for kind, cls in (("upscaler", StableDiffusionUpscalePipeline),
                      ("sd", StableDiffusionPipeline)):
        args = build_parser().parse_args(["--prompt", "x", *argv])
        settings = resolve({"num_inference_steps": args.steps,
                            "guidance_scale": args.guidance_scale}, {}, cls.class_defaults)
        assert (settings["num_inference_steps"], settings["guidance_scale"]) == expected[kind]


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "file not found"),
    (["--image", "text.png"], "not a readable image"),
    (["--image", "in.png", "--mask", "small_mask.png"], "--mask is 32x16 but --image is 32x32"),
    (["--image", "in.png", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--image", "in.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--mask", "mask.png"], "--mask needs an --image"),
    (["--strength", "0.5"], "--strength needs an --image"),
    (["--image", "in.png", "--only_masked_padding", "4"], "needs a --mask"),
    (["--image", "in.png", "--masked_content", "fill"], "--masked_content needs a --mask"),
    (["--image", "in.png", "--mask", "mask.png", "--mask_blur", "-1"], "must not be negative"),
])
def test_bad_image_input(sd1_folder, files, tmp_path, capsys, args, message):
    argv = [files / a if a.endswith(".png") else a for a in args]
    rc, out, err = _run(capsys, "--model", sd1_folder, "--prompt", "a", "--outdir",
                        tmp_path / "out", *argv)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


def test_rgba_is_converted_and_said_so(sd1_folder, files, tmp_path, capsys):
    # The mismatching mask stops the run before the model loads, after the note.
    rc, _, err = _run(capsys, "--model", sd1_folder, "--prompt", "a", "--image",
                      files / "rgba.png", "--mask",
                      files / "small_mask.png", "--outdir", tmp_path / "out")
    assert rc == 2 and "RGBA; converted to RGB" in err


@pytest.mark.parametrize("args, message", [
    ([], "needs --image"),
    (["--image", "low.png", "--mask", "low.png"], "--mask does not apply to an upscaler"),
    (["--image", "low.png", "--noise_level", "351"], "--noise_level must be an integer in [0, 350]"
     ),
])
def test_bad_upscaler_input(upscaler_folder, files, tmp_path, capsys, args, message):
    argv = [files / a if a.endswith(".png") else a for a in args]
    rc, _, err = _run(capsys, "--model", upscaler_folder, "--prompt", "a", "--num_devices",
                      "1", "--outdir", tmp_path / "out", *argv)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
