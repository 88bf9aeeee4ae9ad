"""The WebUI's seamless tiling and hires fix (sdjax.hires, sdjax.latent_resize): tiling against
diffusers with every Conv2d padding circularly, the tiled output wrapping around without a
seam, the latent resizes against torch's F.interpolate, the hires fix as the composition of
its two calls, and its bad input."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image

from sdjax import hires, latent_resize
from sdjax.images import parse_parameters
from sdjax.models.layers import circular_padding
from sdjax.pipeline import StableDiffusionPipeline

STEPS = 3
SIZE = 16  # pixels of the first pass; the tiny VAE's factor is 2, its UNet downsamples once


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


@pytest.fixture(scope="module")
def circular_reference(sd1_folder):
    """diffusers' pipeline of the same folder, every Conv2d of its UNet and VAE circular (the
    WebUI's method)."""
    from diffusers import StableDiffusionPipeline as TorchPipeline
    ref = TorchPipeline.from_pretrained(str(sd1_folder), safety_checker=None,
                                        requires_safety_checker=False)
    for m in [*ref.unet.modules(), *ref.vae.modules()]:
        if isinstance(m, torch.nn.Conv2d):
            m.padding_mode = "circular"
    return ref


def _seam_and_interior(image: np.ndarray) -> tuple[float, float]:
    """(the larger mean step across the wrap-around edges, the largest mean step between
    neighbouring rows or columns inside) of an (H, W, 3) image."""
    x = image.astype(np.float64)
    seam = max(np.abs(x[:, 0] - x[:, -1]).mean(), np.abs(x[0] - x[-1]).mean())
    inside = max(np.abs(np.diff(x, axis=0)).mean(axis=(1, 2)).max(),
                 np.abs(np.diff(x, axis=1)).mean(axis=(0, 2)).max())
    return seam, inside


