"""The x4 upscaler against diffusers' StableDiffusionUpscalePipeline, in float32, on a tiny
model of its layout (7-channel UNet with a noise-level class embedding, VAE factor 4)."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.upscale import StableDiffusionUpscalePipeline
from tests.tiny_models import diffusers_scheduler

TOL = 2e-4
STEPS = 4
LOW = 8  # low-res pixels = latent size; the output is 32x32
PROMPTS = ["a red circle", "a cat"]


@pytest.fixture(scope="module")
def upscalers(upscaler_folder):
    from diffusers import StableDiffusionUpscalePipeline as Reference
    ref = Reference.from_pretrained(str(upscaler_folder))
    ours = StableDiffusionUpscalePipeline.from_pretrained(str(upscaler_folder), dtype="float32",
                                                          num_devices=1)
    return ours, ref


def _inputs(seed: int):
    r = np.random.RandomState(seed)
    low = r.randint(0, 256, (2, LOW, LOW, 3)).astype(np.uint8)
    return low, r.randn(2, LOW, LOW, 3).astype(np.float32), r.randn(2, LOW, LOW, 4).astype(
        np.float32)


# Euler: its input scaling must apply to the latents only, before the low-res image is
# appended (the upscaler adds nothing scheduler-specific beyond that).
@pytest.mark.parametrize("scheduler", ["euler"])
def test_upscaler_matches_diffusers(upscalers, scheduler, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module
    ours, ref = upscalers
    ref.scheduler = diffusers_scheduler(scheduler, ref.scheduler.config)
    for seed, noise_level in ((0, 20), (1, 150)):  # one compile serves both noise levels
        low, image_noise, latents = _inputs(seed)
        by_channels = {3: image_noise, 4: latents}

        def randn_tensor(shape, by_channels=by_channels, **kwargs):
            return torch.from_numpy(by_channels[shape[1]].transpose(0, 3, 1, 2).copy())

        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
        with torch.no_grad():
            expected = ref(PROMPTS, image=[Image.fromarray(x) for x in low],
                           negative_prompt=["low quality"] * 2, num_inference_steps=STEPS,
                           guidance_scale=9.0, noise_level=noise_level,
                           output_type="np").images
        out = ours(PROMPTS, image=low, negative_prompt="low quality", num_inference_steps=STEPS,
                   noise_level=noise_level, latents=latents, image_noise=image_noise,
                   scheduler=scheduler, output_type="float").images
        assert out.shape == expected.shape == (2, 4 * LOW, 4 * LOW, 3)
        err = np.abs(out - expected).max()
        print(f"upscaler {scheduler} noise_level {noise_level}: max abs pixel error {err:.1e}")
        assert err < TOL


def test_upscaler_bad_input(upscalers):
    ours, _ = upscalers
    low = np.zeros((LOW, LOW, 3), np.uint8)
    with pytest.raises(ValueError, match="needs an image"):
        ours("a cat")
    with pytest.raises(ValueError, match="noise_level"):
        ours("a cat", image=low, noise_level=351)
    with pytest.raises(ValueError, match="mask_image or strength"):
        ours("a cat", image=low, mask_image=low)
    with pytest.raises(ValueError, match="height"):
        ours("a cat", image=low, height=64)


# One call shape for the next two tests: low-res noise and latents drawn from (seed, i).
_SEEDED = dict(negative_prompt="low quality", num_inference_steps=STEPS, noise_level=100,
               scheduler="euler", output_type="float")


def test_eight_devices_give_the_one_device_images(upscalers, upscaler_folder):
    """Two images over 8 fake devices (14 of 16 rows padding) at the one-device call's 2
    images per device: bitwise the same images (docs/tpu-gpu.md#reproducibility)."""
    one, _ = upscalers
    eight = StableDiffusionUpscalePipeline.from_pretrained(str(upscaler_folder),
                                                           dtype="float32", num_devices=8)
    low = _inputs(0)[0]
    a, b = (pipe(PROMPTS, image=low, seed=3, batch_size_per_device=2, **_SEEDED).images
            for pipe in (one, eight))
    assert np.abs(a[0] - a[1]).max() > 0.02  # two prompts, two images
    np.testing.assert_array_equal(a, b)


def test_low_res_noise_comes_from_the_seed(upscalers):
    """Without image_noise the low-res noise is drawn from (seed, i): same seed, same image."""
    ours, _ = upscalers
    low = _inputs(0)[0]
    a, b, c = (ours(PROMPTS, image=low, seed=s, **_SEEDED).images for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.02


# Tiled decode: the tiny VAE's tiles are 8 latents (its sample_size 32 / factor 4), starting
# every 6, so 12x20 latents make a 2x4 grid whose last row and column are shorter tiles.
TILED = (12, 20)


def test_tiled_decode_matches_diffusers_and_the_whole_decode(upscalers):
    """Our tiled decode against diffusers' (enable_tiling) on the same VAE, and against the
    whole decode: the tiles reassemble the whole image. A random tiny VAE's group norms and
    borders make each tile differ far more than a trained VAE's do, so "close" is a
    correlation here; diffusers' tiled decode differs from its whole decode the same way."""
    import jax

    from sdjax.vae_tiling import VaeTiling, tiled_decode
    ours, ref = upscalers
    vae, tiling = ours.network("vae"), VaeTiling.for_vae(ours.vae_config)
    z = np.random.RandomState(0).randn(1, *TILED, 4).astype(np.float32)
    tiled, whole = (np.asarray(x) for x in jax.jit(lambda z: (
        tiled_decode(vae.decode, z, tiling), vae.decode(z)))(z))
    with torch.no_grad():
        ref.vae.enable_tiling()
        try:
            expected = ref.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample
        finally:
            ref.vae.disable_tiling()
    expected = expected.numpy().transpose(0, 2, 3, 1)
    assert tiled.shape == expected.shape == (1, 4 * TILED[0], 4 * TILED[1], 3)
    err = np.abs(tiled - expected).max()
    print(f"tiled decode: max abs error {err:.1e} against diffusers' tiled_decode")
    assert err < 1e-4  # [-1, 1] pixels, float32
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.6  # 0.76 measured


def test_the_upscaler_program_decodes_in_tiles(upscalers, monkeypatch):
    """vae_tiling=True reaches the compiled call (traced only: the decode is the test above)."""
    from sdjax import vae_tiling
    ours, _ = upscalers
    seen = []

    def spy(decode, z, tiling):
        seen.append((z.shape[1:3], tiling))
        return decode(z)

    monkeypatch.setattr(vae_tiling, "tiled_decode", spy)
    low = np.zeros(TILED + (3,), np.uint8)
    ours.lower("a cat", image=low, num_inference_steps=1, vae_tiling=False)
    assert not seen
    ours.lower("a cat", image=low, num_inference_steps=1, vae_tiling=True)
    assert seen == [(TILED, vae_tiling.VaeTiling.for_vae(ours.vae_config))]


def test_when_the_upscaler_decodes_in_tiles(upscalers):
    from sdjax.upscale import TILED_DECODE_ABOVE, decode_tiling
    cfg = upscalers[0].vae_config  # factor 4: latents of side n make 4n output pixels
    assert TILED_DECODE_ABOVE == 1024 * 1024
    assert decode_tiling(cfg, 256, 256, None) is None  # 1024x1024 out: whole
    assert decode_tiling(cfg, 256, 264, None) is not None  # above it: tiles
    assert decode_tiling(cfg, 512, 512, False) is None
    assert decode_tiling(cfg, *TILED, True) is not None
    assert decode_tiling(cfg, 8, 8, True) is None  # one tile: the whole decode
    with pytest.raises(ValueError, match="vae_tiling"):
        decode_tiling(cfg, 8, 8, "yes")


def test_the_server_dispatches_and_runs_an_upscaler_folder(upscalers, upscaler_folder):
    """sdjax.dispatch picks the upscaler class for its folder, so sdjax.serve and
    sdjax.generate load it as one; the server's img2img runs it on the init images (4x their
    size, the images of the Python call), and its txt2img says where to go instead."""
    import base64
    import io

    from PIL import Image

    from sdjax.call_settings import Size
    from sdjax.dispatch import pipeline_class
    from sdjax.serve.checkpoints import ModelRegistry
    from sdjax.serve.generation import plan_img2img, plan_txt2img, run_call
    from sdjax.serve.limits import BadRequest, Limits
    from sdjax.serve.schemas import Img2ImgRequest, Txt2ImgRequest
    ours, _ = upscalers
    assert pipeline_class(str(upscaler_folder)) is StableDiffusionUpscalePipeline
    registry = ModelRegistry({"up": str(upscaler_folder)}, lambda source: ours)
    low = _inputs(0)[0]
    images = []
    for x in low:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    fields = dict(prompt="a red circle", steps=STEPS, cfg_scale=7.0, seed=3, batch_size=2,
                  sampler_name="Euler")
    with pytest.raises(BadRequest, match="x4 upscaler: send the low-resolution image"):
        plan_txt2img(Txt2ImgRequest(**fields), registry, Limits())
    plan = plan_img2img(Img2ImgRequest(**fields, init_images=images), registry, Limits())
    assert plan.shape.settings.size == Size(4 * LOW, 4 * LOW)
    out = run_call(registry)(plan.shape, plan.specs)
    expected = ours(["a red circle"] * 2, image=low, seeds=[3, 4], image_indices=[0, 0],
                    num_inference_steps=STEPS, guidance_scale=7.0, scheduler="euler",
                    rng="nv").images  # the server's default source (the WebUI's GPU)
    assert "Noise level: 20" in plan.shape.settings.parameters("a red circle", "", 3,
                                                               guidance_scale=7.0)
    np.testing.assert_array_equal(np.stack(out), expected)
    # the same request over HTTP (the web page's Upscale tab sends it), and the page's defaults
    import httpx

    from sdjax.serve.app import create_app
    from sdjax.serve.background import BackgroundServer
    server = BackgroundServer(create_app(registry, window_s=0.01, max_batch=2))  # 2 a call
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            r = client.post("/sdapi/v1/img2img", json={**fields, "init_images": images})
            assert r.status_code == 200, r.text
            served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
                      for b in r.json()["images"]]
            np.testing.assert_array_equal(np.stack(served), expected)
            defaults = client.get("/sdjax/v1/model-defaults").json()
            assert defaults["upscaler"] and defaults["width"] is None
            assert (defaults["steps"], defaults["cfg_scale"]) == (75, 9.0)
    finally:
        server.stop()
