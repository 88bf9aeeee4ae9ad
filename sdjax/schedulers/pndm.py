"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"): Runge-Kutta warm-up
(unless skip_prk_steps) then a 4th-order linear multistep (PLMS) method.

The reference decides what to do at each call from a counter and the list of stored outputs.
Here that bookkeeping is replayed once on the host into per-evaluation tables (which stored
output formula to use, which sample to step from, which alphas), so the traced step only
selects with the loop index and the whole loop compiles once."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.common import (
    Scheduler,
    check_history,
    check_steps,
    f32,
    history,
    leading_trailing_linspace,
    start_index,
)

# How the effective model output of an evaluation is formed (reference formulas, same order of
# operations so float32 results match).
RAW, AVERAGE, AB2, AB3, AB4, RK_FINAL = range(6)
# What happens to the Runge-Kutta accumulator.
ACC_KEEP, ACC_START, ACC_ADD = range(3)


@flax.struct.dataclass
class PNDMState:
    timesteps: jax.Array  # (M,) int32, fed to the UNet
    init_sigma: jax.Array
    start_coefs: jax.Array  # (2,) img2img: x0 and noise scales
    formula: jax.Array  # (M,) int32
    store: jax.Array  # (M,) bool: push this output onto the multistep history
    keep_sample: jax.Array  # (M,) bool: remember this sample as the step origin
    use_kept: jax.Array  # (M,) bool: step from the remembered sample instead of this one
    acc_mode: jax.Array  # (M,) int32
    coefs: jax.Array  # (M, 5) float32: sqrt(a_t), sqrt(1-a_t), x coef, eps numerator, denominator
    ets: jax.Array  # (4, *shape) past model outputs, newest last
    kept: jax.Array  # (*shape)
    acc: jax.Array  # (*shape) Runge-Kutta weighted sum


@dataclasses.dataclass(frozen=True, kw_only=True)
class PNDM(Scheduler):
    skip_prk_steps: bool
    set_alpha_to_one: bool

    name: ClassVar[str] = "pndm"
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }

    def _evaluation_timesteps(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(all evaluation timesteps, the Runge-Kutta ones) for n steps."""
        asc = leading_trailing_linspace(
            self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset,
            round_linspace=True,
        )[::-1].astype(np.int64)
        if self.skip_prk_steps:
            # The first step is taken twice: once plainly, once with the averaged output.
            plms = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
            return plms, np.zeros(0, np.int64)
        if n < 4:
            raise ValueError("pndm without skip_prk_steps needs at least 4 inference steps")
        half = self.num_train_timesteps // n // 2
        prk = (asc[-4:].repeat(2) + np.tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]
        return np.concatenate([prk, asc[:-3][::-1]]), prk

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> PNDMState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        full, prk = self._evaluation_timesteps(n)
        passed = full[start_index(n, strength) :]  # img2img restarts the counter here
        stride = self.num_train_timesteps // n
        rows = []
        n_ets = 0
        for c, tp in enumerate(passed.tolist()):
            if c < len(prk):
                phase = c % 4
                n_ets += phase == 0
                rows.append((
                    prk[c // 4 * 4], tp - (0 if c % 2 else stride // 2),
                    RK_FINAL if phase == 3 else RAW, phase == 0, phase == 0, True,
                    ACC_START if phase == 0 else ACC_KEEP if phase == 3 else ACC_ADD,
                ))
                continue
            t, prev = tp, tp - stride
            if c == 1:  # the repeated first step: redo it from the kept sample
                t, prev = tp + stride, tp
            else:
                n_ets = min(n_ets, 3) + 1
            if n_ets == 1 and c == 0:
                formula = RAW
            elif n_ets == 1:
                formula = AVERAGE
            else:
                formula = (AB2, AB3, AB4)[n_ets - 2]
            rows.append((t, prev, formula, c != 1, c == 0, c == 1, ACC_KEEP))
        columns = (np.array(col) for col in zip(*rows, strict=True))
        t, prev, formula, store, keep, use_kept, acc_mode = columns

        ac = self.schedule.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        one = np.float32(1.0)
        b_t, b_prev = one - a_t, one - a_prev
        coefs = np.stack([
            np.sqrt(a_t),
            np.sqrt(b_t),
            np.sqrt(a_prev / a_t),
            a_prev - a_t,
            a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev),
        ], axis=1)
        a0 = ac[passed[0]]
        return PNDMState(
            timesteps=jnp.asarray(np.asarray(passed, np.int32)),
            init_sigma=jnp.float32(1.0),
            start_coefs=jnp.asarray(f32([np.sqrt(a0), np.sqrt(one - a0)])),
            formula=jnp.asarray(np.asarray(formula, np.int32)),
            store=jnp.asarray(store, bool),
            keep_sample=jnp.asarray(keep, bool),
            use_kept=jnp.asarray(use_kept, bool),
            acc_mode=jnp.asarray(np.asarray(acc_mode, np.int32)),
            coefs=jnp.asarray(f32(coefs)),
            ets=history(sample_shape, 4),
            kept=history(sample_shape, 1)[0],
            acc=history(sample_shape, 1)[0],
        )

    def step(
        self,
        state: PNDMState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, PNDMState]:
        check_history(state.ets, sample, self.name)
        out = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        ets = jnp.where(state.store[i], jnp.concatenate([state.ets[1:], out[None]]), state.ets)
        kept = jnp.where(state.keep_sample[i], x, state.kept)
        origin = jnp.where(state.use_kept[i], kept, x)
        mode = state.acc_mode[i]
        acc = jnp.where(mode == ACC_ADD, state.acc + 1 / 3 * out, state.acc)
        acc = jnp.where(mode == ACC_START, 1 / 6 * out, acc)
        e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]
        candidates = [
            out,
            (out + e1) / 2,
            (3 * e1 - e2) / 2,
            (23 * e1 - 16 * e2 + 5 * e3) / 12,
            1 / 24 * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
            state.acc + 1 / 6 * out,
        ]
        formula = state.formula[i]
        eps = jnp.select([formula == k for k in range(len(candidates))], candidates)
        sqrt_a, sqrt_b, x_coef, num, den = (state.coefs[i, k] for k in range(5))
        if self.prediction_type == "v_prediction":
            eps = sqrt_a * eps + sqrt_b * origin
        prev = x_coef * origin - eps * (num / den)
        state = state.replace(ets=ets, kept=kept, acc=acc)
        return prev.astype(sample.dtype), state
