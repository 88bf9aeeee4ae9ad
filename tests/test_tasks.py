"""img2img and inpainting on the sampling core, against diffusers' pipelines in float32.

diffusers draws its noise with ``randn_tensor`` and samples the VAE posterior; the reference
runs here with both replaced (the same noise array, the posterior mean), so both sides compute
the same function. Each (task, scheduler) compiles once: strength is a runtime input, so one
executable serves every strength."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.pipeline import StableDiffusionPipeline
from tests.tiny_models import diffusers_scheduler

SCHEDULERS = ["pndm", "ddim", "euler", "lms", "dpmpp_2m"]
# Inpainting adds the mask inputs
# (scheduler-independent but for the initial sigma: 1 for pndm, above 1 for euler) and, for
# ordinary models, the blend, whose noise levels are the sigma and DPM-Solver overrides
# (euler, dpmpp_2m) or the base alphas (test_start_table). Few schedulers keep the suite's
# compiles few; SDJAX_PARITY_SCHEDULERS=all runs every task with all five
# (docs/sampling-core.md has that run's table).
_ALL = os.environ.get("SDJAX_PARITY_SCHEDULERS") == "all"
# img2img: PNDM's start and DPM-Solver's (a sigma scheduler's start runs against diffusers in
# the ordinary-model inpainting below, euler); every scheduler's start state is checked against
# diffusers without a UNet in test_start_table.
IMG2IMG_SCHEDULERS = SCHEDULERS if _ALL else ["pndm", "dpmpp_2m"]
# The 9-channel model with a sigma scheduler (initial sigma above 1) is checked against diffusers
# in test_controlnet.py (euler, with a ControlNet); PNDM here.
INPAINT_MODEL_SCHEDULERS = SCHEDULERS if _ALL else ["pndm"]
ORDINARY_INPAINT_SCHEDULERS = SCHEDULERS if _ALL else ["euler", "dpmpp_2m"]
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


@pytest.mark.parametrize("scheduler", IMG2IMG_SCHEDULERS)
def test_img2img_matches_diffusers(sd1, patched_diffusers, scheduler):
    ours, ref, _ = sd1
    errors = _errors(ours, ref, patched_diffusers, scheduler)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("scheduler", INPAINT_MODEL_SCHEDULERS)
def test_inpainting_model_matches_diffusers(sd1_inpaint, patched_diffusers, scheduler):
    ours, ref = sd1_inpaint
    errors = _errors(ours, ref, patched_diffusers, scheduler, mask_image=_mask())
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("scheduler", ORDINARY_INPAINT_SCHEDULERS)
def test_inpainting_ordinary_model_matches_diffusers(sd1, patched_diffusers, scheduler):
    ours, _, ref = sd1
    errors = _errors(ours, ref, patched_diffusers, scheduler, mask_image=_mask())
    assert max(errors.values()) < TOL, errors


def _call(pipe, scheduler="pndm", **kwargs):
    """The parity tests' call shape, so the 1-device executable is shared with them."""
    args = dict(negative_prompt="low quality", num_inference_steps=STEPS, guidance_scale=7.5,
                latents=_noise(0), scheduler=scheduler, image=[_image(1), _image(2)],
                strength=0.75, output_type="float")
    args.update(kwargs)
    return pipe(PROMPTS, **args).images


@pytest.mark.parametrize("which", ["img2img", "inpainting model"])
def test_eight_devices_give_the_one_device_images(sd1, sd1_inpaint, sd1_folder,
                                                  sd1_inpaint_folder, which):
    """A batch of different init images, sharded over 8 fake devices (14 of 16 rows
    padding) at the one-device call's 2 images per device: bitwise the same images
    (docs/tpu-gpu.md#reproducibility)."""
    folder, one = ((sd1_inpaint_folder, sd1_inpaint[0]) if which == "inpainting model"
                   else (sd1_folder, sd1[0]))
    eight = StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32",
                                                    num_devices=8)
    task = {} if which == "img2img" else {"mask_image": _mask()}
    a, b = _call(one, **task), _call(eight, batch_size_per_device=2, **task)
    assert np.abs(a[0] - a[1]).max() > 0.05  # the two init images give two results
    np.testing.assert_array_equal(a, b)


