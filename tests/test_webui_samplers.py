"""The WebUI's k-diffusion samplers and schedule types (sdjax.schedulers.webui) against
k-diffusion itself, the package the WebUI builds on: a tiny diffusers UNet driven through
``k_diffusion.external.CompVisDenoiser`` (``CompVisVDenoiser`` for v-prediction) with the
WebUI's CFG combination in the denoised space, from the same start noise and the same per-step
noise; float32, 4-6 steps, SD 1.x and v-prediction SD 2.x, txt2img and img2img.

Only ``k_diffusion/sampling.py`` and ``external.py`` are loaded (the package's ``__init__``
pulls in training dependencies), with a one-function stand-in for its ``utils``."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("torchsde")

from sdjax.pipeline import StableDiffusionPipeline  # noqa: E402
from sdjax.schedulers import get_scheduler  # noqa: E402
from sdjax.schedulers import webui as webui_mod  # noqa: E402
from sdjax.schedulers import webui_sigmas as ws  # noqa: E402
from sdjax.schedulers import webui_timesteps as wt  # noqa: E402
from sdjax.schedulers.start import strength_for_start  # noqa: E402
from tests.test_noise import webui_nv_randn  # noqa: E402
from tests.tiny_models import SD15_SCHEDULER, SD21_SCHEDULER  # noqa: E402

CFG = 3.0
FUNCS = {
    "Euler": "sample_euler", "Euler a": "sample_euler_ancestral", "DPM++ 2M": "sample_dpmpp_2m",
    "Heun": "sample_heun", "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral",
    "DPM++ 2S a": "sample_dpmpp_2s_ancestral", "LMS": "sample_lms",
    "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
    "DPM++ 3M SDE": "sample_dpmpp_3m_sde", "DPM fast": "sample_dpm_fast",
}


def _k_diffusion():
    """(k_diffusion.sampling, k_diffusion.external) loaded from their files alone."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install -e '.[test]')")
    root = spec.submodule_search_locations[0]
    pkg = types.ModuleType("_kd")
    pkg.__path__ = [root]
    utils = types.ModuleType("_kd.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    sys.modules.update({"_kd": pkg, "_kd.utils": utils})
    pkg.utils = utils
    mods = []
    for name in ("sampling", "external"):
        s = importlib.util.spec_from_file_location(f"_kd.{name}", f"{root}/{name}.py")
        mod = importlib.util.module_from_spec(s)
        sys.modules[f"_kd.{name}"] = mod
        s.loader.exec_module(mod)
        setattr(pkg, name, mod)
        mods.append(mod)
    # The WebUI replaces k-diffusion's to_d with (x - denoised) / sigma (sd_schedulers.py).
    mods[0].to_d = lambda x, sigma, denoised: (x - denoised) / sigma
    return mods


KD = _k_diffusion()


class _Inner(torch.nn.Module):
    """What CompVisDenoiser wraps: ``apply_model(x, t, cond)`` and ``alphas_cumprod``."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = torch.tensor(alphas_cumprod)

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class _CFG:
    """The WebUI's CFGDenoiser for one prompt: rows [cond; uncond], combined in the denoised
    space as ``denoised_uncond + (denoised_cond - denoised_uncond) * cfg_scale``."""

    def __init__(self, wrap, ctx):
        self.wrap, self.ctx = wrap, ctx  # ctx: [uncond; cond] rows

    def __call__(self, x, sigma):
        b = x.shape[0]
        out = self.wrap(torch.cat([x, x]), torch.cat([sigma, sigma]),
                        cond=torch.cat([self.ctx[b:], self.ctx[:b]]))
        cond, uncond = out[:b], out[b:]
        return uncond + (cond - uncond) * CFG


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, sd1_folder, sd2_folder):
    """(our pipeline, its scheduler config, a jitted UNet of ours, the torch CFG denoiser
    factory, the [uncond; cond] context) of a tiny SD 1.x or v-prediction SD 2.x model."""
    from diffusers import StableDiffusionPipeline as Ref

    folder = sd1_folder if request.param == "sd1" else sd2_folder
    config = SD15_SCHEDULER if request.param == "sd1" else SD21_SCHEDULER
    ref = Ref.from_pretrained(str(folder), safety_checker=None)
    ours = StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32", num_devices=1)
    with torch.no_grad():
        cond, uncond = ref.encode_prompt("a red circle", "cpu", 1, True, "")
    ctx = torch.cat([uncond, cond]).float()
    sched = get_scheduler("Euler", config)
    denoiser = (KD[1].CompVisVDenoiser if config.get("prediction_type") == "v_prediction"
                else KD[1].CompVisDenoiser)
    wrap = denoiser(_Inner(ref.unet, ws.webui_alphas_cumprod(sched.schedule)))
    graphdef, params = ours.store.graphdefs["unet"], ours.store.current["unet"]

    @jax.jit
    def unet(params, x, t, context):
        net = nnx.merge(graphdef, params)
        return net(x, jnp.broadcast_to(t, (x.shape[0],)), context)

    return dict(kind=request.param, pipe=ours, ref=ref, config=config,
                unet=functools.partial(unet, params), cfg=_CFG(wrap, ctx),
                ctx=jnp.asarray(ctx.numpy()), wrap=wrap)


@functools.cache
def _stepper(prediction_type: str):
    """One jitted step for every sampler of a prediction type (the step reads nothing else
    of the scheduler; it compiles once per memory depth)."""
    proto = get_scheduler("Euler", {"prediction_type": prediction_type})
    return jax.jit(lambda state, i, eps, x, n: proto.step(state, i, eps, x, noise=n))


def _ours(m, sched, steps, start, x0, noise, step_noises):
    """Our sampler's loop, step by step (one UNet compile per model for every sampler)."""
    b = noise.shape[0]
    state = sched.set_timesteps(steps, strength_for_start(steps, start),
                               sample_shape=noise.shape)
    x = noise * np.asarray(state.start_coefs[1])
    if x0 is not None:
        x = x0 + x
    x = jnp.asarray(x)
    step = _stepper(sched.prediction_type)
    div, ts, draws = (np.asarray(a) for a in (state.input_div, state.timesteps, state.draw))
    for i in range(sched.num_evaluations(state)):
        xin = x / div[i]
        eps = m["unet"](jnp.concatenate([xin, xin]), ts[i], m["ctx"])
        eps = eps[:b] + CFG * (eps[b:] - eps[:b])
        n = step_noises[draws[i]] if draws[i] >= 0 else np.zeros(noise.shape, np.float32)
        x, state = step(state, i, eps, x, n)
    return np.asarray(x)


def _reference(m, sampler, sigmas, start, x0, noise, step_noises):
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    sched = torch.tensor(sigmas[start:])
    x = nchw(noise) * sched[0]
    if x0 is not None:
        x = nchw(x0) + x
    draws = iter(step_noises)
    kwargs = {}
    if sampler in STOCHASTIC:
        kwargs["noise_sampler"] = lambda s, s_next: nchw(next(draws))
    if sampler == "DPM fast":  # the WebUI's arguments: the model's sigma range in txt2img,
        # the schedule's start sigma to its last nonzero one in img2img
        if x0 is None:
            model_sigmas = ws.ModelSigmas.from_schedule(get_scheduler("Euler", SD15_SCHEDULER)
                                                        .schedule)
            lo, hi, n = model_sigmas.sigma_min, model_sigmas.sigma_max, len(sigmas) - 1
        else:
            lo, hi, n = sched[-2].item(), sched[0].item(), len(sched) - 1
        kwargs.update(sigma_min=lo, sigma_max=hi, n=n)
        with torch.no_grad():
            out = KD[0].sample_dpm_fast(m["cfg"], x, disable=True, eta=1.0, **kwargs)
        return np.transpose(out.numpy(), (0, 2, 3, 1))
    with torch.no_grad():
        out = getattr(KD[0], FUNCS[sampler])(m["cfg"], x, sched, disable=True, **kwargs)
    return np.transpose(out.numpy(), (0, 2, 3, 1))


STOCHASTIC = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE",
              "DPM fast")


