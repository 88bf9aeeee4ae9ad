"""The WebUI's k-diffusion samplers ("Euler a", "DPM++ 2M", ...) as pure JAX steps of the one
sampling loop, over the WebUI's denoiser (k-diffusion's ``CompVisDenoiser`` /
``CompVisVDenoiser``).

The denoiser: the model runs at the fractional timestep ``sigma_to_t(sigma)`` on
``x / sqrt(sigma**2 + 1)`` and its output becomes the denoised estimate (``x - sigma * eps``, or
for v-prediction ``c_skip * x + c_out * v``); txt2img starts from noise * sigmas[0], img2img
from image + noise * the start sigma. Classifier-free guidance is linear in the model output,
so the loop's combination of the outputs equals the WebUI's ``CFGDenoiser`` combination of the
denoised estimates (to float rounding).

Every sampler here is, per model evaluation, a linear map of (the sample x, the denoised
estimate D, a few remembered tensors B_k, fresh noise N) with scalar coefficients that depend
only on the sigma schedule:

    x'   = a_x x + a_d D + sum_k a_k B_k + a_n N
    B'_j = m_jx x + m_jd D + sum_k m_jk B_k

so each sampler is a host-side table builder (numpy, from k-diffusion's ``sample_*`` written
out step by step) and one shared step function. Second-order samplers take two loop
evaluations per step (the second one at the intermediate sigma, with the predicted sample);
multistep samplers remember past denoised estimates or derivatives in B.

Per-step noise (the ancestral and SDE samplers) comes from one hook, :func:`step_noise`, or,
with the WebUI's noise sources (``rng="nv"|"cpu"``), from the loop (``step(noise=...)``,
drawn by ``sdjax.step_noise`` from the WebUI's per-image generators).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import sigmas as sig
from sdjax.schedulers import webui_restart as restart
from sdjax.schedulers import webui_sigmas as ws
from sdjax.schedulers.common import check_steps, normal_like, start_index, torch_linspace_f32
from sdjax.schedulers.start import strength_for_start


def step_noise(key: jax.Array | None, draw: jax.Array, like: jax.Array) -> jax.Array:
    """THE per-step noise hook of the WebUI samplers: standard normal float32 noise shaped like
    ``like`` (the (B, h, w, C) sample) for the sampler's ``draw``-th noise draw of the run
    (k-diffusion's noise_sampler / ``randn_like`` calls, counted from 0 in the WebUI's order:
    one per step for the ancestral samplers, two per step for DPM++ SDE). ``key`` is the
    loop's per-image key of this evaluation (a batch of keys, one per image). With
    ``rng="nv"|"cpu"`` the loop passes the WebUI generators' draw ``state.draw[i]`` to
    :meth:`WebUISampler.step` as ``noise`` instead (``sdjax.step_noise``)."""
    del draw  # the loop's keys are already distinct per evaluation
    return normal_like(key, like)


def _anc(s_from: float, s_to: float, eta: float) -> tuple[float, float]:
    """k-diffusion's ``get_ancestral_step``: (sigma_down, sigma_up)."""
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
    return (s_to ** 2 - up ** 2) ** 0.5, up


class _Table:
    """Rows of per-evaluation coefficients; columns of the update are [x, D, B_0.., N]."""

    def __init__(self, k: int, model: Any = None, img2img: bool = False):
        self.k = k
        self.model, self.img2img = model, img2img  # the model's sigmas; an img2img run
        self.sigma: list[float] = []
        self.upd: list[np.ndarray] = []
        self.mem: list[np.ndarray] = []
        self.draw: list[int] = []
        self.draws = 0

    def add(self, sigma: float, x: float = 0.0, d: float = 0.0, b=(), noise: float = 0.0,
            mem=None) -> None:
        """One evaluation at ``sigma``: x' = x*X + d*D + b.B + noise*N; ``mem`` is a list of
        (x, d, b) rows for the new B (None: B unchanged)."""
        k = self.k
        upd = np.zeros(3 + k)
        upd[0], upd[1], upd[-1] = x, d, noise
        upd[2:2 + len(b)] = b
        m = np.zeros((k, 2 + k))
        if mem is None:
            m[:, 2:] = np.eye(k)
        else:
            for j, (mx, md, mb) in enumerate(mem):
                m[j, 0], m[j, 1] = mx, md
                m[j, 2:2 + len(mb)] = mb
        self.sigma.append(sigma)
        self.upd.append(upd)
        self.mem.append(m)
        self.draw.append(self.draws if noise else -1)
        if noise:
            self.draws += 1