def test_one_two_four_and_eight_devices_give_the_same_latents_bitwise(sd1_folder):
    """At the same batch per device the latents are bitwise equal on 1, 2, 4 and 8 devices
    (docs/tpu-gpu.md#reproducibility): 2, 4 and 8 run XLA's partitioned program, 1 a program
    compiled without the SPMD pipeline. Euler and Heun divide by each step's sigma, which
    XLA compiled differently in the two until the schedulers multiplied by a reciprocal
    (schedulers.common.scalar_divide; without it this test sees 3.2e-5 for Euler and
    1.4e-5 for Heun in the latents). Euler a draws fresh noise in the loop (under the
    suite's compile flags it differed on 1 device until conftest.FAST_COMPILE kept XLA:CPU's
    code generation in one part). The partitioned programs agreed among themselves for
    every sampler and task measured, so Heun and Euler a run on 1 and 2 devices only."""
    pipes = {n: StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                        num_devices=n) for n in (1, 2, 4, 8)}

    def run(pipe, scheduler):
        return np.concatenate([pipe([prompt], latents=_noise(0)[k:k + 1], scheduler=scheduler,
                                    num_inference_steps=2, guidance_scale=7.5, height=SIZE,
                                    width=SIZE, batch_size_per_device=1, image_indices=[k],
                                    output_type="latent").images
                               for k, prompt in enumerate(PROMPTS)])
    for scheduler, devices in (("euler", (1, 2, 4, 8)), ("heun", (1, 2)), ("euler_a", (1, 2))):
        out = [run(pipes[n], scheduler) for n in devices]
        assert np.abs(out[0][0] - out[0][1]).max() > 0.05
        for n, other in zip(devices[1:], out[1:], strict=True):
            np.testing.assert_array_equal(other, out[0], err_msg=f"{scheduler}, {n} devices")


def test_strength_does_not_recompile_and_changes_the_result(sd1):
    ours = sd1[0]
    from tests.test_pipeline import _count_compiles
    _call(ours, strength=0.75)
    results = {}
    assert _count_compiles(lambda: results.update(
        {s: _call(ours, strength=s) for s in (0.2, 0.5, 1.0)})) == 0
    assert np.abs(results[0.2] - results[1.0]).max() > 0.05


def test_prepared_inputs_are_the_call_that_prepares_them(sd1):
    """pipe.prepare once per request and TaskInputs.concat of the requests (the server's
    path) give the images of the call that prepares them itself, bitwise, with no compile."""
    from sdjax.task_inputs import TaskInputs
    from tests.test_pipeline import _count_compiles
    ours = sd1[0]
    direct = _call(ours, strength=0.5)
    parts = [ours.prepare(num_inference_steps=STEPS, scheduler="pndm", image=x, strength=0.5)
             for x in (_image(1), _image(2))]
    assert parts[0].arrays["image"].shape == (1, SIZE, SIZE, 3) and parts[0].start > 0
    joined = TaskInputs.concat(parts)
    out = {}
    assert _count_compiles(lambda: out.update(images=_call(
        ours, image=None, strength=None, task_inputs=joined))) == 0
    np.testing.assert_array_equal(out["images"], direct)
    with pytest.raises(ValueError, match="strength=0.5 does not go with it"):
        _call(ours, image=None, task_inputs=joined, strength=0.5)
    with pytest.raises(ValueError, match="2 images for 4"):
        _call(ours, image=None, strength=None, task_inputs=joined, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="cannot share a call"):
        TaskInputs.concat([parts[0], ours.prepare(num_inference_steps=STEPS, image=_image(1),
                                                  strength=0.9)])


def test_seeded_noise_is_deterministic(sd1):
    ours = sd1[0]
    run = {s: _call(ours, scheduler="euler_a", latents=None, seed=s) for s in (7, 7, 8)}
    again = _call(ours, scheduler="euler_a", latents=None, seed=7)
    np.testing.assert_array_equal(run[7], again)
    assert np.abs(run[7] - run[8]).max() > 0.05


def test_nonfinite_results_are_refused(sd1):
    """NaN weights end in a clear error naming the network, not in black images."""
    import jax

    from sdjax.pipeline import NonFiniteError
    ours = sd1[0]
    clean = ours.params

    def nan_under(prefix):
        return jax.tree_util.tree_map_with_path(
            lambda path, a: a * np.nan if jax.tree_util.keystr(path).startswith(prefix) else a,
            clean)
    try:
        ours.params = {**clean, "unet": nan_under("['unet']")["unet"]}
        with pytest.raises(NonFiniteError, match="UNet for image\\(s\\) 0, 1"):
            _call(ours)
        ours.params = {**clean, "vae": nan_under("['vae']['decoder']")["vae"]}
        with pytest.raises(NonFiniteError, match="VAE decoder"):
            _call(ours)
    finally:
        ours.params = clean
    # The check off: the program returns the images alone, no status to refuse them by
    # (traced, not compiled, to spare the suite a compile).
    lowered = ours.lower(PROMPTS, num_inference_steps=STEPS, latents=_noise(0),
                         image=[_image(1), _image(2)], nan_check=False)
    out = lowered.out_info
    assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (2, SIZE, SIZE, 3)