def _fake_denoiser(x, sigma):
    """A smooth stand-in for the model's denoised estimate (numpy or torch alike)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x * 0.3 / (1 + s) + 0.1 * s / (1 + s)


@pytest.mark.parametrize("sampler", list(FUNCS))
def test_samplers_restate_k_diffusion(sampler):
    """Every sampler's tables against its k-diffusion function over a stand-in denoiser (no
    UNet: the algorithm alone), on several schedule types, txt2img and img2img starts."""
    rng = np.random.default_rng(1)
    shape = (2, 3, 3, 2)
    for schedule, steps, start in (("Automatic", 6, 0), ("Karras", 5, 0), ("Uniform", 7, 3),
                                   ("KL Optimal", 4, 0), ("Exponential", 6, 2)):
        sched = get_scheduler(sampler, SD15_SCHEDULER, schedule_type=schedule)
        sigmas = sched.sigmas(steps)
        noise = rng.standard_normal(shape).astype(np.float32)
        x0 = rng.standard_normal(shape).astype(np.float32) if start else None
        step_noises = rng.standard_normal((2 * steps + 2, *shape)).astype(np.float32)
        state = sched.set_timesteps(steps, strength_for_start(steps, start), sample_shape=shape)
        x = (jnp.asarray(noise) * state.init_sigma if x0 is None
             else sched.add_noise_for_start(state, jnp.asarray(x0), jnp.asarray(noise)))
        for i in range(sched.num_evaluations(state)):
            sigma = state.sigma[i]
            eps = (x - _fake_denoiser(x, sigma[None])) / sigma  # epsilon of that estimate
            draw = int(state.draw[i])
            x, state = sched.step(state, i, eps, x, noise=jnp.asarray(
                step_noises[draw] if draw >= 0 else np.zeros(shape, np.float32)))
        ref = _reference(dict(cfg=_fake_denoiser), sampler, sigmas, start, x0, noise,
                         step_noises)
        # DPM fast works in float32 log time (t = -log sigma): k-diffusion's own float32 run is
        # ~1e-5 from its float64 one here, and so is ours
        tol = 3e-5 if sampler == "DPM fast" else 1e-5
        np.testing.assert_allclose(np.asarray(x), ref, rtol=tol, atol=tol,
                                   err_msg=f"{sampler} {schedule} {steps} from {start}")


CASES = {  # model -> (sampler, schedule type, steps, img2img start step or None)
    "sd1": [("Euler a", "Karras", 5, None), ("DPM++ 2M", "Automatic", 6, None),
            ("Heun", "Exponential", 4, None), ("DPM++ SDE", "Automatic", 4, None),
            ("DPM++ 3M SDE", "Automatic", 6, None), ("DPM++ 2M", "Karras", 6, 2)],
    "sd2": [("Euler", "Automatic", 5, None), ("DPM2 a", "Automatic", 4, None),
            ("DPM++ 2S a", "SGM Uniform", 4, None), ("LMS", "Uniform", 6, 3),
            ("DPM++ 2M SDE", "Karras", 6, 1), ("DPM fast", "Automatic", 5, 2)],
}


def test_samplers_match_k_diffusion(model):
    """Our sampler steps around our UNet against k-diffusion around the diffusers UNet. The
    UNets agree to ~3e-6 on eps; the start sigma (14.6) and the guidance scale multiply that
    in the first steps' denoised estimates. The tiny random UNet's latents end at magnitudes
    up to ~75, so the bound is relative: max |ours - k-diffusion| <= 1e-4 on latents scaled to
    magnitude 10 (seen: <= 1.6e-4 absolute, 2.2e-6 relative)."""
    rng = np.random.default_rng(0)
    shape = (1, 8, 8, 4)
    x0 = rng.standard_normal(shape).astype(np.float32)
    worst = {}
    for sampler, schedule, steps, start in CASES[model["kind"]]:
        sched = get_scheduler(sampler, model["config"], schedule_type=schedule)
        sigmas = sched.sigmas(steps)
        noise = rng.standard_normal(shape).astype(np.float32)
        step_noises = rng.standard_normal((2 * steps + 2, *shape)).astype(np.float32)
        begin = 0 if start is None else start
        image = None if start is None else x0
        ours = _ours(model, sched, steps, begin, image, noise, step_noises)
        ref = _reference(model, sampler, sigmas, begin, image, noise, step_noises)
        worst[(sampler, schedule, start)] = (float(np.abs(ours - ref).max()),
                                             float(np.abs(ref).max()))
        assert np.abs(ref).max() > 0.1
    bad = {k: v for k, v in worst.items() if not v[0] <= 1e-5 * max(10.0, v[1])}
    assert not bad, f"(max |ours - k-diffusion|, max |k-diffusion|) off: {bad} (all: {worst})"


@pytest.mark.parametrize("schedule", ws.SCHEDULE_TYPES[1:])
def test_schedule_types_match_the_webui(schedule):
    """Each schedule type's sigmas against the WebUI's formulas over k-diffusion's model
    sigmas (restated here from modules/sd_schedulers.py where k-diffusion has none)."""
    sched = get_scheduler("Euler", SD15_SCHEDULER, schedule_type=schedule)
    ac = ws.webui_alphas_cumprod(sched.schedule)
    wrap = KD[1].CompVisDenoiser(_Inner(torch.nn.Identity(), ac))
    lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    n = 7
    s = KD[0]
    if schedule == "Uniform":
        ref = wrap.get_sigmas(n)
    elif schedule == "Karras":
        ref = s.get_sigmas_karras(n, lo, hi)
    elif schedule == "Exponential":
        ref = s.get_sigmas_exponential(n, lo, hi)
    elif schedule == "Polyexponential":
        ref = s.get_sigmas_polyexponential(n, lo, hi, rho=1.0)
    elif schedule in ("SGM Uniform", "Normal"):
        t0, t1 = wrap.sigma_to_t(torch.tensor(hi)), wrap.sigma_to_t(torch.tensor(lo))
        ts = torch.linspace(t0, t1, n + 1)[:-1] if schedule == "SGM Uniform" \
            else torch.linspace(t0, t1, n)
        ref = torch.tensor([*(wrap.t_to_sigma(t) for t in ts), 0.0])
    elif schedule == "KL Optimal":
        a0, a1 = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
        k = torch.arange(n + 1)
        ref = torch.tan(k / n * a0 + (1.0 - k / n) * a1)
    elif schedule == "Align Your Steps":
        table = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(table[::-1]))
        ref = torch.tensor([*np.exp(ys)[::-1], 0.0])
    elif schedule == "Simple":
        ss = len(wrap.sigmas) / n
        ref = torch.tensor([*(float(wrap.sigmas[-(1 + int(x * ss))]) for x in range(n)), 0.0])
    elif schedule == "DDIM":
        ss = max(len(wrap.sigmas) // n, 1)
        ref = torch.tensor([*(float(v) for v in wrap.sigmas[1::ss].flip(0)), 0.0])
    else:  # Beta, alpha = beta = 0.6
        from scipy import stats
        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        ref = torch.tensor([*(lo + x * (hi - lo) for x in ts), 0.0])
    ours = sched.sigmas(n)
    ref = ref.float().numpy()
    # the WebUI's DDIM type takes every (1000 // n)-th sigma: it can make more than n steps
    assert ours.shape == ref.shape == ((9,) if schedule == "DDIM" else (n + 1,))
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-6)
    # the model's timestep of each sigma, as CompVisDenoiser.sigma_to_t
    positive = ours[ours > 0]
    np.testing.assert_allclose(ws.ModelSigmas.from_schedule(sched.schedule).sigma_to_t(positive),
                               wrap.sigma_to_t(torch.tensor(positive)).numpy(), atol=2e-4)


def test_webui_names_and_rules():
    with pytest.raises(ValueError, match="unknown schedule_type 'Karas'"):
        get_scheduler("Euler", SD15_SCHEDULER, schedule_type="Karas")
    with pytest.raises(ValueError, match="schedule_type"):
        get_scheduler("euler", SD15_SCHEDULER, schedule_type="Karras")
    assert get_scheduler("DPM++ 2M", SD15_SCHEDULER).resolved_schedule == "Karras"
    assert get_scheduler("Euler", SD15_SCHEDULER, schedule_type="sgm_uniform").schedule_type \
        == "SGM Uniform"
    # DPM2 discards the next-to-last sigma of a one-step-longer schedule
    dpm2 = get_scheduler("DPM2", SD15_SCHEDULER, schedule_type="Karras")
    longer = get_scheduler("DPM++ 2M", SD15_SCHEDULER).sigmas(6)
    np.testing.assert_array_equal(dpm2.sigmas(5), np.concatenate([longer[:-2], longer[-1:]]))
    # the WebUI's img2img step rule: steps as given, int(min(strength, .999) * steps) + 1 run
    rule = webui_mod.WebUISampler.webui_start
    assert rule(20, 0.75) == (20, 4) and rule(20, 1.0) == (20, 0) and rule(20, 0.01) == (20, 19)
    assert rule(20, 0.5, fix_steps=True) == (40, 20)


def test_pipeline_runs_the_webui_samplers(model, monkeypatch):
    """Through the pipeline (the one compiled loop): SD 1.x txt2img with "Euler a" and SD 2.x
    (v-prediction) img2img with "DPM++ 2M SDE" on Karras at the WebUI's strength rule, the
    per-step noise fed through the hook, against k-diffusion."""
    pipe = model["pipe"]
    rng = np.random.default_rng(5)
    shape = (1, 8, 8, 4)
    noise = rng.standard_normal(shape).astype(np.float32)
    step_noises = rng.standard_normal((16, *shape)).astype(np.float32)
    monkeypatch.setattr(webui_mod, "step_noise",
                        lambda key, draw, like: jnp.asarray(step_noises)[draw])
    size = 8 * pipe.vae_scale_factor
    common = dict(num_inference_steps=5, guidance_scale=CFG, height=size, width=size,
                  latents=noise, output_type="latent")
    if model["kind"] == "sd1":
        sampler, schedule, start, image = "Euler a", "Automatic", 0, None
        out = pipe("a red circle", scheduler=sampler, **common).images
    else:
        sampler, schedule, image = "DPM++ 2M SDE", "Karras", rng.standard_normal(shape)
        image = image.astype(np.float32)
        # WebUI: 5 steps at denoising strength 0.6 run int(0.6 * 5) + 1 = 4 of them
        start = 1
        out = pipe("a red circle", scheduler=sampler, schedule_type=schedule, image=image,
                   strength=0.6, **common).images
    sched = get_scheduler(sampler, model["config"], schedule_type=schedule)
    ref = _reference(model, sampler, sched.sigmas(5), start, image, noise, step_noises)
    diff = np.abs(np.asarray(out) - ref).max()
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (diff, np.abs(ref).max())


class _WebUIImageRNG:
    """The WebUI's ``ImageRNG`` (modules/rng.py) restated: one generator per image seeded with
    its seed; ``next()`` draws every image's next (C, H, W) noise, the first being the start
    noise, after which a nonzero ENSD re-seeds each generator with seed + ENSD."""

    def __init__(self, rng, shape, seeds, ensd=0):
        self.rng, self.shape, self.seeds, self.ensd = rng, shape, seeds, ensd
        self.gens = [self._generator(s) for s in seeds]
        self.is_first = True

    def _generator(self, seed):
        if self.rng == "nv":  # rng_philox.Generator: its offset counts the draws
            return {"seed": seed, "offset": 0}
        return torch.Generator().manual_seed(int(seed))

    def _randn(self, gen):
        if self.rng == "nv":
            gen["offset"] += 1
            return torch.tensor(webui_nv_randn(gen["seed"], self.shape, gen["offset"] - 1))
        return torch.randn(self.shape, generator=gen)

    def next(self):
        xs = torch.stack([self._randn(g) for g in self.gens])
        if self.is_first and self.ensd:
            self.gens = [self._generator(s + self.ensd) for s in self.seeds]
        self.is_first = False
        return xs


def test_pipeline_draws_the_webuis_step_noise(model):
    """A full pipeline "Euler a" call with the WebUI's noise (SD 1.x: rng="nv" from a seed
    whose third image crosses 2**32; v-prediction SD 2.x: rng="cpu") against k-diffusion's
    sample_euler_ancestral whose start noise and noise_sampler are the WebUI's ImageRNG (seed
    + i per image), with and without ENSD (a runtime input: one program); and (nv) one image
    alone from seed + 1 is image 1 of the batch."""
    pipe = model["pipe"]
    rng, seed, b = ("nv", 2**32 - 2, 3) if model["kind"] == "sd1" else ("cpu", 123, 2)
    steps = 5
    size = 8 * pipe.vae_scale_factor
    common = dict(num_inference_steps=steps, guidance_scale=CFG, height=size, width=size,
                  output_type="latent", scheduler="Euler a", rng=rng)
    h, w, c = pipe.latent_shape(size, size)
    sigmas = torch.tensor(get_scheduler("Euler a", model["config"]).sigmas(steps))
    ctx = model["cfg"].ctx
    cfg = _CFG(model["wrap"], torch.cat([ctx[:1]] * b + [ctx[1:]] * b))
    compiled, outs = None, []
    for ensd in (0, 31337):
        got = np.asarray(pipe(["a red circle"] * b, seed=seed, eta_noise_seed_delta=ensd,
                              **common).images)
        compiled = compiled or pipe.compile_count
        gen = _WebUIImageRNG(rng, (c, h, w), [seed + i for i in range(b)], ensd)
        with torch.no_grad():
            ref = KD[0].sample_euler_ancestral(cfg, gen.next() * sigmas[0], sigmas,
                                               disable=True,
                                               noise_sampler=lambda s, s_next, g=gen: g.next())
        ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
        diff = np.abs(got - ref).max()
        assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (rng, ensd, diff)
        outs.append(got)
    assert pipe.compile_count == compiled
    # the step noise matters: ENSD changes only it, and the picture with it
    assert np.abs(outs[0] - outs[1]).max() > 0.1 * np.abs(outs[0]).max()
    if rng == "nv":  # (one more compile: once)
        one = np.asarray(pipe("a red circle", seed=seed + 1, eta_noise_seed_delta=31337,
                              **common).images)
        np.testing.assert_allclose(one[0], got[1], atol=1e-5 * max(10.0, np.abs(got).max()))


def test_front_ends_name_them():
    """The CLI flag, the server's sampler_name + scheduler, its lists and the PNG text."""
    import argparse

    from sdjax import cli_args
    from sdjax.call_settings import CallSettings, Sampling, Size
    from sdjax.serve.samplers import sampler_list, sampler_settings, scheduler_list

    p = argparse.ArgumentParser()
    cli_args.add_common_arguments(p)
    args = p.parse_args(["--scheduler", "DPM++ 2M", "--schedule_type", "sgm_uniform"])
    cli_args.check_common_args(args)
    assert args.schedule_type == "SGM Uniform"
    for argv, message in ((["--scheduler", "Euler", "--schedule_type", "Karas"],
                           "unknown --schedule_type 'Karas'"),
                          (["--scheduler", "euler", "--schedule_type", "Karras"],
                           "--schedule_type is for the WebUI's samplers")):
        with pytest.raises(Exception, match=message):
            cli_args.check_common_args(p.parse_args(argv))

    assert sampler_settings("DPM++ 2M", "Karras") == ("DPM++ 2M", "Karras")
    assert sampler_settings("DPM++ 2M Karras", "") == ("DPM++ 2M", "Karras")
    assert sampler_settings("k_euler_a", None) == ("Euler a", "Automatic")
    assert sampler_settings("dpm++ sde", "exponential") == ("DPM++ SDE", "Exponential")
    # the WebUI's own DDIM, PLMS, LCM and DPM fast; DPM adaptive refused in one line
    assert sampler_settings("DDIM", None) == ("DDIM", "Automatic")
    assert sampler_settings("plms", None) == ("PLMS", "Automatic")
    assert sampler_settings("k_lcm", None) == ("LCM", "Automatic")
    assert sampler_settings("k_dpm_fast", None) == ("DPM fast", "Automatic")
    assert sampler_settings("UniPC", None) == sampler_settings("unipc", "") == (
        "UniPC", "Automatic")
    assert sampler_settings("DDPM", None) == ("ddpm", None)
    for name in ("DPM adaptive", "k_dpm_ad"):
        with pytest.raises(ValueError, match="^sampler 'DPM adaptive' is not supported: an "
                                             "adaptive-step solver"):
            sampler_settings(name, None)
    with pytest.raises(Exception, match="--scheduler .DPM adaptive. is not supported"):
        cli_args.check_common_args(p.parse_args(["--scheduler", "DPM adaptive"]))
    with pytest.raises(ValueError, match="LCM sampler runs its own schedule"):
        get_scheduler("LCM", SD15_SCHEDULER, schedule_type="Karras")
    with pytest.raises(ValueError, match="unknown schedule_type 'Karas'"):
        sampler_settings("Euler", "Karas")
    names = [s["name"] for s in sampler_list()]
    assert names[:3] == ["Euler", "Euler a", "DPM++ 2M"] and "DPM++ 2M Karras" in names
    assert len(names) == len(set(names))
    assert [s["label"] for s in scheduler_list()] == list(ws.SCHEDULE_TYPES)

    def text(sampler, schedule):
        settings = CallSettings("m", Sampling(20, sampler, 7.0, schedule_type=schedule),
                                Size(64, 64))
        assert settings.pipeline_kwargs().get("schedule_type") == schedule
        return settings.parameters("a cat", "", 1).split("\n")[1]

    assert text("DPM++ 2M", None).startswith(
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1")
    assert text("Euler", None).startswith("Steps: 20, Sampler: Euler, Schedule type: Automatic,")
    assert text("Euler", "Beta").startswith("Steps: 20, Sampler: Euler, Schedule type: Beta,")
    assert text("euler", None).startswith("Steps: 20, Sampler: Euler, CFG scale")
    assert text("DDIM", None).startswith("Steps: 20, Sampler: DDIM, Schedule type: Automatic,")
    unipc = text("UniPC", None)
    assert unipc.startswith("Steps: 20, Sampler: UniPC, Schedule type: Automatic,")
    from sdjax.from_png import settings as png_settings  # --from_png reads it back
    flags, lines = png_settings("a cat\n" + unipc)
    assert (flags["scheduler"], flags["schedule_type"], flags["steps"], lines) == (
        "UniPC", "Automatic", 20, [])


# -- the WebUI's DDIM and PLMS (over timesteps) and LCM: restated here from its
# modules/sd_samplers_timesteps_impl.py and sd_samplers_lcm.py (k-diffusion has none) ----------

def _timesteps_start(ac, steps, x0, noise, t_enc, eta):
    """What the WebUI's timestep samplers start from (``CompVisSampler.get_timesteps``, its
    img2img with ``t_enc``): (x, timesteps, their alphas, the previous alphas in float64,
    DDIM's eta sigmas)."""
    full = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    x = noise
    if t_enc is not None:
        a = ac[full[t_enc]]
        x = x0 * a.sqrt() + noise * (1 - a).sqrt()
        full = full[:t_enc]
    ts = full
    alphas = ac[ts]
    prev = ac[torch.nn.functional.pad(ts[:-1], (1, 0))].double()
    sig = eta * np.sqrt((1 - prev.numpy()) / (1 - alphas.numpy()) * (1 - alphas.numpy()
                                                                    / prev.numpy()))
    return x, ts, alphas, prev, sig


def _ref_timesteps(eps_fn, sampler, ac, steps, x0, noise, t_enc=None, eta=0.0, noises=()):
    """The WebUI's ``ddim`` / ``plms`` over ``CompVisSampler.get_timesteps`` (txt2img) or
    its img2img (``t_enc``: the image noised to timestep t_enc's level, the first t_enc
    timesteps run). ``eps_fn(x, t)``: the CFG-combined eps; ``ac`` float32 alphas_cumprod."""
    x, ts, alphas, prev, sig = _timesteps_start(ac, steps, x0, noise, t_enc, eta)
    draws, old = iter(noises), []
    for i in range(len(ts) - 1):
        index = len(ts) - 1 - i
        a_t, a_p = alphas[index].item(), prev[index].item()
        e_t = eps_fn(x, ts[index].item())

        def x_prev(e, x=x, a_t=a_t, a_p=a_p, s=0.0):
            x0_ = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
            return a_p ** 0.5 * x0_ + (1 - a_p - s ** 2) ** 0.5 * e

        if sampler == "DDIM":
            x = x_prev(e_t, s=float(sig[index])) + (float(sig[index]) * next(draws) if eta
                                                     else 0)
            continue
        if not old:
            e_next = eps_fn(x_prev(e_t), ts[max(index - 1, 0)].item())
            e_p = (e_t + e_next) / 2
        elif len(old) == 1:
            e_p = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_p = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_p = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = x_prev(e_p)
        old = (old + [e_t])[-3:]
    return x


def _ref_unipc(eps_fn, ac, steps, x0, noise, t_enc=None, variant="bh1",
               skip_type="time_uniform", order=3, lower_order_final=True):
    """The WebUI's ``unipc`` restated in float32 torch with its options (defaults: bh1,
    time_uniform, order 3, lower order final): ``UniPC.sample(method="multistep",
    predict_x0=True)`` over ``NoiseScheduleVP('discrete', alphas_cumprod)``, the model at
    ``(t - 1/1000) * 1000``; txt2img or its img2img (``t_enc`` as for DDIM)."""
    full = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    x, t_start = noise, 1.0
    if t_enc is not None:
        a = ac[full[t_enc]]
        x = x0 * a.sqrt() + noise * (1 - a).sqrt()
        full = full[:t_enc]
        t_start = full[-1] / 1000 + 1 / 1000  # a float32 tensor, as the WebUI's
    t_knots, log_a = torch.linspace(0.0, 1.0, 1001)[1:], 0.5 * torch.log(ac)

    def interp(t, xp, yp):  # interpolate_fn: piecewise linear, the end segments extended
        i = torch.clamp(torch.searchsorted(xp, t.reshape(1), right=True) - 1, 0, 998)[0]
        return yp[i] + (t - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])

    def alpha_sigma_lambda(t):
        la = interp(t, t_knots, log_a)
        return la.exp(), (1 - (2 * la).exp()).sqrt(), la - 0.5 * (1 - (2 * la).exp()).log()

    def data(x, t):  # data_prediction_fn around the CFG-combined eps
        al, sg, _ = alpha_sigma_lambda(t)
        return (x - sg * eps_fn(x, ((t - 1 / 1000) * 1000).item())) / al

    def phis(hh, count):  # h_phi_1, then each h_phi_k / hh - 1 / k!
        out, fact = [torch.expm1(hh)], 1
        for k in range(1, count):
            out.append(out[-1] / hh - 1 / fact)
            fact *= k + 1
        return out

    def update(x, ms, tps, t, order, corrector):
        al_t, sg_t, lam_t = alpha_sigma_lambda(t)
        _, sg_0, lam_0 = alpha_sigma_lambda(tps[-1])
        h = lam_t - lam_0
        rks = [(alpha_sigma_lambda(tps[-1 - i])[2] - lam_0) / h for i in range(1, order)]
        d1s = [(ms[-1 - i] - ms[-1]) / rk for i, rk in enumerate(rks, 1)]
        rks = torch.stack(rks + [torch.tensor(1.0)])
        hh = -h
        hp = phis(hh, order + 2)
        base = sg_t / sg_0 * x - al_t * hp[0] * ms[-1]
        zero = torch.zeros_like(x)
        if variant == "vary_coeff":  # multistep_uni_pc_vary_update
            k_ = len(rks)
            c = torch.stack([rks ** j / math.factorial(j + 1) for j in range(k_)], dim=1)
            x_t = base
            if d1s:
                a_p = torch.linalg.inv(c[:-1, :-1])
                for j in range(k_ - 1):
                    x_t = x_t - al_t * hp[j + 1] * sum(
                        (w * d for w, d in zip(a_p[j], d1s, strict=True)), zero)
            if not corrector:
                return x_t, None
            a_c = torch.linalg.inv(c)
            m_t = data(x_t, t)
            x_t, j = base, 0
            for j in range(k_ - 1):
                x_t = x_t - al_t * hp[j + 1] * sum(
                    (w * d for w, d in zip(a_c[j][:-1], d1s, strict=True)), zero)
            return x_t - al_t * hp[k_] * ((m_t - ms[-1]) * a_c[j][-1]), m_t
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rows, b, fact = [], [], 1
        for i in range(1, order + 1):
            rows.append(rks ** (i - 1))
            b.append(hp[i] * fact / b_h)
            fact *= i + 1
        r, b = torch.stack(rows), torch.stack(b)
        rho_p = (torch.tensor([0.5]) if order == 2
                 else torch.linalg.solve(r[:-1, :-1], b[:-1]) if order > 2 else [])
        x_t = base - al_t * b_h * sum((c * d for c, d in zip(rho_p, d1s, strict=True)), zero)
        if not corrector:
            return x_t, None
        rho_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r, b)
        m_t = data(x_t, t)
        res = sum((c * d for c, d in zip(rho_c[:-1], d1s, strict=True)), zero)
        return base - al_t * b_h * (res + rho_c[-1] * (m_t - ms[-1])), m_t

    n, t_0 = len(full), 1 / 1000
    if skip_type == "time_quadratic":
        ts = torch.linspace(t_start ** 0.5, t_0 ** 0.5, n + 1).pow(2)
    elif skip_type == "logSNR":
        lams = [alpha_sigma_lambda(torch.as_tensor(t))[2].item() for t in (t_start, t_0)]
        lam = torch.linspace(lams[0], lams[1], n + 1)
        ts = torch.stack([interp(-0.5 * torch.logaddexp(torch.zeros(()), -2 * v),
                                 log_a.flip(0), t_knots.flip(0)) for v in lam])
    else:
        ts = torch.linspace(float(t_start), t_0, n + 1)
    ms, tps = [data(x, ts[0])], [ts[0]]
    for step in range(1, n + 1):
        o = step if step < order else (min(order, n + 1 - step) if lower_order_final
                                       else order)
        x, m = update(x, ms, tps, ts[step], o, step < n)
        ms, tps = (ms + [m])[-order:], (tps + [ts[step]])[-order:]
    return x


