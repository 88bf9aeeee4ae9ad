"""The SDXL refiner (text_encoder_2 only, aesthetic-score time ids) and the base→refiner
hand-off (denoising_end / denoising_start) against diffusers on tiny random models."""

import json
import shutil

import numpy as np
import pytest
import torch

import sdjax
from sdjax.dispatch import pipeline_class
from sdjax.weights.errors import WeightsError
from tests.tiny_models import diffusers_scheduler

TOL = 2e-4  # max abs difference of [0, 1] pixels against diffusers in float32
SIZE = 16  # pixels; latents 8x8
PROMPTS = ["a red circle", "a blue square on a green background"]


@pytest.fixture(scope="module")
def refiners(sdxl_refiner_folder):
    from diffusers import StableDiffusionXLImg2ImgPipeline as TorchImg2Img
    ref = TorchImg2Img.from_pretrained(str(sdxl_refiner_folder))
    ref.scheduler = diffusers_scheduler("euler", ref.scheduler.config)
    ours = sdjax.StableDiffusionXLPipeline.from_pretrained(str(sdxl_refiner_folder),
                                                          dtype="float32", num_devices=1)
    return ref, ours


@pytest.fixture(scope="module")
def base(sdxl_folder):
    return sdjax.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), dtype="float32",
                                                          num_devices=1)


def test_refiner_img2img_matches_diffusers(refiners, monkeypatch):
    """img2img at strength 0.3 with a negative prompt, aesthetic scores and sizes, diffusers'
    noise and VAE posterior sample replaced by ours (as tests/test_sdxl.py's img2img)."""
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_img2img as module,
    )
    from PIL import Image

    ref, ours = refiners
    assert ours.is_refiner and ours.num_time_ids == 5
    noise = np.random.RandomState(4).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    images = np.random.RandomState(5).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(
        noise.transpose(0, 3, 1, 2).copy()))
    monkeypatch.setattr(module, "retrieve_latents", lambda out, **_: out.latent_dist.mean)
    sizes = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, original_size=(64, 48),
                 crops_coords_top_left=(4, 8))
    call = dict(strength=0.3, num_inference_steps=10, guidance_scale=7.5)
    with torch.no_grad():
        expected = ref(PROMPTS, image=[Image.fromarray(x) for x in images],
                       negative_prompt=["blue"] * 2, output_type="np", **call, **sizes).images
    out = ours(PROMPTS, image=images, latents=noise, negative_prompt="blue", scheduler="euler",
               output_type="float", **call, **sizes).images
    err = np.abs(out - expected).max()
    print(f"sdxl refiner img2img euler: max abs pixel error {err:.2e}")
    assert err < TOL
    # The aesthetic scores are runtime inputs, like the sizes.
    compiled = ours.compile_count
    lower = ours(PROMPTS, image=images, latents=noise, negative_prompt="blue",
                 scheduler="euler", output_type="float", **call,
                 **{**sizes, "aesthetic_score": 3.0}).images
    assert ours.compile_count == compiled
    assert np.abs(lower - out).max() > 1e-3


