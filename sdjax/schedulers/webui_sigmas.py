"""The WebUI's noise levels: its model sigma table (k-diffusion's ``CompVisDenoiser`` over the
CompVis/SGM ``alphas_cumprod``), the sigma <-> fractional timestep maps, and the schedule types
of its "Schedule type" menu (``modules/sd_schedulers.py``), each an (n + 1)-entry descending
float32 array computed on the host as the WebUI computes it.

    table = ModelSigmas.from_schedule(noise_schedule)
    sigmas = schedule_sigmas("Karras", 20, table)          # (21,) ending in 0

The WebUI (through k-diffusion) evaluates the model at ``sigma_to_t(sigma)``, a training
timestep found by linear interpolation in log sigma, and starts txt2img from noise * sigmas[0].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from sdjax.schedulers.common import NoiseSchedule, torch_linspace_f32

# The schedule types under their WebUI labels, then the internal names the WebUI also accepts.
SCHEDULE_TYPES: tuple[str, ...] = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
    "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)
_BY_KEY = {label.lower(): label for label in SCHEDULE_TYPES}
_BY_KEY.update({label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES})
_BY_KEY["sgmuniform"] = "SGM Uniform"

# The WebUI's option defaults that shape the schedules (Settings > Sampler parameters).
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0
BETA_ALPHA = 0.6  # opts.beta_dist_alpha
BETA_BETA = 0.6  # opts.beta_dist_beta

# "Align Your Steps" 10-step sigmas (NVIDIA's published tables, as the WebUI carries them).
_AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
_AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def schedule_type_label(name: str | None) -> str:
    """The WebUI label of a schedule type given in any of its spellings ("karras",
    "sgm_uniform", "SGM Uniform", ...); None is "Automatic". One-line ValueError otherwise."""
    if name is None:
        return "Automatic"
    if not isinstance(name, str) or name.strip().lower() not in _BY_KEY:
        raise ValueError(f"unknown schedule_type {name!r}; choose one of "
                         f"{', '.join(SCHEDULE_TYPES)}")
    return _BY_KEY[name.strip().lower()]


def webui_alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    """float32 alphas_cumprod as the WebUI's model holds them: the CompVis/SGM beta schedule in
    float64 (ldm's ``make_beta_schedule``; its "linear" is diffusers' "scaled_linear", its
    "sqrt_linear" diffusers' "linear"), cumprod in float64, then float32. Other schedules
    (trained betas, cosine, zero-SNR rescale) come from the diffusers-style schedule."""
    n = schedule.num_train_timesteps
    if schedule.trained_betas is None and not schedule.rescale_betas_zero_snr:
        if schedule.beta_schedule == "scaled_linear":
            betas = np.linspace(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, n) ** 2
            return np.cumprod(1.0 - betas).astype(np.float32)
        if schedule.beta_schedule == "linear":
            betas = np.linspace(schedule.beta_start, schedule.beta_end, n)
            return np.cumprod(1.0 - betas).astype(np.float32)
    return schedule.alphas_cumprod.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelSigmas:
    """k-diffusion's ``DiscreteSchedule`` (``CompVisDenoiser``): ascending float32 sigmas
    of the training timesteps and their logs."""

    sigmas: np.ndarray
    log_sigmas: np.ndarray

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray) -> ModelSigmas:
        ac = np.asarray(alphas_cumprod, np.float32)
        sigmas = ((np.float32(1) - ac) / ac) ** np.float32(0.5)
        return cls(sigmas, np.log(sigmas))

    @classmethod
    @functools.cache
    def from_schedule(cls, schedule: NoiseSchedule) -> ModelSigmas:
        return cls.from_alphas_cumprod(webui_alphas_cumprod(schedule))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma) -> np.ndarray:
        """Fractional timesteps (float32) whose log sigma interpolates to ``sigma``."""
        log_sigma = np.log(np.asarray(sigma, np.float32))
        ls = self.log_sigmas
        dists = log_sigma[..., None] - ls
        low = np.clip((dists >= 0).sum(axis=-1) - 1, 0, len(ls) - 2)
        lo, hi = ls[low], ls[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return ((1 - w) * low + w * (low + 1)).astype(np.float32)

    def t_to_sigma(self, t) -> np.ndarray:
        t = np.asarray(t, np.float32)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.floor(t)
        return np.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).astype(
            np.float32)


def _zero(sigmas) -> np.ndarray:
    return np.concatenate([np.asarray(sigmas, np.float32), np.zeros(1, np.float32)])


def uniform(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    """k-diffusion's ``get_sigmas(n)``: n timesteps evenly from the last to 0."""
    return _zero(m.t_to_sigma(torch_linspace_f32(len(m.sigmas) - 1, 0, n)))


def karras(n: int, m: ModelSigmas, lo: float, hi: float, rho: float = KARRAS_RHO):
    ramp = torch_linspace_f32(0, 1, n)
    lo_r, hi_r = np.float32(lo ** (1 / rho)), np.float32(hi ** (1 / rho))
    return _zero((hi_r + ramp * (lo_r - hi_r)) ** np.float32(rho))


def exponential(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    return _zero(np.exp(torch_linspace_f32(math.log(hi), math.log(lo), n)))


def polyexponential(n: int, m: ModelSigmas, lo: float, hi: float,
                    rho: float = POLYEXPONENTIAL_RHO) -> np.ndarray:
    ramp = torch_linspace_f32(1, 0, n) ** np.float32(rho)
    return _zero(np.exp(ramp * np.float32(math.log(hi) - math.log(lo))
                        + np.float32(math.log(lo))))


def _t_span(n: int, m: ModelSigmas, lo: float, hi: float, points: int) -> np.ndarray:
    start, end = m.sigma_to_t(np.float32(hi)), m.sigma_to_t(np.float32(lo))
    return torch_linspace_f32(float(start), float(end), points)


def sgm_uniform(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    return _zero(m.t_to_sigma(_t_span(n, m, lo, hi, n + 1)[:-1]))


def normal(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    return _zero(m.t_to_sigma(_t_span(n, m, lo, hi, n)))


def kl_optimal(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    """n + 1 sigmas ending at sigma_min (not zero), as the WebUI's ``kl_optimal``."""
    a_min, a_max = np.arctan(np.float32(lo)), np.arctan(np.float32(hi))
    frac = (np.arange(n + 1) / n).astype(np.float32)
    return np.tan(frac * a_min + (np.float32(1) - frac) * a_max).astype(np.float32)


def align_your_steps(n: int, m: ModelSigmas, lo: float, hi: float, *, sdxl: bool = False):
    table = np.asarray(_AYS_SDXL if sdxl else _AYS_SD15, np.float64)
    if n == len(table):
        return _zero(table)
    xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
    return _zero(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])


def simple(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    ss = len(m.sigmas) / n
    return _zero([m.sigmas[-(1 + int(x * ss))] for x in range(n)])


def ddim(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    ss = max(len(m.sigmas) // n, 1)
    return _zero(m.sigmas[1::ss][::-1])


def _beta_ppf(q: float, a: float, b: float) -> float:
    try:
        from scipy import stats  # the WebUI's own: scipy's beta quantile
    except ImportError:
        raise ValueError("the Beta schedule type needs scipy (pip install scipy)") from None
    return float(stats.beta.ppf(q, a, b))


def beta(n: int, m: ModelSigmas, lo: float, hi: float) -> np.ndarray:
    """"Beta Sampling is All You Need" (Lee et al. 2024) with the WebUI's alpha = beta = 0.6."""
    ts = [_beta_ppf(x, BETA_ALPHA, BETA_BETA) for x in 1 - np.linspace(0, 1, n)]
    return _zero([lo + x * (hi - lo) for x in ts])


_FUNCTIONS = {
    "Uniform": uniform, "Karras": karras, "Exponential": exponential,
    "Polyexponential": polyexponential, "SGM Uniform": sgm_uniform, "KL Optimal": kl_optimal,
    "Simple": simple, "Normal": normal, "DDIM": ddim, "Beta": beta,
}


def schedule_sigmas(schedule_type: str, n: int, model: ModelSigmas, *,
                    sdxl: bool = False, discard_next_to_last: bool = False) -> np.ndarray:
    """The WebUI's ``get_sigmas``: the (n + 1) float32 sigmas of a resolved schedule type
    (not "Automatic": a sampler resolves that to its own default first), between the model's
    sigma_min and sigma_max; ``discard_next_to_last`` (DPM2, DPM2 a, DPM++ 3M SDE) schedules
    one step more and drops the next-to-last sigma."""
    label = schedule_type_label(schedule_type)
    steps = n + 1 if discard_next_to_last else n
    lo, hi = model.sigma_min, model.sigma_max
    if label == "Align Your Steps":
        sigmas = align_your_steps(steps, model, lo, hi, sdxl=sdxl)
    elif label in _FUNCTIONS:
        sigmas = _FUNCTIONS[label](steps, model, lo, hi)
    else:
        raise ValueError(f"schedule type {label!r} must be resolved by the sampler first")
    sigmas = np.asarray(sigmas, np.float32)
    if discard_next_to_last:
        sigmas = np.concatenate([sigmas[:-2], sigmas[-1:]])
    return sigmas