def _euler(t: _Table, s: float, to: float) -> None:
    # x + (x - D) / s * (to - s)
    r = (to - s) / s
    t.add(s, x=1 + r, d=-r)


def _table_euler(t, sig_, o):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        _euler(t, s, to)


def _table_euler_a(t, sig_, o):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        down, up = _anc(s, to, o.eta)
        r = (down - s) / s
        t.add(s, x=1 + r, d=-r, noise=o.s_noise * up if to > 0 else 0.0)


def _table_heun(t, sig_, o):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        restart.heun_step(t, s, to)


def _mid(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


def _dpm_2_step(t, s: float, to: float, noise: float = 0.0) -> None:
    """DPM2's two evaluations from ``s`` to ``to`` (through their log-midpoint), ``noise``
    added after the second (DPM2 a's ancestral part)."""
    mid = _mid(s, to)
    dt1, dt2 = mid - s, to - s
    t.add(s, x=1 + dt1 / s, d=-dt1 / s, mem=[(1, 0, ())])
    t.add(mid, x=dt2 / mid, d=-dt2 / mid, b=(1,), noise=noise)


def _table_dpm_2(t, sig_, o):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        if to == 0:
            _euler(t, s, to)
        else:
            _dpm_2_step(t, s, to)


def _table_dpm_2_a(t, sig_, o):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        down, up = _anc(s, to, o.eta)
        if down == 0:
            _euler(t, s, down)
        else:
            _dpm_2_step(t, s, down, noise=o.s_noise * up)


def _table_dpmpp_2s_a(t, sig_, o):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        down, up = _anc(s, to, o.eta)
        noise = o.s_noise * up if to > 0 else 0.0
        if down == 0:
            r = (down - s) / s
            t.add(s, x=1 + r, d=-r, noise=noise)
            continue
        lt, lt_next = -math.log(s), -math.log(down)
        h = lt_next - lt
        ls = lt + h / 2
        s_mid = math.exp(-ls)
        t.add(s, x=s_mid / s, d=-math.expm1(-h / 2), mem=[(1, 0, ())])
        t.add(s_mid, d=-math.expm1(-h), b=(down / s,), noise=noise)


def _table_dpmpp_sde(t, sig_, o, r=0.5):
    for s, to in zip(sig_[:-1], sig_[1:], strict=True):
        if to == 0:
            _euler(t, s, to)
            continue
        lt, lt_next = -math.log(s), -math.log(to)
        h = lt_next - lt
        s_mid = math.exp(-(lt + h * r))
        fac = 1 / (2 * r)
        d1, u1 = _anc(s, s_mid, o.eta)
        # x2 = (d1 / s) x - expm1(log(d1 / s)) D + u1 N; remember x and D
        t.add(s, x=d1 / s, d=-math.expm1(math.log(d1 / s)), noise=o.s_noise * u1,
              mem=[(1, 0, ()), (0, 1, ())])
        d2, u2 = _anc(s, to, o.eta)
        c = -math.expm1(math.log(d2 / s))
        t.add(s_mid, d=c * fac, b=(d2 / s, c * (1 - fac)), noise=o.s_noise * u2)


def _table_dpmpp_2m(t, sig_, o):
    for i, (s, to) in enumerate(zip(sig_[:-1], sig_[1:], strict=True)):
        keep = [(0, 1, ())]
        if to == 0:
            t.add(s, d=1.0, mem=keep)
            continue
        h = math.log(s / to)
        a, b = to / s, -math.expm1(-h)
        if i == 0:
            t.add(s, x=a, d=b, mem=keep)
            continue
        rr = math.log(sig_[i - 1] / s) / h
        t.add(s, x=a, d=b * (1 + 1 / (2 * rr)), b=(-b / (2 * rr),), mem=keep)


def _table_dpmpp_2m_sde(t, sig_, o):
    h_last = None
    for i, (s, to) in enumerate(zip(sig_[:-1], sig_[1:], strict=True)):
        keep = [(0, 1, ())]
        if to == 0:
            t.add(s, d=1.0, mem=keep)
            continue
        h = math.log(s / to)
        eta_h = o.eta * h
        c = -math.expm1(-h - eta_h)
        x_c, d_c, b_c = to / s * math.exp(-eta_h), c, 0.0
        if i > 0:  # midpoint
            k = 0.5 * c * (h / h_last)
            d_c, b_c = d_c + k, -k
        noise = to * math.sqrt(-math.expm1(-2 * eta_h)) * o.s_noise if o.eta else 0.0
        t.add(s, x=x_c, d=d_c, b=(b_c,), noise=noise, mem=keep)
        h_last = h


def _table_dpmpp_3m_sde(t, sig_, o):
    hs: list[float] = []  # h of the previous steps, newest first
    for i, (s, to) in enumerate(zip(sig_[:-1], sig_[1:], strict=True)):
        mem = [(0, 1, ()), (0, 0, (1, 0))]  # B0 = D, B1 = old B0
        if to == 0:
            t.add(s, d=1.0, mem=mem)
            continue
        h = math.log(s / to)
        h_eta = h * (o.eta + 1)
        coef = np.zeros(3)  # of D, B0, B1
        x_c, coef[0] = math.exp(-h_eta), -math.expm1(-h_eta)
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if i >= 2:
            r0, r1 = hs[0] / h, hs[1] / h
            d1_0 = np.array([1 / r0, -1 / r0, 0])
            diff = d1_0 - np.array([0, 1 / r1, -1 / r1])
            d1 = d1_0 + diff * r0 / (r0 + r1)
            d2 = diff / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            coef += phi_2 * d1 - phi_3 * d2
        elif i == 1:
            r = hs[0] / h
            coef += phi_2 * np.array([1 / r, -1 / r, 0])
        noise = to * math.sqrt(-math.expm1(-2 * h * o.eta)) * o.s_noise if o.eta else 0.0
        t.add(s, x=x_c, d=coef[0], b=tuple(coef[1:]), noise=noise, mem=mem)
        hs.insert(0, h)


def _lms_coeff(order: int, ts: np.ndarray, i: int, j: int) -> float:
    """k-diffusion's ``linear_multistep_coeff``: the integral over [t_i, t_i+1] of the
    Lagrange basis polynomial j (exact here; k-diffusion's quadrature is exact to 1e-4)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-ts[i - k], 1.0]) / (ts[i - j] - ts[i - k])
    anti = poly.integ()
    return float(anti(ts[i + 1]) - anti(ts[i]))


def _table_lms(t, sig_, o, order=4):
    ts = np.asarray(sig_, np.float64)
    for i, s in enumerate(sig_[:-1]):
        cur = min(i + 1, order)
        c = [_lms_coeff(cur, ts, i, j) for j in range(cur)]
        # d = (x - D) / s is the newest derivative; B holds the older ones, newest first
        mem = [(1 / s, -1 / s, ())] + [(0, 0, tuple(np.eye(order - 1)[k - 1]) + (0,))
                                       for k in range(1, order)]
        t.add(s, x=1 + c[0] / s, d=-c[0] / s, b=tuple(c[1:]), mem=mem)


def _dpm_solver_step(t, order: int, tt: float, tn: float, noise: float) -> None:
    """k-diffusion's ``dpm_solver_{1,2,3}_step`` from log-time ``tt`` to ``tn`` (t = -log
    sigma; eps = (x - D) / sigma), ``noise`` added after its last evaluation. B0 holds the
    step's x, B1 its first eps."""
    sg = lambda v: math.exp(-v)  # noqa: E731
    h = tn - tt
    s0, sn, e = sg(tt), sg(tn), math.expm1(h)
    keep = [(1, 0, ()), (1 / s0, -1 / s0, ())]
    if order == 1:
        t.add(s0, x=1 - sn * e / s0, d=sn * e / s0, noise=noise)
        return
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = sg(tt + r1 * h)
    c1 = s1 * math.expm1(r1 * h)
    t.add(s0, x=1 - c1 / s0, d=c1 / s0, mem=keep)  # u1
    if order == 2:  # x - sn E eps - sn / (2 r1) E (eps_r1 - eps)
        k = sn * e / (2 * r1)
        t.add(s1, x=-k / s1, d=k / s1, b=(1, -sn * e + k), noise=noise)
        return
    r2 = 2 / 3
    s2 = sg(tt + r2 * h)
    k1 = s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
    t.add(s1, x=-k1 / s1, d=k1 / s1, b=(1, -s2 * math.expm1(r2 * h) + k1))  # u2
    k2 = sn / r2 * (e / h - 1)
    t.add(s2, x=-k2 / s2, d=k2 / s2, b=(1, -sn * e + k2), noise=noise)


