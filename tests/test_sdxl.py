"""SDXL: its networks and StableDiffusionXLPipeline against diffusers on a tiny random model."""

import importlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sdjax
from sdjax.dispatch import pipeline_class
from sdjax.weights.errors import WeightsError
from sdjax.weights.files import open_tensor_file
from sdjax.weights.safetensors_io import save_safetensors
from tests.tiny_models import diffusers_scheduler, tiny_sdxl_components

TOL = 2e-4  # max abs difference of [0, 1] pixels against diffusers in float32
STEPS = 3
SIZE = 16  # pixels; latents 8x8
PROMPTS = ["a red circle", "a blue square on a green background"]


def _tensors(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_networks_match_transformers_and_diffusers():
    """The second text encoder (penultimate states, projected pooled output at the first
    end-of-text token) and the UNet with per-level depths and the text_time embedding."""
    from sdjax.models.clip_text import CLIPTextConfig
    from sdjax.models.unet import UNetConfig
    from sdjax.weights.diffusers_folder import build_network

    unet, _, _, te2 = tiny_sdxl_components(seed=21)
    cfg2 = CLIPTextConfig.from_dict(te2.config.to_dict())
    ours2 = build_network("text_encoder_2", cfg2, _tensors(te2))
    eos = cfg2.eos_token_id
    ids = np.array([[eos - 1, 5, 7, eos] + [1] * 73, [eos - 1, 9] + [eos] * 75], np.int64)
    with torch.no_grad():
        ref = te2(torch.from_numpy(ids), output_hidden_states=True)
    # Jitted: op-by-op dispatch of the eager modules costs more on 2 cores than a compile.
    states, pooled = nnx.jit(lambda m, i: m.penultimate_and_pooled(i))(
        ours2, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(states, ref.hidden_states[-2].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, ref.text_embeds.numpy(), atol=1e-5)

    cfg = UNetConfig.from_dict(dict(unet.config))
    assert cfg.depth_per_level() == (1, 1, 2) and cfg.addition_embed_type == "text_time"
    ours = build_network("unet", cfg, _tensors(unet))
    rng = np.random.RandomState(0)
    x = rng.randn(2, 8, 8, 4).astype(np.float32)
    context = rng.randn(2, 77, cfg.cross_attention_dim).astype(np.float32)
    text = rng.randn(2, 24).astype(np.float32)
    time_ids = np.array([[32, 32, 0, 0, 32, 32], [64, 48, 3, 4, 32, 16]], np.float32)
    t = np.array([999.0, 500.0], np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                   torch.from_numpy(context),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(text),
                                      "time_ids": torch.from_numpy(time_ids)}).sample
    out = nnx.jit(lambda m, *a, **k: m(*a, **k))(
        ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context),
        added_cond={"text_embeds": jnp.asarray(text), "time_ids": jnp.asarray(time_ids)})
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="added_cond"):
        jax.eval_shape(lambda: ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))


@pytest.fixture(scope="module")
def pipes(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline as TorchPipeline
    ref = TorchPipeline.from_pretrained(str(sdxl_folder))
    one = sdjax.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), dtype="float32",
                                                         num_devices=1)
    return ref, one


def _our_step_noise(steps: int, n: int, seed: int) -> list[np.ndarray]:
    """The per-step noise the core draws for images 0..n-1 of a call with ``seed``: the
    stream of sdjax.sampling (key of (seed, i), split, folded with the step)."""
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(n)]
    step_keys = [jax.random.split(k)[1] for k in keys]
    shape = (SIZE // 2, SIZE // 2, 4)
    return [np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), shape))
                      for k in step_keys]) for i in range(steps)]


# Each case also exercises the conditioning: no negative prompt (zero embeddings, diffusers'
# force_zeros_for_empty_prompt), a negative prompt, and a second prompt with non-default
# size/crop time ids.
# SDXL's own inputs (zeroed empty negatives, prompt_2, size conditioning) under a sigma
# scheduler with and without per-step noise; DPM-Solver's step with SDJAX_PARITY_SCHEDULERS=all
# (every scheduler's step is checked on SD 1.x and 2.x in test_pipeline and test_schedulers).
CASES = {
    "euler": dict(negative_prompt=None),
    **({"dpmpp_2m": dict(negative_prompt="low quality")}
       if os.environ.get("SDJAX_PARITY_SCHEDULERS") == "all" else {}),
    "euler_a": dict(negative_prompt="low quality", prompt_2="a photo of a cat",
                    original_size=(64, 48), crops_coords_top_left=(4, 8)),
}


