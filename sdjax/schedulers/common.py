"""What every scheduler shares: the training noise schedule, config parsing, timestep spacing,
img2img start, noise from keys, and the base class with the pipeline/training entry points.

Host-side numbers are built in numpy with the same dtypes and operation order as diffusers'
PyTorch code (float32 where it uses float32, float64 where numpy does the work), so schedules
match the reference bit for bit; only the per-step tensor maths runs in JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys every scheduler maps onto NoiseSchedule rather than onto its own fields.
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)


def f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace with torch's CPU rounding: a float32 step and one fused multiply-add per
    point, from `start` for the first half and back from `end` for the second half."""
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float64(np.float32((b - a) / np.float32(n - 1)))
    k = np.arange(n)
    vals = np.where(k < n // 2, np.float64(a) + step * k, np.float64(b) - step * (n - 1 - k))
    return vals.astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod of float32 accumulates in double and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal), in Python doubles as the reference."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return f32(betas)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (Lin et al. 2023)."""
    root = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return np.float32(1.0) - alphas


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The forward (training) process: betas and alphas_cumprod over the training timesteps."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not supported; use one of "
                f"{BETA_SCHEDULES} or trained_betas"
            )

    @functools.cached_property
    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = f32(self.trained_betas)
        elif self.beta_schedule == "linear":
            betas = torch_linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            root = torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n)
            betas = root * root
        else:
            betas = _cosine_betas(n)
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return cumprod_f32(np.float32(1.0) - self.betas)


def leading_trailing_linspace(
    spacing: str, num_train: int, n: int, steps_offset: int, *, round_linspace: bool
) -> np.ndarray:
    """Descending float64 timesteps for the three spacings of "Common Diffusion Noise Schedules
    and Sample Steps are Flawed" (Table 2), computed as diffusers does. The float `linspace`
    values (K-diffusion style schedulers) stay fractional unless `round_linspace`."""
    if spacing == "linspace":
        t = np.linspace(0, num_train - 1, n)
        if round_linspace:
            return t.round()[::-1].copy()
        return t.astype(np.float32).astype(np.float64)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / n)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {SPACINGS}")


def check_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}]")