class _RefLCM:
    """The WebUI's ``LCMCompVisDenoiser`` (restated): 50 of the model's sigmas (timesteps
    19, 39, ..., 999), the UNet at the nearest, LCM's consistency scalings."""

    def __init__(self, eps_fn, ac):
        valid = ac[19::20]
        self.eps_fn, self.sigmas = eps_fn, ((1 - valid) / valid) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(
            sigma.shape) * 20 + 19

    def get_sigmas(self, n):
        t = torch.linspace(self.sigma_to_t(self.sigmas[-1]).item(),
                           self.sigma_to_t(self.sigmas[0]).item(), n)
        t = torch.clamp((t - 19) / 20, 0, 49).float()
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        sig = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        return torch.cat([sig, sig.new_zeros(1)])

    def __call__(self, x, sigma):
        t = self.sigma_to_t(sigma)
        eps = self.eps_fn(x / (sigma ** 2 + 1) ** 0.5, t.item())
        ts = t.float() * 10
        c_skip, c_out = 0.25 / (ts ** 2 + 0.25), ts / (ts ** 2 + 0.25) ** 0.5
        return c_out * (x - sigma * eps) + c_skip * x


def _ref_lcm(eps_fn, ac, steps, x0, noise, start, noises, blend=lambda out: out):
    """``sample_lcm`` from the WebUI's k-diffusion start (txt2img: noise * sigmas[0]);
    ``blend``: what CFGDenoiserLCM does to its denoiser's output (inpainting's mask blend)."""
    den = _RefLCM(eps_fn, ac)
    sigmas = den.get_sigmas(steps)[start:]
    x = noise * sigmas[0] + (0 if x0 is None else x0)
    draws = iter(noises)
    for s, to in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = blend(den(x, s))
        if to > 0:
            x = x + to * next(draws)
    return x


