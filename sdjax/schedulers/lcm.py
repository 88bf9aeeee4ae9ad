"""Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler.

Each step maps the sample to a clean estimate through the consistency function's boundary
condition (``denoised = c_out * x0 + c_skip * x``) and, except at the last step, noises that
estimate afresh to the next timestep: the sampler is stochastic (per-image keys). The timesteps
are a subset of the ``original_inference_steps``-step schedule the model was distilled on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.common import Scheduler, check_steps, f32, normal_like, start_index
from sdjax.schedulers.ddim import x0_and_eps

SIGMA_DATA = np.float32(0.5)  # the consistency function's data std (diffusers' sigma_data)


@flax.struct.dataclass
class LCMState:
    timesteps: jax.Array  # (M,) int32
    init_sigma: jax.Array
    start_coefs: jax.Array
    # (M, 6): sqrt(a_t), sqrt(1 - a_t), c_skip, c_out, and the noise mix of the next timestep
    # (sqrt(a_prev), sqrt(1 - a_prev)); the last step keeps (1, 0): no fresh noise.
    coefs: jax.Array  # (M, 6)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LCM(Scheduler):
    original_inference_steps: int
    timestep_scaling: float
    set_alpha_to_one: bool
    clip_sample: bool
    clip_sample_range: float

    name: ClassVar[str] = "lcm"
    stochastic: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }
    fixed: ClassVar[dict[str, Any]] = {"thresholding": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"lcm: original_inference_steps must be in [1, "
                             f"{self.num_train_timesteps}], got {self.original_inference_steps}")

    def timestep_schedule(self, n: int) -> np.ndarray:
        """The n timesteps, evenly spaced by index over the distillation schedule (every
        ``num_train_timesteps // original_inference_steps``-th timestep)."""
        check_steps(n, self.num_train_timesteps)
        original = self.original_inference_steps
        if n > original:
            raise ValueError(f"lcm: num_inference_steps must be at most the model's "
                             f"original_inference_steps ({original}), got {n}")
        k = self.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return origin[picks]

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> LCMState:
        n = num_inference_steps
        t = self.timestep_schedule(n)
        ac = self.schedule.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        one = np.float32(1.0)
        a_t = ac[t]
        a_next = np.concatenate([ac[t[1:]], [final]])
        # c_skip and c_out in float32, as the reference computes them from the timestep tensor.
        scaled = t.astype(np.float32) * np.float32(self.timestep_scaling)
        c_skip = SIGMA_DATA**2 / (scaled * scaled + SIGMA_DATA**2)
        c_out = scaled / np.sqrt(scaled * scaled + SIGMA_DATA**2)
        mix = np.stack([np.sqrt(a_next), np.sqrt(one - a_next)], axis=1)
        mix[-1] = (1.0, 0.0)  # the last step returns the clean estimate itself
        coefs = np.concatenate(
            [np.stack([np.sqrt(a_t), np.sqrt(one - a_t), c_skip, c_out], axis=1), mix], axis=1)
        begin = start_index(n, strength)
        return LCMState(
            timesteps=jnp.asarray(np.asarray(t[begin:], np.int32)),
            init_sigma=jnp.float32(1.0),
            start_coefs=jnp.asarray(f32([coefs[begin, 0], coefs[begin, 1]])),
            coefs=jnp.asarray(f32(coefs[begin:])),
        )

    def step(
        self,
        state: LCMState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, LCMState]:
        """One LCM step; ``noise`` (standard normal, like sample) replaces the draw from
        ``key`` (drawn at every step; the last step weights it 0)."""
        sqrt_a, sqrt_b, c_skip, c_out, next_a, next_b = (state.coefs[i, k] for k in range(6))
        x = sample.astype(jnp.float32)
        x0, _ = x0_and_eps(self.prediction_type, model_output.astype(jnp.float32), x, sqrt_a,
                           sqrt_b)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = c_out * x0 + c_skip * x
        if noise is None:
            noise = normal_like(key, sample)
        prev = next_a * denoised + next_b * noise
        return prev.astype(sample.dtype), state