def test_handoff_matches_diffusers(sdxl_folder, base, refiners):
    """The base runs the first 80% of a 10-step euler schedule and returns latents; the
    refiner finishes them: diffusers' denoising_end / denoising_start, at both ends."""
    from diffusers import StableDiffusionXLPipeline as TorchBase

    ref_refiner, refiner = refiners
    ref_base = TorchBase.from_pretrained(str(sdxl_folder))
    ref_base.scheduler = diffusers_scheduler("euler", ref_base.scheduler.config)
    latents = np.random.RandomState(6).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    call = dict(num_inference_steps=10, guidance_scale=7.5)
    with torch.no_grad():
        handed = ref_base(PROMPTS, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                          height=SIZE, width=SIZE, denoising_end=0.8, output_type="latent",
                          **call).images
        expected = ref_refiner(PROMPTS, image=handed, denoising_start=0.8, output_type="np",
                               **call).images
    ours = base(PROMPTS, latents=latents, height=SIZE, width=SIZE, denoising_end=0.8,
                output_type="latent", scheduler="euler", **call).images
    assert ours.shape == (2, SIZE // 2, SIZE // 2, 4)
    np.testing.assert_allclose(ours, handed.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    out = refiner(PROMPTS, image=ours, denoising_start=0.8, scheduler="euler",
                  output_type="float", **call).images
    err = np.abs(out - expected).max()
    print(f"sdxl hand-off euler 0.8: max abs pixel error {err:.2e}")
    assert err < TOL

    # Both cuts are runtime inputs: other fractions, other images, no new program.
    compiled = base.compile_count, refiner.compile_count
    earlier = base(PROMPTS, latents=latents, height=SIZE, width=SIZE, denoising_end=0.5,
                   output_type="latent", scheduler="euler", **call).images
    later = refiner(PROMPTS, image=earlier, denoising_start=0.5, scheduler="euler",
                    output_type="float", **call).images
    assert (base.compile_count, refiner.compile_count) == compiled
    assert np.abs(earlier - ours).max() > 1e-2 and np.abs(later - out).max() > 1e-3


def test_bad_refiner_and_handoff_arguments(refiners):
    _, refiner = refiners
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    lat = np.zeros((SIZE // 2, SIZE // 2, 4), np.float32)
    bad = [
        (dict(image=image, prompt_2="b"), "prompt_2 does not apply to a refiner"),
        (dict(image=image, target_size=(16, 16)), "aesthetic score in place of the target"),
        (dict(image=image, aesthetic_score="high"), "aesthetic_score must be a number"),
        (dict(denoising_start=0.8), "denoising_start is img2img's"),
        (dict(image=lat, denoising_start=0.8, strength=0.5), "give one"),
        (dict(image=lat, denoising_start=0.8, latents=lat[None]), "pass the latents to start"),
        (dict(image=lat, denoising_start=1.0), "strictly between 0 and 1"),
        (dict(denoising_end=0), "strictly between 0 and 1"),
        (dict(image=lat, denoising_start=0.8, denoising_end=0.5), "must be below"),
        (dict(image=lat, denoising_start=0.9999), "leaves none of the 10 steps"),
        (dict(image=lat, height=32), "leave height and width out"),
        (dict(image=lat[..., :3]), r"float \(h, w, 4\)"),
        (dict(image=np.full_like(lat, np.nan)), "NaN"),
    ]
    for kwargs, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            refiner("a", num_inference_steps=10, **kwargs)


def test_refiner_folder_loading(sdxl_refiner_folder, base, tmp_path):
    assert pipeline_class(str(sdxl_refiner_folder)) is sdjax.StableDiffusionXLPipeline
    with pytest.raises(ValueError, match="aesthetic_score does not apply"):
        base("a", aesthetic_score=6.0)
    broken = tmp_path / "model"
    shutil.copytree(sdxl_refiner_folder, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(
        {**index, "requires_aesthetics_score": False}))
    with pytest.raises(WeightsError, match="requires_aesthetics_score should be true"):
        sdjax.StableDiffusionXLPipeline.from_pretrained(str(broken), num_devices=1)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(WeightsError, match="missing tokenizer_2/"):
        sdjax.StableDiffusionXLPipeline.from_pretrained(str(broken), num_devices=1)


@pytest.mark.parametrize("steps", [7, 10])
def test_cuts_match_diffusers_for_every_scheduler(steps):
    """Host side, every scheduler: denoising_start runs exactly the timesteps diffusers'
    img2img get_timesteps keeps (second-order ones included), and denoising_end stops after
    as many evaluations as its txt2img loop runs."""
    import types

    from diffusers import StableDiffusionXLImg2ImgPipeline as TorchImg2Img

    from sdjax.schedulers import SCHEDULER_NAMES, cut, get_scheduler
    from sdjax.schedulers.start import strength_for_start
    from tests.tiny_models import SDXL_SCHEDULER

    for name in SCHEDULER_NAMES:
        ours = get_scheduler(name, SDXL_SCHEDULER)
        for fraction in (0.3, 0.5, 0.8):
            ref = diffusers_scheduler(name, SDXL_SCHEDULER)
            ref.set_timesteps(steps)
            cutoff = int(round(1000 - fraction * 1000))
            ran = len([t for t in ref.timesteps if t >= cutoff])
            assert cut.denoising_end_stop(ours, steps, 0, fraction) == ran, (name, fraction)
            kept, _ = TorchImg2Img.get_timesteps(types.SimpleNamespace(scheduler=ref), steps,
                                                 1.0, "cpu", denoising_start=fraction)
            start = cut.denoising_start_step(ours, steps, fraction)
            timesteps = ours.set_timesteps(steps, strength_for_start(steps, start)).timesteps
            np.testing.assert_allclose(timesteps, kept.numpy(), err_msg=f"{name} {fraction}")
