"""The WebUI's UniPC sampler (its ``modules/models/diffusion/uni_pc/uni_pc.py`` driven by
``sd_samplers_timesteps_impl.unipc``) as rows of the WebUI samplers' coefficient table.

The data-prediction (``predict_x0``) multistep solver over ``NoiseScheduleVP('discrete')``:
log alpha_t interpolated piecewise linearly over the model's ``0.5 * log(alphas_cumprod)`` at
continuous times (n + 1) / 1000, the UNet at the fractional timestep ``(t - 1/1000) * 1000``.
The WebUI's options (Settings > Sampler parameters, :class:`Options`): ``uni_pc_variant``
("bh1": B(h) = -h, "bh2": B(h) = expm1(-h), "vary_coeff": the varying-coefficient solver),
``uni_pc_skip_type`` (the time grid: "time_uniform", "time_quadratic", "logSNR"),
``uni_pc_order`` and ``uni_pc_lower_order_final``; the defaults bh1, time_uniform, 3, True.
txt2img runs ``len(get_timesteps(steps))`` UniPC steps from t = 1 to t = 1/1000 on the
unscaled noise; img2img (the WebUI's timesteps rule) ``t_enc`` steps from ``timesteps[t_enc -
1] / 1000 + 1/1000`` on the image noised to timestep ``timesteps[t_enc]``'s level.

Every step j of UniPC predicts x_j from the corrected x_{j-1} and the last data predictions
m, evaluates the model there (m_j), then corrects x_j with m_j; the corrected x_j and m_j give
the prediction of x_{j+1}. Both are linear in (the predicted x_j, m_j, m_{j-1}, ...,
m_{j-order}), so one loop evaluation is one table row: the sample is the predicted x_j in the
evaluation's variance-exploding scale (x / alpha_t: the UNet input is x / input_div and the
denoised estimate is UniPC's m), the memory the ``order`` previous m, and the last row writes
the final (variance-preserving) sample. The corrector reuses the next evaluation, as
UniPC's: N steps are N evaluations, and the last step is the predictor alone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sdjax.schedulers.common import torch_linspace_f32

VARIANTS = ("bh1", "bh2", "vary_coeff")
SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")
MAX_ORDER = 50  # the WebUI's slider


@dataclasses.dataclass(frozen=True)
class Options:
    """The WebUI's UniPC options under their option names (``shared_options.py``)."""

    variant: str = "bh1"
    skip_type: str = "time_uniform"
    order: int = 3
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"uni_pc_variant must be one of {', '.join(VARIANTS)}, got "
                             f"{self.variant!r}")
        if self.skip_type not in SKIP_TYPES:
            raise ValueError(f"uni_pc_skip_type must be one of {', '.join(SKIP_TYPES)}, got "
                             f"{self.skip_type!r}")
        if (isinstance(self.order, bool) or not isinstance(self.order, int)
                or not 1 <= self.order <= MAX_ORDER):
            raise ValueError(f"uni_pc_order must be an integer from 1 to {MAX_ORDER}, got "
                             f"{self.order!r}")
        if not isinstance(self.lower_order_final, bool):
            raise ValueError(f"uni_pc_lower_order_final must be true or false, got "
                             f"{self.lower_order_final!r}")


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


def _interp(x: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """``interpolate_fn``: piecewise linear through increasing knots xp, extended linearly
    beyond them by the outermost segments."""
    x = np.asarray(x, np.float64)
    i = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    return yp[i] + (x - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])


class NoiseScheduleVP:
    """``NoiseScheduleVP('discrete', alphas_cumprod)``: log alpha at continuous time t."""

    def __init__(self, alphas_cumprod: np.ndarray):
        ac = np.asarray(alphas_cumprod, np.float32)
        self.total_n = len(ac)
        self.t_array = torch_linspace_f32(0.0, 1.0, self.total_n + 1)[1:].astype(np.float64)
        self.log_alpha = _f32(0.5 * np.log(ac.astype(np.float64))).astype(np.float64)

    def log_alpha_t(self, t: np.ndarray) -> np.ndarray:
        return _interp(t, self.t_array, self.log_alpha)

    def lambda_t(self, t: np.ndarray) -> np.ndarray:
        """``marginal_lambda``: log(alpha_t / sigma_t)."""
        la = self.log_alpha_t(t)
        return la - 0.5 * np.log(-np.expm1(2 * la))

    def inverse_lambda(self, lam: np.ndarray) -> np.ndarray:
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
        return _interp(log_alpha, self.log_alpha[::-1], self.t_array[::-1])

    def model_time(self, t: np.ndarray) -> np.ndarray:
        """``get_model_input_time``: (t - 1/N) * 1000, in float32 as the WebUI's tensors."""
        return _f32(_f32(np.asarray(t, np.float32) - np.float32(1 / self.total_n))
                    * np.float32(1000))


