"""img2img with the stochastic schedulers (ddpm, euler_a) is distributed as diffusers' is, not
only deterministic under a seed.

With a model whose output is a constant (the eps it predicts does not depend on the sample),
every step is an affine map of the sample plus independent Gaussian noise, so the start
latents and every later sample are Gaussian, elementwise: ``A + B * noise + sum_k C_k * z_k``
over the start noise and each step's noise. diffusers' own schedulers, run as its img2img
pipeline runs them (the strength's cut, ``add_noise`` at the first timestep) with those noises
set to 0 and to unit impulses, give A, B and C_k exactly; ours, run over many PRNG keys the way
the sampling core runs them (the runtime start table, a key per image folded with the step),
must show that mean and variance. A wrong start timestep, noise scale or step variance moves
one of them by many standard errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.schedulers import get_scheduler
from sdjax.schedulers.common import start_index
from sdjax.schedulers.start import start_table
from tests.tiny_models import SD15_SCHEDULER, diffusers_scheduler

STEPS = 6
SAMPLES = 20_000  # images; the standard error of a mean is 0.7% of its standard deviation
SHAPE = (2, 2, 4)  # one image's latents (NHWC)
_r = np.random.RandomState(0)
CLEAN = _r.randn(*SHAPE).astype(np.float32)  # the encoded init image
EPS = (0.5 * _r.randn(*SHAPE)).astype(np.float32)  # what the model predicts, always


def _ours(name: str, strength: float) -> list[np.ndarray]:
    """(SAMPLES, *SHAPE) start latents, then the sample after each step."""
    sched = get_scheduler(name, SD15_SCHEDULER)
    table = start_table(sched, STEPS, (SAMPLES, *SHAPE))
    start = jnp.int32(start_index(STEPS, strength))
    state, first = table.state(start), int(table.first(start))
    noise_keys = jax.random.split(jax.random.key(0), SAMPLES)
    step_keys = jax.random.split(jax.random.key(1), SAMPLES)
    noise = jax.vmap(lambda k: jax.random.normal(k, SHAPE, jnp.float32))(noise_keys)
    x = sched.add_noise_for_start(state, jnp.asarray(CLEAN), noise)
    seen = [x]
    for i in range(first, table.num_evaluations):
        key = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(step_keys)
        x, state = sched.step(state, i, jnp.broadcast_to(EPS, x.shape), x, key=key)
        seen.append(x)
    return [np.asarray(s) for s in seen]


def _reference(name: str, strength: float, start_noise: float, step_noise: dict[int, float],
               monkeypatch) -> list[np.ndarray]:
    """diffusers' img2img schedule with the start noise and step k's noise set to constants
    (0 where not given): start latents, then the sample after each step."""
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a

    sched = diffusers_scheduler(name, SD15_SCHEDULER)
    sched.set_timesteps(STEPS)
    # StableDiffusionImg2ImgPipeline.get_timesteps
    t_start = STEPS - min(int(STEPS * strength), STEPS)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    draws = iter(range(len(timesteps)))

    def randn_tensor(shape, **kwargs):
        return torch.full(shape, step_noise.get(next(draws), 0.0))

    for module in (ddpm, euler_a):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    clean = torch.from_numpy(CLEAN.transpose(2, 0, 1)[None].copy())
    x = sched.add_noise(clean, torch.full_like(clean, start_noise), timesteps[:1])
    seen = [x]
    eps = torch.from_numpy(EPS.transpose(2, 0, 1)[None].copy())
    for t in timesteps:
        sched.scale_model_input(x, t)  # advances nothing, but as the pipeline calls it
        x = sched.step(eps, t, x).prev_sample
        seen.append(x)
    return [s[0].numpy().transpose(1, 2, 0) for s in seen]


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_stochastic_img2img_is_distributed_as_diffusers(name, strength, monkeypatch):
    ours = _ours(name, strength)
    mean = _reference(name, strength, 0.0, {}, monkeypatch)
    n_steps = len(mean) - 1
    assert len(ours) == len(mean) == STEPS * strength + 1
    # Each noise's coefficient at every point: its impulse response.
    coefs = [[a - m for a, m in zip(_reference(name, strength, 1.0, {}, monkeypatch), mean,
                                     strict=True)]]
    coefs += [[a - m for a, m in zip(_reference(name, strength, 0.0, {k: 1.0}, monkeypatch),
                                     mean, strict=True)] for k in range(n_steps)]
    var = [sum(c[p] ** 2 for c in coefs) for p in range(len(mean))]
    assert all((v > 0).all() for v in var)  # noise reaches every point
    for p, (x, m, v) in enumerate(zip(ours, mean, var, strict=True)):
        se = np.sqrt(v / SAMPLES)
        z = np.abs(x.mean(axis=0) - m) / se
        ratio = x.var(axis=0) / v
        print(f"{name} strength {strength} point {p}: max |mean error| {z.max():.1f} standard "
              f"errors, variance ratio {ratio.min():.3f}..{ratio.max():.3f}")
        assert z.max() < 5
        assert np.abs(ratio - 1).max() < 5 * np.sqrt(2 / SAMPLES)