def test_tiling_matches_diffusers_circular_and_wraps_around(pipe, circular_reference):
    half = SIZE // 4  # latent pixels: half the latent, a multiple of the UNet's downsampling
    lat = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="float",
              tiling=True)
    out = pipe("a red circle", latents=lat, **kw).images
    with torch.no_grad():
        ref = circular_reference(
            "a red circle", latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()),
            num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np").images
    err = np.abs(out - ref).max()
    print(f"tiling vs diffusers circular: max abs pixel error {err:.2e}")
    assert err < 2e-4
    # On the torus: the noise rolled by half the latent gives the image rolled by half, so
    # the wrap-around edge is an edge like any inside, and no larger than the inside's.
    count = pipe.compile_count
    rolled = pipe("a red circle", latents=np.roll(lat, (half, half), axis=(1, 2)), **kw).images
    assert pipe.compile_count == count
    np.testing.assert_allclose(rolled[0], np.roll(out[0], (2 * half, 2 * half), axis=(0, 1)),
                               atol=1e-4)
    seam, inside = _seam_and_interior(out[0])
    assert seam <= inside
    # The VAE alone, both ways, against diffusers' circular VAE; rolling is exact only with
    # circular padding (zeros at the border break it), so the check above can fail.
    vae = pipe.network("vae")
    z = np.random.RandomState(1).randn(1, 8, 8, 4).astype(np.float32)
    image = np.random.RandomState(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    decode, encode = nnx.jit(lambda m, z: m.decode(z)), nnx.jit(lambda m, x: m.encode(x)[0])
    with circular_padding():
        ours_dec, ours_enc = np.asarray(decode(vae, z)), np.asarray(encode(vae, image))
        ours_rolled = np.asarray(decode(vae, np.roll(z, 2, axis=2)))
    plain_decode = nnx.jit(lambda m, z: m.decode(z))  # traced outside: zero padding
    plain_rolled, plain = (np.asarray(plain_decode(vae, a)) for a in (np.roll(z, 2, axis=2), z))
    with torch.no_grad():
        ref_vae = circular_reference.vae
        ref_dec = ref_vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample
        ref_enc = ref_vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(ours_dec, ref_dec.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(ours_enc, ref_enc.latent_dist.mean.numpy().transpose(0, 2, 3, 1),
                               atol=1e-4)
    np.testing.assert_allclose(ours_rolled, np.roll(ours_dec, 4, axis=2), atol=1e-4)
    assert np.abs(plain_rolled - np.roll(plain, 4, axis=2)).max() > 1e-2


@pytest.mark.parametrize("upscaler", list(hires.UPSCALERS)[:6])
def test_latent_resizes_match_torch_interpolate(upscaler):
    mode, antialias = hires.UPSCALERS[upscaler]
    x = np.random.RandomState(0).randn(2, 4, 9, 13).astype(np.float32)  # NCHW
    for size in [(18, 26), (13, 19), (5, 7), (27, 20)]:  # up, up by odd factors, down, mixed
        ref = F.interpolate(torch.from_numpy(x), size=size, mode=mode, antialias=antialias)
        ours = latent_resize.interpolate(x.transpose(0, 2, 3, 1), size, mode, antialias)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-5, err_msg=f"{upscaler} to {size}")


def test_hires_sizes_are_the_webuis():
    assert hires.sizes(64, 96, 8, scale=1.5) == hires.Sizes((12, 18), (0, 0), 8)
    # Another aspect: cover (512x768 -> 1024 wide covers 1024x1024 at 1024x1536), then crop
    # the centre in latent units, as the WebUI's truncate_x/y.
    s = hires.sizes(512, 768, 8, size=(1024, 1024))
    assert (s.resized, s.crop, s.pixels) == ((128, 192), (0, 64), (1024, 1024))
    assert hires.sizes(512, 768, 8, size=(0, 1536)).pixels == (1024, 1536)
    x = np.arange(10)[None, :, None]
    assert hires.centre_crop(x, (0, 0)).shape == (1, 10, 1)
    assert hires.centre_crop(x, (3, 0))[0, :, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]


X, Y = "a red circle", "a blue square"
# Every WebUI option in one call: prompt editing, alternation and AND (prompts and negative
# prompts), variation seeds with seed resize, tiling. The latent hires fix's composition test
# and the 8-device test share its programs.
EDITED = [f"[{X}:{Y}:0.5] AND {Y} :0.7", f"[{X}|{Y}]", f"[{X}:{Y}:1.5]"]
# (with the WebUI's NV noise and an ancestral WebUI sampler: its start and per-step noise
# from each image's generator, the same for any device count)
OPTIONS = dict(negative_prompt=["", f"[{Y}::2]", ""], subseed=11,
               subseed_strength=[0.3, 0.0, 1.0], seed_resize_from=(12, 20), tiling=True,
               scheduler="Euler a", rng="nv", eta_noise_seed_delta=31337)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_is_the_composition_of_its_two_calls(pipe, upscaler, monkeypatch):
    """With every option (latent) the second call takes them all and first_pass_steps: its
    schedules count on from the first pass's steps, fractions from 1.0, as the WebUI's."""
    x, y = X, Y
    prompts, options = (EDITED, OPTIONS) if upscaler == "latent" else ([x, y], {})
    seed, strength = 7, 0.6
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=seed, **options)
    submitted = []
    submit = pipe.submit
    monkeypatch.setattr(pipe, "submit", lambda c: submitted.append(c) or submit(c))
    out = pipe(prompts, hires_scale=2, hires_upscaler=upscaler, hires_denoising_strength=strength,
               **kw)
    monkeypatch.undo()
    order = pipe._schedule(STEPS, None)[1].order  # the WebUI's firstpass_steps
    assert [c.first_pass_steps for c in submitted] == [None, None, STEPS * order]
    count = pipe.compile_count
    if upscaler == "latent":
        first = pipe(prompts, output_type="latent", **kw).images
        big = F.interpolate(torch.from_numpy(first.transpose(0, 3, 1, 2).copy()),
                            size=(SIZE, SIZE), mode="bilinear")
        image = big.numpy().transpose(0, 2, 3, 1)
    else:
        first = pipe(prompts, **kw).images
        image = [np.asarray(Image.fromarray(a).resize((2 * SIZE, 2 * SIZE),
                                                       Image.Resampling.LANCZOS))
                 for a in first]
    again = dict(image=image, strength=strength, num_inference_steps=STEPS, seed=seed,
                 first_pass_steps=STEPS * order if upscaler == "latent" else None, **options)
    second = pipe(prompts, **again)
    if upscaler == "latent":  # [x:y:0.5] is all y in the hires pass: y, in the same program
        np.testing.assert_array_equal(pipe([f"{y} AND {y} :0.7", *prompts[1:]],
                                           **again).images[0], second.images[0])
        with pytest.raises(ValueError, match="^first_pass_steps is the hires pass's own"):
            pipe(prompts, hires_scale=2, first_pass_steps=3, **kw)
        with pytest.raises(ValueError, match="^first_pass_steps must be"):
            pipe(prompts, **{**again, "first_pass_steps": 0})
    assert pipe.compile_count == count  # both passes' executables were cached
    assert out.images.shape == (len(prompts), 2 * SIZE, 2 * SIZE, 3)
    assert out.seeds == second.seeds
    # uint8 images; the latents resized by torch differ from ours by float rounding (1e-6)
    diff = np.abs(out.images.astype(int) - second.images).max()
    assert diff <= (1 if upscaler == "latent" else 0)


