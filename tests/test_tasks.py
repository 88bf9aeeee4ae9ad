"""img2img and inpainting on the sampling core, against diffusers' pipelines in float32.

diffusers draws its noise with ``randn_tensor`` and samples the VAE posterior; the reference
runs here with both replaced (the same noise array, the posterior mean), so both sides compute
the same function. Each (task, scheduler) compiles once: strength is a runtime input, so one
executable serves every strength."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.pipeline import StableDiffusionPipeline
from tests.tiny_models import diffusers_scheduler

SCHEDULERS = ["pndm", "ddim", "euler", "lms", "dpmpp_2m"]
STRENGTHS = [0.3, 0.75, 1.0]
TOL = 2e-4  # max abs difference of [0, 1] pixels, as text-to-image's parity
STEPS = 5
SIZE = 32  # pixels; latents 16x16
PROMPTS = ["a red circle", "a blue square on a green background"]


def _image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)


def _mask() -> np.ndarray:
    """White (repaint) on the right half and a block at the top left."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[:, SIZE // 2 + 3:] = 255
    m[2:9, 4:13] = 255
    return m


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)


@pytest.fixture(scope="module")
def patched_diffusers(monkeypatch_module):
    """diffusers' img2img/inpaint modules with the test's noise and the posterior mean."""
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_img2img as img2img,
    )
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_inpaint as inpaint,
    )
    state = {"noise": None}

    def randn_tensor(shape, **kwargs):
        noise = torch.from_numpy(state["noise"].transpose(0, 3, 1, 2).copy())
        assert tuple(noise.shape) == tuple(shape)
        return noise

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mean

    for module in (img2img, inpaint):
        monkeypatch_module.setattr(module, "randn_tensor", randn_tensor)
        monkeypatch_module.setattr(module, "retrieve_latents", mean)
    return state


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _reference(pipe, state, scheduler, noise, **kwargs):
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    state["noise"] = noise
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=["low quality"] * 2, num_inference_steps=STEPS,
                    guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
                    **kwargs).images


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    ref = StableDiffusionImg2ImgPipeline.from_pretrained(str(sd1_folder), safety_checker=None,
                                                         requires_safety_checker=False)
    ref_inpaint = StableDiffusionInpaintPipeline(**ref.components)
    ours = StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)
    return ours, ref, ref_inpaint


@pytest.fixture(scope="module")
def sd1_inpaint(sd1_inpaint_folder):
    from diffusers import StableDiffusionInpaintPipeline
    ref = StableDiffusionInpaintPipeline.from_pretrained(
        str(sd1_inpaint_folder), safety_checker=None, requires_safety_checker=False)
    ours = StableDiffusionPipeline.from_pretrained(str(sd1_inpaint_folder), dtype="float32",
                                                   num_devices=1)
    return ours, ref


def _errors(ours, ref, state, scheduler, **task):
    """Max pixel error at each strength, one compile for all of them."""
    images = [_image(1), _image(2)]
    pil = {k: (Image.fromarray(v) if k == "mask_image" else v) for k, v in task.items()}
    errors = {}
    for k, strength in enumerate(STRENGTHS):
        noise = _noise(k)
        ref_images = _reference(ref, state, scheduler, noise, strength=strength,
                                image=[Image.fromarray(x) for x in images], **pil)
        out = ours(PROMPTS, negative_prompt="low quality", num_inference_steps=STEPS,
                   guidance_scale=7.5, latents=noise, scheduler=scheduler, image=images,
                   strength=strength, output_type="float", **task).images
        assert out.shape == ref_images.shape == (2, SIZE, SIZE, 3)
        errors[strength] = float(np.abs(out - ref_images).max())
    print(f"{scheduler}: " + ", ".join(f"strength {s}: {e:.1e}" for s, e in errors.items()))
    return errors


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_img2img_matches_diffusers(sd1, patched_diffusers, scheduler):
    ours, ref, _ = sd1
    errors = _errors(ours, ref, patched_diffusers, scheduler)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_model_matches_diffusers(sd1_inpaint, patched_diffusers, scheduler):
    ours, ref = sd1_inpaint
    errors = _errors(ours, ref, patched_diffusers, scheduler, mask_image=_mask())
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_ordinary_model_matches_diffusers(sd1, patched_diffusers, scheduler):
    ours, _, ref = sd1
    errors = _errors(ours, ref, patched_diffusers, scheduler, mask_image=_mask())
    assert max(errors.values()) < TOL, errors