def _table_dpm_fast(t, sig_, o):
    """k-diffusion's ``sample_dpm_fast`` (DPM-Solver-Fast) over the WebUI's arguments: from
    the model's sigma_max to sigma_min in txt2img, the schedule's start sigma to its last
    nonzero one in img2img (the WebUI's), as many evaluations as steps (orders 3, ..., then
    2, 1 or the remainder), equal steps in log sigma (float32, as torch's linspace)."""
    if t.img2img:
        hi, lo = sig_[0], sig_[-2]
    else:
        hi, lo = t.model.sigma_max, t.model.sigma_min
    nfe = len(sig_) - 1
    m = nfe // 3 + 1
    ts = [float(v) for v in torch_linspace_f32(-np.log(np.float32(hi)),
                                               -np.log(np.float32(lo)), m + 1)]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        tt, tn = ts[i], ts[i + 1]
        if o.eta:
            down, up = _anc(math.exp(-tt), math.exp(-tn), o.eta)
            tn_ = min(ts[-1], -math.log(down))
            up = math.sqrt(max(math.exp(-2 * tn) - math.exp(-2 * tn_), 0.0))
        else:
            tn_, up = tn, 0.0
        _dpm_solver_step(t, order, tt, tn_, o.s_noise * up)


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    build: Any
    memory: int  # remembered tensors
    scheduler: str | None = None  # "Automatic" resolves to this schedule type (None: Uniform)
    discard_next_to_last_sigma: bool = False
    eta: bool = False  # takes the WebUI's eta (its "Eta for ancestral samplers")
    draws: bool = False  # draws noise whatever the eta (Restart: scaled by s_noise)