# The stochastic schedulers' diffusers modules, whose randn_tensor gets our per-step noise.
_NOISY = {"euler_a": "scheduling_euler_ancestral_discrete", "lcm": "scheduling_lcm"}


def _reference(ref, monkeypatch, scheduler: str, prompts: list[str], latents: np.ndarray,
               seed: int, kwargs: dict, guidance: float = 7.5) -> np.ndarray:
    """diffusers' images for our call; for euler_a and lcm with the per-step noise our core
    draws."""
    if scheduler in _NOISY:
        module = importlib.import_module(f"diffusers.schedulers.{_NOISY[scheduler]}")
        draws = iter(_our_step_noise(STEPS, len(prompts), seed))
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(
            next(draws).transpose(0, 3, 1, 2).copy()))
    ref.scheduler = diffusers_scheduler(scheduler, ref.scheduler.config)
    # diffusers wants lists as long as the prompts'.
    kwargs = {k: [v] * len(prompts) if isinstance(v, str) else v for k, v in kwargs.items()}
    with torch.no_grad():
        return ref(prompts, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                   output_type="np", **kwargs).images


@pytest.mark.parametrize("scheduler", list(CASES))
def test_matches_diffusers(pipes, monkeypatch, scheduler):
    ref, ours = pipes
    kwargs = CASES[scheduler]
    latents = np.random.RandomState(0).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    expected = _reference(ref, monkeypatch, scheduler, PROMPTS, latents, 0, kwargs)
    out = ours(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
               latents=latents, scheduler=scheduler, output_type="float", seed=0,
               **kwargs).images
    assert out.shape == expected.shape == (2, SIZE, SIZE, 3)
    err = np.abs(out - expected).max()
    print(f"sdxl {scheduler}: max abs pixel error {err:.2e}")
    assert err < TOL
    if scheduler == "euler":
        # The time ids are runtime inputs: new sizes change the images, not the program.
        compiled = ours.compile_count
        moved = ours(PROMPTS, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                     latents=latents, scheduler=scheduler, output_type="float",
                     original_size=(512, 512), target_size=(16, 16)).images
        assert ours.compile_count == compiled
        assert np.abs(moved - out).max() > 1e-3

        # The WebUI's emphasis reaches SDXL's encoders as runtime weights: a weight changes
        # its image only, without a recompile; weight 1 is the plain prompt, bit for bit.
        def run(prompts):
            return ours(prompts, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                        width=SIZE, latents=latents, scheduler=scheduler, output_type="float",
                        seed=0, **kwargs).images
        weighted = run(["(a red circle:1.4)", PROMPTS[1]])
        unit = run(["(a red circle:1.0)", PROMPTS[1]])
        assert ours.compile_count == compiled
        np.testing.assert_array_equal(unit, out)
        np.testing.assert_array_equal(weighted[1], out[1])
        assert np.abs(weighted[0] - out[0]).max() > 1e-3


def test_lcm_without_guidance_runs_b_latents_and_matches_diffusers(pipes, monkeypatch):
    """Few-step SDXL as an LCM or Turbo model runs: the lcm scheduler (fresh noise between
    steps) at guidance 0, where the UNet gets the conditional latents alone (no
    unconditional pass, as in diffusers, whose reference then runs none either)."""
    ref, ours = pipes
    latents = np.random.RandomState(1).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    call = dict(num_inference_steps=STEPS, guidance_scale=0.0, height=SIZE, width=SIZE,
                latents=latents, scheduler="lcm", seed=0, output_type="float")
    hlo = ours.lower(PROMPTS, **call).as_text()
    latent = f"x{SIZE // 2}x{SIZE // 2}x4xf32>"
    assert f"tensor<2{latent}" in hlo and f"tensor<4{latent}" not in hlo
    out = ours(PROMPTS, **call).images
    expected = _reference(ref, monkeypatch, "lcm", PROMPTS, latents, 0, {}, guidance=0.0)
    err = np.abs(out - expected).max()
    print(f"sdxl lcm, guidance 0: max abs pixel error {err:.2e}")
    assert err < TOL


