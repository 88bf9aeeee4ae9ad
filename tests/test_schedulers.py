"""Schedulers against diffusers' PyTorch schedulers, step by step, plus loop/jit and noise checks.

Both sides get the same random "model outputs" (and, for the ancestral samplers, the same noise:
diffusers' `randn_tensor` is patched to return it). Samples are compared with a relative error
max|ours - ref| / max|ref|. Host-side schedules match the reference exactly except where torch's
CPU sqrt/exp/log are not correctly rounded (off by up to one float32 ulp), which is why the
bound below is not zero."""

from __future__ import annotations

import inspect
from unittest import mock

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.schedulers import (
    SCHEDULER_NAMES,
    default_scheduler_name,
    diffusers_equivalent,
    get_scheduler,
)
from sdjax.schedulers.common import NoiseSchedule
from tests.tiny_models import diffusers_scheduler

# diffusers (with numpy 2) warns about __array__ copy semantics on every set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REL_TOL = 1e-5
SHAPE = (2, 4, 4, 3)  # NHWC; the scheduler maths is elementwise so torch gets the same array
STEPS = (1, 2, 5, 25, 50)

# The hub's runwayml/stable-diffusion-v1-5 scheduler_config.json: no timestep_spacing key.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21 = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_same_timesteps(ours, ref) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    if np.issubdtype(ref.dtype, np.integer):
        np.testing.assert_array_equal(ours, ref)
    else:  # Karras and "continuous" timesteps come from log(sigma): a float32 ulp is allowed
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def compare_run(name: str, config: dict, n: int, strength: float = 1.0, seed: int = 0) -> float:
    """Run ours and the reference side by side (img2img as diffusers' pipeline does it when
    strength < 1); return the worst relative error over inputs, scalings and samples."""
    rng = np.random.default_rng(seed)
    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(n)
    t_start = max(n - min(int(n * strength), n), 0)
    ref_timesteps = ref.timesteps[t_start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    sched = get_scheduler(name, config)
    state = sched.set_timesteps(n, strength, sample_shape=SHAPE)
    assert sched.num_evaluations(state) == len(ref_timesteps)
    assert_same_timesteps(state.timesteps, ref_timesteps.numpy())

    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    if strength < 1.0:
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ref = ref.add_noise(
            torch.from_numpy(x0), torch.from_numpy(noise), ref_timesteps[:1].repeat(SHAPE[0])
        )
        x = sched.add_noise_for_start(state, jnp.asarray(x0), jnp.asarray(noise))
    else:
        assert rel_err(sched.init_noise_sigma(state), float(ref.init_noise_sigma)) <= 1e-6
        x_ref = torch.from_numpy(x0) * ref.init_noise_sigma
        x = jnp.asarray(x0) * sched.init_noise_sigma(state)
    worst = rel_err(x, x_ref)
    module = type(ref).__module__
    for i, t in enumerate(ref_timesteps):
        out = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        scaled_ref = ref.scale_model_input(x_ref, t)
        worst = max(worst, rel_err(sched.scale_model_input(state, x, i), scaled_ref))
        with mock.patch(
            f"{module}.randn_tensor", lambda *a, _n=noise, **k: torch.from_numpy(_n), create=True
        ):
            x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
        x, state = sched.step(state, i, jnp.asarray(out), x, noise=jnp.asarray(noise))
        worst = max(worst, rel_err(x, x_ref))
    return worst


# -- step-by-step parity --------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_parity_with_diffusers(name, prediction, spacing):
    """Every name, both prediction types, each spacing (None: the SD 1.5 file, which has no
    timestep_spacing key, so each class falls back to its own default)."""
    config = {**SD15, "prediction_type": prediction}
    if spacing is not None:
        config["timestep_spacing"] = spacing
    errors = {n: compare_run(name, config, n) for n in STEPS}
    assert max(errors.values()) <= REL_TOL, errors


EXTRA_CONFIGS = [
    ("pndm", {**SD15, "skip_prk_steps": False}),  # Runge-Kutta warm-up
    ("pndm", {**SD15, "skip_prk_steps": False, "prediction_type": "v_prediction"}),
    ("ddim", {}),  # class defaults: linear betas, clip_sample, set_alpha_to_one
    ("ddim", SD21),
    ("ddim", {**SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5}),
    ("ddim", {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ("ddpm", {}),
    ("ddpm", {**SD21, "variance_type": "fixed_large"}),
    ("ddpm", {**SD15, "variance_type": "fixed_small_log", "beta_schedule": "squaredcos_cap_v2"}),
    ("lms", {**SD15, "use_karras_sigmas": True}),
    ("lms", {**SD15, "trained_betas": np.linspace(0.001, 0.02, 500).tolist(),
             "num_train_timesteps": 500}),
    ("euler", {**SD15, "use_karras_sigmas": True}),
    ("euler", {**SD15, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", {**SD15, "final_sigmas_type": "sigma_min", "interpolation_type": "log_linear"}),
    ("euler", {**SD21, "timestep_type": "continuous"}),
    ("euler", {**SD15, "prediction_type": "sample"}),
    ("euler_a", {**SD21, "beta_schedule": "linear"}),
    ("heun", {}),
    ("heun", {**SD21, "use_karras_sigmas": True}),
    ("dpmpp_2m", {**SD15, "solver_type": "heun", "prediction_type": "sample"}),
    ("dpmpp_2m", {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {**SD15, "euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ("dpmpp_2m", {**SD15, "lambda_min_clipped": -5.1}),
    ("dpmpp_2m_karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"}),
    ("lcm", {**SD15, "original_inference_steps": 100, "timestep_scaling": 4.0,
             "set_alpha_to_one": False}),
    ("lcm", {**SD21, "clip_sample": True, "clip_sample_range": 0.5,
             "original_inference_steps": 25}),
]


@pytest.mark.parametrize(("name", "config"), EXTRA_CONFIGS)
def test_parity_options_and_img2img(name, config):
    """Other config options, and img2img starts (strength < 1) for each."""
    runs = [(5, 1.0), (25, 1.0), (5, 0.3), (25, 0.6)]
    errors = {(n, strength): compare_run(name, config, n, strength) for n, strength in runs}
    assert max(errors.values()) <= REL_TOL, errors


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_parity_zero_terminal_snr(name):
    """With zero terminal SNR the first sigma is 4096 and the Euler update cancels x_T ~ 4096
    down to O(1): the reference's own one-ulp sqrt error is amplified ~4000x, so the bound here
    is correspondingly looser."""
    config = {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    errors = {n: compare_run(name, config, n) for n in (1, 5, 25)}
    assert max(errors.values()) <= 1e-3, errors


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_parity_other_seed_with_img2img(name):
    config = {**SD15, "timestep_spacing": "leading"}
    errors = [compare_run(name, config, 10, strength, seed=1) for strength in (1.0, 0.5)]
    assert max(errors) <= REL_TOL, errors


def test_noise_schedule_matches_diffusers():
    """Betas and alphas_cumprod are bitwise equal (torch's float32 linspace rounding and
    double-accumulated cumprod are reproduced); the zero-SNR rescale to within rounding."""
    for kwargs in [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"trained_betas": tuple(np.linspace(1e-4, 0.03, 1000).tolist())},
        {"num_train_timesteps": 37, "beta_start": 0.1, "beta_end": 0.7},
    ]:
        ref = diffusers.DDPMScheduler(**kwargs)
        ours = NoiseSchedule(**kwargs)
        np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    ref = diffusers.DDPMScheduler(rescale_betas_zero_snr=True)
    ours = NoiseSchedule(rescale_betas_zero_snr=True)
    # sqrt(alphas_cumprod) minus its last value cancels: torch's inexact sqrt shows at ~1e-13.
    ref_ac = ref.alphas_cumprod.numpy()
    np.testing.assert_allclose(ours.alphas_cumprod, ref_ac, rtol=1e-6, atol=1e-10)


# -- config handling ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_defaults_are_the_diffusers_class_defaults(name):
    cls = type(get_scheduler(name, {}))
    ref_cls = getattr(diffusers, diffusers_equivalent(name)[0])
    signature = inspect.signature(ref_cls.__init__).parameters
    for key, value in cls.defaults.items():
        assert signature[key].default == value, key
    # The SD 1.5 file has no timestep_spacing: each class keeps its own default.
    sched = get_scheduler(name, SD15)
    assert sched.timestep_spacing == signature["timestep_spacing"].default
    assert sched.steps_offset == 1 and sched.schedule.beta_schedule == "scaled_linear"


def test_evaluation_counts():
    n = 10
    assert len(get_scheduler("pndm", SD15).set_timesteps(n).timesteps) == n + 1
    prk = get_scheduler("pndm", {**SD15, "skip_prk_steps": False}).set_timesteps(n)
    assert len(prk.timesteps) == n + 9  # 12 Runge-Kutta evaluations replace 3 steps
    assert len(get_scheduler("heun", SD15).set_timesteps(n).timesteps) == 2 * n - 1
    for name in ("ddim", "ddpm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm"):
        assert len(get_scheduler(name, SD15).set_timesteps(n).timesteps) == n


def test_registry_and_config_errors():
    with pytest.raises(ValueError, match="dpmpp_2m_karras"):
        get_scheduler("k_euler", SD15)
    assert default_scheduler_name(SD15) == "pndm"
    assert default_scheduler_name(SD21) == "ddim"
    assert default_scheduler_name({}) == "pndm"
    assert default_scheduler_name({"_class_name": "UniPCMultistepScheduler"}) == "pndm"
    dpm = {"_class_name": "DPMSolverMultistepScheduler"}
    assert default_scheduler_name(dpm) == "dpmpp_2m"
    assert default_scheduler_name({**dpm, "use_karras_sigmas": True}) == "dpmpp_2m_karras"
    assert default_scheduler_name({"_class_name": "EulerAncestralDiscreteScheduler"}) == "euler_a"
    # Frozen and hashable: equal configs give equal keys for jit caches.
    assert get_scheduler("euler", SD15) == get_scheduler("euler", dict(SD15))
    assert len({get_scheduler(n, SD15) for n in SCHEDULER_NAMES}) == len(SCHEDULER_NAMES)
    assert get_scheduler("dpmpp_2m_karras", SD15).name == "dpmpp_2m_karras"
    # Unknown keys, and keys of other classes, are ignored as diffusers does.
    assert get_scheduler("euler", {**SD15, "foo": 1}) == get_scheduler("euler", SD15)
    for name, bad in [
        ("ddim", {"thresholding": True}),
        ("ddpm", {"variance_type": "learned_range"}),
        ("euler", {"use_exponential_sigmas": True}),
        ("dpmpp_2m", {"use_lu_lambdas": True}),
        ("euler", {"timestep_spacing": "uniform"}),
        ("euler_a", {"prediction_type": "sample"}),
        ("pndm", {"beta_schedule": "sigmoid"}),
    ]:
        with pytest.raises(ValueError):
            get_scheduler(name, {**SD15, **bad}).set_timesteps(5)
    with pytest.raises(ValueError, match="original_inference_steps"):
        get_scheduler("lcm", SD15).set_timesteps(51)  # LCM's steps are a subset of its 50
    with pytest.raises(ValueError, match="at least 4"):
        get_scheduler("pndm", {**SD15, "skip_prk_steps": False}).set_timesteps(3)
    for bad_strength in (0.05, 1.5):
        with pytest.raises(ValueError, match="strength"):
            get_scheduler("ddim", SD15).set_timesteps(5, bad_strength)


@pytest.mark.parametrize("name", ["pndm", "lms", "heun", "dpmpp_2m"])
def test_multistep_state_needs_sample_shape(name):
    sched = get_scheduler(name, SD15)
    state = sched.set_timesteps(5)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="sample_shape"):
        sched.step(state, 0, x, x)


# -- one compiled fori_loop -----------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_fori_loop_under_jit_equals_python_loop(name):
    config = {**SD15, "prediction_type": "v_prediction" if name == "heun" else "epsilon"}
    sched = get_scheduler(name, config)
    state = sched.set_timesteps(6, sample_shape=SHAPE)
    m = sched.num_evaluations(state)
    rng = np.random.default_rng(0)
    outs = jnp.asarray(rng.standard_normal((m, *SHAPE)).astype(np.float32))
    x_init = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    base = jax.random.key(7)

    def body(i, carry):
        x, state = carry
        model_in = sched.scale_model_input(state, x, i)
        out = outs[i] + 0.01 * model_in  # a "model" that depends on its input and step
        key = jax.random.fold_in(base, i) if sched.stochastic else None
        return sched.step(state, i, out, x, key=key)

    @jax.jit
    def compiled(x, state):
        x = x * sched.init_noise_sigma(state)
        return jax.lax.fori_loop(0, m, body, (x, state))[0]

    x = x_init * sched.init_noise_sigma(state)
    carry = (x, state)
    for i in range(m):
        carry = body(i, carry)
    # Not bitwise: XLA fuses the traced loop body (and may contract multiply-adds).
    assert rel_err(compiled(x_init, state), carry[0]) <= REL_TOL


# -- stochastic samplers --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["euler_a", "ddpm"])
def test_noise_is_keyed_and_per_sample(name):
    sched = get_scheduler(name, SD15)
    assert sched.stochastic
    state = sched.set_timesteps(10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    out = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    k0, k1 = jax.random.key(0), jax.random.key(1)
    a, _ = sched.step(state, 3, out, x, key=k0)
    np.testing.assert_array_equal(a, sched.step(state, 3, out, x, key=k0)[0])
    assert not np.allclose(a, sched.step(state, 3, out, x, key=k1)[0])
    raw, _ = sched.step(state, 3, out, x, key=jax.random.PRNGKey(0))  # legacy uint32 keys too
    assert raw.shape == x.shape and np.all(np.isfinite(raw))
    # A batch of keys: sample b's noise comes from keys[b] only.
    keys = jax.random.split(jax.random.key(5), 2)
    both, _ = sched.step(state, 3, out, x, key=keys)
    alone, _ = sched.step(state, 3, out[1:], x[1:], key=keys[1:])
    np.testing.assert_array_equal(both[1:], alone)
    with pytest.raises(ValueError, match="key"):
        sched.step(state, 3, out, x)


@pytest.mark.parametrize("name", ["euler_a", "ddpm"])
def test_added_noise_statistics(name):
    """prev_sample - its noiseless part must be N(0, std^2), with std the reference's
    sigma_up (Euler a) or sqrt of the posterior variance (DDPM)."""
    n_steps, i, draws = 10, 4, 4096
    sched = get_scheduler(name, SD15)
    state = sched.set_timesteps(n_steps)
    ref = diffusers_scheduler(name, SD15)
    ref.set_timesteps(n_steps)
    if name == "ddpm":
        expected_std = float(ref._get_variance(ref.timesteps[i]) ** 0.5)
    else:
        s_from, s_to = ref.sigmas[i], ref.sigmas[i + 1]
        expected_std = float((s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
    shape = (draws, 64)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    out = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    keys = jax.random.split(jax.random.key(0), draws)
    noisy, _ = sched.step(state, i, out, x, key=keys)
    clean, _ = sched.step(state, i, out, x, noise=jnp.zeros(shape))
    added = np.asarray(noisy - clean, np.float64)
    count = added.size
    assert abs(added.mean()) < 5 * expected_std / np.sqrt(count)
    assert abs(added.var() / expected_std**2 - 1) < 5 * np.sqrt(2 / count)
    # Independent across samples and positions: neighbouring draws are uncorrelated.
    corr = np.corrcoef(added[:-1].ravel(), added[1:].ravel())[0, 1]
    assert abs(corr) < 5 / np.sqrt(count)


# -- training helpers -----------------------------------------------------------------------


def test_add_noise_velocity_snr_match_ddpm():
    config = {**SD15, "_class_name": "DDPMScheduler"}
    ref = diffusers.DDPMScheduler.from_config(config)
    sched = get_scheduler("ddpm", config)
    assert sched.num_train_timesteps == 1000
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], np.int64)
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    ours = sched.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    assert rel_err(ours, ref.add_noise(tx, tn, tt)) <= 1e-6
    ours = sched.get_velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    assert rel_err(ours, ref.get_velocity(tx, tn, tt)) <= 1e-6
    from diffusers.training_utils import compute_snr

    every = np.arange(1000)
    snr_ref = compute_snr(ref, torch.from_numpy(every)).numpy()
    np.testing.assert_allclose(sched.snr(jnp.asarray(every)), snr_ref, rtol=1e-5)