def _ours_timesteps(eps_fn, sched, steps, x0, noise, begin, step_noises, blend=None):
    """Our WebUI timesteps sampler's loop, step by step, around ``eps_fn(xin, t)`` (numpy);
    ``blend``: (image latents, repaint mask) of inpainting (no final blend)."""
    shape = noise.shape
    if x0 is None:
        state = sched.set_timesteps(steps, sample_shape=shape)
        x = noise * np.asarray(state.init_sigma)
    else:
        state = sched.img2img_state(steps, begin)
        c = np.asarray(state.start_coefs)
        x = x0 * c[0] + noise * c[1]
    x = jnp.asarray(x)
    step = _stepper_any()
    div, ts, draws = (np.asarray(a) for a in (state.input_div, state.timesteps, state.draw))
    for i in range(sched.num_evaluations(state)):
        seen = x if blend is None else sched.blend_input(state, i, x, blend)
        eps = eps_fn(np.asarray(seen) / div[i], ts[i])
        n = step_noises[draws[i]] if draws[i] >= 0 else np.zeros(shape, np.float32)
        x, state = (step(sched, state, i, jnp.asarray(eps), x, n) if blend is None else
                    _blend_stepper()(sched, state, i, jnp.asarray(eps), x, n, blend))
    return np.asarray(x)


@functools.cache
def _blend_stepper():
    return jax.jit(lambda sched, state, i, eps, x, n, blend: sched.step(
        state, i, eps, x, noise=n, blend=blend), static_argnums=0)


@functools.cache
def _stepper_any():
    """One jitted step, the scheduler static (LCM reads its own prediction rule)."""
    return jax.jit(lambda sched, state, i, eps, x, n: sched.step(state, i, eps, x, noise=n),
                   static_argnums=0)


def _timesteps_case(sampler, config, eps_np, eps_torch, steps, begin, rng, eta=0.0,
                    shape=(2, 3, 3, 2)):
    """(ours, the WebUI's restated) for one run of DDIM / PLMS / LCM."""
    sched = get_scheduler(sampler, config)
    if eta:
        sched = dataclasses.replace(sched, eta_ddim=eta)
    ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32))
    noise = rng.standard_normal(shape).astype(np.float32)
    x0 = None if begin is None else rng.standard_normal(shape).astype(np.float32)
    step_noises = rng.standard_normal((steps + 2, *shape)).astype(np.float32)
    ours = _ours_timesteps(eps_np, sched, steps, x0, noise, begin, step_noises)
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    xs = [None if x0 is None else nchw(x0), nchw(noise), [nchw(n) for n in step_noises]]
    with torch.no_grad():
        if sampler == "LCM":
            ref = _ref_lcm(eps_torch, ac, steps, xs[0], xs[1], begin or 0, xs[2])
        elif sampler == "UniPC":
            t_enc = None if begin is None else steps - 1 - begin
            ref = _ref_unipc(eps_torch, ac, steps, xs[0], xs[1], t_enc)
        else:
            t_enc = None if begin is None else steps - 1 - begin
            ref = _ref_timesteps(eps_torch, sampler, ac, steps, xs[0], xs[1], t_enc, eta,
                                 xs[2])
    return ours, np.transpose(ref.numpy(), (0, 2, 3, 1))