def test_eight_devices(sdxl_folder, pipes, monkeypatch):
    """Two images over 8 fake devices (14 of 16 rows padding) at the one-device call's 2
    images per device give the one-device images bitwise (the euler_a program of
    test_matches_diffusers, other seeds; docs/tpu-gpu.md#reproducibility). Then, with the
    same 8-device program, negative size time ids against diffusers: one prompt only,
    because diffusers pairs them with the wrong rows when a batch has several images (it
    repeats [negative, positive] row pairs where its embeddings are [negatives...,
    positives...])."""
    eight = sdjax.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), dtype="float32",
                                                           num_devices=8)
    latents = np.random.RandomState(1).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    call = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                scheduler="euler_a", output_type="float", seed=7)
    a = pipes[1](PROMPTS, latents=latents, **call, **CASES["euler_a"]).images
    b = eight(PROMPTS, latents=latents, batch_size_per_device=2, **call,
              **CASES["euler_a"]).images
    assert np.abs(a[0] - a[1]).max() > 0.01
    np.testing.assert_array_equal(a, b)

    sizes = dict(negative_original_size=(16, 16), negative_target_size=(32, 24),
                 negative_crops_coords_top_left=(2, 2), negative_prompt="low quality")
    out = eight(PROMPTS[:1], latents=latents[:1], batch_size_per_device=2, **call,
                **sizes).images
    expected = _reference(pipes[0], monkeypatch, "euler_a", PROMPTS[:1], latents[:1], 7, sizes)
    assert np.abs(out - expected).max() < TOL