def run_times(ns: NoiseScheduleVP, steps: int, t_start: float | None,
              skip_type: str = "time_uniform") -> np.ndarray:
    """``get_time_steps(skip_type, t_T, t_0, steps)``: (steps + 1) float32 times from t_T (1,
    or ``t_start``, a float32 value) to t_0 = 1/N."""
    t_T = 1.0 if t_start is None else float(t_start)
    t_0 = 1.0 / ns.total_n
    if skip_type == "time_quadratic":
        # t_T ** 0.5 of a float32 tensor (img2img) rounds to float32; of 1.0 it is exact
        root = torch_linspace_f32(float(_f32(math.sqrt(t_T))), t_0 ** 0.5, steps + 1)
        return _f32(root.astype(np.float64) ** 2)
    if skip_type == "logSNR":
        lam = [float(_f32(ns.lambda_t(np.float64(_f32(t))))) for t in (t_T, t_0)]
        return _f32(ns.inverse_lambda(torch_linspace_f32(lam[0], lam[1], steps + 1)))
    return torch_linspace_f32(t_T, t_0, steps + 1)


def img2img_start(timesteps: np.ndarray) -> float:
    """``timesteps[-1] / 1000 + 1 / 1000`` as the WebUI's float32 tensors compute it."""
    return float(_f32(_f32(np.float32(timesteps[-1]) / np.float32(1000)) + np.float32(0.001)))


def _h_phis(hh: float, count: int) -> list[float]:
    """h phi_1(h), h phi_2(h) / h, ...: each the last over hh less 1/k! (UniPC's h_phi_k)."""
    out, fact = [math.expm1(hh)], 1
    for k in range(1, count):
        out.append(out[-1] / hh - 1 / fact)
        fact *= k + 1
    return out


def _update(lam: np.ndarray, alpha: np.ndarray, k: int, order: int, variant: str):
    """``multistep_uni_pc_{bh,vary}_update`` (data prediction) to time index k at ``order``:
    (the coefficient of the previous corrected x, the predictor's and the corrector's
    coefficients of the data predictions {time index: coefficient}, m_k included in the
    corrector's)."""
    h = lam[k] - lam[k - 1]
    rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, order)] + [1.0]
    hh = -h
    base = {k - 1: -alpha[k] * math.expm1(hh)}
    pred, corr = dict(base), dict(base)

    def add(coefs, weights):  # - sum_i w_i (m_{k-1-i} - m_{k-1}) / rk_i  (the D1s)
        for i in range(1, len(weights) + 1):
            c = -weights[i - 1] / rks[i - 1]
            coefs[k - 1 - i] = coefs.get(k - 1 - i, 0.0) + c
            coefs[k - 1] -= c

    if variant == "vary_coeff":
        big_k = len(rks)
        cols = [np.asarray(rks) ** c / math.factorial(c + 1) for c in range(big_k)]
        c_mat = np.stack(cols, axis=1)
        a_c = np.linalg.inv(c_mat)
        hp = _h_phis(hh, big_k + 1)
        if big_k > 1:
            a_p = np.linalg.inv(c_mat[:-1, :-1])
            add(pred, alpha[k] * sum(hp[j + 1] * a_p[j] for j in range(big_k - 1)))
            add(corr, alpha[k] * sum(hp[j + 1] * a_c[j][:-1] for j in range(big_k - 1)))
        # the last term takes row K - 2 of A_c (row 0 at order 1), as UniPC's loop leaves k
        c = -alpha[k] * hp[big_k] * a_c[max(big_k - 2, 0)][-1]
    else:
        r = np.stack([np.asarray(rks) ** (i - 1) for i in range(1, order + 1)])
        b_h = hh if variant == "bh1" else math.expm1(hh)
        hp = _h_phis(hh, order + 1)
        fact, b = 1, []
        for i in range(1, order + 1):
            b.append(hp[i] * fact / b_h)
            fact *= i + 1
        b = np.asarray(b)
        if order >= 2:
            rho_p = [0.5] if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
            add(pred, alpha[k] * b_h * np.asarray(rho_p))
        rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
        add(corr, alpha[k] * b_h * rhos_c[:-1])
        c = -alpha[k] * b_h * rhos_c[-1]  # rho_c[-1] (m_k - m_{k-1})
    corr[k] = c
    corr[k - 1] -= c
    sigma = np.sqrt(1 - alpha ** 2)
    return sigma[k] / sigma[k - 1], pred, corr