def _fake_eps(x, t):
    """A smooth stand-in for the UNet's eps at timestep t (numpy or torch alike)."""
    return x * 0.5 + 0.05 * (float(t) / 1000) - 0.2


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "LCM", "UniPC"])
def test_timestep_samplers_restate_the_webui(sampler):
    """The WebUI's DDIM (eta 0 and its eta), PLMS and LCM over a stand-in eps, against the
    WebUI's own loops restated: step counts that divide 1000 and that do not (one timestep
    more), txt2img and img2img by the WebUI's timesteps rule, epsilon and v-prediction."""
    rng = np.random.default_rng(3)
    for config, steps, begin, eta in ((SD15_SCHEDULER, 4, None, 0.0),
                                      (SD15_SCHEDULER, 7, None, 0.0),
                                      (SD15_SCHEDULER, 8, 3, 0.0),
                                      (SD21_SCHEDULER, 6, None, 0.5),
                                      (SD21_SCHEDULER, 5, 0, 0.0),
                                      (SD21_SCHEDULER, 6, 1, 0.7)):
        if eta and sampler != "DDIM":
            continue
        vpred = config.get("prediction_type") == "v_prediction" and sampler != "LCM"
        ac = np.asarray(ws.webui_alphas_cumprod(get_scheduler("Euler", config).schedule),
                        np.float32)

        def eps_np(x, t, vpred=vpred, ac=ac):
            out = _fake_eps(x, t)
            if not vpred:
                return out
            # the UNet's v whose eps (the WebUI's predict_eps_from_z_and_v) is _fake_eps
            a = float(ac[int(float(t))])  # (the WebUI truncates UniPC's fractional t)
            return (out - (1 - a) ** 0.5 * x) / a ** 0.5

        def eps_torch(x, t):
            return _fake_eps(x, t)  # the reference sees eps (its V denoiser converts)

        ours, ref = _timesteps_case(sampler, config, eps_np, eps_torch, steps, begin, rng,
                                    eta)
        if sampler == "LCM" and steps == 4:
            # every step count's LCM timesteps, ties halfway between two of them included
            sched = get_scheduler("LCM", config)
            lcm = _RefLCM(None, torch.tensor(ac))
            for n in range(1, 99):  # (99 and 197: a tie rounds the other way in torch)
                want = lcm.sigma_to_t(lcm.get_sigmas(n)[:-1]).numpy()
                sig, ls = wt.lcm_sigmas(n, sched.model_sigmas)
                np.testing.assert_array_equal([wt.lcm_timestep(x, ls) for x in sig[:-1]],
                                              want, err_msg=f"LCM {n} steps")
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{sampler} {steps} from {begin} eta {eta}")


def _unet_eps(model):
    """(ours, the WebUI's) CFG-combined UNet output at an integer timestep: ours the raw
    output the loop feeds the step; the WebUI's (CompVisTimestepsDenoiser /
    CompVisTimestepsVDenoiser restated) eps, or the raw output for LCM's denoiser (``raw``)."""
    ac = np.asarray(ws.webui_alphas_cumprod(get_scheduler("Euler", model["config"]).schedule),
                    np.float32)
    vpred = model["config"].get("prediction_type") == "v_prediction"

    def ours(x, t):
        b = x.shape[0]
        out = model["unet"](jnp.concatenate([x, x]), jnp.float32(t), model["ctx"])
        return np.asarray(out[:b] + CFG * (out[b:] - out[:b]))

    def webui(x, t, raw=False):
        b, ctx = x.shape[0], model["cfg"].ctx
        out = model["ref"].unet(torch.cat([x, x]), torch.tensor(float(t)),
                                encoder_hidden_states=torch.cat([ctx[b:], ctx[:b]])).sample
        if vpred and not raw:  # predict_eps_from_z_and_v
            a = torch.tensor(ac[int(t)])
            out = a.sqrt() * out + (1 - a).sqrt() * torch.cat([x, x])
        cond, uncond = out[:b], out[b:]
        return uncond + (cond - uncond) * CFG

    return ours, webui


TIMESTEP_CASES = {  # model -> (sampler, steps, img2img start step (k-diffusion rule) or None)
    "sd1": [("DDIM", 6, None), ("PLMS", 5, 1),  # (and DDIM img2img through the pipeline)
            ("UniPC", 6, None), ("UniPC", 8, 2)],
    "sd2": [("DDIM", 8, 2), ("PLMS", 7, None), ("LCM", 4, 1), ("LCM", 5, None),
            ("UniPC", 7, None), ("UniPC", 5, 0)],
}


def test_timestep_samplers_match_the_webui(model):
    """The WebUI's DDIM, PLMS, LCM and UniPC around our UNet (our step loop) against the WebUI's
    loops restated around the diffusers UNet: SD 1.x and v-prediction SD 2.x, txt2img and
    img2img by the WebUI's timesteps rule; within 1e-5 of the latents' scale."""
    rng = np.random.default_rng(7)
    ours_eps, webui_eps = _unet_eps(model)
    worst = {}
    for sampler, steps, begin in TIMESTEP_CASES[model["kind"]]:
        ours, ref = _timesteps_case(
            sampler, model["config"], ours_eps,
            functools.partial(webui_eps, raw=sampler == "LCM"), steps, begin, rng,
            shape=(1, 8, 8, 4))
        worst[(sampler, steps, begin)] = (float(np.abs(ours - ref).max()),
                                          float(np.abs(ref).max()))
        assert np.abs(ref).max() > 0.1
    bad = {k: v for k, v in worst.items() if not v[0] <= 1e-5 * max(10.0, v[1])}
    assert not bad, f"(max |ours - WebUI|, max |WebUI|) off: {bad} (all: {worst})"


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_pipeline_runs_the_timestep_samplers(model):
    """Through the pipeline (the compiled loop, img2img's start table with the timesteps
    samplers' own img2img states): SD 1.x img2img with "DDIM" at denoising strength 0.6 (the
    WebUI's t_enc = 3 of 5 steps) and with "UniPC" at 0.75 (t_enc = 4 of 6) against the
    WebUI's loops. (The step is the one the UNet
    tests above drive, LCM and v-prediction included.)"""
    pipe = model["pipe"]
    rng = np.random.default_rng(9)
    shape = (1, 8, 8, 4)
    noise = rng.standard_normal(shape).astype(np.float32)
    image = rng.standard_normal(shape).astype(np.float32)
    size = 8 * pipe.vae_scale_factor
    out = pipe("a red circle", scheduler="DDIM", image=image, strength=0.6,
               num_inference_steps=5, guidance_scale=CFG, height=size, width=size,
               latents=noise, output_type="latent").images
    _, webui_eps = _unet_eps(model)
    sched = get_scheduler("DDIM", model["config"])
    ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32))
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        ref = _ref_timesteps(webui_eps, "DDIM", ac, 5, nchw(image), nchw(noise), t_enc=3)
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    diff = np.abs(np.asarray(out) - ref).max()
    assert np.abs(ref).max() > 0.1
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (diff, np.abs(ref).max())
    # UniPC img2img at strength 0.75 of 6 steps: the WebUI's t_enc = 4 UniPC steps
    out = pipe("a red circle", scheduler="UniPC", image=image, strength=0.75,
               num_inference_steps=6, guidance_scale=CFG, height=size, width=size,
               latents=noise, output_type="latent").images
    with torch.no_grad():
        ref = _ref_unipc(webui_eps, ac, 6, nchw(image), nchw(noise), t_enc=4)
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    diff = np.abs(np.asarray(out) - ref).max()
    assert np.abs(ref).max() > 0.1
    assert diff <= 1e-4, (diff, np.abs(ref).max())


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_pipeline_inpaints_as_the_webui(model, monkeypatch):
    """Inpainting with a WebUI k-diffusion sampler ("Euler a", 5 steps at denoising strength
    0.75: the WebUI's t_enc = 3) through the pipeline against k-diffusion around the WebUI's
    CFGDenoiser with its mask blend (``denoised = init_latent * mask + nmask * denoised`` at
    every evaluation, ``mask`` the kept region) and processing.py's final blend of the
    samples, from the image's latents plus the noise at the start sigma. (The blend does not
    depend on the prediction type: SD 1.x alone.)"""
    pipe, ref_pipe = model["pipe"], model["ref"]
    f = pipe.vae_scale_factor
    size, steps, strength = 8 * f, 5, 0.75
    rng = np.random.default_rng(11)
    shape = (1, 8, 8, 4)
    noise = rng.standard_normal(shape).astype(np.float32)
    step_noises = rng.standard_normal((8, *shape)).astype(np.float32)
    monkeypatch.setattr(webui_mod, "step_noise",
                        lambda key, draw, like: jnp.asarray(step_noises)[draw])
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[2 * f:5 * f, 3 * f:7 * f] = 255  # whole latent cells
    out = np.asarray(pipe("a red circle", image=pixels, mask_image=mask, strength=strength,
                          scheduler="Euler a", num_inference_steps=steps, guidance_scale=CFG,
                          height=size, width=size, latents=noise,
                          output_type="latent").images)
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        signed = torch.tensor(pixels.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
        init = (ref_pipe.vae.encode(signed).latent_dist.mean
                * ref_pipe.vae.config.scaling_factor)
        nmask = torch.tensor(mask[::f, ::f] / 255.0, dtype=torch.float32)[None, None]
        keep = 1 - nmask
        sigmas = torch.tensor(get_scheduler("Euler a", model["config"]).sigmas(steps))
        t_enc = int(strength * steps)
        sched = sigmas[steps - t_enc - 1:]
        draws = iter(step_noises)
        ref = KD[0].sample_euler_ancestral(
            lambda x, s: init * keep + nmask * model["cfg"](x, s), init + nchw(noise) * sched[0],
            sched, disable=True, noise_sampler=lambda s, s_next: nchw(next(draws)))
        ref = init * keep + nmask * ref
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    assert np.abs(ref - np.transpose(init.numpy(), (0, 2, 3, 1))).max() > 0.1
    diff = np.abs(out - ref).max()
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (diff, np.abs(ref).max())


# -- the WebUI's UniPC options, DDIM CFG++ and Restart -------------------------------------------

UNIPC_OPTION_CASES = (  # (config, steps, img2img start step or None, the WebUI's options)
    (SD15_SCHEDULER, 6, None, dict(uni_pc_variant="bh2")),
    (SD15_SCHEDULER, 8, 2, dict(uni_pc_variant="vary_coeff", uni_pc_order=2)),
    (SD21_SCHEDULER, 7, None, dict(uni_pc_skip_type="time_quadratic",
                                   uni_pc_lower_order_final=False)),
    (SD21_SCHEDULER, 8, 1, dict(uni_pc_skip_type="logSNR", uni_pc_variant="vary_coeff")),
    (SD15_SCHEDULER, 5, None, dict(uni_pc_skip_type="logSNR", uni_pc_order=1)),
    (SD15_SCHEDULER, 7, 1, dict(uni_pc_skip_type="time_quadratic", uni_pc_order=4,
                                uni_pc_variant="bh2")),
)


def _vpred_eps(config, eps):
    """``eps(x, t)`` as the UNet output of ``config``'s prediction type: on a v-prediction
    model the v whose eps (the WebUI's predict_eps_from_z_and_v at the truncated t) it is."""
    ac = np.asarray(ws.webui_alphas_cumprod(get_scheduler("Euler", config).schedule),
                    np.float32)
    if config.get("prediction_type") != "v_prediction":
        return eps

    def v(x, t):
        a = float(ac[int(float(t))])
        return (eps(x, t) - (1 - a) ** 0.5 * x) / a ** 0.5
    return v


def test_unipc_options_restate_the_webui():
    """The WebUI's UniPC options (variants bh2 and vary_coeff, skip types time_quadratic and
    logSNR, orders 1, 2 and 4, lower order final off) over a stand-in eps against its
    UniPC restated: txt2img and img2img, epsilon and v-prediction, within 1e-5."""
    rng = np.random.default_rng(5)
    shape = (2, 3, 3, 2)
    for config, steps, begin, opts in UNIPC_OPTION_CASES:
        sched = dataclasses.replace(get_scheduler("UniPC", config), **opts)
        ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32))
        noise = rng.standard_normal(shape).astype(np.float32)
        x0 = None if begin is None else rng.standard_normal(shape).astype(np.float32)
        ours = _ours_timesteps(_vpred_eps(config, _fake_eps), sched, steps, x0, noise, begin,
                               np.zeros((1, *shape), np.float32))
        nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
        with torch.no_grad():
            ref = _ref_unipc(_fake_eps, ac, steps, None if x0 is None else nchw(x0),
                             nchw(noise), None if begin is None else steps - 1 - begin,
                             **{k[len("uni_pc_"):]: v for k, v in opts.items()})
        ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"UniPC {opts} {steps} from {begin}")


