"""Guidance options (guidance_rescale, guidance_interval), guidance off (the UNet on B latents),
the few-step samplers (lcm, euler_a with trailing spacing) and per-model sdjax.json defaults,
against diffusers' StableDiffusionPipeline on a tiny model, float32."""

from __future__ import annotations

import json
import shutil
import warnings
from unittest import mock

import jax
import numpy as np
import pytest
import torch

from sdjax import model_defaults, sampling
from sdjax.pipeline import StableDiffusionPipeline
from tests.tiny_models import diffusers_scheduler

TOL = 2e-4  # max abs difference of [0, 1] pixels against diffusers, as tests/test_pipeline.py
SIZE = 32  # pixels; the tiny VAE's latents are 16x16
PROMPTS = ["a red circle", "a blue square on a green background"]
LATENTS = np.random.RandomState(3).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "num_train_timesteps": 1000, "steps_offset": 1,
                   "timestep_spacing": "trailing", "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def turbo_folder(sd1_folder, tmp_path_factory):
    """The tiny model as a Turbo-like folder: euler_a with trailing spacing, and an
    sdjax.json asking for 2 steps without guidance."""
    folder = tmp_path_factory.mktemp("turbo") / "model"
    shutil.copytree(sd1_folder, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    (folder / "sdjax.json").write_text(json.dumps({"num_inference_steps": 2,
                                                   "guidance_scale": 0.0}))
    return folder


@pytest.fixture(scope="module")
def turbo(turbo_folder):
    return StableDiffusionPipeline.from_pretrained(str(turbo_folder), dtype="float32",
                                                   num_devices=1)


@pytest.fixture(scope="module")
def reference(sd1_folder):
    from diffusers import StableDiffusionPipeline as TorchPipeline
    return TorchPipeline.from_pretrained(str(sd1_folder), safety_checker=None,
                                         requires_safety_checker=False)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusionPipeline.from_pretrained(str(sd1_folder), dtype="float32",
                                                   num_devices=1)


def step_noise(seeds, steps: int, shape=LATENTS.shape[1:]) -> list[np.ndarray]:
    """The noise our stochastic schedulers add at each evaluation for image i of seed s
    (sampling.build: the second half of split(fold_in(key(s), i)), folded with the step), as
    NCHW batches for diffusers' randn_tensor."""
    out = []
    for step in range(steps):
        batch = []
        for i, s in enumerate(seeds):
            key = jax.random.split(jax.random.fold_in(jax.random.key(s), i))[1]
            batch.append(jax.random.normal(jax.random.fold_in(key, step), shape))
        out.append(np.stack(batch).transpose(0, 3, 1, 2))
    return out


def reference_images(ref, name, config, *, guidance, steps, noise=None, **kwargs):
    """diffusers' images from LATENTS; ``noise`` (a list per step) replaces its scheduler's
    randn_tensor draws."""
    ref.scheduler = diffusers_scheduler(name, config)
    module = type(ref.scheduler).__module__
    draws = iter(noise or [])
    with torch.no_grad(), warnings.catch_warnings(), mock.patch(
            f"{module}.randn_tensor", lambda *a, **k: torch.from_numpy(np.asarray(next(draws))),
            create=True):
        warnings.simplefilter("ignore")
        return ref(PROMPTS, negative_prompt=["low quality"] * 2,
                   latents=torch.from_numpy(LATENTS.transpose(0, 3, 1, 2).copy()),
                   num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                   output_type="np", **kwargs).images


def runs_2b_latents(lowered) -> bool:
    """Whether a lowered sampler of 2 images feeds the UNet 4 latents (cond and uncond)."""
    return f"tensor<4x{SIZE // 2}x{SIZE // 2}x4xf32>" in lowered.as_text()


# One compiled program (euler, 3 steps, guided) serves the rescale and interval tests.
GUIDED = dict(negative_prompt="low quality", num_inference_steps=3, height=SIZE, width=SIZE,
              latents=LATENTS, scheduler="euler", output_type="float")


def test_guidance_rescale_matches_diffusers(pipe, reference):
    ref = reference_images(reference, "euler", reference.scheduler.config, guidance=7.5, steps=3,
                           guidance_rescale=0.7)
    out = pipe(PROMPTS, guidance_scale=7.5, guidance_rescale=0.7, **GUIDED).images
    plain = pipe(PROMPTS, guidance_scale=7.5, **GUIDED).images
    err = np.abs(out - ref).max()
    print(f"guidance_rescale 0.7: max abs pixel error {err:.2e}")
    assert err < TOL
    assert np.abs(out - plain).max() > 10 * TOL  # the rescale did something


def test_guidance_interval_is_per_image_and_runtime(pipe):
    plain = pipe(PROMPTS, guidance_scale=7.5, **GUIDED).images
    compiled = pipe.compile_count
    # The second image at guidance 1 through the guided program (the first one is guided).
    mixed = pipe(PROMPTS, guidance_scale=[7.5, 1.0], **GUIDED).images
    everywhere = pipe(PROMPTS, guidance_scale=7.5, guidance_interval=(0.0, float("inf")),
                      **GUIDED).images
    nowhere = pipe(PROMPTS, guidance_scale=7.5, guidance_interval=[None, (500.0, 600.0)],
                   **GUIDED).images
    some = pipe(PROMPTS, guidance_scale=7.5, guidance_interval=(1.0, 50.0),
                guidance_rescale=[0.0, 0.5], **GUIDED).images
    assert pipe.compile_count == compiled  # interval and rescale are runtime inputs
    np.testing.assert_array_equal(everywhere, plain)
    np.testing.assert_array_equal(nowhere, mixed)  # image 0: no interval; image 1: no step in it
    assert np.abs(some - plain).max() > 1e-2 and np.abs(some - mixed).max() > 1e-2


def test_guidance_option_errors(pipe):
    for kwargs, match in [
        (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
        (dict(guidance_rescale=[0.1]), "one value or one per image"),
        (dict(guidance_interval=(2.0, 1.0)), "sigma_lo <= sigma_hi"),
        (dict(guidance_interval=(-1.0, 1.0)), "sigma_lo <= sigma_hi"),
        (dict(guidance_interval="1,2"), "pair"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            pipe(PROMPTS, num_inference_steps=1, **kwargs)


def test_lcm_matches_diffusers(pipe, reference):
    """LCM with a smaller distillation schedule and timestep scaling, 3 steps with fresh noise
    between them (drawn from each image's key, given to diffusers), guidance 2 with CFG as an
    LCM-LoRA runs."""
    config = {**reference.scheduler.config, "original_inference_steps": 20,
              "timestep_scaling": 5.0}
    pipe.scheduler_config, before = config, pipe.scheduler_config
    try:
        out = pipe(PROMPTS, negative_prompt="low quality", num_inference_steps=3,
                   guidance_scale=2.0, height=SIZE, width=SIZE, latents=LATENTS,
                   scheduler="lcm", seed=11, output_type="float").images
    finally:
        pipe.scheduler_config = before
    ref = reference_images(reference, "lcm", config, guidance=2.0, steps=3,
                           noise=step_noise([11, 11], 3))
    err = np.abs(out - ref).max()
    print(f"lcm 3 steps: max abs pixel error {err:.2e}")
    assert err < TOL


def test_turbo_folder_needs_no_flags(turbo, reference):
    """sdjax.json's 2 steps and guidance 0 apply when the call gives none: the guidance-off
    program (B latents through the UNet), euler_a with trailing spacing, as diffusers at
    guidance 0 and 1 (where diffusers runs no unconditional pass either)."""
    assert turbo.model_defaults == {"num_inference_steps": 2, "guidance_scale": 0.0}
    settings = turbo.sampling_settings()
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (2, 0.0)
    assert turbo.default_scheduler == "euler_a"
    kwargs = dict(negative_prompt="low quality", height=SIZE, width=SIZE, latents=LATENTS,
                  seed=5, output_type="float")
    assert not runs_2b_latents(turbo.lower(PROMPTS, **kwargs))
    assert runs_2b_latents(turbo.lower(PROMPTS, guidance_scale=7.5, **kwargs))
    for guidance in (None, 1.0):
        out = turbo(PROMPTS, guidance_scale=guidance, **kwargs).images
        ref = reference_images(reference, "euler_a", TURBO_SCHEDULER, guidance=guidance or 0.0,
                               steps=2, noise=step_noise([5, 5], 2))
        err = np.abs(out - ref).max()
        print(f"euler_a trailing, 2 steps, guidance {guidance}: max abs pixel error {err:.2e}")
        assert err < TOL
    assert turbo.compile_count == 1
    spec = next(s for s, fn in turbo._compiled.items() if fn.is_compiled)
    assert spec.steps == 2 and not spec.cfg


def test_sdjax_json_checks_and_precedence(tmp_path):
    assert model_defaults.read(tmp_path) == {}
    (tmp_path / "sdjax.json").write_text(json.dumps({"guidance_scale": 3, "clip_skip": 2,
                                                     "guidance_interval": [0.5, 9]}))
    read = model_defaults.read(tmp_path)
    assert read == {"guidance_scale": 3.0, "clip_skip": 2, "guidance_interval": (0.5, 9.0)}
    resolved = model_defaults.resolve({"guidance_scale": 5.0, "num_inference_steps": None},
                                      read, {"num_inference_steps": 75, "guidance_scale": 9.0})
    assert resolved["guidance_scale"] == 5.0 and resolved["num_inference_steps"] == 75
    assert resolved["clip_skip"] == 2 and resolved["scheduler"] is None
    for bad, match in [({"steps": 4}, "unknown setting 'steps'"),
                       ({"num_inference_steps": "4"}, "must be an integer"),
                       ({"scheduler": "k_euler"}, "unknown scheduler"),
                       ({"guidance_interval": [3, 1]}, "sigma_lo <= sigma_hi")]:
        (tmp_path / "sdjax.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match) as e:
            model_defaults.read(tmp_path)
        assert str(tmp_path / "sdjax.json") in str(e.value)
    (tmp_path / "sdjax.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        model_defaults.read(tmp_path)


def test_save_pretrained_keeps_sdjax_json(turbo, tmp_path):
    saved = turbo.save_pretrained(tmp_path / "copy")
    assert model_defaults.read(saved) == turbo.model_defaults


def test_combine_guidance_is_diffusers_rescale():
    """The combine against diffusers' own rescale_noise_cfg, one image guided in the interval
    and one outside it."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        rescale_noise_cfg,
    )
    rng = np.random.default_rng(0)
    uncond, cond = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(2))
    g = np.array([[7.5, 0.6, 1.0, 2.0], [7.5, 0.6, 3.0, 4.0]], np.float32)
    out = np.asarray(sampling.combine_guidance(uncond, cond, g, np.float32(1.5)))
    guided = torch.from_numpy(uncond + 7.5 * (cond - uncond))
    ref = rescale_noise_cfg(guided, torch.from_numpy(cond), guidance_rescale=0.6).numpy()
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], cond[1], rtol=1e-5, atol=1e-5)


def test_cli_takes_the_folder_defaults_and_records_the_options(turbo_folder, tmp_path, capsys):
    from PIL import Image

    from sdjax.images import parse_parameters
    from sdjax.sample import main

    rc = main(["--model", str(turbo_folder), "--prompt", "a red circle", "--num_devices", "1",
               "--guidance_interval", "1,inf", "--outdir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "sampling: euler_a, 2 steps, guidance 0 in sigma [1, inf]" in err
    (png,) = tmp_path.glob("*.png")
    meta = parse_parameters(Image.open(png).text["parameters"])
    assert (meta["Steps"], meta["Sampler"], meta["CFG scale"]) == ("2", "Euler a", "0")
    assert meta["Guidance interval"] == "1 inf"
    for flags, message in [(["--guidance_interval", "3,1"], "sigma_lo <= sigma_hi"),
                           (["--guidance_interval", "1"], "expected LO,HI"),
                           (["--guidance_rescale", "2"], "must be in [0, 1]")]:
        try:
            rc = main(["--model", str(turbo_folder), "--prompt", "a", *flags,
                       "--outdir", str(tmp_path / "no")])
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "no").exists()
