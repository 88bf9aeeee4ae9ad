"""The runtime start step (schedulers/start.py) runs exactly what set_timesteps(n, strength)
runs, for every scheduler of the registry: same start latents, same model inputs, same
samples. set_timesteps(n, strength) itself is checked against diffusers in test_schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.schedulers import SCHEDULER_NAMES, get_scheduler
from sdjax.schedulers.common import start_index
from sdjax.schedulers.start import start_table
from tests.tiny_models import SD15_SCHEDULER

STEPS = 6
SHAPE = (2, 4, 4, 3)


def _model(x, t):
    """A stand-in denoiser whose output depends on the sample and the timestep."""
    return 0.3 * x + 0.01 * jnp.asarray(t, jnp.float32)


def _run(sched, state, first, total, x0, noise, step_noise):
    """Start latents, then every evaluation; returns every model input and sample."""
    x = sched.add_noise_for_start(state, x0, noise)
    seen = [x]
    for i in range(first, total):
        t = state.timesteps[i]
        xin = sched.scale_model_input(state, x, i)
        extra = {"noise": step_noise[i - first]} if sched.stochastic else {}
        x, state = sched.step(state, i, _model(xin, t), x, **extra)
        seen += [xin, x]
    return seen


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_runtime_start_runs_what_the_strength_cut_runs(name):
    sched = get_scheduler(name, SD15_SCHEDULER)
    r = np.random.RandomState(0)
    x0, noise = r.randn(*SHAPE).astype(np.float32), r.randn(*SHAPE).astype(np.float32)
    step_noise = r.randn(4 * STEPS, *SHAPE).astype(np.float32)
    table = start_table(sched, STEPS, SHAPE)
    for strength in (0.2, 0.5, 0.8, 1.0):
        direct = sched.set_timesteps(STEPS, strength, sample_shape=SHAPE)
        expected = _run(sched, direct, 0, sched.num_evaluations(direct), x0, noise, step_noise)
        start = start_index(STEPS, strength)
        got = _run(sched, table.state(jnp.int32(start)), int(table.first(start)),
                   table.num_evaluations, x0, noise, step_noise)
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_noise_levels_follow_the_evaluations():
    """The blend's add_noise coefficients: sqrt(alphas_cumprod[t]) pairs for discrete
    schedulers, (1, sigma) for sigma schedulers; one row per evaluation."""
    for name in ("ddim", "euler"):
        sched = get_scheduler(name, SD15_SCHEDULER)
        state = sched.set_timesteps(STEPS)
        levels = sched.noise_levels(state)
        assert levels.shape == (sched.num_evaluations(state), 2)
        if name == "ddim":
            ac = sched.schedule.alphas_cumprod[np.asarray(state.timesteps)]
            np.testing.assert_array_equal(levels[:, 0], np.sqrt(ac))
        else:
            np.testing.assert_array_equal(levels[:, 1], np.asarray(state.sigma))
            assert (levels[:, 0] == 1).all()
    assert jax.numpy.asarray(levels).dtype == jnp.float32
