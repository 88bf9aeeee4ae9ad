"""The sdjax side of a benchmark run: compile, steady state, FLOPs, memory."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import hardware
from benchmarks.flops import count_flops
from benchmarks.workload import Workload
from sdjax.dispatch import pipeline_class
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.schedulers import get_scheduler


@dataclasses.dataclass
class SdjaxResult:
    load_s: float
    cold_compile_s: float
    first_call_s: float
    times_s: list[float]
    unet_evaluations: int
    per_device_batch: int
    flops: dict[str, float]           # per device and call, by part; see flops_per_call
    xla_memory_bytes: int | None      # XLA's static estimate: arguments + outputs + temporaries
    peak_memory_bytes: int | None     # the allocator's high-water mark (GPU/TPU only)
    max_batch_per_device: int | None  # None: not searched / not measurable here
    images: np.ndarray                # the last call's float pixels, for the parity check

    @property
    def s_per_batch(self) -> float:
        return statistics.median(self.times_s)


def load(w: Workload, cache_dir: str | None, *,
         background_load: bool = False) -> StableDiffusionPipeline:
    control = {} if w.controlnet is None else {"controlnet": w.controlnet}
    return pipeline_class(w.folder).from_pretrained(w.folder, dtype=w.dtype,
                                                    num_devices=w.num_devices,
                                                    compilation_cache=cache_dir,
                                                    matmul_precision=w.matmul_precision,
                                                    background_load=background_load,
                                                    **control)


def run(w: Workload, *, cache_dir: str | None, repeats: int, search_max_batch: bool,
        flops: bool = True) -> SdjaxResult:
    t0 = time.perf_counter()
    pipe = load(w, cache_dir)
    load_s = time.perf_counter() - t0
    # from_pretrained asks for >= 1 s compiles only; the warm-start child must find even a
    # tiny model's executable in the cache.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    prompts, kwargs = w.prompts(), w.sdjax_kwargs()

    t0 = time.perf_counter()
    compiled = pipe.compile(prompts, **kwargs)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe(prompts, **kwargs)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = pipe(prompts, **kwargs)
        times.append(time.perf_counter() - t0)

    per_device = -(-w.batch // pipe.num_devices)
    sched = get_scheduler(w.scheduler or pipe.default_scheduler, pipe.scheduler_config)
    state = sched.set_timesteps(w.steps, sample_shape=(1, 1, 1, 1))
    evals = int(sched.num_evaluations(state))
    part_flops = flops_per_call(pipe, w, per_device, evals, compiled) if flops else {}
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else int(mem.argument_size_in_bytes
                                             + mem.output_size_in_bytes
                                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    stats = hardware.memory_stats()
    peak = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    max_batch = (max_batch_per_device(pipe, w, per_device, stats)
                 if search_max_batch and stats and "bytes_limit" in stats else None)
    return SdjaxResult(load_s, cold, first, times, evals, per_device, part_flops, xla_bytes,
                       peak, max_batch, out.images)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def network_flops(pipe: StableDiffusionPipeline, name: str, method: str | None,
                  *inputs: jax.ShapeDtypeStruct) -> float:
    """FLOPs of one call of a pipeline network at the given input shapes, counted from its
    traced program (benchmarks/flops.py): the same figure on every backend, nothing compiled.
    Traced under the pipeline's matmul precision, as the sampler is."""
    graphdef, state = nnx.split(pipe.network(name))

    def apply(state, *args):
        module = nnx.merge(graphdef, state)
        return (getattr(module, method) if method else module)(*args)

    with jax.default_matmul_precision(pipe.matmul_precision):
        return count_flops(apply, _abstract(state), *inputs)


def flops_per_call(pipe: StableDiffusionPipeline, w: Workload, per_device: int, evals: int,
                   compiled: jax.stages.Compiled) -> dict[str, float]:
    """FLOPs of one device's share of one call: text encoder on 2B prompts (cond + uncond),
    UNet (and each ControlNet) on 2B latents times the number of evaluations, VAE decoder on
    B latents, each counted
    at the per-device shapes. The scheduler's elementwise update is noise next to these.

    ``whole_program`` is XLA's cost analysis of the compiled sampler, kept as a cross-check
    where the backend reports one (0 where it does not): XLA counts a while loop's body once
    whatever its trip count, so it holds about one UNet evaluation.
    """
    dtype = jnp.dtype(pipe.dtype)
    vae_dtype = pipe.network("vae").decoder.conv_in.kernel.dtype  # float32 for fp16 models
    _, h, wd, c = w.latent_shape()
    tokens = pipe.max_prompt_tokens
    ctx = pipe.unet_config.cross_attention_dim
    sds = jax.ShapeDtypeStruct
    ids = sds((2 * per_device, tokens), jnp.int32)
    te = network_flops(pipe, "text_encoder", None, ids)
    added = None
    if "text_encoder_2" in pipe.params:  # SDXL: the second encoder, the UNet's added inputs
        te += network_flops(pipe, "text_encoder_2", "penultimate_and_pooled", ids)
        added = {"text_embeds": sds((2 * per_device, pipe.network("text_encoder_2").config
                                     .projection_dim), dtype),
                 "time_ids": sds((2 * per_device, pipe.num_time_ids), jnp.float32)}
    unet = network_flops(pipe, "unet", None, sds((2 * per_device, h, wd, c), dtype),
                         sds((2 * per_device,), jnp.float32),
                         sds((2 * per_device, tokens, ctx), dtype), None, added)
    vae = network_flops(pipe, "vae", "decode", sds((per_device, h, wd, c), vae_dtype))
    parts = {"text_encoder": te, "unet_evaluation": unet}
    for k, (_, cfg) in enumerate(pipe._controlnets):  # each evaluation: the UNet's batch
        control = sds((2 * per_device, w.height, w.width, cfg.conditioning_channels), dtype)
        parts[f"controlnet_{k}_evaluation"] = network_flops(
            pipe, f"controlnet_{k}", None, sds((2 * per_device, h, wd, c), dtype),
            sds((2 * per_device,), jnp.float32), sds((2 * per_device, tokens, ctx), dtype),
            control, added)
    per_eval = sum(v for name, v in parts.items() if name.endswith("_evaluation"))
    cost = compiled.cost_analysis()
    whole = float(cost.get("flops", 0.0)) if cost else 0.0
    return {**parts, "vae_decode": vae, "total": te + evals * per_eval + vae,
            "whole_program": whole}


def max_batch_per_device(pipe: StableDiffusionPipeline, w: Workload, start: int,
                         stats: dict, limit: int = 512) -> int | None:
    """Largest per-device batch (doubling from ``start``) whose compiled sampler XLA says fits
    the device memory; compiles without running, so nothing is allocated for the big ones."""
    budget = int(stats["bytes_limit"])
    best = None
    b = start
    while b <= limit:
        n = b * pipe.num_devices
        wb = dataclasses.replace(w, batch=n)
        try:
            mem = pipe.compile(wb.prompts(), batch_size_per_device=b,
                               **wb.sdjax_kwargs()).memory_analysis()
        except Exception:  # XLA reports a compile-time OOM as various runtime errors
            break
        need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
        if need > budget:
            break
        best, b = b, 2 * b
    return best
