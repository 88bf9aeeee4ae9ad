"""StableDiffusionPipeline: load a model once, then generate batches of images, each batch in
one compiled call that every device runs on its own shard.

Inside the compiled call: CLIP text encoding of the prompt and negative prompt, the whole
denoising loop (``jax.lax.fori_loop``) with classifier-free guidance as one 2B batch through the
UNet, and the VAE decode to uint8 pixels. Prompts (as token ids), seeds and guidance scales are
runtime arrays, so changing them never recompiles; size, steps, scheduler and batch shape are
static and each combination is compiled once per process (and cached on disk across processes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from sdjax import (
    hires,
    model_defaults,
    noise_call,
    parallel,
    previews,
    prompt_editing,
    sampling,
    task_inputs,
    validation,
)
from sdjax import prompts as prompt_syntax
from sdjax.call import SDXL_FIELDS, Call, build, takes_call
from sdjax.controlnet import attach as controlnets
from sdjax.outputs import NonFiniteError, PendingImages, PipelineOutput
from sdjax.param_store import ParamStore, lora_key
from sdjax.runtime import (  # noqa: F401  (their old home: kept importable from here)
    DTYPES,
    MATMUL_PRECISIONS,
    enable_compilation_cache,
    parse_dtype,
    resolve_matmul_precision,
)
from sdjax.schedulers import (
    ALL_SCHEDULER_NAMES,
    SCHEDULER_NAMES,
    default_scheduler_name,
    get_scheduler,
)
from sdjax.task_inputs import TaskInputs
from sdjax.weights import model as model_files
from sdjax.weights.resolve import resolve_model


class StableDiffusionPipeline:
    """Text-to-image, img2img and inpainting with Stable Diffusion 1.x/2.x-architecture models.

    Build it with :meth:`from_pretrained`; call it with prompts. See docs/python-api.md. What
    it holds: the model's configs and tokenizer, its parameters (a :class:`ParamStore`), and
    one compiled sampler per :class:`sampling.CoreSpec`; a call's host side is
    :mod:`sdjax.task_inputs` and the text, its device side :mod:`sdjax.sampling`.
    """

    # Sampling settings of this kind of model, between a folder's sdjax.json and the library's
    # (sdjax.model_defaults.resolve).
    class_defaults: ClassVar[Mapping[str, Any]] = {}
    SDXL = False  # the model family from_pretrained loads (sdjax.sdxl sets it)
    UPSCALER = False  # the x4 upscaler (sdjax.upscale): its task is an image, 4x its size

    def __init__(self, *, text_encoder, vae, unet, tokenizer, scheduler_config: dict,
                 mesh, dtype, name: str = "", vae_scale_factor: int = 8,
                 tokenizer_dir: Path | None = None, note: str = "",
                 matmul_precision: str | None = None):
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir  # its files, for saving; None = bundled CLIP BPE
        self.note = note  # what was loaded and how to change it (single files), for the CLI
        self.scheduler_config = scheduler_config
        self.mesh = mesh
        self.dtype = dtype
        # Fixed at construction: it is traced into every executable this pipeline compiles.
        self._matmul_precision = resolve_matmul_precision(matmul_precision, dtype)
        self.name = name
        self.vae_scale_factor = vae_scale_factor
        self.unet_config = unet.config
        self.text_encoder_config = text_encoder.config
        self.vae_config = vae.config
        self.store = ParamStore({"text_encoder": text_encoder, "vae": vae, "unet": unet}, mesh)
        self._compiled: dict[sampling.CoreSpec, sampling.Executable] = {}
        self.compile_seconds = 0.0
        # The model folder's sdjax.json: what a call uses where its caller gives nothing.
        self.model_defaults: dict[str, Any] = {}
        self._controlnets: list = []  # (name, config) of each ControlNet (load_controlnet)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str = "toy", dtype="bfloat16",
                        num_devices: int | None = None, *, config=None, vae=None,
                        prediction_type: str | None = None, ema: bool = False,
                        variant: str | None = None, compilation_cache: str | None = None,
                        local_devices: bool = False,
                        matmul_precision: str | None = None,
                        background_load: bool = False,
                        controlnet=None) -> StableDiffusionPipeline:
        """``model``: ``"toy"`` | a diffusers folder | a single ``.safetensors``/``.ckpt``
        (CompVis/A1111 layout) | a hub id. ``dtype``: compute/param dtype of the networks.
        ``num_devices``: devices to shard batches over (None = all).
        ``config`` (single files): None = detect the family from the tensors, a preset name
        (``sd15``, ``sd21``, ``sd21-v``, …) or a diffusers folder whose configs, tokenizer and
        scheduler to use. ``vae``: another VAE, a diffusers VAE folder or a single VAE file.
        ``prediction_type``: ``"epsilon"`` | ``"v_prediction"``, overriding the scheduler
        config (and a single file's ``.yaml``). ``ema``: single files with both trained and
        EMA UNet weights load the trained ones by default (as diffusers does), the EMA copy
        with ``ema=True``.
        ``local_devices``: on a multi-host run, use only this process's devices, so each
        process generates on its own (no collective with the other hosts).
        ``matmul_precision``: ``"highest"`` | ``"high"`` | ``"default"``, the precision of the
        sampler's dots and convolutions on GPUs and TPUs; None = ``"highest"`` for float32 (true
        float32), XLA's default for bfloat16/float16. ``"default"`` makes a float32 pipeline
        use TF32 (NVIDIA) or bfloat16 passes (TPU): faster, less exact.
        ``background_load``: return once the configs, tokenizers and every tensor's name and
        shape are read and checked, and read the tensors themselves in a background thread;
        the first call compiles meanwhile (or fetches its executable from the compilation
        cache), LoRA files are checked at once and merged after the reads, and whatever needs
        the values (calls, embeddings, saving, :attr:`params`) waits for them. A file that
        fails while being read raises there. (Multi-process runs load at once: placing
        weights on a global mesh is a collective.)
        ``controlnet``: a ControlNet (a diffusers ControlNetModel folder, an original single
        file ``control_*.pth``/``.safetensors``, or a hub id), or a list of them
        (:meth:`load_controlnet`)."""
        dtype = parse_dtype(dtype)
        matmul_precision = resolve_matmul_precision(matmul_precision, dtype)
        model_files.check_options(prediction_type, vae)
        parallel.maybe_initialize_distributed()
        enable_compilation_cache(compilation_cache)
        mesh = parallel.make_mesh(num_devices, local=local_devices)
        source = resolve_model(model)
        parts, deferred = model_files.load_parts(
            source, mesh, sdxl=cls.SDXL, dtype=dtype, config=config, vae=vae,
            prediction_type=prediction_type, ema=ema, variant=variant,
            background_load=background_load)
        pipe = cls(text_encoder=parts.text_encoder, vae=parts.vae, unet=parts.unet,
                   tokenizer=parts.tokenizer, scheduler_config=parts.scheduler_config,
                   mesh=mesh, dtype=dtype, name=model,
                   vae_scale_factor=parts.vae.config.downsample_factor,
                   tokenizer_dir=parts.tokenizer_dir, note=parts.note,
                   matmul_precision=matmul_precision, **parts.extra)
        if source.is_dir():
            pipe.model_defaults = model_defaults.read(source)
        elif config is None:  # a file sdjax wrote carries them (weights.file_configs)
            from sdjax.weights.file_configs import defaults as file_defaults
            pipe.model_defaults = file_defaults(source)
        if deferred is not None:
            pipe.store.fill_in_background(deferred)
        for source in controlnets.as_list(controlnet):
            pipe.load_controlnet(source, variant=variant)
        return pipe

    def load_controlnet(self, source: str | Path, *, variant: str | None = None) -> str:
        """Add a ControlNet (a diffusers ControlNetModel folder or hub id, or an original
        single file with ``control_model.*`` keys, ``.pth`` read without running code) after
        those loaded; returns its name. One of another family than this model's, or a file
        that is not a ControlNet, raises ``WeightsError`` in one line. A call then takes
        ``control_image=`` (one per ControlNet) and the other ControlNet arguments."""
        return controlnets.load_into(self, source, variant)

    @property
    def controlnets(self) -> list[str]:
        """The ControlNets loaded, in order (as given)."""
        return [name for name, _ in self._controlnets]

    def wait_for_weights(self) -> None:
        """Return once the weights are read (at once unless from_pretrained's
        ``background_load`` is still reading them); raises what reading them raised."""
        self.store.wait()

    @property
    def weights_wait_seconds(self) -> float:
        """Time callers spent blocked on background reads (the CLIs keep it out of their
        generation figures)."""
        return self.store.wait_seconds

    @property
    def params(self) -> dict[str, nnx.State]:
        """The networks' parameters (``{"text_encoder": State, "vae": …, "unet": …}``), once
        they are read (:meth:`wait_for_weights`)."""
        return self.store.params

    @params.setter
    def params(self, value: dict[str, nnx.State]) -> None:
        self.store.params = value

    def network(self, name: str) -> nnx.Module:
        """``"text_encoder"``, ``"unet"`` or ``"vae"`` as an NNX module over this pipeline's
        parameters, for tools that run or analyse one network alone."""
        return self.store.network(name)

    # ------------------------------------------------------------------ adapters
    def load_lora(self, path: str | Path, scale: float = 1.0) -> str:
        """Merge a LoRA file (kohya/A1111 or diffusers/PEFT ``.safetensors``) into the UNet and
        text encoder weights at ``scale``; returns its name (the file's stem). Several stack;
        loading the same file again changes its scale, re-merged from the original weights.
        Shapes do not change, so nothing recompiles. A file that does not fit this model
        raises ``ValueError`` and leaves the pipeline as it was."""
        self.set_loras({**self.loras, lora_key(path): scale})
        return self.store.lora_name(path)

    def unload_lora(self, path: str | Path) -> None:
        """Take a LoRA loaded by :meth:`load_lora` out of the weights (the others stay merged,
        re-merged from the original weights); a file not loaded is a no-op."""
        key = lora_key(path)
        if key in self.loras:
            self.set_loras({k: s for k, s in self.loras.items() if k != key})

    def set_loras(self, wanted: Mapping[str | Path, float]) -> None:
        """Make exactly ``wanted`` ({LoRA file: scale}) the merged LoRAs, in one re-merge from
        the original weights (:meth:`ParamStore.set_loras`)."""
        self.store.set_loras(wanted, self.lora_prefixes)

    @property
    def loras(self) -> dict[str, float]:
        """The LoRA files merged into the weights (resolved paths) and their scales."""
        return self.store.loras

    @property
    def lora_prefixes(self) -> Mapping[str, tuple[str, str]]:
        """The networks a LoRA file may change and the prefixes that name them
        (:mod:`sdjax.weights.lora`): SD's UNet and text encoder."""
        from sdjax.weights.lora import SD_PREFIXES
        return SD_PREFIXES

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Add a textual-inversion embedding (A1111 ``.pt``/``.safetensors``, diffusers'
        ``learned_embeds``) as ``token`` (default: the WebUI file's stem, or the token a
        diffusers file holds); returns the token, which prompts then use by name. The token
        table grows, so the next call compiles once for the new size. A file that does not
        fit raises ``ValueError`` and leaves the pipeline as it was. (SDXL: see
        StableDiffusionXLPipeline._embedding_tables.)"""
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a string, got {type(token).__name__}")
        token, tables = self._embedding_tables(Path(path).expanduser(), token)
        grown = self.store.add_tokens(
            token, [(net, getattr(self, attr), vectors) for net, attr, vectors in tables],
            str(path))
        for (_, attr, _), tokenizer in zip(tables, grown, strict=True):
            setattr(self, attr, tokenizer)
        self._compiled.clear()  # compiled for the old table size
        return token

    def _embedding_tables(self, path: Path, token: str | None
                          ) -> tuple[str, list[tuple[str, str, np.ndarray]]]:
        """(token, [(text encoder, its tokenizer's attribute, vectors)]) of an embedding
        file: SD's one encoder takes the file's one vector set."""
        from sdjax.weights import embeddings
        token, vectors = embeddings.read_embedding(path, token)
        return token, [("text_encoder", "tokenizer", vectors)]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path) -> Path:
        """A diffusers folder (float32) that diffusers' and sdjax's from_pretrained load."""
        from sdjax.weights.export import save_pipeline
        folder = save_pipeline(folder, unet=self.network("unet"), vae=self.network("vae"),
                               text_encoder=self.network("text_encoder"),
                               tokenizer_dir=self.tokenizer_dir, tokenizer=self.tokenizer,
                               scheduler_config=self.scheduler_config)
        model_defaults.write(folder, self.model_defaults)
        return folder

    def save_single_file(self, path: str | Path, half: bool = False) -> Path:
        """A CompVis/A1111-layout ``.safetensors`` (float16 with ``half``) that the WebUI and
        diffusers' ``from_single_file`` load; written atomically. LoRAs are saved merged;
        textual-inversion tokens cannot be (the layout has no tokenizer), so they are refused."""
        self._refuse_embeddings_in_single_file()
        from sdjax.weights import file_configs
        from sdjax.weights.export import save_single_file
        nets = {n: self.network(n) for n in file_configs.NETWORK_NAMES}
        meta = file_configs.metadata(  # loads back with no flags (file_configs)
            **nets, tokenizer=self.tokenizer, tokenizer_dir=self.tokenizer_dir,
            scheduler_config=self.scheduler_config, defaults=self.model_defaults)
        return save_single_file(path, **nets, half=half, metadata=meta)

    def _refuse_embeddings_in_single_file(self) -> None:
        if self.store.embedding_tokens:
            raise ValueError(f"embeddings ({', '.join(self.store.embedding_tokens)}) cannot be "
                             "saved in a single file; use save_pretrained, or save without them")

    # ------------------------------------------------------------------ properties
    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def default_hw(self) -> tuple[int, int]:
        """(height, width) the model was trained at: the UNet's sample size in pixels."""
        size = self.unet_config.sample_size
        if size is None:
            return (512, 512)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    @property
    def matmul_precision(self) -> str | None:
        """The ``jax.default_matmul_precision`` the sampler is compiled under (None: XLA's
        default); set by ``from_pretrained(matmul_precision=...)``."""
        return self._matmul_precision

    @property
    def default_scheduler(self) -> str:
        """The scheduler a call without ``scheduler=`` uses: the model's sdjax.json, else its
        scheduler config's class."""
        return (self.sampling_settings()["scheduler"]
                or default_scheduler_name(self.scheduler_config))

    def sampling_settings(self, **given: Any) -> dict[str, Any]:
        """The settings a call with these arguments uses (None or absent = not given): each
        of sdjax.model_defaults.LIBRARY_DEFAULTS from the arguments, else the model's
        sdjax.json, else the class's defaults, else the library's."""
        return model_defaults.resolve(given, self.model_defaults, self.class_defaults)

    @property
    def max_prompt_tokens(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def compile_count(self) -> int:
        """Sampler executables this pipeline has compiled: one per static shape (size, steps,
        scheduler, batch), never more for new prompts, seeds or guidance scales."""
        return sum(fn.is_compiled for fn in self._compiled.values())

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, channels) of the latents the UNet denoises for an image of this size."""
        f = self.vae_scale_factor
        return (height // f, width // f, self.vae_config.latent_channels)

    # ------------------------------------------------------------------ host side
    def tokenize(self, prompts: Sequence[str],
                 chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, weights float32), each (len(prompts), chunks, 77): the prompts in
        the WebUI's syntax and 75-token chunks (``sdjax.prompts``), every prompt's chunks
        repeated to ``chunks`` (default: the bucket these prompts need)."""
        return prompt_syntax.prompt_arrays(prompts, self.tokenizer, chunks,
                                           prompt_syntax.expander(self.store.embedding_tokens))

    def prompt_layout(self, prompts: Sequence[str], negatives: Sequence[str],
                      steps: int | None = None, scheduler: str | None = None) -> tuple:
        """What the text of a call of these prompts (one negative per prompt) compiles to:
        (chunks per prompt, distinct prompts per schedule, AND parts, composable guidance;
        sdjax.prompt_editing.layout). Calls that agree on it merge into one program without
        failing (sdjax.serve groups requests by it). ValueError past the stated limits."""
        steps, sched = self._schedule(steps, scheduler)
        return prompt_editing.layout(self.tokenize, prompts, negatives, steps * sched.order)

    def check_size(self, height: int, width: int) -> None:
        task_inputs.check_size(height, width, self.vae_scale_factor)

    def prepare(self, num_prompts: int = 1, num_images_per_prompt: int = 1, *,
                num_inference_steps: int | None = None, scheduler: str | None = None,
                height: int | None = None, width: int | None = None,
                schedule_type: str | None = None, sampler_options=None, **options) -> TaskInputs:
        """The host side of a call's task (:class:`sdjax.task_inputs.TaskInputs`: the task,
        its batched arrays, the span of the schedule, the output size, the post-processing)
        for ``num_prompts * num_images_per_prompt`` images; ``options`` are the fields of
        :class:`sdjax.task_inputs.TaskOptions` (``image``, ``mask_image``, ``strength``, ...),
        with :meth:`submit`'s meanings. Raises ``ValueError``/``TypeError`` naming the
        argument. A call takes the value as ``task_inputs=`` and does not prepare again; several
        requests' values that share task, size and span join with ``TaskInputs.concat``."""
        steps, sched = self._schedule(num_inference_steps, scheduler, schedule_type,
                                      sampler_options)
        return self._prepare_request(build(
            task_inputs.TaskRequest, "prepare", num_prompts=num_prompts,
            num_images_per_prompt=num_images_per_prompt, steps=steps, scheduler=sched,
            height=height, width=width, **options))

    def _prepare_request(self, request: task_inputs.TaskRequest) -> TaskInputs:
        inputs = self._prepare_task(request)
        self.check_size(inputs.height, inputs.width)
        return inputs

    def _prepare_task(self, request: task_inputs.TaskRequest) -> TaskInputs:
        """The class's own task inputs (the x4 upscaler has its own)."""
        model = task_inputs.ImageModel(
            self.unet_config.in_channels, self.vae_config.latent_channels,
            self.vae_scale_factor, self.default_hw)
        return task_inputs.prepare(model, request)

    def _schedule(self, steps: int | None, scheduler: str | None, schedule_type: str | None = None,
                  sampler_options=None) -> tuple[int, Any]:
        """(steps, the scheduler object) a call with these arguments uses; a WebUI sampler
        name takes a WebUI ``schedule_type`` and the WebUI's ``sampler_options``."""
        settings = self.sampling_settings(num_inference_steps=steps, scheduler=scheduler)
        steps = validation.check_int(settings["num_inference_steps"], "num_inference_steps",
                                     minimum=1)
        name = validation.check_choice(settings["scheduler"], "scheduler", ALL_SCHEDULER_NAMES,
                                       allow_none=True)
        return steps, get_scheduler(name or default_scheduler_name(self.scheduler_config),
                                    self.scheduler_config, schedule_type=schedule_type,
                                    sdxl=self.SDXL, options=sampler_options)

    @takes_call
    def __call__(self, call: Call) -> PipelineOutput:
        """Generate images: :meth:`submit`, then wait for its result."""
        return self.submit(call).result()

    @takes_call
    def submit(self, call: Call) -> PendingImages:
        """Start generating ``len(prompt) * num_images_per_prompt`` images and return at once
        (JAX dispatches asynchronously); ``.result()`` waits and brings them to the host.
        Submitting the next batch before taking this one's result keeps the devices busy
        while the host encodes and writes. The arguments are :class:`sdjax.call.Call`'s
        fields; docs/python-api.md says what each means. Wrong argument types raise
        ``TypeError`` and wrong values ``ValueError``, naming the argument, before anything
        compiles; nothing a user changes between calls (prompts, seeds, guidance, strength,
        images) recompiles. With ``hires_scale`` or ``hires_size`` the first pass runs here
        and the hires pass is submitted (sdjax.hires)."""
        if call.hires_scale is not None or call.hires_size is not None:
            return hires.submit(self, call)
        fn, call_args, n, finish, seeds = self._plan(call)
        if self.store.pending:
            if self.store.loading:
                # Weights still loading in the background: compile (or fetch from the
                # cache) against their shapes meanwhile.
                fn.compile(*call_args)
            self.wait_for_weights()
            # The parameters as they are now: read, and with any pending LoRA merge done.
            call_args = (self.store.current, *call_args[1:])
        return PendingImages(fn(*call_args), n, finish, seeds)

    @takes_call
    def compile(self, call: Call) -> jax.stages.Compiled:
        """The compiled sampler that :meth:`submit` with the same arguments runs, compiled now
        if this process has not yet (the time counts in ``compile_seconds``); nothing runs.
        For tools: XLA's ``cost_analysis()`` and ``memory_analysis()`` of the whole call, or
        checking that a batch fits before running it."""
        fn, call_args, *_ = self._plan(call)
        return fn.compile(*call_args)

    @takes_call
    def lower(self, call: Call) -> jax.stages.Lowered:
        """The sampler that :meth:`submit` with the same arguments runs, traced and lowered but
        not compiled: its StableHLO (``as_text()``) as XLA receives it, in seconds."""
        fn, call_args, *_ = self._plan(call)
        return fn.lower(*call_args)

    def _plan(self, c: Call):
        """Validate and place a call's arguments; returns (executable, its arguments, image
        count, host post-processing of the images or None, the seed of each image)."""
        if c.output_type not in ("uint8", "float", "latent"):
            raise ValueError(f"output_type must be 'uint8', 'float' or 'latent', not "
                             f"{c.output_type!r}")
        hires.check_one_pass(c)
        settings = self.sampling_settings(
            num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
            scheduler=c.scheduler, guidance_rescale=c.guidance_rescale,
            guidance_interval=c.guidance_interval, clip_skip=c.clip_skip)
        steps = settings["num_inference_steps"]
        prompts, negatives, seeds, guidance = validation.check_call(
            prompt=c.prompt, negative_prompt=c.negative_prompt, num_inference_steps=steps,
            guidance_scale=settings["guidance_scale"], height=c.height, width=c.width,
            num_images_per_prompt=c.num_images_per_prompt, seed=c.seed, seeds=c.seeds,
            image_indices=c.image_indices, scheduler=settings["scheduler"],
            scheduler_names=ALL_SCHEDULER_NAMES, factor=self.vae_scale_factor)
        steps, sched = self._schedule(steps, settings["scheduler"], c.schedule_type,
                                      c.sampler_options)
        clip_skip = validation.check_int(
            1 if settings["clip_skip"] is None else settings["clip_skip"], "clip_skip", minimum=1,
            maximum=self.text_encoder_config.num_hidden_layers)
        n = len(prompts) * c.num_images_per_prompt
        guidance, cfg = sampling.guidance_array(guidance, settings["guidance_rescale"],
                                                settings["guidance_interval"], n)
        cfg = cfg or getattr(sched, "needs_uncond", False)  # DDIM CFG++: always
        if c.denoising_start is not None and c.latents is not None:
            raise ValueError("with denoising_start no noise is added to the image, so "
                             "latents= (that noise) does not apply; pass the latents to "
                             "start from as image=")
        if c.task_inputs is None:  # the steps and scheduler as resolved above
            height, width = controlnets.call_size(self, c)
            prepared = self._prepare_request(task_inputs.TaskRequest(
                num_prompts=len(prompts), num_images_per_prompt=c.num_images_per_prompt,
                steps=steps, scheduler=sched, height=height, width=width,
                **c.task_options()))
        else:
            prepared = c.given_task_inputs(n)
        if prepared.finish is not None and c.output_type != "uint8":
            raise ValueError("padding_mask_crop pastes uint8 images back: output_type must be "
                             "'uint8'")
        height, width = prepared.height, prepared.width
        # Prompt editing, alternation and AND (None: no prompt uses them; the WebUI doubles the
        # steps of samplers with two evaluations per step).
        stack = prompt_editing.plan(prompts, negatives, steps * sched.order,
                                    c.first_pass_steps)
        inputs = dict(prepared.arrays)
        if stack is None:
            # One chunk count for prompts and negative prompts alike (sdjax.prompts).
            text = self.tokenize(prompts + negatives)
            chunks = text[0].shape[1]
        else:
            text, chunks = stack.token_arrays(self.tokenize)
            inputs.update(stack.inputs(c.num_images_per_prompt))
            cfg = cfg or stack.composable  # the composable sum needs the unconditional pass
        inputs.update(controlnets.call_inputs(self, c, prepared, len(prompts), steps, sched))
        inputs.update(self._conditioning_inputs(
            prompts, negatives, c.num_images_per_prompt, height, width,
            c.negative_prompt is None, chunks=chunks, stack=stack, **c.sdxl_arguments()))
        text = tuple(np.repeat(a, c.num_images_per_prompt, axis=0) for a in text)
        if seeds is None:
            seeds = [parallel.random_seed(c.seed)] * n
        image_indices = range(n) if c.image_indices is None else c.image_indices
        lat_shape = self.latent_shape(height, width)
        rng, seed_resize = self._noise_inputs(c, n, lat_shape, inputs)
        previews.call_inputs(c.on_step, n, lat_shape, self.SDXL, inputs)
        # The noise given or not, one program (sdjax.sampling: bit for bit either way).
        inputs["latents"] = (np.zeros((n, *lat_shape), np.float32) if c.latents is None else
                             validation.check_latents(c.latents, (n, *lat_shape)))
        inputs["latents_given"] = np.full((n,), c.latents is not None)

        size, per_device, chunk = sampling.batch_shape(
            n, self.mesh, c.batch_size_per_device, c.decode_chunk, height * width)
        spec = sampling.CoreSpec(lat_shape, sched, steps, per_device, chunk, c.output_type,
                                 prepared.task, tuple(sorted(inputs)), bool(c.nan_check),
                                 cfg=cfg, clip_skip=clip_skip, text_chunks=chunks,
                                 stops_early=prepared.stop is not None, tiling=bool(c.tiling),
                                 rng=rng, seed_resize=seed_resize,
                                 controlnets=len(self._controlnets),
                                 **({} if stack is None else stack.spec_fields()))
        if c.tiling and prepared.task.decode_tiles is not None:
            raise ValueError("tiling wraps the whole image: it does not go with the tiled "
                             "VAE decode (vae_tiling=False)")

        def pad(x):
            return parallel.put_batch(parallel.pad_batch(np.asarray(x), size), self.mesh)

        ids = tuple(pad(a[:n]) for a in text)  # text rows: [prompts; negatives], per image
        neg_ids = tuple(pad(a[n:]) for a in text)
        seed_arr = pad(np.asarray(seeds, np.int64).astype(np.uint32))
        index_arr = pad(np.asarray(image_indices, np.int64).astype(np.uint32))
        guidance = pad(guidance)
        span_values = np.asarray([prepared.start, prepared.stop or 0], np.int32)
        # Built per shard like the batch, so multi-host runs never put to another host's device.
        span = jax.make_array_from_callback((2,), parallel.replicated(self.mesh),
                                            lambda idx: span_values[idx])
        placed = {k: pad(v) for k, v in inputs.items()}
        return (self._executable(spec),
                (self.store.current, ids, neg_ids, guidance, seed_arr, index_arr, span, placed),
                n, prepared.finish, list(seeds))

    def _noise_inputs(self, c: Call, n: int, lat_shape: tuple[int, int, int],
                      inputs: dict) -> tuple[str, tuple[int, int] | None]:
        """The call's rng and seed-resize size; adds its variation seeds and ENSD to
        ``inputs`` (sdjax.noise_call)."""
        return noise_call.call_inputs(c, n, lat_shape, self.vae_scale_factor, inputs)

    def noise(self, seeds, height: int, width: int, subseeds=None, subseed_strength=0.0,
              seed_resize_from=None, rng: str = "jax", *, image_indices=None) -> np.ndarray:
        """The unscaled N(0, 1) start noise (N, h, w, C) a call draws, one per seed:
        ``pipe(..., seed=s) == pipe(..., latents=pipe.noise([s], ...))`` bit for bit
        (:func:`sdjax.noise_call.noise` says which image of which call each one is)."""
        return noise_call.noise(self, seeds, height, width, subseeds, subseed_strength,
                                seed_resize_from, rng, image_indices)

    def _conditioning_inputs(self, prompts: list[str], negatives: list[str], per_prompt: int,
                             height: int, width: int, no_negative: bool, chunks: int,
                             stack: prompt_editing.PromptStack | None = None, **sdxl) -> dict:
        """Batched inputs (one row per image) that the conditioning needs besides the token
        ids; none for SD 1.x/2.x, which refuse SDXL's arguments (see sdjax.sdxl). ``stack``:
        the prompts' editing and AND layout (sdjax.prompt_editing), None for plain prompts."""
        if sdxl:
            raise ValueError(f"{next(iter(sdxl))} is for SDXL models (their second text "
                             "encoder and added conditioning); this is an SD 1.x/2.x model")
        return {}

    # ------------------------------------------------------------------ compiled part
    def _executable(self, spec: sampling.CoreSpec) -> sampling.Executable:
        fn = self._compiled.get(spec)
        if fn is None:
            nets = self._networks(spec)
            t0 = time.perf_counter()  # host-side tables (every start's schedule) count too
            fn = sampling.build(spec, nets, self.mesh, on_compile=self._count_compile,
                                precision=self.matmul_precision)
            self._count_compile(time.perf_counter() - t0)
            self._compiled[spec] = fn
        return fn

    def _networks(self, spec: sampling.CoreSpec) -> sampling.Networks:
        """The networks and the denoiser seam's plug-ins a spec's program uses (docs/
        architecture.md: how a per-step input plugs in)."""
        return prompt_editing.plug_in(
            sampling.Networks(self.store.graphdefs, self.dtype,
                              self.vae_config.scaling_factor, encoder=self._encode,
                              residuals=controlnets.residual_sources(self, spec.controlnets)),
            spec)

    # The conditioning of sampling.Networks.encode; None: one text encoder's last states.
    _encode = None

    def _count_compile(self, seconds: float) -> None:
        self.compile_seconds += seconds


__all__ = ["StableDiffusionPipeline", "PipelineOutput", "PendingImages", "NonFiniteError",
           "SCHEDULER_NAMES", "MATMUL_PRECISIONS", "parse_dtype", "SDXL_FIELDS"]