def test_bad_task_arguments(sd1, sd1_inpaint):
    ours, inpaint_model = sd1[0], sd1_inpaint[0]
    image = _image(1)
    for strength in (0.0, -0.5, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="strength"):
            ours("a cat", image=image, strength=strength)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        ours("a cat", image=image, strength=0.1, num_inference_steps=5)
    with pytest.raises(ValueError, match="needs an image"):
        ours("a cat", mask_image=_mask())
    with pytest.raises(ValueError, match="strength needs an image"):
        ours("a cat", strength=0.5)
    with pytest.raises(ValueError, match="inpainting model"):
        inpaint_model("a cat", image=image)
    with pytest.raises(ValueError, match="3 images for 2 prompt"):
        ours(PROMPTS, image=[image] * 3)
    with pytest.raises(ValueError, match="uint8"):
        ours("a cat", image=image.astype(np.float32))
    with pytest.raises(ValueError, match="masked_content"):
        ours("a cat", image=image, mask_image=_mask(), masked_content="blur")
    with pytest.raises(ValueError, match="masked_content"):
        ours("a cat", image=image, masked_content="fill")


def test_inpainting_makes_the_images_size(sd1):
    """The default size of inpainting (and img2img) is the image's, rounded down to the VAE
    factor, as the WebUI's users expect (diffusers' inpainting pipeline uses the model's);
    a size given differently resizes image and mask (docs/python-api.md)."""
    ours = sd1[0]
    assert ours.default_hw != (24, 40)
    image = np.zeros((25, 41, 3), np.uint8)
    mask = np.zeros((25, 41), np.uint8)
    mask[:, 20:] = 255

    def size(**kw):
        prepared = ours.prepare(num_inference_steps=STEPS, image=image, mask_image=mask, **kw)
        hw, inputs = (prepared.height, prepared.width), prepared.arrays
        assert inputs["image"].shape == (1, *hw, 3) and inputs["mask"].shape == (1, *hw)
        return hw, inputs["mask"][0]

    (hw, m) = size(height=None, width=None)
    assert hw == (24, 40)
    (hw, m) = size(height=32, width=16)
    assert hw == (32, 16) and m[:, :7].max() == 0 and m[:, 9:].min() == 1  # resized, kept


def test_only_masked_region_holds_every_blurred_pixel(sd1):
    """A thin stroke blurred by --mask_blur stays below 128 everywhere: the WebUI's region is
    the bounding box of every non-zero pixel, so it is cropped, not refused, and the
    paste-back's whole feather lies inside the region."""
    from sdjax import tasks
    stroke = np.zeros((64, 64), np.uint8)
    stroke[30, 20:28] = 255
    soft = np.round(tasks.blur_mask(stroke, 3) * 255).astype(np.uint8)
    assert 0 < soft.max() < 128
    top, left, bottom, right = tasks.only_masked_box(soft, 0, 32, 32)
    outside = soft.copy()
    outside[top:bottom, left:right] = 0
    assert outside.max() == 0 and (bottom - top) * (right - left) < 64 * 64 // 2
    image = np.zeros((64, 64, 3), np.uint8)
    prepared = sd1[0].prepare(num_inference_steps=STEPS, height=32, width=32, image=image,
                              mask_image=stroke, mask_blur=3, padding_mask_crop=0)
    assert prepared.finish is not None


def test_fill_paints_the_masked_region_from_the_kept_one():
    from sdjax import tasks
    image = np.zeros((48, 48, 3), np.uint8)
    image[:, :24] = (200, 30, 30)  # kept: red on the left
    image[:, 24:] = (0, 0, 255)  # masked: blue on the right, to be painted over
    mask = np.zeros((48, 48), np.uint8)
    mask[:, 24:] = 255
    filled = tasks.fill_masked(image, mask).astype(int)
    np.testing.assert_array_equal(filled[:, :24], image[:, :24])
    # Red spread over the masked half (premultiplied alpha rounds a little), no blue left.
    assert np.abs(filled[:, 24:] - (200, 30, 30)).max() <= 4


def test_masked_content_sets_the_start_latents(sd1):
    """The WebUI's latent noise / latent nothing: the masked latent cells start from the
    call's noise / zeros, the kept ones from the image's latents, as in "original"."""
    import jax

    from sdjax import tasks
    ours = sd1[0]
    vae, lat = ours.network("vae"), ours.vae_config.latent_channels
    mask = _mask()
    inputs = {"image": _image(1)[None], "mask": (mask[None] > 0).astype(np.uint8)}
    noise = _noise(0)[:1]
    keys = jax.random.split(jax.random.key(0), 1)

    def latents(content):
        task = tasks.inpainting(lat, lat, content)
        return np.asarray(tasks.feed(task, vae, ours.vae_config.scaling_factor, inputs, keys,
                                     chunk=1, noise=noise).image_latents)[0]
    original = latents("original")
    under = mask[::2, ::2] > 0  # the latent grid (factor 2) samples the mask
    assert under.any() and (~under).any() and np.abs(original[under]).mean() > 0.01
    for content, expected in (("latent noise", noise[0]), ("latent nothing", 0 * noise[0])):
        got = latents(content)
        np.testing.assert_array_equal(got[~under], original[~under])
        np.testing.assert_allclose(got[under], expected[under], atol=1e-6)