def _ref_ddim_cfgpp(cond_fn, uncond_fn, scale, ac, steps, x0, noise, t_enc=None, eta=0.0,
                    noises=()):
    """The WebUI's ``ddim_cfgpp`` (sd_samplers_timesteps_impl.py, 1.10) restated: DDIM whose
    eps is the CFG combination at ``scale / 12.5`` (its ``cond_scale_miltiplier``) and whose
    direction term takes the unconditional eps (``last_noise_uncond``); ``cond_fn`` and
    ``uncond_fn`` give eps at an integer timestep."""
    x, ts, alphas, prev, sig = _timesteps_start(ac, steps, x0, noise, t_enc, eta)
    draws = iter(noises)
    for i in range(len(ts) - 1):
        index = len(ts) - 1 - i
        t = ts[index].item()
        u, c = uncond_fn(x, t), cond_fn(x, t)
        e_t = u + (c - u) * (scale / 12.5)
        a_t, a_p, s = alphas[index].item(), prev[index].item(), float(sig[index])
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        x = a_p ** 0.5 * pred_x0 + (1 - a_p - s ** 2) ** 0.5 * u + (s * next(draws) if eta
                                                                    else 0)
    return x


def _nchw(a):
    return torch.tensor(np.transpose(a, (0, 3, 1, 2)))


def _fake_uncond_eps(x, t):
    """A second stand-in eps, for the unconditional half."""
    return x * 0.3 + 0.1 * (float(t) / 1000) + 0.05


def test_ddim_cfgpp_restates_the_webui():
    """"DDIM CFG++" over stand-in conditional and unconditional eps (the step given the
    loop's guided output and the unconditional one) against the WebUI's ddim_cfgpp
    restated: txt2img and img2img, eta_ddim 0 and 0.6, epsilon and v-prediction, the
    guidance above and at 1."""
    rng = np.random.default_rng(6)
    shape = (2, 3, 3, 2)
    step = jax.jit(lambda sched, state, i, out, unc, x, n: sched.step(
        state, i, out, x, noise=n, uncond=unc), static_argnums=0)
    for config, steps, begin, eta, scale in ((SD15_SCHEDULER, 5, None, 0.0, 7.0),
                                             (SD15_SCHEDULER, 8, 2, 0.6, 7.0),
                                             (SD21_SCHEDULER, 6, None, 0.6, 1.0),
                                             (SD21_SCHEDULER, 7, 1, 0.0, 4.5)):
        sched = dataclasses.replace(get_scheduler("DDIM CFG++", config), eta_ddim=eta)
        assert sched.needs_uncond and sched.stochastic == bool(eta)
        cond, uncond = _vpred_eps(config, _fake_eps), _vpred_eps(config, _fake_uncond_eps)
        noise = rng.standard_normal(shape).astype(np.float32)
        x0 = None if begin is None else rng.standard_normal(shape).astype(np.float32)
        noises = rng.standard_normal((steps + 1, *shape)).astype(np.float32)
        if x0 is None:
            state = sched.set_timesteps(steps, sample_shape=shape)
            x = jnp.asarray(noise * np.asarray(state.init_sigma))
        else:
            state = sched.img2img_state(steps, begin)
            c = np.asarray(state.start_coefs)
            x = jnp.asarray(x0 * c[0] + noise * c[1])
        div, ts, draws = (np.asarray(a) for a in (state.input_div, state.timesteps,
                                                  state.draw))
        for i in range(sched.num_evaluations(state)):
            xin = np.asarray(x) / div[i]
            u, c_ = uncond(xin, ts[i]), cond(xin, ts[i])
            guided = u + max(scale, 1.0) * (c_ - u) if scale > 1 else c_  # the loop's CFG
            n = noises[draws[i]] if draws[i] >= 0 else np.zeros(shape, np.float32)
            x, state = step(sched, state, i, jnp.asarray(guided), jnp.asarray(u), x, n)
        ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32))
        nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
        with torch.no_grad():
            ref = _ref_ddim_cfgpp(_fake_eps, _fake_uncond_eps, scale, ac, steps,
                                  None if x0 is None else nchw(x0), nchw(noise),
                                  None if begin is None else steps - 1 - begin, eta,
                                  [nchw(n) for n in noises])
        ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"DDIM CFG++ {steps} from {begin} eta {eta}")


def _ref_restart(model, x, sigmas, s_noise, noise):
    """The WebUI's ``restart_sampler`` (sd_samplers_extra.py) restated over k-diffusion's
    ``to_d`` and ``get_sigmas_karras`` with its automatic restart list; ``noise()`` is its
    ``torch.randn_like``."""
    to_d, karras = KD[0].to_d, KD[0].get_sigmas_karras
    s_in = x.new_ones([x.shape[0]])

    def heun_step(x, old, new):
        d = to_d(x, old, model(x, old * s_in))
        if new == 0:
            return x + d * (new - old)
        x_2 = x + d * (new - old)
        d_2 = to_d(x_2, new, model(x_2, new * s_in))
        return x + (d + d_2) / 2 * (new - old)

    steps = sigmas.shape[0] - 1
    restart_list = {}
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - r_steps * r_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [r_steps + 1, r_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - k), dim=0)): v
                    for k, v in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            r_steps, r_times, r_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - r_max), dim=0))
            if max_idx < min_idx:
                up = karras(r_steps, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                step_list += list(zip(up[:-1], up[1:], strict=True)) * r_times
    last = None
    for old, new in step_list:
        if last is None:
            last = old
        elif last < old:
            x = x + noise() * s_noise * (old ** 2 - last ** 2) ** 0.5
        x = heun_step(x, old, new)
        last = new
    return x


def test_restart_restates_the_webui():
    """"Restart" over a stand-in denoiser against the WebUI's restart_sampler restated: under
    20 steps (Heun over the schedule), at 20 (one restart of 9 steps) and at 36 (two of 9),
    txt2img and img2img (the restart list built over the cut schedule, as the WebUI's),
    several schedule types and s_noise, the jumps' noise fed to both."""
    rng = np.random.default_rng(8)
    shape = (2, 3, 3, 2)
    for schedule, steps, start, s_noise in (("Automatic", 6, 0, 1.0), ("Automatic", 20, 0, 1.0),
                                            ("Exponential", 36, 0, 0.9),
                                            ("Uniform", 24, 3, 1.0), ("Karras", 7, 2, 1.0)):
        sched = dataclasses.replace(
            get_scheduler("Restart", SD15_SCHEDULER, schedule_type=schedule), s_noise=s_noise)
        sigmas = sched.sigmas(steps)
        noise = rng.standard_normal(shape).astype(np.float32)
        x0 = rng.standard_normal(shape).astype(np.float32) if start else None
        step_noises = rng.standard_normal((4, *shape)).astype(np.float32)
        state = sched.set_timesteps(steps, strength_for_start(steps, start), sample_shape=shape)
        x = (jnp.asarray(noise) * state.init_sigma if x0 is None
             else sched.add_noise_for_start(state, jnp.asarray(x0), jnp.asarray(noise)))
        # 2 steps - 1 evaluations, as Heun; a jump's noise is drawn after the 2 restarts
        assert sched.num_evaluations(state) == 2 * (steps - start) - 1
        assert int(np.asarray(state.draw).max()) + 1 == (
            0 if steps - start < 20 else 1 if steps - start < 36 else 2)
        for i in range(sched.num_evaluations(state)):
            sigma = state.sigma[i]
            eps = (x - _fake_denoiser(x, sigma[None])) / sigma
            draw = int(state.draw[i])
            x, state = sched.step(state, i, eps, x, noise=jnp.asarray(
                step_noises[draw] if draw >= 0 else np.zeros(shape, np.float32)))
        run = torch.tensor(sigmas[start:])
        draws = iter([_nchw(n) for n in step_noises])
        with torch.no_grad():
            x_ref = _nchw(noise) * run[0] + (0 if x0 is None else _nchw(x0))
            ref = _ref_restart(_fake_denoiser, x_ref, run, s_noise,
                               functools.partial(next, draws))
        ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
        np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"Restart {schedule} {steps} from {start}")


