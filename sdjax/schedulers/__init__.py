"""Diffusion schedulers as pure functions over a pytree state, by name.

    sched = get_scheduler("dpmpp_2m_karras", scheduler_config)   # frozen, hashable
    state = sched.set_timesteps(25, sample_shape=latents.shape)  # host-side tables
    x = latents * sched.init_noise_sigma(state)

    def body(i, carry):
        x, state = carry
        eps = unet(sched.scale_model_input(state, x, i), state.timesteps[i], ...)
        return sched.step(state, i, eps, x, key=keys_for_step_i)

    x, state = jax.lax.fori_loop(0, sched.num_evaluations(state), body, (x, state))

Every scheduler reproduces the diffusers class of the same family built with
`Cls.from_config(scheduler_config)`: timesteps, model-input scaling and every intermediate
sample. img2img: `set_timesteps(n, strength)` keeps only the remaining evaluations, and
`add_noise_for_start(state, x0_latents, noise)` makes the starting latents (instead of
multiplying noise by init_noise_sigma).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdjax import validation
from sdjax.schedulers import webui as _webui
from sdjax.schedulers.common import NoiseSchedule, Scheduler
from sdjax.schedulers.ddim import DDIM
from sdjax.schedulers.ddpm import DDPM
from sdjax.schedulers.dpm_solver import DPMSolverMultistep
from sdjax.schedulers.euler import Euler, EulerAncestral
from sdjax.schedulers.heun import Heun
from sdjax.schedulers.lcm import LCM
from sdjax.schedulers.lms import LMS
from sdjax.schedulers.pndm import PNDM
from sdjax.schedulers.webui import WebUISampler
from sdjax.schedulers.webui_sigmas import SCHEDULE_TYPES, schedule_type_label
from sdjax.schedulers.webui_timesteps import (
    OPTION_DEFAULTS,
    OPTION_SAMPLERS,
    TIMESTEP_SAMPLERS,
    WebUITimestepSampler,
)
from sdjax.schedulers.webui_unipc import Options as UniPCOptions

# name -> (our class, the diffusers class it reproduces, options forced on top of the model's
# config: ours take them, and so does the diffusers class when built as the reference).
_REGISTRY: dict[str, tuple[type[Scheduler], str, dict[str, Any]]] = {
    "pndm": (PNDM, "PNDMScheduler", {}),
    "ddim": (DDIM, "DDIMScheduler", {}),
    "ddpm": (DDPM, "DDPMScheduler", {}),
    "lms": (LMS, "LMSDiscreteScheduler", {}),
    "euler": (Euler, "EulerDiscreteScheduler", {}),
    "euler_a": (EulerAncestral, "EulerAncestralDiscreteScheduler", {}),
    "heun": (Heun, "HeunDiscreteScheduler", {}),
    "dpmpp_2m": (
        DPMSolverMultistep,
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistep,
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCM, "LCMScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# The WebUI's samplers by their labels: its k-diffusion samplers (sdjax.schedulers.webui),
# then its DDIM and PLMS over timesteps and LCM (sdjax.schedulers.webui_timesteps).
WEBUI_SAMPLER_NAMES: tuple[str, ...] = _webui.WEBUI_SAMPLER_NAMES + tuple(TIMESTEP_SAMPLERS)
# label -> the WebUI's aliases of it
WEBUI_ALIASES: dict[str, tuple[str, ...]] = {
    **_webui.ALIASES, **{k: v[1] for k, v in TIMESTEP_SAMPLERS.items()}}
# What scheduler= accepts: our diffusers-equivalent names, then the WebUI's sampler names
# (its k-diffusion samplers, sdjax.schedulers.webui).
ALL_SCHEDULER_NAMES: tuple[str, ...] = SCHEDULER_NAMES + WEBUI_SAMPLER_NAMES


def refuse_not_fixed_step(name: str | None, what: str = "sampler") -> None:
    """Raise the one-line ValueError for a WebUI sampler sdjax cannot run ("DPM adaptive",
    any spelling or alias)."""
    if not isinstance(name, str):
        return
    for label, why in _webui.NOT_FIXED_STEP.items():
        if name.strip().lower() in (label.lower(), "k_dpm_ad"):
            raise ValueError(f"{what} {label!r} is not supported: {why}; use \"DPM fast\" "
                             f"(a fixed number of steps) or another sampler")


# The WebUI's sampler parameters a call can set (``sampler_options=``), by the WebUI's option
# names, with its defaults.
SAMPLER_OPTIONS: dict[str, Any] = dict(OPTION_DEFAULTS)


def check_sampler_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The WebUI sampler options given (``SAMPLER_OPTIONS``' names), checked: a one-line
    ValueError names an unknown option or a bad value."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"sampler_options must be a mapping of the WebUI's option names to "
                        f"values, got {type(options).__name__}")
    out = dict(options)
    for key in out:
        if key not in SAMPLER_OPTIONS:
            raise ValueError(f"unknown sampler option {key!r}; choose from "
                             f"{', '.join(SAMPLER_OPTIONS)}")
    if "eta_ddim" in out:
        out["eta_ddim"] = validation.check_number(out["eta_ddim"], "eta_ddim", minimum=0)
    order = out.get("uni_pc_order")
    if isinstance(order, float) and order.is_integer():  # a JSON client's 3.0
        out["uni_pc_order"] = int(order)
    unipc = {k: out.get(f"uni_pc_{k}", SAMPLER_OPTIONS[f"uni_pc_{k}"])
             for k in ("variant", "skip_type", "order", "lower_order_final")}
    UniPCOptions(**unipc)  # raises on a bad UniPC option
    return out


def webui_sampler_label(name: str | None) -> str | None:
    """``name`` if it is a WebUI sampler's label ("DPM++ 2M"), else None (a
    diffusers-equivalent name, or unknown). The server also takes the WebUI's aliases
    (``sdjax.schedulers.webui.ALIASES``)."""
    return name if isinstance(name, str) and name in WEBUI_SAMPLER_NAMES else None

# A model's diffusers class -> our name (the first registered, so DPMSolver -> dpmpp_2m).
_BY_DIFFUSERS_CLASS: dict[str, str] = {}
for _name, (_, _cls, _) in _REGISTRY.items():
    _BY_DIFFUSERS_CLASS.setdefault(_cls, _name)


def _entry(name: str) -> tuple[type[Scheduler], str, dict[str, Any]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return _REGISTRY[name]


def get_scheduler(name: str, config: Mapping[str, Any], *, schedule_type: str | None = None,
                  sdxl: bool = False, options: Mapping[str, Any] | None = None) -> Scheduler:
    """The scheduler `name` configured from a parsed scheduler_config.json. A WebUI sampler
    name takes the WebUI's ``schedule_type`` (None: "Automatic"; ``sdxl`` picks SDXL's
    "Align Your Steps" table) and reads the WebUI sampler ``options`` it uses
    (``SAMPLER_OPTIONS``; all are checked, as the WebUI's global settings, whatever the
    sampler); the other names take no schedule type."""
    refuse_not_fixed_step(name, "scheduler")
    options = check_sampler_options(options)
    label = webui_sampler_label(name)
    if label is not None:
        cls = WebUITimestepSampler if label in TIMESTEP_SAMPLERS else WebUISampler
        used = {k: v for k, v in options.items() if label in OPTION_SAMPLERS[k]}
        return cls.from_config(config, sampler=label,
                               schedule_type=schedule_type_label(schedule_type),
                               sdxl=bool(sdxl), **used)
    if schedule_type not in (None, "Automatic"):
        raise ValueError(f"schedule_type={schedule_type!r} is for the WebUI's samplers "
                         f"({', '.join(WEBUI_SAMPLER_NAMES)}), not scheduler={name!r}")
    cls, _, forced = _entry(name)
    return cls.from_config(config, **forced)


def diffusers_equivalent(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, ``from_config`` options) of the scheduler that ``name``
    reproduces: the tests' oracle and the benchmarks' peer."""
    _, cls, forced = _entry(name)
    return cls, dict(forced)


def default_scheduler_name(config: Mapping[str, Any]) -> str:
    """The name matching the config's diffusers class (`pndm` when unknown)."""
    name = _BY_DIFFUSERS_CLASS.get(config.get("_class_name", ""), "pndm")
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        return "dpmpp_2m_karras"
    return name


__all__ = [
    "ALL_SCHEDULER_NAMES",
    "SCHEDULER_NAMES",
    "SAMPLER_OPTIONS",
    "SCHEDULE_TYPES",
    "WEBUI_ALIASES",
    "WEBUI_SAMPLER_NAMES",
    "WebUISampler",
    "WebUITimestepSampler",
    "check_sampler_options",
    "webui_sampler_label",
    "NoiseSchedule",
    "Scheduler",
    "default_scheduler_name",
    "diffusers_equivalent",
    "get_scheduler",
    "refuse_not_fixed_step",
]
