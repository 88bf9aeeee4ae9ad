"""K-LMS: linear multistep (up to 4th order) on the probability-flow ODE in sigma
(Karras et al. 2022 / k-diffusion), with the reference's coefficient bookkeeping."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import sigmas as sig
from sdjax.schedulers.common import (
    check_history,
    check_steps,
    history,
    scalar_divide,
    start_index,
)

LMS_ORDER = 4


@flax.struct.dataclass
class LMSState:
    timesteps: jax.Array  # (M,) float32
    init_sigma: jax.Array
    start_coefs: jax.Array
    input_div: jax.Array  # (M,)
    sigma: jax.Array  # (M,)
    v: jax.Array  # (M, 2)
    lms_coefs: jax.Array  # (M, 4): weights of the newest .. oldest derivative
    derivatives: jax.Array  # (4, *shape), newest last


def lms_coefficient(sigmas: np.ndarray, step: int, order: int, j: int) -> float:
    """Integral over [sigma_step, sigma_step+1] of the Lagrange basis polynomial that is 1 at
    sigma_(step-j) and 0 at the other `order` - 1 previous sigmas (exact, in float64)."""
    nodes = [float(sigmas[step - k]) for k in range(order)]
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = poly.integ()
    return float(antiderivative(float(sigmas[step + 1])) - antiderivative(float(sigmas[step])))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMS(sig.SigmaScheduler):
    use_karras_sigmas: bool

    name: ClassVar[str] = "lms"
    defaults: ClassVar[dict[str, Any]] = {
        **sig.SIGMA_DEFAULTS,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
    fixed: ClassVar[dict[str, Any]] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> LMSState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        timesteps, sigmas = sig.sigma_schedule(self, n, use_karras_sigmas=self.use_karras_sigmas)
        begin = start_index(n, strength)
        steps = range(begin, n)
        coefs = np.zeros((len(steps), LMS_ORDER), np.float32)
        for local, step in enumerate(steps):
            order = min(step + 1, LMS_ORDER)
            # The reference zips the coefficients with the derivatives it has seen so far,
            # which after an img2img start is fewer than `order`.
            for j in range(min(order, local + 1)):
                coefs[local, j] = lms_coefficient(sigmas, step, order, j)
        return LMSState(
            **sig.common_fields(self.timestep_spacing, timesteps, sigmas, begin),
            lms_coefs=jnp.asarray(coefs),
            derivatives=history(sample_shape, LMS_ORDER),
        )

    def step(
        self,
        state: LMSState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, LMSState]:
        check_history(state.derivatives, sample, self.name)
        sigma = state.sigma[i]
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        x0 = sig.x0_from_sigma(self.prediction_type, out, x, sigma, state.v[i])
        derivative = scalar_divide(x - x0, sigma)
        history_ = jnp.concatenate([state.derivatives[1:], derivative[None]])
        c = state.lms_coefs[i]
        total = c[0] * history_[3]
        for k in range(1, LMS_ORDER):
            total = total + c[k] * history_[3 - k]
        prev = x + total
        return prev.astype(sample.dtype), state.replace(derivatives=history_)