SAMPLERS: dict[str, SamplerInfo] = {
    "Euler": SamplerInfo(_table_euler, 1),
    "Euler a": SamplerInfo(_table_euler_a, 1, eta=True),
    "DPM++ 2M": SamplerInfo(_table_dpmpp_2m, 1, "Karras"),
    "Heun": SamplerInfo(_table_heun, 2),
    "DPM2": SamplerInfo(_table_dpm_2, 1, "Karras", discard_next_to_last_sigma=True),
    "DPM2 a": SamplerInfo(_table_dpm_2_a, 1, "Karras", discard_next_to_last_sigma=True,
                          eta=True),
    "DPM++ 2S a": SamplerInfo(_table_dpmpp_2s_a, 1, "Karras", eta=True),
    "LMS": SamplerInfo(_table_lms, 4),
    "DPM++ SDE": SamplerInfo(_table_dpmpp_sde, 2, "Karras", eta=True),
    "DPM++ 2M SDE": SamplerInfo(_table_dpmpp_2m_sde, 1, "Exponential", eta=True),
    "DPM++ 3M SDE": SamplerInfo(_table_dpmpp_3m_sde, 2, "Exponential",
                                discard_next_to_last_sigma=True, eta=True),
    "DPM fast": SamplerInfo(_table_dpm_fast, 2, eta=True),
    "Restart": SamplerInfo(restart.table_restart, 2, "Karras", draws=True),
}
WEBUI_SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
# The WebUI's aliases (k-diffusion function names) of each sampler.
ALIASES: dict[str, tuple[str, ...]] = {
    "Euler": ("k_euler",), "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "DPM++ 2M": ("k_dpmpp_2m",), "Heun": ("k_heun",), "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",), "DPM++ 2S a": ("k_dpmpp_2s_a",), "LMS": ("k_lms",),
    "DPM++ SDE": ("k_dpmpp_sde",), "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",), "DPM fast": ("k_dpm_fast",),
    "Restart": ("restart",),
}
# The WebUI's samplers that cannot run as a fixed number of loop evaluations.
NOT_FIXED_STEP: dict[str, str] = {
    "DPM adaptive": "an adaptive-step solver (its number of UNet evaluations depends on the "
                    "image), which sdjax's fixed-count compiled loop cannot run",
}


