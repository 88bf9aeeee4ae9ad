"""The WebUI's UniPC sampler (its ``modules/models/diffusion/uni_pc/uni_pc.py`` driven by
``sd_samplers_timesteps_impl.unipc``) as rows of the WebUI samplers' coefficient table.

The WebUI's defaults: variant "bh1" (B(h) = -h), order 3, skip type "time_uniform", lower
order final, the data-prediction (``predict_x0``) multistep solver over ``NoiseScheduleVP
('discrete')``: log alpha_t interpolated piecewise linearly over the model's
``0.5 * log(alphas_cumprod)`` at continuous times (n + 1) / 1000, the UNet at the fractional
timestep ``(t - 1/1000) * 1000``. txt2img runs ``len(get_timesteps(steps))`` UniPC steps from
t = 1 to t = 1/1000 on the unscaled noise; img2img (the WebUI's timesteps rule) ``t_enc``
steps from ``timesteps[t_enc - 1] / 1000 + 1/1000`` on the image noised to timestep
``timesteps[t_enc]``'s level.

Every step j of UniPC predicts x_j from the corrected x_{j-1} and the last data predictions
m, evaluates the model there (m_j), then corrects x_j with m_j; the corrected x_j and m_j give
the prediction of x_{j+1}. Both are linear in (the predicted x_j, m_j, m_{j-1}, m_{j-2},
m_{j-3}), so one loop evaluation is one table row: the sample is the predicted x_j in the
evaluation's variance-exploding scale (x / alpha_t: the UNet input is x / input_div and the
denoised estimate is UniPC's m), the memory the three previous m, and the last row writes
the final (variance-preserving) sample. The corrector reuses the next evaluation, as
UniPC's: N steps are N evaluations, and the last step is the predictor alone.
"""

from __future__ import annotations

import math

import numpy as np

from sdjax.schedulers.common import torch_linspace_f32

ORDER = 3  # the WebUI's uni_pc_order
MEMORY = ORDER  # m_{j-1}, m_{j-2}, m_{j-3}: the order-3 corrector's previous estimates


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


class NoiseScheduleVP:
    """``NoiseScheduleVP('discrete', alphas_cumprod)``: log alpha at continuous time t."""

    def __init__(self, alphas_cumprod: np.ndarray):
        ac = np.asarray(alphas_cumprod, np.float32)
        self.total_n = len(ac)
        self.t_array = torch_linspace_f32(0.0, 1.0, self.total_n + 1)[1:].astype(np.float64)
        self.log_alpha = _f32(0.5 * np.log(ac.astype(np.float64))).astype(np.float64)

    def log_alpha_t(self, t: np.ndarray) -> np.ndarray:
        """Piecewise linear through the knots, extended linearly beyond them."""
        t = np.asarray(t, np.float64)
        xp, yp = self.t_array, self.log_alpha
        i = np.clip(np.searchsorted(xp, t, side="right") - 1, 0, len(xp) - 2)
        return yp[i] + (t - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])

    def model_time(self, t: np.ndarray) -> np.ndarray:
        """``get_model_input_time``: (t - 1/N) * 1000, in float32 as the WebUI's tensors."""
        return _f32(_f32(np.asarray(t, np.float32) - np.float32(1 / self.total_n))
                    * np.float32(1000))


def run_times(ns: NoiseScheduleVP, steps: int, t_start: float | None) -> np.ndarray:
    """``get_time_steps('time_uniform', t_T, t_0, steps)``: (steps + 1) float32 times."""
    t_T = 1.0 if t_start is None else float(t_start)
    return torch_linspace_f32(t_T, 1.0 / ns.total_n, steps + 1)


def img2img_start(timesteps: np.ndarray) -> float:
    """``timesteps[-1] / 1000 + 1 / 1000`` as the WebUI's float32 tensors compute it."""
    return float(_f32(_f32(np.float32(timesteps[-1]) / np.float32(1000)) + np.float32(0.001)))


