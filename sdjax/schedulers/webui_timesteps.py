"""The WebUI's own DDIM, PLMS and LCM samplers (and UniPC, ``webui_unipc``) as steps of the
one sampling loop.

The WebUI runs DDIM and PLMS over integer timesteps (``modules/sd_samplers_timesteps.py`` and
``sd_samplers_timesteps_impl.py``, not k-diffusion): the timesteps ``range(0, 1000, 1000 //
steps) + 1``, the UNet on the sample itself (variance preserving: ``x = sqrt(a) x0 + sqrt(1 -
a) eps``) at each of them from the last down to the second, each step moving the sample to
the next lower timestep's ``alphas_cumprod`` (so the last step ends at timestep 1's noise
level, not 0, and a schedule of n timesteps makes n - 1 steps). LCM is a k-diffusion-style
sampler (``modules/sd_samplers_lcm.py``) over its own denoiser: 50 of the model's sigmas
(every 20th timestep from 19), the UNet at the nearest of those timesteps, the denoised
estimate mixed with the sample by LCM's consistency scalings, then fresh noise at the next
sigma.

Here, as for the k-diffusion samplers (``sdjax.schedulers.webui``), each evaluation is a linear
map of (x, the denoised estimate D, remembered tensors B, noise N). The loop's sample is kept
in the variance-exploding scale of the evaluation's timestep (``x / sqrt(a_t)``, so the UNet
input is ``x / input_div`` and D is the usual ``x - sigma * eps``) and the last evaluation
writes the WebUI's variance-preserving sample. img2img follows the WebUI's timesteps rule:
``t_enc = int(min(strength, 0.999) * steps)``, the image noised to timestep ``t_enc``'s level,
then the steps of the first ``t_enc`` timesteps (from timestep ``t_enc - 1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import sigmas as sig
from sdjax.schedulers import webui
from sdjax.schedulers import webui_sigmas as ws
from sdjax.schedulers import webui_unipc as unipc
from sdjax.schedulers.common import check_steps, start_index, torch_linspace_f32

# LCM's denoiser: its timesteps are every SKIP-th from SKIP - 1 (LCM's 50 original steps).
LCM_ORIGINAL_STEPS = 50


def webui_timesteps(steps: int) -> np.ndarray:
    """``CompVisSampler.get_timesteps``: ``range(0, 1000, 1000 // steps) + 1`` clipped."""
    return np.clip(np.arange(0, 1000, 1000 // steps) + 1, 0, 999)


@dataclasses.dataclass(frozen=True)
class _Run:
    """The evaluations of one DDIM/PLMS run: the WebUI's ``timesteps`` (the schedule it is
    given, ascending), their alphas_cumprod (float32, as the model holds them) and the
    previous timestep's (float64, as the WebUI casts them; index 0 takes timestep 0's)."""

    ts: np.ndarray
    alphas: np.ndarray
    prev: np.ndarray

    @classmethod
    def of(cls, ac: np.ndarray, ts: np.ndarray) -> _Run:
        prev_ts = np.concatenate([[0], ts[:-1]])
        return cls(ts, ac[ts].astype(np.float32), ac[prev_ts].astype(np.float32).astype(
            np.float64))

    def sigma(self, index: int) -> float:  # the VE sigma of timestep ts[index]
        a = float(self.alphas[index])
        return math.sqrt((1 - a) / a)

    def sigma_prev(self, index: int) -> float:
        a = float(self.prev[index])
        return math.sqrt((1 - a) / a)


class _Evals:
    """The rows of a run: the table of ``webui._Table`` plus each evaluation's timestep."""

    def __init__(self, k: int):
        self.table = webui._Table(k)
        self.t: list[float] = []

    def add(self, t: float, sigma: float, **kw) -> None:
        self.t.append(float(t))
        self.table.add(sigma, **kw)


def _ddim(ev: _Evals, run: _Run, eta: float, cfgpp: bool = False) -> None:
    """``ddim``: x' = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s N, with the WebUI's
    eta sigma s; written in the next evaluation's VE scale (the VP sample after the last).
    ``cfgpp`` (``ddim_cfgpp``): the direction term takes the unconditional eps, (x - B0) / s
    with B0 the unconditional denoised estimate, which the step writes (``uncond=``)."""
    n = len(run.ts)
    for index in range(n - 1, 0, -1):
        a_t, a_p = float(run.alphas[index]), float(run.prev[index])
        s = run.sigma(index)
        noise_sd = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        c = math.sqrt(1 - a_p - noise_sd ** 2)
        k = 1.0 if index == 1 else 1 / math.sqrt(a_p)  # to the next evaluation's scale
        noise = k * noise_sd if eta else 0.0
        if cfgpp:
            ev.add(run.ts[index], s, x=k * c / s, d=k * math.sqrt(a_p), b=(-k * c / s,),
                   noise=noise)
            continue
        # eps = (x - D) / s
        ev.add(run.ts[index], s, x=k * c / s, d=k * (math.sqrt(a_p) - c / s), noise=noise)


_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _plms(ev: _Evals, run: _Run) -> None:
    """``plms``: a pseudo improved Euler first step (two evaluations), then Adams-Bashforth
    over the remembered eps (B0..B2, newest first; B3 holds the first step's sample).
    x_prev = x + (sigma_prev - sigma) eps' in the VE scale."""
    n = len(run.ts)
    old = 0
    for index in range(n - 1, 0, -1):
        s, sp = run.sigma(index), run.sigma_prev(index)
        k = math.sqrt(float(run.prev[index])) if index == 1 else 1.0
        h = sp - s
        shift = [(1 / s, -1 / s, ()), (0, 0, (1, 0, 0, 0)), (0, 0, (0, 1, 0, 0)),
                 (0, 0, (0, 0, 0, 1))]  # B0 = this eps, B1 = old B0, B2 = old B1
        if old == 0:
            # eval 1: x2 = x + h eps (the next timestep's VE scale); B0 = eps, B3 = x
            ev.add(run.ts[index], s, x=1 + h / s, d=-h / s,
                   mem=[(1 / s, -1 / s, ()), (0, 0, ()), (0, 0, ()), (1, 0, ())])
            # eval 2 at the next timestep: eps' = (B0 + eps2) / 2; x = B3 + h eps'
            s2 = run.sigma(max(index - 1, 0))
            ev.add(run.ts[max(index - 1, 0)], s2, x=k * h / (2 * s2), d=-k * h / (2 * s2),
                   b=(k * h / 2, 0, 0, k))
        else:
            c = _AB[min(old + 1, 4)]
            ev.add(run.ts[index], s, x=k * (1 + h * c[0] / s), d=-k * h * c[0] / s,
                   b=tuple(k * h * cj for cj in c[1:]), mem=shift)
        old += 1


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


def lcm_sigmas(steps: int, m: ws.ModelSigmas) -> tuple[np.ndarray, np.ndarray]:
    """(LCM's ``get_sigmas(steps)``, its denoiser's 50 log sigmas): t from 999 to 19 evenly,
    each t's fractional index (t - 19) / 20 into the 50 sigmas, log-interpolated. Where a
    t falls halfway between two of LCM's timesteps, :func:`lcm_timestep` is decided by the
    float32 rounding of exp and log (so the WebUI's own choice there can differ by device);
    both are rounded correctly here (float64, then float32), which makes torch's CPU choice
    at every step count up to 198 but 99 and 197 (tests check 1-98)."""
    skip = 1000 // LCM_ORIGINAL_STEPS
    ls = _f32(np.log(m.sigmas[skip - 1::skip].astype(np.float64)))
    idx = np.clip((torch_linspace_f32(999, skip - 1, steps) - np.float32(skip - 1))
                  / np.float32(skip), 0, LCM_ORIGINAL_STEPS - 1).astype(np.float32)
    low, high = np.floor(idx).astype(np.int64), np.ceil(idx).astype(np.int64)
    w = idx - np.floor(idx)
    log_sigma = ((1 - w) * ls[low] + w * ls[high]).astype(np.float32)
    return np.concatenate([_f32(np.exp(log_sigma.astype(np.float64))), [0]]).astype(
        np.float32), ls


def lcm_timestep(sigma: float, log_sigmas: np.ndarray) -> int:
    """``LCMCompVisDenoiser.sigma_to_t``: the nearest of its 50 timesteps (in log sigma)."""
    skip = 1000 // LCM_ORIGINAL_STEPS
    near = int(np.abs(_f32(np.log(np.float64(np.float32(sigma)))) - log_sigmas).argmin())
    return near * skip + skip - 1


def _lcm(ev: _Evals, run_sigmas: list[float], log_sigmas: np.ndarray) -> None:
    """``sample_lcm`` over ``LCMCompVisDenoiser``: x' = c_skip x + c_out D (D = x - sigma
    eps, the UNet at the nearest LCM timestep; c_* of that timestep * 10), + sigma' N."""
    for s, to in zip(run_sigmas[:-1], run_sigmas[1:], strict=True):
        t = lcm_timestep(s, log_sigmas)
        ts = t * 10.0
        c_skip = 0.25 / (ts ** 2 + 0.25)
        c_out = ts / math.sqrt(ts ** 2 + 0.25)
        ev.add(t, s, x=c_skip, d=c_out, noise=to if to > 0 else 0.0)


TIMESTEP_SAMPLERS: dict[str, tuple[int, tuple[str, ...]]] = {  # name -> (memory, aliases)
    "DDIM": (1, ("ddim",)), "DDIM CFG++": (1, ("ddim_cfgpp",)), "PLMS": (4, ("plms",)),
    "LCM": (1, ("k_lcm",)), "UniPC": (0, ("unipc",)),  # UniPC's: its order
}
# DDIM CFG++ scales the guidance by this (the WebUI's cond_scale_miltiplier, mapping CFG
# scales 0..12.5 to 0..1).
CFGPP_SCALE = 1 / 12.5
# The WebUI's sampler options (Settings > Sampler parameters) these samplers read, under the
# WebUI's option names; the scheduler fields of the same names hold them.
OPTION_DEFAULTS: dict[str, Any] = {
    "eta_ddim": 0.0, "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform",
    "uni_pc_order": 3, "uni_pc_lower_order_final": True,
}
# Which sampler reads which option.
OPTION_SAMPLERS: dict[str, tuple[str, ...]] = {
    "eta_ddim": ("DDIM", "DDIM CFG++"), "uni_pc_variant": ("UniPC",),
    "uni_pc_skip_type": ("UniPC",), "uni_pc_order": ("UniPC",),
    "uni_pc_lower_order_final": ("UniPC",),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebUITimestepSampler(webui.WebUISampler):
    """The WebUI's DDIM, DDIM CFG++, PLMS, UniPC (its timesteps samplers) and LCM.
    ``eta_ddim`` is the WebUI's "Eta for DDIM" (default 0: deterministic; DDIM CFG++ reads
    it too); the ``uni_pc_*`` fields are its UniPC options (``webui_unipc.Options``); LCM
    draws fresh noise every step but the last. ``schedule_type`` is ignored by the
    timesteps samplers, as by the WebUI; LCM runs its own schedule (Automatic only)."""

    eta_ddim: float
    uni_pc_variant: str
    uni_pc_skip_type: str
    uni_pc_order: int
    uni_pc_lower_order_final: bool

    name: ClassVar[str] = "webui_timesteps"
    known: ClassVar[dict[str, Any]] = TIMESTEP_SAMPLERS
    defaults: ClassVar[dict[str, Any]] = {**webui.WebUISampler.defaults, **OPTION_DEFAULTS}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler == "LCM" and self.schedule_type != "Automatic":
            raise ValueError(f"the WebUI's LCM sampler runs its own schedule: schedule_type "
                             f"{self.schedule_type!r} is not supported (use Automatic)")
        self.unipc_options  # noqa: B018  (checks the UniPC options)

    @property
    def unipc_options(self) -> unipc.Options:
        return unipc.Options(self.uni_pc_variant, self.uni_pc_skip_type, self.uni_pc_order,
                             self.uni_pc_lower_order_final)

    @property
    def needs_uncond(self) -> bool:  # type: ignore[override]
        return self.sampler == "DDIM CFG++"

    @property
    def uncond_scale(self) -> float:  # type: ignore[override]
        return CFGPP_SCALE

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.sampler == "LCM" or (self.sampler in ("DDIM", "DDIM CFG++")
                                         and self.eta_ddim != 0)

    @property
    def order(self) -> int:  # type: ignore[override]
        return 1

    @property
    def denoiser_prediction(self) -> str:
        # LCM's denoiser takes the UNet's output as eps whatever the model predicts.
        return "epsilon" if self.sampler == "LCM" else self.prediction_type

    @property
    def inpaint_blend(self) -> str:  # type: ignore[override]
        # CFGDenoiserTimesteps masks before denoising; CFGDenoiserLCM blends its output.
        return "output" if self.sampler == "LCM" else "input"

    @property
    def memory(self) -> int:
        return self.uni_pc_order if self.sampler == "UniPC" else TIMESTEP_SAMPLERS[
            self.sampler][0]

    def _alphas(self) -> np.ndarray:
        return np.asarray(ws.webui_alphas_cumprod(self.schedule), np.float32)

    def sigmas(self, steps: int) -> np.ndarray:
        """LCM: its (steps + 1) sigmas; DDIM/PLMS: the VE sigmas of the WebUI's timesteps,
        descending (their evaluations are at all but the first)."""
        if self.sampler == "LCM":
            return lcm_sigmas(steps, self.model_sigmas)[0]
        if self.sampler == "UniPC":
            ns = unipc.NoiseScheduleVP(self._alphas())
            la = ns.log_alpha_t(unipc.run_times(ns, len(webui_timesteps(steps)), None,
                                                self.uni_pc_skip_type))
            return _f32(np.sqrt(np.expm1(-2 * la)))
        ac = self._alphas()[webui_timesteps(steps)][::-1].astype(np.float64)
        return np.sqrt((1 - ac) / ac).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0, *,
                      sample_shape: tuple[int, ...] | None = None,
                      img2img: bool | None = None) -> webui.WebUIState:
        """The run from the WebUI's rule: txt2img (strength 1 and not ``img2img``) runs the
        whole schedule; img2img starting at step ``begin = start_index(n, strength)`` of the
        k-diffusion rule (``webui_start``) has the WebUI's ``t_enc = n - 1 - begin``."""
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        begin = start_index(n, strength)
        img2img = begin > 0 if img2img is None else img2img
        ev = _Evals(self.memory)
        if self.sampler == "UniPC":
            return self._unipc_state(n, begin, img2img, sample_shape)
        if self.sampler == "LCM":
            sigmas, log_sigmas = lcm_sigmas(n, self.model_sigmas)
            run = [float(s) for s in sigmas[begin:]]
            _lcm(ev, run, log_sigmas)
            init, coefs = float(sigmas[0]), (1.0, run[0])
        else:
            ac = self._alphas()
            full = webui_timesteps(n)
            t_enc = n - 1 - begin
            ts = full[:t_enc] if img2img else full
            r = _Run.of(ac, ts)
            if self.sampler in ("DDIM", "DDIM CFG++"):
                _ddim(ev, r, self.eta_ddim, cfgpp=self.sampler == "DDIM CFG++")
            else:
                _plms(ev, r)
            # txt2img: VP noise in the first evaluation's VE scale; img2img: the image noised
            # to timestep t_enc, read at timestep t_enc - 1 (the WebUI's), VP if none runs.
            scale = 1 / math.sqrt(float(r.alphas[-1])) if ev.t else 1.0
            init = scale
            a_enc = float(ac[full[t_enc] if img2img else ts[-1]])
            coefs = (math.sqrt(a_enc) * scale, math.sqrt(1 - a_enc) * scale)
        t = ev.table
        s_eval = np.asarray(t.sigma, np.float32)
        m, k = len(s_eval), self.memory
        shape = (k, *(sample_shape if sample_shape is not None else (0,)))
        return webui.WebUIState(
            timesteps=jnp.asarray(np.asarray(ev.t, np.float32)),
            init_sigma=jnp.asarray(np.float32(init)),
            start_coefs=jnp.asarray(np.array(coefs, np.float32)),
            input_div=jnp.asarray(sig.input_div(s_eval)),
            sigma=jnp.asarray(s_eval),
            v=jnp.asarray(sig.v_coefs(s_eval)),
            upd=jnp.asarray(np.asarray(t.upd, np.float32).reshape(m, 3 + k)),
            mem=jnp.asarray(np.asarray(t.mem, np.float32).reshape(m, k, 2 + k)),
            draw=jnp.asarray(np.asarray(t.draw, np.int32)),
            memory=jnp.zeros(shape, jnp.float32),
        )

    def _unipc_state(self, n: int, begin: int, img2img: bool,
                     sample_shape: tuple[int, ...] | None) -> webui.WebUIState:
        """UniPC's run (``sdjax.schedulers.webui_unipc``): txt2img over all the WebUI's
        timesteps of n steps, img2img over the first ``t_enc`` from the noised image."""
        ac = self._alphas()
        ac64 = ac.astype(np.float64)
        sqrt_ac = (_f32(np.sqrt(ac64)), _f32(np.sqrt(1 - ac64)))
        ns = unipc.NoiseScheduleVP(ac)
        full = webui_timesteps(n)
        t_enc = n - 1 - begin
        steps = t_enc if img2img else len(full)
        k = self.memory
        table = webui._Table(k)
        t_start = unipc.img2img_start(full[:t_enc]) if img2img and t_enc else None
        run = (unipc.build(table, ns, sqrt_ac, steps, t_start, self.unipc_options) if steps
               else None)
        a_enc = float(ac[full[t_enc]]) if img2img else 0.0
        scale = 1 / run["alpha0"] if run else 1.0  # the first evaluation's VE scale
        m = len(table.sigma)
        shape = (k, *(sample_shape if sample_shape is not None else (0,)))
        empty = np.zeros((0,), np.float32)
        return webui.WebUIState(
            timesteps=jnp.asarray(run["t"] if run else empty),
            init_sigma=jnp.asarray(np.float32(scale)),
            start_coefs=jnp.asarray(np.array([math.sqrt(a_enc) * scale,
                                              math.sqrt(1 - a_enc) * scale], np.float32)),
            input_div=jnp.asarray(run["div"] if run else empty),
            sigma=jnp.asarray(run["sigma"] if run else empty),
            v=jnp.asarray(run["v"] if run else np.zeros((0, 2), np.float32)),
            upd=jnp.asarray(np.asarray(table.upd, np.float32).reshape(m, 3 + k)),
            mem=jnp.asarray(np.asarray(table.mem, np.float32).reshape(m, k, 2 + k)),
            draw=jnp.asarray(np.asarray(table.draw, np.int32)),
            memory=jnp.zeros(shape, jnp.float32),
        )
