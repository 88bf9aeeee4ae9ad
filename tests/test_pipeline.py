"""The compiled, sharded sampler end to end against diffusers' StableDiffusionPipeline."""

import os

import jax
import numpy as np
import pytest
import torch

from sdjax import parallel
from sdjax.pipeline import StableDiffusionPipeline
from tests.tiny_models import diffusers_scheduler

DETERMINISTIC = ["pndm", "ddim", "lms", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras"]
TOL = 2e-4  # max abs difference of [0, 1] pixels against diffusers in float32; reached: see below
STEPS = 4
SIZE = 32  # pixels; latents 16x16


@pytest.fixture(scope="module")
def references(request):
    """diffusers pipelines for both tiny models, loaded from the same folders."""
    from diffusers import StableDiffusionPipeline as TorchPipeline
    out = {}
    for kind in ("sd1", "sd2"):
        folder = request.getfixturevalue(f"{kind}_folder")
        out[kind] = (folder, TorchPipeline.from_pretrained(str(folder), safety_checker=None,
                                                           requires_safety_checker=False))
    return out


@pytest.fixture(scope="module")
def ours(references):
    return {kind: StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32",
                                                           num_devices=1)
            for kind, (folder, _) in references.items()}


def _reference_images(pipe, scheduler, prompts, latents_nhwc, guidance):
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    lat = torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return pipe(prompts, negative_prompt=["low quality"] * len(prompts), latents=lat,
                    num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE,
                    width=SIZE, output_type="np").images


# SD 1.x with PNDM's step, a second-order sigma step (Heun) and DPM-Solver's; SD 2.x
# (v-prediction) with PNDM's, a first-order sigma step (Euler) and DPM-Solver's with Karras
# sigmas; every scheduler on both with SDJAX_PARITY_SCHEDULERS=all. Each scheduler's step, the
# v-prediction one too, is checked against diffusers without a UNet in test_schedulers; DDIM
# runs against diffusers in test_train's export test, Euler on SD 1.x in test_tasks and
# test_controlnet.
_ALL = os.environ.get("SDJAX_PARITY_SCHEDULERS") == "all"
CASES = [(s, "sd1") for s in DETERMINISTIC
         if _ALL or s in ("pndm", "heun", "dpmpp_2m")] + [
    (s, "sd2") for s in DETERMINISTIC if _ALL or s in ("pndm", "euler", "dpmpp_2m_karras")]


@pytest.mark.parametrize("scheduler, kind", CASES)
def test_matches_diffusers(references, ours, kind, scheduler):
    prompts = ["a red circle", "a blue square on a green background"]
    latents = np.random.RandomState(0).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    ref = _reference_images(references[kind][1], scheduler, prompts, latents, 7.5)
    out = ours[kind](prompts, negative_prompt="low quality", num_inference_steps=STEPS,
                     guidance_scale=7.5, height=SIZE, width=SIZE, latents=latents,
                     scheduler=scheduler, output_type="float").images
    assert out.shape == ref.shape == (2, SIZE, SIZE, 3)
    err = np.abs(out - ref).max()
    print(f"{kind} {scheduler}: max abs pixel error {err:.2e}")
    assert err < TOL


def test_default_output_is_uint8_of_the_model_size(ours):
    out = ours["sd1"]("a cat", num_inference_steps=2).images
    assert out.dtype == np.uint8 and out.shape == (1, 16, 16, 3)


def test_seed_and_index_decide_each_image(ours):
    pipe = ours["sd1"]
    a = pipe(["a cat", "a dog", "a cat"], num_inference_steps=2, seed=5,
             output_type="latent").images
    b = pipe(["a cat"], num_inference_steps=2, seed=5, output_type="latent").images
    c = pipe(["a cat"], num_inference_steps=2, seed=6, output_type="latent").images
    # Same image whatever else is in the batch, up to float rounding (a different batch shape
    # may sum in another order; same per-device shapes are bitwise equal, see test_sample_cli)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)
    assert np.abs(a[0] - a[2]).max() > 0.1  # same prompt, image index differs
    assert np.abs(b - c).max() > 0.1


def _count_compiles(fn):
    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_new_prompt_seed_and_guidance_do_not_recompile(ours):
    pipe = ours["sd2"]
    pipe(["a cat", "a dog"], num_inference_steps=3, seed=0, guidance_scale=7.5)
    n = _count_compiles(lambda: pipe(["a red square", "a photo"], negative_prompt="blue",
                                     num_inference_steps=3, seed=123, guidance_scale=2.0))
    assert n == 0
    # one guidance scale per image (how sdjax.serve merges requests) is the same program
    n = _count_compiles(lambda: pipe(["a cat", "a dog"], num_inference_steps=3,
                                     guidance_scale=[1.0, 9.0]))
    assert n == 0
    assert _count_compiles(lambda: pipe(["a cat"] * 2, num_inference_steps=4)) > 0


def test_bad_arguments(ours):
    pipe = ours["sd1"]
    assert pipe.vae_scale_factor == 2  # the tiny VAE has two levels
    with pytest.raises(ValueError, match="multiple of 2"):
        pipe("a", height=21)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a", num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("a", guidance_scale=-1)
    with pytest.raises(ValueError, match="one value or one per image"):
        pipe("a", guidance_scale=[7.5, 2.0])
    with pytest.raises(ValueError, match=r"guidance_scale\[1\] must be a finite number"):
        pipe(["a", "b"], guidance_scale=[7.5, float("nan")])
    with pytest.raises(ValueError, match="unknown|scheduler"):
        pipe("a", scheduler="nope")


# float16 takes the same path as bfloat16 with another dtype (and is emulated, slowly, on CPU):
# with SDJAX_PARITY_SCHEDULERS=all.
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"] if _ALL else ["bfloat16"])
def test_half_precision_runs_and_stays_close(references, ours, dtype):
    folder = references["sd2"][0]
    half = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, num_devices=1)
    latents = np.random.RandomState(1).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    kwargs = dict(num_inference_steps=STEPS, latents=latents, output_type="float", height=SIZE,
                  width=SIZE)
    ref = ours["sd2"](["a red circle", "a cat"], **kwargs).images
    out = half(["a red circle", "a cat"], **kwargs).images
    assert np.isfinite(out).all()
    err = np.abs(out - ref)
    print(f"{dtype}: mean abs pixel error {err.mean():.3e}, max {err.max():.3e}")
    assert err.mean() < 2e-2 and err.max() < 0.2


def test_decode_chunks_do_not_change_the_images(ours):
    pipe = ours["sd1"]
    a = pipe(["a cat"] * 3, num_inference_steps=2, decode_chunk=1, output_type="float").images
    b = pipe(["a cat"] * 3, num_inference_steps=2, decode_chunk=3, output_type="float").images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cpu_sampler_keeps_convolutions_and_dots_in_xla(ours):
    """parallel.compiler_options reaches the compiled sampler: on CPU, no YNNPACK fusions."""
    hlo = ours["sd1"].compile(["a cat"], num_inference_steps=2).as_text()
    assert "convolution(" in hlo and " dot(" in hlo
    assert "ynn_fusion" not in hlo
    # SD-sized latent grids keep XLA's defaults (YNNPACK), where it is the faster.
    mesh = parallel.make_mesh(1)
    assert parallel.compiler_options(mesh, 32 * 32) == parallel.compiler_options(mesh)
    assert parallel.compiler_options(mesh, 64 * 64) is None