def resolve_schedule(sampler: str, schedule_type: str | None) -> str:
    """The schedule type a sampler runs: "Automatic" is the sampler's own default (WebUI 1.9
    on), Uniform for samplers without one."""
    label = ws.schedule_type_label(schedule_type)
    if label == "Automatic":
        return SAMPLERS[sampler].scheduler or "Uniform"
    return label


def infotext_schedule(sampler: str, schedule_type: str | None) -> str | None:
    """What the WebUI's infotext says after ``Schedule type:`` for a sampler (None: not one
    of its k-diffusion samplers): the schedule it ran, "Automatic" where that is the model's
    own (a sampler without a default schedule)."""
    if sampler not in SAMPLERS:
        return None
    label = ws.schedule_type_label(schedule_type)
    if label == "Automatic" and SAMPLERS[sampler].scheduler is None:
        return label
    return resolve_schedule(sampler, label)


@flax.struct.dataclass
class WebUIState:
    timesteps: jax.Array  # (M,) float32 fractional training timesteps (sigma_to_t)
    init_sigma: jax.Array  # sigmas[0]: txt2img's noise scale
    start_coefs: jax.Array  # (2,) img2img: image * 1 + noise * the start sigma
    input_div: jax.Array  # (M,) sqrt(sigma**2 + 1)
    sigma: jax.Array  # (M,)
    v: jax.Array  # (M, 2)
    upd: jax.Array  # (M, 3 + K) coefficients of [x, D, B_0..B_K-1, N] in the new x
    mem: jax.Array  # (M, K, 2 + K) coefficients of [x, D, B] in the new B
    draw: jax.Array  # (M,) int32: the noise draw of each evaluation (-1: none)
    memory: jax.Array  # (K, *shape) float32 (empty placeholder without a sample shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebUISampler(sig.SigmaScheduler):
    """A WebUI sampler (``sampler``, one of :data:`WEBUI_SAMPLER_NAMES`) on a schedule type
    (``schedule_type``), with the WebUI's ``eta`` and ``s_noise`` and its img2img rule."""

    sampler: str
    schedule_type: str
    eta: float
    s_noise: float
    sdxl: bool  # "Align Your Steps" has an SDXL table

    name: ClassVar[str] = "webui"
    known: ClassVar[dict[str, Any]] = SAMPLERS  # the sampler names this class runs
    blends_denoised: ClassVar[bool] = True  # inpainting the WebUI's way (its CFGDenoiser)
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    defaults: ClassVar[dict[str, Any]] = {
        **sig.SIGMA_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": False,
        "sampler": "Euler", "schedule_type": "Automatic", "eta": 1.0, "s_noise": 1.0,
        "sdxl": False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in self.known:
            raise ValueError(f"unknown WebUI sampler {self.sampler!r}; choose one of "
                             f"{', '.join(self.known)}")
        object.__setattr__(self, "schedule_type", ws.schedule_type_label(self.schedule_type))

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return (self.info.eta and self.eta != 0) or (self.info.draws and self.s_noise != 0)

    @property
    def needs_uncond(self) -> bool:
        """Whether :meth:`step` takes the unconditional prediction apart (``uncond=``): the
        loop then always runs the unconditional pass (DDIM CFG++)."""
        return False

    @property
    def uncond_scale(self) -> float:
        """With ``needs_uncond``: the factor of the guidance (the denoised estimate is
        uncond + uncond_scale * (guided - uncond))."""
        return 1.0

    @property
    def info(self) -> SamplerInfo:
        return SAMPLERS[self.sampler]

    @property
    def denoiser_prediction(self) -> str:
        """What the WebUI's denoiser takes the UNet's output to be."""
        return self.prediction_type

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2 if self.sampler in ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE",
                                     "Restart") else 1

    @property
    def resolved_schedule(self) -> str:
        return resolve_schedule(self.sampler, self.schedule_type)

    @property
    def model_sigmas(self) -> ws.ModelSigmas:
        return ws.ModelSigmas.from_schedule(self.schedule)

    def sigmas(self, steps: int) -> np.ndarray:
        """The (steps + 1) float32 sigmas of the WebUI's ``get_sigmas`` for this sampler."""
        return ws.schedule_sigmas(self.resolved_schedule, steps, self.model_sigmas,
                                  sdxl=self.sdxl,
                                  discard_next_to_last=self.info.discard_next_to_last_sigma)

    @staticmethod
    def webui_start(steps: int, strength: float, *, fix_steps: bool = False) -> tuple[int, int]:
        """The WebUI's img2img steps rule (``setup_img2img_steps``): (the steps of the
        schedule, the step to start at). By default (the WebUI's "With img2img, do exactly
        the amount of steps the slider specifies" off) the schedule has ``steps`` steps and
        ``int(min(strength, 0.999) * steps) + 1`` of them run; with ``fix_steps`` the schedule
        has ``int(steps / min(strength, 0.999))`` steps and the last ``steps`` run."""
        s = min(float(strength), 0.999)
        if fix_steps:
            total = int(steps / s) if s > 0 else 0
            return total, total - steps
        t_enc = int(s * steps)
        return steps, steps - t_enc - 1

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0, *,
                      sample_shape: tuple[int, ...] | None = None,
                      img2img: bool = False) -> WebUIState:
        """The state of a run from step ``start_index(n, strength)`` of the n-step schedule
        (how sdjax.schedulers.start encodes a start step; the WebUI's own rule for strength
        is :meth:`webui_start`); ``img2img``: an img2img run (DPM fast's end points differ
        from txt2img's at the same start)."""
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        sigmas = self.sigmas(n).astype(np.float64)
        begin = start_index(n, strength)
        run = sigmas[begin:]
        info = self.info
        table = _Table(info.memory, self.model_sigmas, img2img or begin > 0)
        info.build(table, [float(s) for s in run], self)
        s_eval = np.asarray(table.sigma, np.float32)
        m = len(s_eval)
        shape = (info.memory, *(sample_shape if sample_shape is not None else (0,)))
        return WebUIState(
            timesteps=jnp.asarray(self.model_sigmas.sigma_to_t(s_eval)),
            init_sigma=jnp.asarray(np.float32(sigmas[0])),
            start_coefs=jnp.asarray(np.array([1.0, run[0]], np.float32)),
            input_div=jnp.asarray(sig.input_div(s_eval)),
            sigma=jnp.asarray(s_eval),
            v=jnp.asarray(sig.v_coefs(s_eval)),
            upd=jnp.asarray(np.asarray(table.upd, np.float32).reshape(m, -1)),
            mem=jnp.asarray(np.asarray(table.mem, np.float32).reshape(m, info.memory, -1)),
            draw=jnp.asarray(np.asarray(table.draw, np.int32)),
            memory=jnp.zeros(shape, jnp.float32),
        )

    def img2img_state(self, steps: int, begin: int) -> WebUIState:
        """The img2img run that starts at step ``begin`` (``start_table``'s hook: for DPM
        fast, DDIM and PLMS it differs from txt2img's at the same start)."""
        return self.set_timesteps(steps, strength_for_start(steps, begin), img2img=True)

    @property
    def inpaint_blend(self) -> str:
        """Where the WebUI's inpainting puts the image's latents back outside the mask at
        every evaluation: "denoised" (the k-diffusion samplers: ``CFGDenoiser`` blends the
        denoised estimate), "input" (its timesteps samplers: the sample before the UNet,
        ``mask_before_denoising``) or "output" (LCM: its denoiser's consistency-scaled
        output)."""
        return "denoised"

    def blend_input(self, state: WebUIState, i: jax.Array, sample: jax.Array,
                    blend: tuple[jax.Array, jax.Array]) -> jax.Array:
        """The sample the UNet sees (before ``scale_model_input``) when inpainting: with
        "input" blending the image's clean latents outside the mask, in the loop's scale
        (the UNet's input times ``input_div``); else ``sample`` itself."""
        if self.inpaint_blend != "input":
            return sample
        image, repaint = blend
        x = sample.astype(jnp.float32)
        return repaint * x + (1 - repaint) * (image.astype(jnp.float32) * state.input_div[i])

    def step(self, state: WebUIState, i: jax.Array, model_output: jax.Array,
             sample: jax.Array, key: jax.Array | None = None, *,
             noise: jax.Array | None = None,
             blend: tuple[jax.Array, jax.Array] | None = None,
             uncond: jax.Array | None = None) -> tuple[jax.Array, WebUIState]:
        """One evaluation's update. ``noise`` replaces the hook's draw; ``blend`` = (clean
        image latents, repaint mask): the WebUI's inpainting, as :attr:`inpaint_blend` says
        (``init_latent * mask + nmask * ...``; with "input" the UNet saw
        :meth:`blend_input`'s sample, and the step, as the WebUI's, still moves the
        unblended sample by the eps that UNet output means); ``uncond`` (samplers that
        ``needs_uncond``): the unconditional model output, whose denoised estimate becomes B0
        and scales the guidance by ``uncond_scale``."""
        x = sample.astype(jnp.float32)
        memory = state.memory
        if memory.shape[1:] != x.shape:
            if memory.shape[1:] != (0,):
                raise ValueError(f"the state was built for samples {memory.shape[1:]}, "
                                 f"not {x.shape}")
            memory = jnp.zeros((memory.shape[0], *x.shape), jnp.float32)
        mode = None if blend is None else self.inpaint_blend
        seen = x if mode != "input" else self.blend_input(state, i, x, blend)
        den = sig.x0_from_sigma(self.denoiser_prediction, model_output.astype(jnp.float32),
                                seen, state.sigma[i], state.v[i])
        if uncond is not None:
            den_u = sig.x0_from_sigma(self.denoiser_prediction, uncond.astype(jnp.float32),
                                      seen, state.sigma[i], state.v[i])
            den = den_u + self.uncond_scale * (den - den_u)
            memory = memory.at[0].set(den_u + (x - seen))
        if mode == "input":
            # the WebUI's eps of the blended input, applied to the sample: x - sigma * eps
            den = den + (x - seen)
        elif mode == "denoised":
            image, repaint = blend
            den = image.astype(jnp.float32) * (1 - repaint) + repaint * den
        terms = jnp.concatenate([x[None], den[None], memory], axis=0)
        upd = state.upd[i]
        new = jnp.tensordot(upd[:-1], terms, axes=1)
        if mode == "output":
            image, repaint = blend
            new = image.astype(jnp.float32) * (1 - repaint) + repaint * new
        if noise is None and key is not None:
            noise = step_noise(key, state.draw[i], x)
        if noise is not None:
            new = new + upd[-1] * noise.astype(jnp.float32)
        memory = jnp.tensordot(state.mem[i], terms, axes=1)
        return new.astype(sample.dtype), state.replace(memory=memory)