def _bh1(lam: np.ndarray, alpha: np.ndarray, k: int, order: int):
    """``multistep_uni_pc_bh_update`` (bh1, data prediction) to time index k at ``order``:
    (the coefficient of the previous corrected x, the predictor's and the corrector's
    coefficients of the data predictions {time index: coefficient}, m_k included in the
    corrector's)."""
    h = lam[k] - lam[k - 1]
    rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, order)] + [1.0]
    rks_a = np.asarray(rks)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh  # bh1
    rows, b, fact = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks_a ** (i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    r, b = np.stack(rows), np.asarray(b)
    base = {k - 1: -alpha[k] * h_phi_1}
    pred, corr = dict(base), dict(base)

    def add(coefs, rhos):  # - alpha_k B_h sum_i rho_i (m_{k-1-i} - m_{k-1}) / rk_i
        for i in range(1, len(rhos) + 1):
            c = -alpha[k] * b_h * rhos[i - 1] / rks[i - 1]
            coefs[k - 1 - i] = coefs.get(k - 1 - i, 0.0) + c
            coefs[k - 1] -= c

    if order >= 2:
        add(pred, [0.5] if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1]))
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
    add(corr, rhos_c[:-1])
    c = -alpha[k] * b_h * rhos_c[-1]  # rho_c[-1] (m_k - m_{k-1})
    corr[k] = c
    corr[k - 1] -= c
    sigma = np.sqrt(1 - alpha ** 2)
    return sigma[k] / sigma[k - 1], pred, corr


def step_orders(steps: int) -> list[int]:
    """The order of each step 1..steps: ``init_order`` for the first order - 1, then
    ``min(order, steps + 1 - step)`` (lower_order_final). A run shorter than the order (the
    WebUI asserts) runs at the orders it has."""
    return [k if k < ORDER else min(ORDER, steps + 1 - k) for k in range(1, steps + 1)]


def build(table, ns: NoiseScheduleVP, sqrt_ac: tuple[np.ndarray, np.ndarray], steps: int,
          t_start: float | None) -> dict:
    """Fill ``table`` (a ``webui._Table(MEMORY)``) with a UniPC run of ``steps`` steps and
    return the per-evaluation arrays: ``t`` (the UNet's float32 timesteps), ``div`` (1 /
    alpha_t), ``sigma`` (the VE sigma), ``v`` (the v-prediction coefficients of the
    denoised estimate: the WebUI converts v to eps with ``sqrt_alphas_cumprod`` at the
    truncated timestep, then takes x0 with the interpolated alpha_t), and ``alpha0``."""
    ts = run_times(ns, steps, t_start)
    la = ns.log_alpha_t(ts.astype(np.float64))
    alpha = np.exp(la)
    lam = la - 0.5 * np.log(-np.expm1(2 * la))
    sigma = np.sqrt(-np.expm1(2 * la))
    orders = step_orders(steps)
    upd = [_bh1(lam, alpha, k, orders[k - 1]) for k in range(1, steps + 1)]
    for j in range(steps):  # evaluation j at ts[j]: x = predicted x_j / alpha_j, D = m_j
        cx, pred, _ = upd[j]  # the prediction of x_{j+1}
        terms = dict(pred)
        if j >= 1:  # corrected x_j = predicted x_j + (corrector - predictor)(m)
            _, p_j, c_j = upd[j - 1]
            for idx in set(p_j) | set(c_j):
                terms[idx] = terms.get(idx, 0.0) + cx * (c_j.get(idx, 0.0) - p_j.get(idx, 0.0))
        out = 1.0 / alpha[j + 1] if j + 1 < steps else 1.0
        b = [0.0] * MEMORY
        for idx, c in terms.items():
            if idx < j:
                b[j - 1 - idx] += out * c
        table.add(float(sigma[j] / alpha[j]), x=out * cx * alpha[j],
                  d=out * terms.get(j, 0.0), b=tuple(b),
                  mem=[(0, 1, ()), (0, 0, (1, 0, 0)), (0, 0, (0, 1, 0))])
    t_in = ns.model_time(ts[:steps])
    idx = t_in.astype(np.int64)  # t.to(torch.int)
    sa, s1a = sqrt_ac[0][idx], sqrt_ac[1][idx]
    s, a = sigma[:steps], alpha[:steps]
    v = np.stack([-s * sa / a, 1 / (1 - s * s1a)], axis=1)
    return dict(t=t_in, div=_f32(1 / a), sigma=_f32(s / a), v=_f32(v), alpha0=float(alpha[0]))