def test_unipc_options_around_the_unet(model):
    """UniPC with non-default options (SD 1.x: bh2, logSNR, order 2; v-prediction SD 2.x:
    vary_coeff, time_quadratic, lower order final off, img2img) around our UNet (our step
    loop) against the WebUI's UniPC restated around the diffusers UNet."""
    opts = (dict(uni_pc_variant="bh2", uni_pc_skip_type="logSNR", uni_pc_order=2)
            if model["kind"] == "sd1" else
            dict(uni_pc_variant="vary_coeff", uni_pc_skip_type="time_quadratic",
                 uni_pc_lower_order_final=False))
    steps, begin = (6, None) if model["kind"] == "sd1" else (7, 1)
    rng = np.random.default_rng(12)
    shape = (1, 8, 8, 4)
    ours_eps, webui_eps = _unet_eps(model)
    sched = get_scheduler("UniPC", model["config"], options=opts)
    ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32))
    noise = rng.standard_normal(shape).astype(np.float32)
    x0 = None if begin is None else rng.standard_normal(shape).astype(np.float32)
    ours = _ours_timesteps(ours_eps, sched, steps, x0, noise, begin,
                           np.zeros((1, *shape), np.float32))
    with torch.no_grad():
        ref = _ref_unipc(webui_eps, ac, steps, None if x0 is None else _nchw(x0), _nchw(noise),
                         None if begin is None else steps - 1 - begin,
                         **{k[len("uni_pc_"):]: v for k, v in opts.items()})
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    diff = np.abs(ours - ref).max()
    assert np.abs(ref).max() > 0.1
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (diff, np.abs(ref).max())


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_pipeline_runs_ddim_cfgpp_and_restart(model):
    """Through the pipeline with the WebUI's NV noise (start noise and step noise from the
    per-image generators): "DDIM CFG++" (6 steps, sampler_options eta_ddim 0.5, its guidance
    at 3 / 12.5 and at 1 / 12.5: the unconditional pass runs at guidance 1 too, in the same
    program) and "Restart" (20 steps: one restart, its jump's noise the generator's next
    draw) against the WebUI's ddim_cfgpp and restart_sampler restated around the diffusers
    UNet (SD 1.x, txt2img)."""
    pipe = model["pipe"]
    size = 8 * pipe.vae_scale_factor
    h, w, c = pipe.latent_shape(size, size)
    seed = 77
    sched = get_scheduler("DDIM CFG++", model["config"])
    ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32))
    ctx = model["cfg"].ctx

    def parts(x, t):  # (cond, uncond) eps of the diffusers UNet
        out = model["ref"].unet(torch.cat([x, x]), torch.tensor(float(t)),
                                encoder_hidden_states=torch.cat([ctx[1:], ctx[:1]])).sample
        return out[:1], out[1:]

    compiled = None
    for scale in (CFG, 1.0):
        got = np.asarray(pipe("a red circle", scheduler="DDIM CFG++", num_inference_steps=6,
                              guidance_scale=scale, height=size, width=size, seed=seed,
                              rng="nv", sampler_options={"eta_ddim": 0.5},
                              output_type="latent").images)
        compiled = compiled or pipe.compile_count
        gen = _WebUIImageRNG("nv", (c, h, w), [seed])
        start = gen.next()
        with torch.no_grad():
            ref = _ref_ddim_cfgpp(lambda x, t: parts(x, t)[0], lambda x, t: parts(x, t)[1],
                                  scale, ac, 6, None, start, eta=0.5,
                                  noises=iter(gen.next, None))
        ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
        diff = np.abs(got - ref).max()
        assert np.abs(ref).max() > 0.1
        assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), ("DDIM CFG++", scale, diff)
    assert pipe.compile_count == compiled
    steps = 20
    got = np.asarray(pipe("a red circle", scheduler="Restart", num_inference_steps=steps,
                          guidance_scale=CFG, height=size, width=size, seed=seed, rng="nv",
                          output_type="latent").images)
    sigmas = torch.tensor(get_scheduler("Restart", model["config"]).sigmas(steps))
    gen = _WebUIImageRNG("nv", (c, h, w), [seed])
    with torch.no_grad():
        ref = _ref_restart(model["cfg"], gen.next() * sigmas[0], sigmas, 1.0, gen.next)
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    diff = np.abs(got - ref).max()
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), ("Restart", diff, np.abs(ref).max())


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_server_reads_the_sampler_options(model):
    """The server: "DDIM CFG++" and "Restart" listed and mapped under their names and
    aliases; the WebUI's sampler options from /sdapi/v1/options (the server's) and
    override_settings (the request's, on top) reach the call as sampler_options (those
    that differ from the defaults), bad ones a 422 naming them; and the Python API refuses
    an unknown option in one line."""
    from types import SimpleNamespace

    from sdjax.serve.generation import plan_txt2img
    from sdjax.serve.limits import BadRequest, Limits
    from sdjax.serve.samplers import check_options, sampler_list, sampler_settings
    from sdjax.serve.schemas import Txt2ImgRequest

    listed = {item["name"]: item for item in sampler_list()}
    assert listed["DDIM CFG++"]["aliases"] == ["ddim_cfgpp"]
    assert listed["Restart"] == {"name": "Restart", "aliases": ["restart"],
                                 "options": {"scheduler": "karras"}}
    assert sampler_settings("ddim_cfgpp", None) == ("DDIM CFG++", "Automatic")
    assert sampler_settings("restart", "") == ("Restart", "Automatic")
    pipe = model["pipe"]
    registry = SimpleNamespace(find=lambda wanted: "toy", get=lambda title: pipe,
                               find_refiner=lambda name: None, lora_dir=None)

    def plan(options=None, **fields):
        req = Txt2ImgRequest(**{"prompt": "a cat", "seed": 1, "steps": 4, "width": 64,
                                "height": 64, "sampler_name": "UniPC", **fields})
        return plan_txt2img(req, registry, Limits(), options).shape.settings

    assert plan().sampling.options == ()
    assert "sampler_options" not in plan().pipeline_kwargs()
    settings = plan({"uni_pc_order": 2, "uni_pc_variant": "bh1", "eta_ddim": 0.25},
                    override_settings={"uni_pc_variant": "vary_coeff",
                                       "uni_pc_lower_order_final": False})
    assert settings.pipeline_kwargs()["sampler_options"] == {
        "eta_ddim": 0.25, "uni_pc_variant": "vary_coeff", "uni_pc_order": 2,
        "uni_pc_lower_order_final": False}
    steps, sched = pipe._schedule(4, "UniPC", None, settings.pipeline_kwargs()[
        "sampler_options"])
    assert (sched.uni_pc_variant, sched.uni_pc_order, sched.uni_pc_lower_order_final,
            sched.memory) == ("vary_coeff", 2, False, 2)
    for bad, match in (({"uni_pc_skip_type": "linear"}, "uni_pc_skip_type must be one of"),
                       ({"uni_pc_order": 0}, "uni_pc_order must be an integer from 1"),
                       ({"eta_ddim": -1}, "eta_ddim must not be negative")):
        with pytest.raises(BadRequest, match=match):
            plan(override_settings=bad)
        with pytest.raises(BadRequest, match=match):
            check_options(bad)
    with pytest.raises(ValueError, match="^unknown sampler option 'uni_pc_steps'; choose "
                                         "from eta_ddim, "):
        pipe("a cat", scheduler="UniPC", sampler_options={"uni_pc_steps": 2})


def _inpaint_8x8(pipe, scheduler: str, seed: int, cells: tuple[int, int, int, int],
                 steps: int, strength: float):
    """An 8x8-latent inpainting call from seeded noise, image and a mask of whole latent
    cells (rows cells[0]:cells[1], columns cells[2]:cells[3]): (noise, pixels, mask, its
    latents)."""
    f = pipe.vae_scale_factor
    size = 8 * f
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[cells[0] * f:cells[1] * f, cells[2] * f:cells[3] * f] = 255
    out = np.asarray(pipe("a red circle", image=pixels, mask_image=mask, strength=strength,
                          scheduler=scheduler, num_inference_steps=steps, guidance_scale=CFG,
                          height=size, width=size, latents=noise,
                          output_type="latent").images)
    return noise, pixels, mask, out