def test_img2img_matches_diffusers(sdxl_folder, pipes, monkeypatch):
    """The base model's img2img (StableDiffusionXLImg2ImgPipeline without aesthetic scores),
    with diffusers' noise and VAE posterior sample replaced by ours (tests/test_tasks.py)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline as TorchImg2Img
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_img2img as module,
    )
    from PIL import Image

    noise = np.random.RandomState(2).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    images = np.random.RandomState(3).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(
        noise.transpose(0, 3, 1, 2).copy()))
    monkeypatch.setattr(module, "retrieve_latents", lambda out, **_: out.latent_dist.mean)
    ref = TorchImg2Img(**pipes[0].components)
    ref.scheduler = diffusers_scheduler("euler", ref.scheduler.config)
    with torch.no_grad():
        expected = ref(PROMPTS, image=[Image.fromarray(x) for x in images], strength=0.6,
                       num_inference_steps=5, guidance_scale=7.5,
                       negative_prompt=["blue"] * 2, output_type="np").images
    out = pipes[1](PROMPTS, image=images, strength=0.6, num_inference_steps=5, latents=noise,
                   guidance_scale=7.5, negative_prompt="blue", scheduler="euler",
                   output_type="float").images
    assert np.abs(out - expected).max() < TOL


def test_bad_sdxl_arguments(pipes):
    ours = pipes[1]
    with pytest.raises(ValueError, match="go together"):
        ours("a", negative_original_size=(16, 16))
    with pytest.raises(ValueError, match="original_size must be a pair"):
        ours("a", original_size=512)
    with pytest.raises(ValueError, match=r"crops_coords_top_left\[0\]"):
        ours("a", crops_coords_top_left=(-1, 0))
    with pytest.raises(ValueError, match="entries in prompt_2"):
        ours(["a", "b"], prompt_2=["c", "d", "e"])


def test_wrong_pipeline_and_strict_loading_name_the_sdxl_parts(sdxl_folder, sd1_folder,
                                                                tmp_path):
    # The CLIs and the server pick the pipeline from the folder.
    assert pipeline_class(str(sdxl_folder)) is sdjax.StableDiffusionXLPipeline
    assert pipeline_class(str(sd1_folder)) is sdjax.StableDiffusionPipeline
    with pytest.raises(WeightsError, match="SDXL model: load it with "
                                           "sdjax.StableDiffusionXLPipeline"):
        sdjax.StableDiffusionPipeline.from_pretrained(str(sdxl_folder), num_devices=1)
    with pytest.raises(WeightsError, match="not an SDXL model"):
        sdjax.StableDiffusionXLPipeline.from_pretrained(str(sd1_folder), num_devices=1)
    broken = tmp_path / "model"
    shutil.copytree(sdxl_folder, broken)
    weights = broken / "text_encoder_2" / "model.safetensors"
    tensors = {k: np.array(v) for k, v in open_tensor_file(weights).items()
               if k != "text_projection.weight"}
    save_safetensors(tensors, weights)
    with pytest.raises(WeightsError, match=r"text_encoder_2.*text_projection\.kernel"):
        sdjax.StableDiffusionXLPipeline.from_pretrained(str(broken), num_devices=1)


def test_webui_samplers_match_k_diffusion(pipes):
    """SDXL with a WebUI k-diffusion sampler: "Euler a" on Karras with rng="nv" (start and
    per-step noise from the WebUI's per-image NV generators, seed + i), 4 steps, against
    k-diffusion's sample_euler_ancestral over CompVisDenoiser around diffusers' SDXL UNet
    with its added text and time conditioning (the embeddings diffusers' pipeline makes for
    the same prompts) and the WebUI's CFG combination in the denoised space: within 1e-5 of
    the latents' scale. (One sampler: the others share its denoiser and SD 1.x/2.x test
    them; each SDXL case is a compile of its own.)"""
    from sdjax.schedulers import get_scheduler
    from sdjax.schedulers import webui_sigmas as ws
    from tests.test_webui_samplers import KD, _WebUIImageRNG

    ref, ours = pipes
    steps, cfg, negative = 4, 5.0, "low quality"
    b = len(PROMPTS)
    with torch.no_grad():
        pe, npe, pooled, npooled = ref.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=[negative] * b)
        time_ids = ref._get_add_time_ids(
            (SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=pe.dtype,
            text_encoder_projection_dim=ref.text_encoder_2.config.projection_dim)
    cond = {"ctx": torch.cat([pe, npe]), "pooled": torch.cat([pooled, npooled]),
            "time_ids": time_ids.repeat(2 * b, 1)}  # the WebUI's rows: [cond; uncond]
    sched = get_scheduler("Euler", dict(ours.scheduler_config))

    class Inner(torch.nn.Module):  # what CompVisDenoiser wraps: the SDXL UNet, its conds
        def __init__(self):
            super().__init__()
            self.alphas_cumprod = torch.tensor(ws.webui_alphas_cumprod(sched.schedule))

        def apply_model(self, x, t, cond):
            return ref.unet(x, t, encoder_hidden_states=cond["ctx"], added_cond_kwargs={
                "text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}).sample

    wrap = KD[1].CompVisDenoiser(Inner())

    def denoiser(x, sigma):
        out = wrap(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cond)
        c, u = out[:b], out[b:]
        return u + (c - u) * cfg

    shape = (b, 4, SIZE // 2, SIZE // 2)
    seed = 2**32 - 1  # image 1's NV seed crosses 2**32
    out = np.asarray(ours(PROMPTS, negative_prompt=negative, num_inference_steps=steps,
                          guidance_scale=cfg, height=SIZE, width=SIZE, output_type="latent",
                          scheduler="Euler a", schedule_type="Karras", rng="nv",
                          seed=seed).images)
    sigmas = torch.tensor(get_scheduler("Euler a", dict(ours.scheduler_config),
                                        schedule_type="Karras", sdxl=True).sigmas(steps))
    with torch.no_grad():
        gen = _WebUIImageRNG("nv", shape[1:], [seed + i for i in range(b)])
        x = KD[0].sample_euler_ancestral(denoiser, gen.next() * sigmas[0], sigmas,
                                         disable=True, noise_sampler=lambda s, t: gen.next())
    expected = x.numpy().transpose(0, 2, 3, 1)
    diff = np.abs(out - expected).max()
    print(f"sdxl Euler a: max |ours - k-diffusion| {diff:.2e} of {np.abs(expected).max():.1f}")
    assert np.abs(expected).max() > 1.0
    assert diff <= 1e-5 * max(10.0, np.abs(expected).max()), diff
