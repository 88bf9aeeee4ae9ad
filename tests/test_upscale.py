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
    one, _ = upscalers
    eight = StableDiffusionUpscalePipeline.from_pretrained(str(upscaler_folder),
                                                           dtype="float32", num_devices=8)
    low = _inputs(0)[0]
    a, b = (pipe(PROMPTS, image=low, seed=3, **_SEEDED).images for pipe in (one, eight))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_low_res_noise_comes_from_the_seed(upscalers):
    """Without image_noise the low-res noise is drawn from (seed, i): same seed, same image."""
    ours, _ = upscalers
    low = _inputs(0)[0]
    a, b, c = (ours(PROMPTS, image=low, seed=s, **_SEEDED).images for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.02
