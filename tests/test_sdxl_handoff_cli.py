"""SDXL from the command line and the server: the base→refiner hand-off (``--refiner``, the
WebUI's ``refiner_checkpoint``) makes the Python API's two calls' images, on 8 fake devices
as on 1; ``--prompt_2`` reaches the base; bad combinations are refused before anything loads.

One pair of one-device pipelines serves as the reference for the CLI and the server, so the
hand-off's two programs compile once for both (the CLI's 8-device run compiles its own).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sdjax.handoff import refine
from sdjax.images import parse_parameters
from sdjax.sample import main
from sdjax.sdxl import StableDiffusionXLPipeline
from sdjax.serve.app import create_app
from sdjax.serve.background import BackgroundServer
from sdjax.serve.checkpoints import ModelRegistry
from sdjax.serve.generation import plan_txt2img
from sdjax.serve.limits import BadRequest, Limits
from sdjax.serve.schemas import Img2ImgRequest, Txt2ImgRequest

PROMPTS = ["a red circle", "a blue square"]
CALL = dict(num_inference_steps=4, guidance_scale=7.5, scheduler="euler_a", height=16,
            width=16)


@pytest.fixture(scope="module")
def one_device(sdxl_folder, sdxl_refiner_folder):
    return tuple(StableDiffusionXLPipeline.from_pretrained(str(f), dtype="float32",
                                                           num_devices=1)
                 for f in (sdxl_folder, sdxl_refiner_folder))


def test_cli_handoff_is_the_api_handoff(sdxl_folder, sdxl_refiner_folder, one_device,
                                        tmp_path, capsys, monkeypatch):
    """sdjax.sample --refiner makes what refine() makes from the same arguments (the CLI gets
    the reference pipelines, so the programs compile once; the arguments it loads them with
    are checked against from_pretrained's signature)."""
    import inspect

    base, refiner = one_device
    by_path = {str(sdxl_folder): base, str(sdxl_refiner_folder): refiner}
    signature = inspect.signature(StableDiffusionXLPipeline.from_pretrained)

    def loaded(cls, model, **kwargs):
        signature.bind(model, **kwargs)
        assert kwargs["num_devices"] == 1
        return by_path[model]

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(loaded))
    rc = main([str(a) for a in (
        "--model", sdxl_folder, "--refiner", sdxl_refiner_folder, "--refiner_switch_at", 0.5,
        "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt_2", "an oil painting",
        "--negative_prompt", "green", "--aesthetic_score", 7, "--steps", 4, "--scheduler",
        "euler_a", "--height", 16, "--width", 16, "--seed", 3, "--num_devices", 1,
        "--original_size", "32,24", "--outdir", tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "refiner:" in err
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2
    meta = parse_parameters(Image.open(files[1]).text["parameters"])
    assert (meta["prompt"], meta["Seed"], meta["Seed index"]) == (PROMPTS[1], "3", "1")
    assert (meta["Refiner"], meta["Refiner switch at"], meta["Aesthetic score"]) == (
        str(sdxl_refiner_folder), "0.5", "7")
    assert meta["Original size"] == "32 24"

    handoff = dict(switch_at=0.5, negative_prompt="green", aesthetic_score=7.0, seed=3, **CALL)
    expected = refine(base, refiner, PROMPTS, prompt_2="an oil painting",
                      original_size=(32, 24), **handoff).images
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(f)) for f in files]),
                                  expected)
    # --prompt_2 and --original_size reached the base: without either the images differ.
    for other in (dict(original_size=(32, 24)), dict(prompt_2="an oil painting")):
        plain = refine(base, refiner, PROMPTS, **other, **handoff).images
        assert np.abs(plain.astype(int) - expected).max() > 2


def test_handoff_from_eight_devices(sdxl_folder, one_device):
    """The base's denoising_end on 8 fake devices (6 of them padding) hands on the latents
    it makes on 1, and the refiner finishes them into the same images."""
    base, refiner = one_device
    eight = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), dtype="float32",
                                                      num_devices=8)
    call = dict(denoising_end=0.5, output_type="latent", seed=3, negative_prompt="green",
                **CALL)
    latents = eight(PROMPTS, **call).images
    # Latents reach |x| ~ 15 here: float32 rounding of another batch layout, no more.
    np.testing.assert_allclose(latents, base(PROMPTS, **call).images, rtol=1e-5, atol=1e-4)
    finish = dict(denoising_start=0.5, negative_prompt="green", seed=3,
                  **{k: v for k, v in CALL.items() if k not in ("height", "width")})
    expected = refine(base, refiner, PROMPTS, switch_at=0.5, negative_prompt="green", seed=3,
                      **CALL).images
    images = refiner(PROMPTS, image=latents, **finish).images
    assert np.abs(images.astype(int) - expected).max() <= 1  # uint8 may round the other way


