"""The sampling core: the one compiled, sharded call every task runs.

    token ids -> CLIP -> initial latents -> fori_loop(UNet with CFG, scheduler step) -> VAE decode

Each device runs the whole call on its shard of the batch. What differs between text-to-image,
img2img, inpainting and upscaling is what the task feeds the loop (``sdjax.tasks``): the
initial latents (noise, or an encoded image noised to the start step), extra UNet input
channels, class labels, and a blend of kept latents after each step. This module knows nothing
of files, images on disk or the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sdjax import parallel, prompts, tasks, vae_tiling
from sdjax.schedulers.start import start_table

# Per-image status the compiled call returns when it checks its outputs (one int8 per image).
FINITE, NONFINITE_LATENTS, NONFINITE_PIXELS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """Everything that shapes the compiled program; one executable per distinct value."""

    latent_shape: tuple[int, int, int]  # (h, w, channels) of the denoised latents
    scheduler: object  # a frozen scheduler dataclass
    steps: int
    per_device: int
    decode_chunk: int
    output_type: str  # "uint8" | "float" | "latent"
    task: tasks.Task
    inputs: tuple[str, ...]  # names of the batched task inputs (and "latents" if given)
    nan_check: bool  # return a per-image finite/non-finite status next to the images
    # Run the unconditional pass (a 2B UNet batch). False when no image of the call is guided
    # (every guidance scale <= 1): the UNet then runs on the B conditional latents alone.
    cfg: bool = True
    clip_skip: int = 1  # the text encoder's layer (the WebUI's "Clip skip"); 1 = the last
    text_chunks: int = 1  # 77-token chunks of the text context (sdjax.prompts' buckets)
    # The loop ends at the call's stop evaluation (denoising_end, a runtime input), not at the
    # schedule's end. False keeps the static trip count of every other call.
    stops_early: bool = False


# Columns of the per-image guidance array: scale, diffusers' CFG rescale, and the sigma
# interval (lo, hi) outside which the scale is 1.
GUIDANCE_COLUMNS = ("scale", "rescale", "sigma_lo", "sigma_hi")


def combine_guidance(uncond: jax.Array, cond: jax.Array, guidance: jax.Array,
                     sigma: jax.Array) -> jax.Array:
    """Classifier-free guidance of one step, per image: ``guidance`` is (B, 4) as
    GUIDANCE_COLUMNS. A scale <= 1 means no guidance (the conditional prediction), as in
    diffusers, whose pipelines skip the unconditional pass then; outside [sigma_lo, sigma_hi]
    the scale is 1 (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval").
    The rescale is diffusers' ``rescale_noise_cfg`` (Lin et al. 2023): the guided prediction
    scaled to the conditional one's standard deviation over each image, mixed in at that
    factor."""
    scale, rescale, lo, hi = (guidance[:, k, None, None, None] for k in range(4))
    scale = jnp.where((scale > 1) & (sigma >= lo) & (sigma <= hi), scale, 1.0)
    guided = uncond + scale * (cond - uncond)
    axes = tuple(range(1, cond.ndim))
    # ddof=1: torch's std; the where keeps a zero std (padding rows) from making NaNs.
    ratio = cond.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1,
                                                                   keepdims=True)
    rescaled = rescale * (guided * ratio) + (1 - rescale) * guided
    return jnp.where(rescale > 0, rescaled, guided)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The graph definitions of a pipeline's networks and what the loop needs to know of
    them (the parameters themselves are an argument of the call)."""

    graphdefs: Mapping[str, object]
    dtype: jnp.dtype
    vae_scaling: float
    # How the prompts become the UNet's conditioning, for models that do not condition on
    # one text encoder's last states (SDXL): ``(params, ids, neg_ids, inputs, clip_skip) ->
    # (context, added)``, both for the 2B batch [negatives; prompts] (``ids``/``neg_ids`` are
    # (token ids, weights) pairs, as sdjax.prompts makes them); ``added`` is the UNet's
    # ``added_cond``. None: ``sdjax.prompts.encode`` of the one text encoder, nothing added.
    encode: Callable | None = None


def build(spec: CoreSpec, nets: Networks, mesh: Mesh,
          on_compile: Callable[[float], None] | None = None,
          precision: str | None = None) -> Executable:
    """The sharded, jitted sampler for ``spec``. Its arguments are ``(params, ids, neg_ids,
    guidance, seeds, indices, span, inputs)``: ``ids`` and ``neg_ids`` are pairs (token ids,
    weights), each (B, chunks, 77) (``sdjax.prompts``); every array batched on its first axis except
    ``params`` (replicated) and ``span`` (replicated int32 (2,): the first step of the schedule,
    a runtime input for tasks that cut it by strength or denoising_start, and, with
    ``spec.stops_early``, the evaluation the loop stops before); ``guidance`` is (B, 4), the
    columns of GUIDANCE_COLUMNS; ``inputs`` is the task's dict of batched arrays
    (``tasks.Task.input_names``, ``image_noise`` for the upscaler when given), plus ``latents``
    when the caller gives the noise; ``spec.inputs`` names them."""
    sched, task = spec.scheduler, spec.task
    lat_shape = spec.latent_shape
    sample_shape = (spec.per_device, *lat_shape)
    if task.runtime_start:
        table = start_table(sched, spec.steps, sample_shape)
        total = table.num_evaluations
        noise_levels = jnp.asarray(table.noise_levels)
    else:
        state0 = sched.set_timesteps(spec.steps, sample_shape=sample_shape)
        total = sched.num_evaluations(state0)
    graphdefs, dtype, scaling = nets.graphdefs, nets.dtype, nets.vae_scaling

    def per_device(params, ids, neg_ids, guidance, seeds, indices, span, inputs):
        start = span[0]
        end = span[1] if spec.stops_early else total
        te = nnx.merge(graphdefs["text_encoder"], params["text_encoder"])
        unet = nnx.merge(graphdefs["unet"], params["unet"])
        vae = nnx.merge(graphdefs["vae"], params["vae"])
        b = ids[0].shape[0]
        if nets.encode is None:
            context = prompts.encode(te, *(jnp.concatenate(pair, axis=0)
                                           for pair in zip(neg_ids, ids, strict=True)),
                                     clip_skip=spec.clip_skip)
            added = None
        else:
            context, added = nets.encode(params, ids, neg_ids, inputs, spec.clip_skip)
        keys = jax.vmap(lambda sd, i: jax.random.fold_in(jax.random.key(sd), i))(seeds, indices)
        noise_keys, step_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
        noise_keys, step_keys = noise_keys[:, 0], step_keys[:, 0]
        if "latents" in inputs:
            noise = inputs["latents"].astype(jnp.float32)
        else:
            noise = jax.vmap(lambda k: jax.random.normal(k, lat_shape, jnp.float32))(noise_keys)
        feed = tasks.feed(task, vae, scaling, inputs, noise_keys, chunk=spec.decode_chunk,
                          noise=noise)

        if task.runtime_start:
            state = table.state(start)
            first = table.first(start)
        else:
            state, first = state0, 0
        x = noise * sched.init_noise_sigma(state)
        if feed.image_latents is not None and not task.noised_start:
            x = feed.image_latents  # another model's denoising_end latents, already noisy
        elif feed.image_latents is not None:
            noised = sched.add_noise_for_start(state, feed.image_latents, noise)
            # Inpainting from strength 1 starts from noise alone (diffusers' is_strength_max);
            # img2img at strength 1 still mixes the image in at the first timestep.
            x = jnp.where(start == 0, x, noised) if task.pure_noise_at_full_strength else noised
        guidance = guidance.astype(jnp.float32)
        labels = feed.class_labels
        if spec.cfg:
            labels = None if labels is None else jnp.concatenate([labels, labels])
        else:
            # No unconditional pass: the negative prompts' half of the (cheap, once per call)
            # text encoding goes unused.
            context = context[b:]
            added = None if added is None else {k: v[b:] for k, v in added.items()}

        def body(i, carry):
            x, state = carry
            t = state.timesteps[i]
            xin = sched.scale_model_input(state, x, i).astype(dtype)
            if feed.extra is not None:
                xin = jnp.concatenate([xin, feed.extra.astype(dtype)], axis=-1)
            if spec.cfg:
                eps = unet(jnp.concatenate([xin, xin], axis=0), jnp.broadcast_to(t, (2 * b,)),
                           context, class_labels=labels, added_cond=added).astype(jnp.float32)
                eps = combine_guidance(eps[:b], eps[b:], guidance, sched.step_sigma(state, i))
            else:
                eps = unet(xin, jnp.broadcast_to(t, (b,)), context, class_labels=labels,
                           added_cond=added).astype(jnp.float32)
            key = (jax.vmap(lambda k: jax.random.fold_in(k, i))(step_keys)
                   if sched.stochastic else None)
            x, state = sched.step(state, i, eps, x, key=key)
            if feed.repaint is not None:
                # Ordinary models inpaint by putting the kept region back, noised to the
                # next evaluation's level (clean after the last that runs), as diffusers does.
                level = noise_levels[jnp.minimum(i + 1, total - 1)]
                kept = jnp.where(i < end - 1, level[0] * feed.image_latents + level[1] * noise,
                                 feed.image_latents)
                x = (1 - feed.repaint) * kept + feed.repaint * x
            return x, state

        x, _ = jax.lax.fori_loop(first, end, body, (x, state))
        status = jnp.where(jnp.isfinite(x).all(axis=(1, 2, 3)), FINITE, NONFINITE_LATENTS)
        if spec.output_type == "latent":
            return (x, status.astype(jnp.int8)) if spec.nan_check else x
        z = (x / scaling).astype(vae.decoder.conv_in.kernel.dtype)
        # Decoding is the activation-memory peak: map over chunks of the per-device batch.
        decode = vae.decode
        if task.decode_tiles is not None:
            decode = functools.partial(vae_tiling.tiled_decode, vae.decode,
                                       tiling=task.decode_tiles)
        pixels = jax.lax.map(lambda zi: decode(zi[None])[0], z, batch_size=spec.decode_chunk)
        pixels = pixels.astype(jnp.float32)
        if spec.nan_check:
            status = jnp.where((status == FINITE) & ~jnp.isfinite(pixels).all(axis=(1, 2, 3)),
                               NONFINITE_PIXELS, status).astype(jnp.int8)
        pixels = jnp.clip(pixels / 2 + 0.5, 0.0, 1.0)
        if spec.output_type == "uint8":
            pixels = jnp.round(pixels * 255).astype(jnp.uint8)
        return (pixels, status) if spec.nan_check else pixels

    batch = P(parallel.AXIS)
    out_specs = (batch, batch) if spec.nan_check else batch
    sharded = jax.shard_map(per_device, mesh=mesh,
                            in_specs=(P(), batch, batch, batch, batch, batch, P(), batch),
                            out_specs=out_specs, check_vma=False)
    options = parallel.compiler_options(mesh, lat_shape[0] * lat_shape[1])
    return Executable(jax.jit(sharded, compiler_options=options), on_compile, precision)


class Executable:
    """One spec's sampler: compiled on first use, with the compile time kept apart so the
    CLIs and the benchmarks can report it."""

    def __init__(self, jitted, on_compile: Callable[[float], None] | None = None,
                 precision: str | None = None):
        self._jitted, self._on_compile, self._precision = jitted, on_compile, precision
        self._compiled: jax.stages.Compiled | None = None

    def lower(self, *args) -> jax.stages.Lowered:
        # Tracing happens here, so the precision reaches every dot and convolution of the
        # sampler; the HLO carries it into compile() (tests/test_precision.py).
        with jax.default_matmul_precision(self._precision):
            return self._jitted.lower(*args)

    def compile(self, *args) -> jax.stages.Compiled:
        if self._compiled is None:
            t0 = time.perf_counter()
            self._compiled = self.lower(*args).compile()
            if self._on_compile is not None:
                self._on_compile(time.perf_counter() - t0)
        return self._compiled

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    def eval_shape(self, *args):
        """Shapes and dtypes of what the call returns: traced, never compiled."""
        return jax.eval_shape(self._jitted, *args)

    def __call__(self, *args):
        return self.compile(*args)(*args)