def test_eight_devices_give_the_one_device_images(pipe, sd1_folder):
    """Every WebUI option in one call (EDITED, OPTIONS: the WebUI's NV noise with ENSD and
    "Euler a", whose per-step noise comes from each image's generator), its batch of 3
    sharded over 8 fake devices (5 of them padding), against one device: the first pass,
    then the hires fix."""
    eight = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                    num_devices=8)
    call = dict(seed=7, num_inference_steps=STEPS, height=SIZE, width=SIZE, **OPTIONS)
    # The 1-device programs are the composition test's. Float rounding between programs of
    # other batch shapes: the tiny model's first-pass latents (Euler a from sigma_max 14.6)
    # reach 45, 4.2e-4 apart (1e-5 of their scale; a different noise draw would be O(1)).
    one, many = (p(EDITED, output_type="latent", **call).images for p in (pipe, eight))
    assert np.abs(one[0] - one[1]).max() > 1e-2 and np.abs(one[1] - one[2]).max() > 1e-2
    np.testing.assert_allclose(many, one, atol=2e-5 * max(10.0, np.abs(one).max()))
    one, many = (p(EDITED, hires_scale=2, hires_upscaler="latent", hires_denoising_strength=0.6,
                   **call).images.astype(int) for p in (pipe, eight))
    assert np.abs(one[0] - one[1]).max() > 0 and np.abs(one[1] - one[2]).max() > 0
    assert np.abs(many - one).max() <= 1
    assert eight.compile_count == 2


@pytest.mark.parametrize("fields, message", [
    ({"hires_scale": 1.0}, "hires_scale must be above 1"),
    ({"hires_scale": 2, "hires_size": (32, 32)}, "hires_scale or hires_size"),
    ({"hires_scale": 2, "hires_upscaler": "ESRGAN"}, "unknown hires_upscaler 'ESRGAN'"),
    ({"hires_scale": 2, "hires_denoising_strength": 0}, r"must be in \(0, 1\]"),
    ({"hires_scale": 2, "hires_denoising_strength": 1.5}, r"must be in \(0, 1\]"),
    ({"hires_steps": 4}, "give hires_scale or hires_size too"),
    ({"hires_size": (0, 0)}, "must give a height or a width"),
    ({"hires_scale": 2, "hires_scheduler": "nope"}, "unknown hires_scheduler 'nope'"),
    ({"hires_scale": 2, "image": np.zeros((16, 16, 3), np.uint8)}, "text-to-image"),
])
def test_bad_hires_input_is_one_line(pipe, fields, message):
    count = pipe.compile_count
    with pytest.raises(ValueError, match=message) as e:
        pipe.submit("a cat", num_inference_steps=STEPS, height=SIZE, width=SIZE, **fields)
    assert "\n" not in str(e.value) and pipe.compile_count == count
    with pytest.raises(TypeError, match="tiling must be True or False"):
        pipe.submit("a cat", tiling="yes")


@pytest.fixture(scope="module")
def server(pipe):
    from sdjax.serve.app import create_app
    from sdjax.serve.background import BackgroundServer
    from sdjax.serve.checkpoints import ModelRegistry
    # (every call runs max_batch images: the 2 of a request, the batch pipe(...) gives them)
    app = create_app(ModelRegistry({"tiny": "tiny"}, lambda source: pipe), window_s=0.05,
                     max_batch=2)
    s = BackgroundServer(app)
    s.client = httpx.Client(base_url=s.url, timeout=300)
    yield s
    s.client.close()
    s.stop()