def start_index(num_inference_steps: int, strength: float) -> int:
    """The step img2img starts from: diffusers' `get_timesteps` keeps the last
    int(N * strength) steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    if kept == 0:
        raise ValueError(
            f"strength={strength} with {num_inference_steps} steps leaves no denoising step"
        )
    return num_inference_steps - kept


def scalar_divide(x: jax.Array, s: jax.Array) -> jax.Array:
    """``x / s`` for a scalar (or per-image) divisor, as a multiplication by ``1 / s``
    computed on the scalar first. XLA's algebraic simplifier rewrote a division by a
    broadcast scalar into a multiplication by its reciprocal in the partitioned program of
    two or more devices and not in the one-device one, so the two rounded differently
    (docs/tpu-gpu.md#reproducibility); with the reciprocal taken here there is no division
    left to rewrite, and every program rounds alike."""
    return x * (1 / s)


def normal_like(key: jax.Array | None, sample: jax.Array) -> jax.Array:
    """Standard normal float32 noise shaped like `sample`. A batch of keys (leading dim ==
    sample.shape[0]) draws each sample's noise from its own key, so an image's noise does not
    depend on which other images share its batch."""
    if key is None:
        raise ValueError("this scheduler is stochastic: step() needs a PRNG key")
    key = jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        if key.shape[0] != sample.shape[0]:
            raise ValueError(
                f"got {key.shape[0]} keys for a batch of {sample.shape[0]} samples"
            )
        draw = functools.partial(jax.random.normal, shape=sample.shape[1:], dtype=jnp.float32)
        return jax.vmap(draw)(key)
    return jax.random.normal(key, sample.shape, jnp.float32)


def history(sample_shape: tuple[int, ...] | None, depth: int) -> jax.Array:
    """Zeroed float32 buffers for `depth` past tensors shaped like the sample. Without a shape
    the state gets an empty placeholder and step() says what to pass."""
    if sample_shape is None:
        return jnp.zeros((depth, 0), jnp.float32)
    return jnp.zeros((depth, *sample_shape), jnp.float32)


def check_history(buffer: jax.Array, sample: jax.Array, name: str) -> None:
    if buffer.shape[1:] != sample.shape:
        raise ValueError(
            f"{name} keeps past model outputs: build its state with "
            f"set_timesteps(..., sample_shape={tuple(sample.shape)}) (got buffers for "
            f"{tuple(buffer.shape[1:])})"
        )


def _broadcast_to(coef: jax.Array, like: jax.Array) -> jax.Array:
    coef = jnp.reshape(coef, (-1,) + (1,) * (like.ndim - 1))
    return coef.astype(like.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scheduler:
    """Base of every scheduler: a frozen, hashable description built from a diffusers
    scheduler config. Subclasses declare their options as fields named like the config keys,
    `defaults` with the diffusers class defaults (used where the config lacks a key), and
    `fixed` with options they accept only at one value."""

    schedule: NoiseSchedule
    prediction_type: str
    timestep_spacing: str
    steps_offset: int

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False
    order: ClassVar[int] = 1  # diffusers' `order`: img2img skips t_start * order evaluations
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES
    defaults: ClassVar[Mapping[str, Any]]
    fixed: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Scheduler:
        """Build from a scheduler_config.json dict; keys this class does not know are ignored
        (as diffusers' `from_config` does), missing keys take this class's defaults."""
        opts = dict(cls.defaults)
        opts.update((k, v) for k, v in config.items() if k in cls.defaults)
        opts.update(overrides)
        for key, allowed in cls.fixed.items():
            if opts.get(key, allowed) != allowed:
                raise ValueError(
                    f"{cls.__name__}: {key}={opts[key]!r} is not supported (only {allowed!r})"
                )
        betas = opts.get("trained_betas")
        schedule = NoiseSchedule(
            num_train_timesteps=int(opts["num_train_timesteps"]),
            beta_start=float(opts["beta_start"]),
            beta_end=float(opts["beta_end"]),
            beta_schedule=opts["beta_schedule"],
            trained_betas=None if betas is None else tuple(float(b) for b in betas),
            rescale_betas_zero_snr=bool(opts.get("rescale_betas_zero_snr", False)),
        )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "schedule"]
        return cls(schedule=schedule, **{k: opts[k] for k in names})

    def __post_init__(self) -> None:
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported; "
                f"use one of {SPACINGS}"
            )
        if self.prediction_type not in self.prediction_types:
            raise ValueError(
                f"{self.name}: prediction_type {self.prediction_type!r} is not supported; "
                f"use one of {self.prediction_types}"
            )

    # -- the training process ---------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def add_noise(self, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """x_t = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) noise, one t per
        sample (leading axis), as diffusers' DDPMScheduler.add_noise."""
        ac = jnp.asarray(self.schedule.alphas_cumprod).astype(original.dtype)[timesteps]
        scale = _broadcast_to(jnp.sqrt(ac), original)
        sigma = _broadcast_to(jnp.sqrt(1 - ac), original)
        return scale * original + sigma * noise

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """The v-prediction target sqrt(a) noise - sqrt(1 - a) x_0."""
        ac = jnp.asarray(self.schedule.alphas_cumprod).astype(sample.dtype)[timesteps]
        scale = _broadcast_to(jnp.sqrt(ac), sample)
        sigma = _broadcast_to(jnp.sqrt(1 - ac), sample)
        return scale * noise - sigma * sample

    def snr(self, timesteps: jax.Array) -> jax.Array:
        """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at integer timesteps."""
        ac = jnp.asarray(self.schedule.alphas_cumprod)[timesteps]
        return ac / (1 - ac)

    # -- what the sampling loop calls -------------------------------------------------------

    def num_evaluations(self, state: Any) -> int:
        return int(state.timesteps.shape[0])

    def init_noise_sigma(self, state: Any) -> jax.Array:
        return state.init_sigma

    def scale_model_input(self, state: Any, sample: jax.Array, i: jax.Array) -> jax.Array:
        return sample

    def step_sigma(self, state: Any, i: jax.Array) -> jax.Array:
        """The noise level sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod) of evaluation
        ``i`` (what ``guidance_interval`` compares): the sigma schedulers' own sigma, else that
        of the evaluation's timestep (interpolated linearly at fractional timesteps)."""
        sigma = getattr(state, "sigma", None)
        if sigma is not None:
            return sigma[i]
        ac = self.schedule.alphas_cumprod
        with np.errstate(divide="ignore"):  # a zero-terminal-SNR schedule ends at sigma inf
            table = jnp.asarray(np.sqrt((np.float32(1.0) - ac) / ac))
        t = state.timesteps[i].astype(jnp.float32)
        return jnp.interp(t, jnp.arange(len(ac), dtype=jnp.float32), table)

    def add_noise_for_start(self, state: Any, original: jax.Array, noise: jax.Array) -> jax.Array:
        """img2img: noise clean latents to the level of the state's first evaluation, as
        diffusers' img2img pipeline does with `add_noise(x0, noise, timesteps[:1])` (and, for
        sigma schedulers, the sigma at the begin index)."""
        scale, sigma = state.start_coefs[0], state.start_coefs[1]
        return scale.astype(original.dtype) * original + sigma.astype(original.dtype) * noise

    def noise_levels(self, state: Any) -> np.ndarray:
        """(M, 2) float32: the (x0 scale, noise scale) of diffusers' ``add_noise`` at each
        evaluation's timestep: inpainting with ordinary models re-noises the kept region to the
        next evaluation's level after every step."""
        ac = self.schedule.alphas_cumprod[np.asarray(state.timesteps)]
        return f32(np.stack([np.sqrt(ac), np.sqrt(np.float32(1.0) - ac)], axis=1))