def test_generate_hands_off_as_the_api_does(sdxl_folder, sdxl_refiner_folder, one_device,
                                            tmp_path, capsys, monkeypatch):
    """sdjax.generate --refiner (and the SDXL flags) writes the images refine() makes, records
    the hand-off in each sample's metadata and in the manifest, and a re-run that changes the
    switch point is refused. Same pipelines and shapes as the sample test: no new compile."""
    from sdjax import generate
    from tests.test_generate import read_dataset

    base, refiner = one_device
    monkeypatch.setattr(generate, "load_pipeline", lambda *args: base)
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda cls, model, **kwargs: refiner))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["--model", sdxl_folder, "--refiner", sdxl_refiner_folder, "--prompts", prompts,
            "--outdir", tmp_path / "data", "--prompt_2", "an oil painting",
            "--negative_prompt", "green", "--aesthetic_score", 7, "--steps", 4,
            "--scheduler", "euler_a", "--height", 16, "--width", 16, "--seed", 3,
            "--num_devices", 1, "--batch_size", 2, "--original_size", "32,24"]
    rc = generate.main([str(a) for a in [*argv, "--refiner_switch_at", 0.5]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    samples = read_dataset(tmp_path / "data")
    images = np.stack([np.asarray(Image.open(io.BytesIO(samples[k]["png"])))
                       for k in sorted(samples)])
    expected = refine(base, refiner, PROMPTS, switch_at=0.5, prompt_2="an oil painting",
                      negative_prompt="green", aesthetic_score=7.0, seed=3,
                      original_size=(32, 24), **CALL).images
    np.testing.assert_array_equal(images, expected)
    meta = json.loads(samples["000000001"]["json"])
    assert (meta["prompt_2"], meta["original_size"], meta["refiner_switch_at"]) == (
        "an oil painting", [32, 24], 0.5)
    png = parse_parameters(Image.open(io.BytesIO(samples["000000001"]["png"])).text[
        "parameters"])
    assert (png["Refiner"], png["Refiner switch at"]) == (str(sdxl_refiner_folder), "0.5")
    manifest = json.loads((tmp_path / "data" / "run.json").read_text())["settings"]
    assert (manifest["refiner_switch_at"], manifest["refiner"], manifest["prompt_2"]) == (
        0.5, str(sdxl_refiner_folder), "an oil painting")

    rc = generate.main([str(a) for a in [*argv, "--refiner_switch_at", 0.6]])
    err = capsys.readouterr().err
    assert rc == 2 and "other settings (refiner_switch_at: 0.5 -> 0.6)" in err, err


@pytest.mark.parametrize("args, message", [
    (["--model", "{sd1}", "--refiner", "{ref}"], "--refiner needs an SDXL base model"),
    (["--model", "{sd1}", "--prompt_2", "x"], "--prompt_2 is for SDXL"),
    (["--refiner", "{ref}", "--refiner_switch_at", "0"], "strictly between 0 and 1"),
])
def test_generate_refuses_bad_combinations_before_loading(args, message, sdxl_folder,
                                                          sdxl_refiner_folder, sd1_folder,
                                                          tmp_path, capsys):
    from sdjax import generate
    subs = {"{sd1}": str(sd1_folder), "{ref}": str(sdxl_refiner_folder)}
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    (tmp_path / "p.txt").write_text("a cat\n")
    rc = generate.main(["--model", str(sdxl_folder), "--prompts", str(tmp_path / "p.txt"),
                        "--outdir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "{sd1}", "--refiner", "{ref}"], "--refiner needs an SDXL base model"),
    (["--refiner", "{sd1}"], "is not an SDXL model"),
    (["--refiner", "{tmp}/nowhere"], "--refiner: model not found"),
    (["--refiner", "{ref}", "--refiner_switch_at", "1"], "strictly between 0 and 1"),
    (["--refiner_switch_at", "0.5"], "--refiner_switch_at needs a --refiner"),
    (["--refiner", "{ref}", "--image", "{tmp}/in.png"], "does not apply with --image"),
    (["--model", "{sd1}", "--negative_prompt_2", "x"], "--negative_prompt_2 is for SDXL"),
    (["--model", "{sd1}", "--target_size", "8,8"], "--target_size is for SDXL"),
])
def test_bad_combinations_fail_before_loading(args, message, sdxl_folder, sdxl_refiner_folder,
                                              sd1_folder, tmp_path, capsys):
    subs = {"{sd1}": str(sd1_folder), "{ref}": str(sdxl_refiner_folder), "{tmp}": str(tmp_path)}
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    rc = main(["--model", str(sdxl_folder), "--prompt", "a cat", "--outdir",
               str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def registry(one_device, sdxl_folder, sdxl_refiner_folder):
    loaded = {str(sdxl_folder): one_device[0], str(sdxl_refiner_folder): one_device[1]}

    def load(source):
        if source not in loaded:
            loaded[source] = StableDiffusionXLPipeline.from_pretrained(source, num_devices=1)
        return loaded[source]

    # The refiner's title is its folder's name, "model".
    return ModelRegistry({"xl": str(sdxl_folder)}, load, refiner=str(sdxl_refiner_folder))


SHAPE = {"width": 16, "height": 16, "steps": 4, "sampler_name": "Euler a", "cfg_scale": 7.5}


def test_server_refiner_fields(registry, one_device):
    """txt2img with refiner_checkpoint over HTTP is the API's hand-off with the WebUI's seeds
    (seed + k, index 0); the fields decide the call; bad ones are a 422."""
    app = create_app(registry, window_s=0.05, max_batch=2)  # every call's batch: 2 images
    server = BackgroundServer(app)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            r = client.post("/sdapi/v1/txt2img", json={
                **SHAPE, "prompt": "a red circle", "negative_prompt": "green", "seed": 5,
                "batch_size": 2, "refiner_checkpoint": "model [abc123]",
                "refiner_switch_at": 0.5})
            assert r.status_code == 200, r.text
            body = r.json()
            titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
            bad = client.post("/sdapi/v1/txt2img", json={**SHAPE, "refiner_checkpoint": "xl"})
    finally:
        server.stop()
    assert titles == ["xl", "model"]  # the refiner is listed, as the WebUI lists checkpoints
    served = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
                       for b in body["images"]])
    expected = refine(*one_device, ["a red circle"] * 2, switch_at=0.5,
                      negative_prompt="green", seeds=[5, 6], image_indices=[0, 0],
                      rng="nv", **CALL).images
    np.testing.assert_array_equal(served, expected)
    text = json.loads(body["info"])["infotexts"][1]
    assert "Seed: 6," in text and "Refiner: model, Refiner switch at: 0.5" in text
    assert bad.status_code == 422 and "this server's refiner is 'model'" in bad.json()["detail"]

    def shape(cls=Txt2ImgRequest, **fields):
        return plan_txt2img(cls(**{**SHAPE, **fields}), registry, Limits()).shape.settings

    # An SDXL base without the refiner: its own call; switch_at alone changes nothing (the
    # WebUI's page always sends one); another switch point is another call.
    plain = shape(refiner_switch_at=0.3)
    assert plain.model == "xl" and plain.sdxl.refiner is None
    assert plain == shape(refiner_checkpoint="None") == shape(refiner_checkpoint="")
    default = shape(refiner_checkpoint="model")
    assert (default.sdxl.refiner, default.sdxl.refiner_switch_at) == ("model", 0.8)
    assert default != plain and default != shape(refiner_checkpoint="model",
                                                  refiner_switch_at=0.5)
    for fields, message in [
        (dict(refiner_checkpoint="nope"), "'nope' is not a refiner here"),
        (dict(refiner_checkpoint="model", refiner_switch_at=1.0), "strictly between 0 and 1"),
        (dict(cls=Img2ImgRequest, refiner_checkpoint="model"), "on txt2img only"),
        # (SDXL's leading spacing puts a 1-step run's one timestep at 1: no base step.)
        (dict(refiner_checkpoint="model", steps=1), "refiner_switch_at 0.8 with 1 euler_a "
         "steps: denoising_end=0.8 stops before the first"),
    ]:
        with pytest.raises(BadRequest, match=message) as e:
            shape(**fields)
        assert e.value.status == 422