def step_orders(steps: int, opts: Options) -> list[int]:
    """The order of each step 1..steps: ``init_order`` for the first order - 1, then the
    order (``min(order, steps + 1 - step)`` with lower_order_final). A run shorter than the
    order (the WebUI asserts) runs at the orders it has."""
    o = opts.order
    return [k if k < o else (min(o, steps + 1 - k) if opts.lower_order_final else o)
            for k in range(1, steps + 1)]


def build(table, ns: NoiseScheduleVP, sqrt_ac: tuple[np.ndarray, np.ndarray], steps: int,
          t_start: float | None, opts: Options = Options()) -> dict:
    """Fill ``table`` (a ``webui._Table(opts.order)``) with a UniPC run of ``steps`` steps and
    return the per-evaluation arrays: ``t`` (the UNet's float32 timesteps), ``div`` (1 /
    alpha_t), ``sigma`` (the VE sigma), ``v`` (the v-prediction coefficients of the
    denoised estimate: the WebUI converts v to eps with ``sqrt_alphas_cumprod`` at the
    truncated timestep, then takes x0 with the interpolated alpha_t), and ``alpha0``."""
    memory = opts.order
    ts = run_times(ns, steps, t_start, opts.skip_type)
    la = ns.log_alpha_t(ts.astype(np.float64))
    alpha = np.exp(la)
    lam = la - 0.5 * np.log(-np.expm1(2 * la))
    sigma = np.sqrt(-np.expm1(2 * la))
    orders = step_orders(steps, opts)
    upd = [_update(lam, alpha, k, orders[k - 1], opts.variant) for k in range(1, steps + 1)]
    eye = np.eye(memory)
    shift = [(0, 1, ())] + [(0, 0, tuple(eye[i])) for i in range(memory - 1)]
    for j in range(steps):  # evaluation j at ts[j]: x = predicted x_j / alpha_j, D = m_j
        cx, pred, _ = upd[j]  # the prediction of x_{j+1}
        terms = dict(pred)
        if j >= 1:  # corrected x_j = predicted x_j + (corrector - predictor)(m)
            _, p_j, c_j = upd[j - 1]
            for idx in set(p_j) | set(c_j):
                terms[idx] = terms.get(idx, 0.0) + cx * (c_j.get(idx, 0.0) - p_j.get(idx, 0.0))
        out = 1.0 / alpha[j + 1] if j + 1 < steps else 1.0
        b = [0.0] * memory
        for idx, c in terms.items():
            if idx < j:
                b[j - 1 - idx] += out * c
        table.add(float(sigma[j] / alpha[j]), x=out * cx * alpha[j],
                  d=out * terms.get(j, 0.0), b=tuple(b), mem=shift)
    t_in = ns.model_time(ts[:steps])
    idx = t_in.astype(np.int64)  # t.to(torch.int)
    sa, s1a = sqrt_ac[0][idx], sqrt_ac[1][idx]
    s, a = sigma[:steps], alpha[:steps]
    v = np.stack([-s * sa / a, 1 / (1 - s * s1a)], axis=1)
    return dict(t=t_in, div=_f32(1 / a), sigma=_f32(s / a), v=_f32(v), alpha0=float(alpha[0]))