def test_cli_and_png_text_take_the_sampler_options():
    """``--sampler_option NAME=VALUE`` (repeatable) checked before loading, into the call's
    sampler_options; the PNG text's ``Eta DDIM`` (the WebUI's, with DDIM and DDIM CFG++);
    ``--from_png`` reads it and the WebUI's UniPC infotext names back."""
    import argparse

    from sdjax import cli_args
    from sdjax.call_settings import CallSettings, Size
    from sdjax.from_png import settings as png_settings

    p = argparse.ArgumentParser()
    cli_args.add_common_arguments(p)
    args = p.parse_args(["--scheduler", "DDIM CFG++", "--sampler_option", "eta_ddim=0.5",
                         "--sampler_option", "uni_pc_lower_order_final=false", "--steps", "8",
                         "--guidance_scale", "7"])
    cli_args.check_common_args(args)
    call = CallSettings.from_args(args, Size(64, 64))
    assert call.pipeline_kwargs()["sampler_options"] == {"eta_ddim": 0.5,
                                                         "uni_pc_lower_order_final": False}
    text = call.parameters("a cat", "", 3)
    assert text.endswith("Eta DDIM: 0.5"), text
    # sdjax.generate's manifest records them (a resumed dataset keeps its options)
    from sdjax.dataset.prompts import PromptsInfo
    from sdjax.dataset.shards import Layout
    from sdjax.generate import Settings
    manifest = Settings(call, "float32", 0, "", "png", None).manifest(
        Layout(1, 1, 1), PromptsInfo(1, "0"))
    assert manifest["sampler_options"] == {"eta_ddim": 0.5, "uni_pc_lower_order_final": False}
    flags, lines = png_settings(text + ", UniPC variant: bh2, UniPC order: 2")
    assert flags["scheduler"] == "DDIM CFG++" and not lines
    assert flags["sampler_option"] == [("eta_ddim", 0.5), ("uni_pc_variant", "bh2"),
                                       ("uni_pc_order", 2)]
    for bad, message in (("uni_pc_order=0", "uni_pc_order must be an integer from 1"),
                         ("uni_pc_steps=2", "unknown sampler option 'uni_pc_steps'")):
        with pytest.raises(Exception, match=message):
            cli_args.check_common_args(p.parse_args(["--sampler_option", bad]))

@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_pipeline_inpaints_with_the_timestep_samplers_as_the_webui(model):
    """Inpainting with the WebUI's DDIM (SD 1.x, 4 steps at denoising strength 0.75:
    t_enc = 3) through the pipeline against the WebUI's ``ddim`` restated under
    ``CFGDenoiserTimesteps``, whose ``mask_before_denoising`` gives the UNet
    ``x * nmask + init_latent * mask`` while the sampler moves its own x by that eps, then
    processing.py's final blend of the samples. (PLMS, UniPC and LCM take the same loop; their
    blends are checked step by step below: LCM's output blend differs from a denoised-estimate
    blend by its c_skip, under 7e-6 of the sample, which no pipeline test can tell apart.)"""
    pipe, ref_pipe = model["pipe"], model["ref"]
    f, steps, strength = pipe.vae_scale_factor, 4, 0.75
    noise, pixels, mask, out = _inpaint_8x8(pipe, "DDIM", 13, (1, 5, 2, 6), steps, strength)
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    _, webui_eps = _unet_eps(model)
    ac = torch.tensor(np.asarray(ws.webui_alphas_cumprod(
        get_scheduler("DDIM", model["config"]).schedule), np.float32))
    with torch.no_grad():
        signed = torch.tensor(pixels.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
        init = (ref_pipe.vae.encode(signed).latent_dist.mean
                * ref_pipe.vae.config.scaling_factor)
        nmask = torch.tensor(mask[::f, ::f] / 255.0, dtype=torch.float32)[None, None]
        keep = 1 - nmask
        ref = _ref_timesteps(lambda x, t: webui_eps(x * nmask + init * keep, t), "DDIM", ac,
                             steps, init, nchw(noise), t_enc=int(strength * steps))
        ref = init * keep + nmask * ref
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    assert np.abs(ref - np.transpose(init.numpy(), (0, 2, 3, 1))).max() > 0.1
    diff = np.abs(out - ref).max()
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (diff, np.abs(ref).max())


def test_timestep_samplers_inpaint_as_the_webui():
    """The inpainting blends of the WebUI's timesteps samplers and LCM step by step over a
    stand-in eps, the kept region included (before processing.py's final blend), against
    its loops restated: v-prediction DDIM and UniPC (``mask_before_denoising``: the UNet's
    v at the blended input becomes eps by that input, ``predict_eps_from_z_and_v``, and moves
    the unblended sample) and LCM (its output blended, then the next sigma's noise), SD 1.x
    PLMS (its second evaluation of the first step blended too); 4 steps, txt2img and
    img2img starts."""
    rng = np.random.default_rng(17)
    shape = (1, 3, 3, 2)
    repaint = np.zeros((1, 3, 3, 1), np.float32)
    repaint[:, 1:, :2] = 1.0
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    nmask = nchw(repaint)
    keep = 1 - nmask
    for sampler, config, begin in (("DDIM", SD21_SCHEDULER, 0), ("UniPC", SD21_SCHEDULER, 0),
                                   ("PLMS", SD15_SCHEDULER, 0), ("LCM", SD15_SCHEDULER, 0),
                                   ("LCM", SD15_SCHEDULER, 1)):
        sched = get_scheduler(sampler, config)
        vpred = config.get("prediction_type") == "v_prediction"
        ac = np.asarray(ws.webui_alphas_cumprod(sched.schedule), np.float32)

        def eps_np(x, t, vpred=vpred, ac=ac):
            out = _fake_eps(x, t)
            if not vpred:
                return out
            a = float(ac[int(float(t))])
            return (out - (1 - a) ** 0.5 * x) / a ** 0.5

        image = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        step_noises = rng.standard_normal((6, *shape)).astype(np.float32)
        ours = _ours_timesteps(eps_np, sched, 4, image, noise, begin, step_noises,
                               blend=(jnp.asarray(image), jnp.asarray(repaint)))
        init = nchw(image)
        with torch.no_grad():
            if sampler == "LCM":
                ref = _ref_lcm(_fake_eps, torch.tensor(ac), 4, init, nchw(noise), begin,
                               [nchw(n) for n in step_noises],
                               blend=lambda den, init=init: init * keep + nmask * den)
            else:
                def masked(x, t, init=init):
                    return _fake_eps(x * nmask + init * keep, t)

                t_enc = 4 - 1 - begin
                ref = (_ref_unipc(masked, torch.tensor(ac), 4, init, nchw(noise), t_enc)
                       if sampler == "UniPC" else
                       _ref_timesteps(masked, sampler, torch.tensor(ac), 4, init,
                                      nchw(noise), t_enc))
        ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
        assert np.abs(ref - image).max() > 0.1
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{sampler} inpainting from {begin}")
        if sampler == "LCM":  # its output blend keeps the image exactly before the noise
            kept = (ours - (1 - repaint) * image)  # the noise of the last step is none
            assert np.abs(kept * (1 - repaint)).max() < 1e-6


def test_inpainting_model_blends_as_the_webui(sd1_inpaint_folder):
    """A 9-channel inpainting model with a WebUI sampler ("Euler", 4 steps at denoising
    strength 0.75): the WebUI sets its mask blend for every model (processing.py's
    ``self.mask`` / ``nmask`` whatever the UNet), so the UNet takes [x, mask, masked-image
    latents] (its ``c_concat``) and ``CFGDenoiser`` still blends the denoised estimate with
    the image's latents, then the final blend; against k-diffusion around the diffusers
    9-channel UNet, within 1e-5 of the latents' scale."""
    from diffusers import StableDiffusionPipeline as Ref

    ref_pipe = Ref.from_pretrained(str(sd1_inpaint_folder), safety_checker=None)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_inpaint_folder), dtype="float32",
                                                   num_devices=1)
    f, steps, strength = pipe.vae_scale_factor, 4, 0.75
    noise, pixels, mask, out = _inpaint_8x8(pipe, "Euler", 19, (2, 6, 1, 5), steps, strength)
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)))  # noqa: E731
    scaling = ref_pipe.vae.config.scaling_factor
    with torch.no_grad():
        cond, uncond = ref_pipe.encode_prompt("a red circle", "cpu", 1, True, "")
        signed = torch.tensor(pixels.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
        init = ref_pipe.vae.encode(signed).latent_dist.mean * scaling
        nmask = torch.tensor(mask[::f, ::f] / 255.0, dtype=torch.float32)[None, None]
        hole = torch.tensor(mask < 128, dtype=torch.float32)[None, None]
        masked = ref_pipe.vae.encode(signed * hole).latent_dist.mean * scaling
        concat = torch.cat([nmask, masked], dim=1)

        class Inner(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.alphas_cumprod = torch.tensor(ws.webui_alphas_cumprod(
                    get_scheduler("Euler", SD15_SCHEDULER).schedule))

            def apply_model(self, x, t, cond):
                rows = torch.cat([x, concat.expand(x.shape[0], -1, -1, -1)], dim=1)
                return ref_pipe.unet(rows, t, encoder_hidden_states=cond).sample

        cfg = _CFG(KD[1].CompVisDenoiser(Inner()), torch.cat([uncond, cond]))
        keep = 1 - nmask
        sigmas = torch.tensor(get_scheduler("Euler", SD15_SCHEDULER).sigmas(steps))
        run = sigmas[steps - int(strength * steps) - 1:]
        ref = KD[0].sample_euler(lambda x, s: init * keep + nmask * cfg(x, s),
                                 init + nchw(noise) * run[0], run, disable=True)
        ref = init * keep + nmask * ref
    ref = np.transpose(ref.numpy(), (0, 2, 3, 1))
    assert np.abs(ref - np.transpose(init.numpy(), (0, 2, 3, 1))).max() > 0.1
    diff = np.abs(out - ref).max()
    assert diff <= 1e-5 * max(10.0, np.abs(ref).max()), (diff, np.abs(ref).max())
