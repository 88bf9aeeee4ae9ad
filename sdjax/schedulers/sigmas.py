"""What the sigma-parameterised (K-diffusion style) schedulers share: sigma = sqrt((1 - a) / a)
over the training timesteps, interpolation at inference timesteps, the Karras et al. (2022)
spacing, the n-step schedule built from them, the inverse map from sigma back to a
(fractional) training timestep, the per-step input scaling and x0 estimate, and the base
class that rescales the UNet input."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.common import (
    NoiseSchedule,
    Scheduler,
    f32,
    leading_trailing_linspace,
    scalar_divide,
    torch_linspace_f32,
)

KARRAS_RHO = 7.0

# Options every K-diffusion style scheduler in diffusers has, with their class defaults.
SIGMA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


def train_sigmas(schedule: NoiseSchedule, *, zero_snr_floor: bool = False) -> np.ndarray:
    """float32 sigma per training timestep (ascending in t). With a zero-terminal-SNR schedule
    the Euler/DPM family replace the last alphas_cumprod (0) with 2**-24 so sigma stays finite."""
    ac = schedule.alphas_cumprod
    if zero_snr_floor and schedule.rescale_betas_zero_snr:
        ac = ac.copy()
        ac[-1] = np.float32(2.0**-24)
    return np.sqrt((np.float32(1.0) - ac) / ac)


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Piecewise-linear sigma at (possibly fractional) timesteps, in float64."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, uniform in sigma**(1/rho) (Karras et al. eq. 5)."""
    hi, lo = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
    ramp = np.linspace(0, 1, n)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose log-sigma interpolates to each given sigma.

    `log_train_sigmas` is float32 and ascending; like the reference, the interval width is taken
    in float32 and the rest in float64, which keeps the resulting timesteps identical."""
    sigmas = np.asarray(sigmas, np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    n = log_train_sigmas.shape[0]
    below = (log_train_sigmas[:, None] <= log_sigma[None, :]).sum(axis=0)
    low = np.clip(below - 1, 0, n - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_schedule(
    sched: Scheduler,
    n: int,
    *,
    zero_snr_floor: bool = False,
    interpolation_type: str = "linear",
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """(descending float32 timesteps, fractional for `linspace`; float32 sigmas with the final
    one appended) of an n-step schedule.

    The keywords are the diffusers options of the same names; `zero_snr_floor` is passed to
    `train_sigmas`. `sigma_min` / `sigma_max` override the Karras endpoints only."""
    timesteps = leading_trailing_linspace(
        sched.timestep_spacing, sched.num_train_timesteps, n, sched.steps_offset,
        round_linspace=False,
    ).astype(np.float32)
    train = train_sigmas(sched.schedule, zero_snr_floor=zero_snr_floor)
    if interpolation_type == "linear":
        sigmas = interp_sigmas(timesteps, train)
    else:
        # The reference spaces n + 1 sigmas here, one more than there are timesteps.
        sigmas = np.exp(torch_linspace_f32(np.log(train[-1]), np.log(train[0]), n + 1))
    if use_karras_sigmas:
        # The reference takes the default endpoints in the interpolation's dtype (float64
        # after `linear`, float32 after `log_linear`).
        hi = sigma_max if sigma_max is not None else sigmas[0].item()
        lo = sigma_min if sigma_min is not None else sigmas[-1].item()
        sigmas = karras(hi, lo, n)
        timesteps = sigma_to_t(sigmas, np.log(train))
    last = train[0] if final_sigmas_type == "sigma_min" else 0.0
    return f32(timesteps), f32(np.concatenate([sigmas, [last]]))


def init_sigma(sigmas: np.ndarray, spacing: str) -> np.float32:
    """Scale of the initial noise: the largest sigma, or sqrt(sigma_max**2 + 1) for `leading`
    spacing (the reference's choice, kept for parity)."""
    top = np.float32(sigmas.max())
    if spacing in ("linspace", "trailing"):
        return top
    return np.sqrt(top * top + np.float32(1.0))


def input_div(sigmas: np.ndarray) -> np.ndarray:
    """Divisor that brings x = x0 + sigma * eps back to unit variance for the UNet."""
    return np.sqrt(sigmas * sigmas + np.float32(1.0))


def v_coefs(sigmas: np.ndarray) -> np.ndarray:
    """(M, 2) float32: x0 = v * c[0] + x / c[1] for v-prediction at each sigma."""
    div = sigmas * sigmas + np.float32(1.0)
    return np.stack([-sigmas / np.sqrt(div), div], axis=1)


def x0_from_sigma(
    prediction_type: str, out: jax.Array, x: jax.Array, sigma: jax.Array, v: jax.Array
) -> jax.Array:
    """Denoised estimate for x = x0 + sigma * eps; `v` is this step's row of v_coefs."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * v[0] + scalar_divide(x, v[1])
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SigmaScheduler(Scheduler):
    """Schedulers whose sample is x0 + sigma * noise: the UNet input must be rescaled."""

    def scale_model_input(self, state: Any, sample: jax.Array, i: jax.Array) -> jax.Array:
        return scalar_divide(sample.astype(jnp.float32), state.input_div[i]).astype(sample.dtype)

    def noise_levels(self, state: Any) -> np.ndarray:
        sigma = np.asarray(state.sigma, np.float32)
        return np.stack([np.ones_like(sigma), sigma], axis=1)


def common_fields(
    spacing: str, timesteps: np.ndarray, sigmas: np.ndarray, begin: int
) -> dict[str, jax.Array]:
    """State fields every sigma scheduler has, for the evaluations from `begin` on.
    `sigmas` is the full float32 schedule (one more entry than evaluations, or more)."""
    m = len(timesteps) - begin
    here = sigmas[begin : begin + m]
    return {
        "timesteps": jnp.asarray(timesteps[begin:], jnp.float32),
        "init_sigma": jnp.asarray(init_sigma(sigmas, spacing)),
        # img2img starts from x0 + sigma_begin * noise.
        "start_coefs": jnp.asarray(np.array([1.0, sigmas[begin]], np.float32)),
        "input_div": jnp.asarray(input_div(here)),
        "sigma": jnp.asarray(here),
        "v": jnp.asarray(v_coefs(here)),
    }
