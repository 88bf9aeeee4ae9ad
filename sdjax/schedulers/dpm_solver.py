"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"), the
multistep second-order data-prediction solver, as diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_order=2, optionally on Karras sigmas.

The first step of a run (and, by the reference's rules, the last) is first order; the choice
is a per-evaluation flag selected with the traced loop index."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import sigmas as sig
from sdjax.schedulers.common import (
    Scheduler,
    check_history,
    check_steps,
    f32,
    history,
    scalar_divide,
    start_index,
)

# The reference drops to first order at the end of short schedules.
LOWER_ORDER_FINAL_BELOW = 15


@flax.struct.dataclass
class DPMState:
    timesteps: jax.Array  # (M,) int32
    init_sigma: jax.Array
    start_coefs: jax.Array
    alpha_sigma: jax.Array  # (M, 2) alpha_s, sigma_s of x = alpha_s x0 + sigma_s eps
    coefs: jax.Array  # (M, 4) x coef, x0 coef, signed D1 coef, 1 / r0
    second_order: jax.Array  # (M,) bool
    prev_x0: jax.Array  # (1, *shape) the previous step's data prediction


def _alpha_sigma(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.float32(1.0) / np.sqrt(sigmas * sigmas + np.float32(1.0))
    return alpha, sigmas * alpha


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverMultistep(Scheduler):
    use_karras_sigmas: bool
    solver_type: str
    lower_order_final: bool
    euler_at_final: bool
    final_sigmas_type: str
    lambda_min_clipped: float

    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    }
    fixed: ClassVar[dict[str, Any]] = {
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "thresholding": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "variance_type": None,
        "use_dynamic_shifting": False,
    }

    @property
    def name(self) -> str:  # type: ignore[override]
        return "dpmpp_2m_karras" if self.use_karras_sigmas else "dpmpp_2m"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{self.name}: solver_type must be 'midpoint' or 'heun'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"{self.name}: final_sigmas_type must be 'zero' or 'sigma_min'")

    def _timesteps(self, n: int, train_alphas_cumprod: np.ndarray) -> np.ndarray:
        ntt = self.num_train_timesteps
        one = np.float32(1.0)
        ac = train_alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(one - ac))
        last = ntt - int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = last // (n + 1)
            t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            return t + self.steps_offset
        return np.arange(last, 0, -ntt / n).round().astype(np.int64) - 1

    def step_sigma(self, state: DPMState, i: jax.Array) -> jax.Array:
        return state.alpha_sigma[i, 1] / state.alpha_sigma[i, 0]

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> DPMState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        ac = self.schedule.alphas_cumprod
        if self.schedule.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = np.float32(2.0**-24)
        with np.errstate(divide="ignore"):
            timesteps = self._timesteps(n, ac)
        train = sig.train_sigmas(self.schedule, zero_snr_floor=True)
        if self.use_karras_sigmas:
            sigmas = sig.karras(train[-1].item(), train[0].item(), n)
            timesteps = sig.sigma_to_t(sigmas, np.log(train))
            if self.schedule.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = sig.interp_sigmas(timesteps, train)
        last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = f32(np.concatenate([sigmas, [last]]))

        total = len(timesteps)
        begin = start_index(n, strength)
        g = np.arange(begin, total)
        final_first_order = self.euler_at_final or self.final_sigmas_type == "zero" or (
            self.lower_order_final and total < LOWER_ORDER_FINAL_BELOW
        )
        second_order = (g > begin) & ~((g == total - 1) & final_first_order)

        alpha_s, sigma_s = _alpha_sigma(sigmas[g])
        alpha_t, sigma_t = _alpha_sigma(sigmas[g + 1])
        alpha_p, sigma_p = _alpha_sigma(sigmas[np.maximum(g - 1, 0)])
        with np.errstate(divide="ignore", invalid="ignore"):
            lam_s = np.log(alpha_s) - np.log(sigma_s)
            lam_t = np.log(alpha_t) - np.log(sigma_t)
            lam_p = np.log(alpha_p) - np.log(sigma_p)
            h = lam_t - lam_s
            inv_r0 = np.float32(1.0) / ((lam_s - lam_p) / h)
            expm1 = np.exp(-h) - np.float32(1.0)
            x0_coef = alpha_t * expm1
            if self.solver_type == "midpoint":
                d1_coef = np.float32(0.5) * (alpha_t * expm1)
            else:  # stored negated: x - (-c) * D1 == x + c * D1 exactly
                d1_coef = -(alpha_t * (expm1 / h + np.float32(1.0)))
            coefs = np.stack([sigma_t / sigma_s, x0_coef, d1_coef, inv_r0], axis=1)
        # First-order rows must not carry the (infinite) D1 terms of a missing history.
        coefs[~second_order, 2:] = 0.0
        alpha_0, sigma_0 = _alpha_sigma(sigmas[begin : begin + 1])
        return DPMState(
            timesteps=jnp.asarray(np.asarray(timesteps[begin:], np.int32)),
            init_sigma=jnp.float32(1.0),
            start_coefs=jnp.asarray(f32([alpha_0[0], sigma_0[0]])),
            alpha_sigma=jnp.asarray(f32(np.stack([alpha_s, sigma_s], axis=1))),
            coefs=jnp.asarray(f32(coefs)),
            second_order=jnp.asarray(second_order),
            prev_x0=history(sample_shape, 1),
        )

    def noise_levels(self, state: DPMState) -> np.ndarray:
        return np.asarray(state.alpha_sigma, np.float32)

    def step(
        self,
        state: DPMState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, DPMState]:
        check_history(state.prev_x0, sample, self.name)
        alpha, sigma = state.alpha_sigma[i, 0], state.alpha_sigma[i, 1]
        out = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        if self.prediction_type == "epsilon":
            x0 = scalar_divide(x - sigma * out, alpha)
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x - sigma * out
        else:
            x0 = out
        x_coef, x0_coef, d1_coef, inv_r0 = (state.coefs[i, k] for k in range(4))
        first = x_coef * x - x0_coef * x0
        second = first - d1_coef * (inv_r0 * (x0 - state.prev_x0[0]))
        prev = jnp.where(state.second_order[i], second, first)
        return prev.astype(sample.dtype), state.replace(prev_x0=x0[None])