def _png(b64: str) -> tuple[np.ndarray, str]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")), image.info["parameters"]


def test_server_hires_and_tiling_requests(server, pipe):
    """The WebUI's fields through HTTP: a hires request is the pipeline's hires call (with
    the server's noise source, nv, and the WebUI's own PLMS), with the WebUI's infotext read
    back by png-info; a tiling request is the pipeline's tiling call."""
    shape = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "steps": STEPS,
             "sampler_name": "PLMS", "cfg_scale": 7.5, "seed": 7}
    r = server.client.post("/sdapi/v1/txt2img", json={
        **shape, "batch_size": 2, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
        "denoising_strength": 0.6, "hr_sampler_name": "Use same sampler"})
    assert r.status_code == 200, r.text
    expected = pipe(["a red circle"] * 2, seeds=[7, 8], image_indices=[0, 0], height=SIZE,
                    width=SIZE, num_inference_steps=STEPS, scheduler="PLMS", hires_scale=2,
                    hires_denoising_strength=0.6, rng="nv").images  # the server's GPU source
    for k, b64 in enumerate(r.json()["images"]):
        image, text = _png(b64)
        np.testing.assert_array_equal(image, expected[k])
    assert "Size: 16x16" in text and "Denoising strength: 0.6, Hires upscale: 2, " \
        "Hires upscaler: Latent" in text
    info = server.client.post("/sdapi/v1/png-info", json={"image": b64}).json()["parameters"]
    assert (info["Hires upscale"], info["Hires upscaler"], info["Denoising strength"]) == (
        "2", "Latent", "0.6")
    # Tiling: the request's call is the pipeline's with tiling=True (the pipeline's tiling is
    # the diffusers test above), its PNG text the WebUI's; the call itself is not run here.
    from sdjax.outputs import PipelineOutput
    seen = []

    class Done:
        def result(self):
            return PipelineOutput(images=np.zeros((1, SIZE, SIZE, 3), np.uint8), seeds=[7])

    pipe.submit = lambda call: seen.append(call) or Done()
    try:
        r = server.client.post("/sdapi/v1/txt2img", json={**shape, "tiling": True})
    finally:
        del pipe.submit
    assert r.status_code == 200, r.text
    assert [(c.tiling, c.hires_scale, c.seeds) for c in seen] == [(True, None, [7])]
    image, text = _png(r.json()["images"][0])
    assert "Tiling: True" in text and parse_parameters(text)["Tiling"] == "True"
    modes = server.client.get("/sdapi/v1/latent-upscale-modes").json()
    assert [m["name"] for m in modes][:2] == ["Latent", "Latent (antialiased)"]
    assert "Lanczos" in [u["name"] for u in server.client.get("/sdapi/v1/upscalers").json()]
    # Bad hires fields: a one-line 4xx.
    for fields, message in [({"hr_scale": 1}, "hr_scale must be above 1"),
                            ({"hr_upscaler": "ESRGAN_4x"}, "unknown hr_upscaler"),
                            ({"hr_resize_x": 4096, "hr_resize_y": 4096}, "max_pixels"),
                            ({"denoising_strength": 0}, "denoising_strength must be in")]:
        r = server.client.post("/sdapi/v1/txt2img", json={**shape, "enable_hr": True, **fields})
        assert r.status_code == 422 and message in r.json()["detail"], r.text
        assert "\n" not in r.json()["detail"]


@pytest.mark.parametrize("argv, message", [
    (["--hires_scale", "1"], "--hires_scale must be above 1"),
    (["--hires_scale", "2", "--hires_upscaler", "ESRGAN"], "unknown --hires_upscaler"),
    (["--hires_scale", "2", "--hires_denoising_strength", "1.5"], "must be in (0, 1]"),
    (["--hires_steps", "4"], "--hires_steps needs --hires_scale or --hires_size"),
    (["--hires_size", "4096,4096"], "max_pixels"),
])
def test_cli_bad_hires_flags_exit_2(argv, message, tmp_path, capsys):
    from sdjax.sample import main
    rc = main(["--model", "toy", "--steps", "2", "--outdir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
