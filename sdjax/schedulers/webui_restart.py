"""The WebUI's Heun step and its Restart sampler (``modules/sd_samplers_extra.py``'s
``restart_sampler``) as rows of the WebUI samplers' coefficient table
(``sdjax.schedulers.webui._Table``: x' = a_x x + a_d D + sum_k a_k B_k + a_n N per evaluation).

Restart is Heun's method (Euler on the step to 0) over a list of sigma pairs that, from 20
steps on, goes back up at a sigma near 0.1 to one near 2 and down again, with fresh noise at
each jump up (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"). The
noise is k-diffusion's ``torch.randn_like``, which the WebUI routes to its per-image
generators, so it is drawn as the ancestral samplers' (one draw per jump).
"""

from __future__ import annotations

import numpy as np

from sdjax.schedulers import webui_sigmas as ws


def heun_step(t, s: float, to: float, noise: float = 0.0) -> None:
    """Heun's two evaluations from ``s`` to ``to`` (Euler's one to 0), ``noise`` added
    after the last."""
    dt = to - s
    if to == 0:
        r = dt / s
        t.add(s, x=1 + r, d=-r, noise=noise)
        return
    # predictor: B0 = x, B1 = d = (x - D) / s; x2 = x + d dt
    t.add(s, x=1 + dt / s, d=-dt / s, mem=[(1, 0, ()), (1 / s, -1 / s, ())])
    # corrector at `to`: x = B0 + dt (B1 + (x2 - D2) / to) / 2
    t.add(to, x=dt / (2 * to), d=-dt / (2 * to), b=(1, dt / 2), noise=noise)



def _nearest(sigmas: np.ndarray, value: float) -> int:
    """``int(torch.argmin(abs(sigmas - value)))`` over float32 sigmas (the first of ties)."""
    return int(np.argmin(np.abs(sigmas - np.float32(value))))


def restart_steps(sig_: list[float]) -> list[tuple[float, float]]:
    """The (from, to) sigma pairs of the WebUI's ``restart_sampler`` (``sd_samplers_extra``,
    Restart sampling, Xu et al. 2023) with its automatic restart list: under 20 steps the
    schedule itself; from 20, a Karras schedule of ``steps - restart_steps * restart_times``
    steps between the schedule's last nonzero and first sigma, and at the sigma nearest 0.1
    a restart back up to the one nearest 2, ``restart_times`` times (1 and 9 + 1 Karras
    points; from 36 steps 2 and steps // 4 + 1)."""
    steps = len(sig_) - 1
    sigmas = np.asarray(sig_, np.float32)
    restarts: dict[int, tuple[int, int, float]] = {}
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = ws.karras(steps - r_steps * r_times, None, float(sigmas[-2]),
                           float(sigmas[0])).astype(np.float32)
        restarts = {_nearest(sigmas, 0.1): (r_steps + 1, r_times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 in restarts:
            r_steps, r_times, r_max = restarts[i + 1]
            lo_i, hi_i = i + 1, _nearest(sigmas, r_max)
            if hi_i < lo_i:
                up = ws.karras(r_steps, None, float(sigmas[lo_i]), float(sigmas[hi_i]))[:-1]
                pairs += ([(float(a), float(b)) for a, b in zip(up[:-1], up[1:], strict=True)]
                          * r_times)
    return pairs


def table_restart(t, sig_, o):
    """Heun (Euler to 0) over :func:`restart_steps`; where a pair starts above the last
    one's end, fresh noise x s_noise x sqrt(from^2 - end^2) is added before it (here: after
    the previous evaluation, as its noise)."""
    pairs = restart_steps(sig_)
    for n, (s, to) in enumerate(pairs):
        nxt = pairs[n + 1][0] if n + 1 < len(pairs) else None
        jump = 0.0
        if nxt is not None and to < nxt:
            f32 = np.float32
            jump = float(f32(o.s_noise) * np.sqrt(f32(nxt) ** 2 - f32(to) ** 2))
        heun_step(t, s, to, noise=jump)
